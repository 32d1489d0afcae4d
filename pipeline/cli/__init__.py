"""The ``sppscl`` command line, one module per command group over the library (see ``root`` for errors and exit codes).

``root`` builds the app from the groups and is the one place errors become messages; the groups never import it.
"""

from .root import app, main, run

__all__ = ["app", "main", "run"]
