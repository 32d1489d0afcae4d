"""The project's error types, and how an error the user can act on becomes one line and an exit code.

Exit codes (every command, see ``sppscl.cli.main``):

* 0: done.
* 1: the run was tried and failed: the disk filled up, ``data verify`` found problems, a sweep run failed,
  or an internal error (a bug: rerun with ``--debug`` and report the traceback).
* 2: the command cannot run as given: a bad input file, option, ``--set`` value or output location.
* 130: interrupted (Ctrl-C); rerun the same command to resume.

Every error type the user can act on derives from :class:`SppsclError`; its message names the file, the
row/id/key and what to do, and ``exit_code`` says which of the codes above it means.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# errnos that mean "the disk (or the user's quota) is full"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class SppsclError(Exception):
    """An error the user can act on; the message says what, where (file/row/id/key) and what to do."""

    exit_code = EXIT_USAGE


class OutputError(SppsclError):
    """An output location cannot be written (no permission, read-only, a file where a folder should be)."""


class DiskFullError(SppsclError):
    """The disk filled up while writing; what was written before is kept and the run resumes once space is freed."""

    exit_code = EXIT_FAILED


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing ancestor), or None if unknown."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"


def os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, also when h5py reports it only in its message ("errno = 28")."""
    if not isinstance(e, OSError):
        return None
    if e.errno is not None:
        return e.errno
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def is_disk_full(e: BaseException) -> bool:
    return os_errno(e) in _FULL


def disk_full(path: Path, needed: int | None, resume: str, free: int | None = None) -> DiskFullError:
    """The error for a full disk at ``path``: free space now, the bytes the write needed, and how to resume."""
    free = free_bytes(path) if free is None else free
    have = "unknown" if free is None else human_bytes(free)
    need = f"; this write needs about {human_bytes(needed)}" if needed else ""
    return DiskFullError(f"{path}: no space left on the device ({have} free{need}). Free some space, then {resume}.")


class InputError(SppsclError):
    """An input path names something that is not a readable regular file (a FIFO, a device, a folder, a link loop)."""


# the longest value an error message echoes: a hostile file can hold a value of any size
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (with how much was left out): a message never
    renders an unbounded value. Containers are cut before ``repr`` walks them, so a huge or deep one costs nothing."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > limit:
        return f"<a {type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def shown_key(value: object) -> str:
    """A key name for an error message: as is when it is a short string, else :func:`shown`."""
    return value if isinstance(value, str) and len(value) <= SHOWN_CHARS else shown(value)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a FIFO (named pipe)", "a character device", ...)."""
    for test, words in (
        (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "a special file"


def _check_input_kind(path: Path, what: str, is_kind) -> bool:
    """Refuse ``path`` unless ``is_kind(mode)`` holds for what it is (links followed): decided from ``stat``, before
    any open, so a FIFO never blocks the command and a device is never read. Returns False when nothing is there (the
    caller says what is missing in its own words)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:  # ELOOP: a link loop; EACCES; ENAMETOOLONG
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not is_kind(mode):
        raise InputError(f"{path} is {file_kind(mode)}, not {what}; refused, not opened")
    return True


def check_input_file(path: Path, what: str) -> bool:
    """Refuse ``path`` unless it is (a link that leads to) a regular file; False when nothing is there."""
    return _check_input_kind(path, what, stat.S_ISREG)


def check_input_folder(path: Path, what: str) -> bool:
    """Refuse ``path`` unless it is (a link that leads to) a folder: a FIFO, device or file given where a folder is
    expected is named as what it is. False when nothing is there."""
    return _check_input_kind(path, what, stat.S_ISDIR)


# C0/C1 control characters (ESC starts a terminal escape sequence) and the bidirectional overrides that reorder what
# a terminal shows; newline and tab keep their meaning
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}
_UNPRINTABLE.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def printable(text: str) -> str:
    """``text`` from data (an id, a file name, a reason) made safe for a terminal: control characters shown escaped
    (``\\x1b``), never sent raw, so an id cannot move the cursor, recolour or hide what the console shows."""
    return str(text).translate(_UNPRINTABLE)


def safe(text: object) -> str:
    """Text from data for a rich console or table (a run name, a path, a class name, an id): rich markup escaped (so
    ``[red]`` or ``[/]`` in a name is shown, never applied nor a crash) and control characters shown escaped
    (:func:`printable`). The one helper every console line and table cell built from data goes through."""
    from rich.markup import escape

    return escape(printable(str(text)))


def masked_url(url: str) -> str:
    """A storage URL as it may be shown (console, logs, errors, records): SQLAlchemy's own rendering with the password
    as ``***``. A URL SQLAlchemy cannot parse is not shown at all: it might hold a password in an unknown place."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<the --storage URL (not a URL SQLAlchemy can read, so not shown)>"


def masked_argv(argv: list[str]) -> list[str]:
    """A command line as it may be recorded: the value of ``--storage`` (``--storage URL`` or ``--storage=URL``) masked."""
    out, mask_next = [], False
    for arg in argv:
        if mask_next:
            out.append(masked_url(arg))
        elif arg.startswith("--storage="):
            out.append("--storage=" + masked_url(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        mask_next = arg == "--storage"
    return out
