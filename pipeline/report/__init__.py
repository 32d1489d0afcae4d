"""``sppscl report``: one self-contained HTML file for a run, several runs, a sweep, a cv or a reproduce folder, or a
sweep's study in a database.

The page is a Jinja2 template (``template.html.j2``) with its style, its one small script (sortable tables) and
every chart (matplotlib, PNG) inline. A Content-Security-Policy in the page forbids every network load: only
``data:`` images, and the inline style and script named by their SHA-256, may run; nothing else is fetched.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import sys
import tempfile
from pathlib import Path

from ..errors import masked_argv, printable
from ..outputs import atomic_write, check_output_file, check_output_folder
from .collect import COMMANDS_FILE, ReportError, Section, sections_for, study_section

HERE = Path(__file__).parent
REPORT_FILE = "report.html"

__all__ = ["COMMANDS_FILE", "REPORT_FILE", "ReportError", "build_report", "record_command", "render", "write_report"]


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy(style: str, script: str) -> str:
    """Nothing from any network: default-src 'none'; images only as data: URIs; the inline style and script only."""
    return (
        f"default-src 'none'; img-src data:; style-src {_sha256(style)}; script-src {_sha256(script)}; "
        "base-uri 'none'; form-action 'none'; connect-src 'none'"
    )


def render(sections: list[Section], title: str, sources: list[str]) -> str:
    """The report's HTML."""
    import jinja2
    from markupsafe import Markup

    from .. import __version__

    # autoescape: every value from data (run names, paths, class names, commands) is HTML-escaped; finalize shows its
    # control characters escaped first (a bidirectional override would reorder what the page shows)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE), autoescape=True, undefined=jinja2.StrictUndefined,
        finalize=lambda v: v if isinstance(v, Markup) or not isinstance(v, str) else printable(v),
    )
    style = (HERE / "style.css").read_text()
    script = (HERE / "sort.js").read_text()
    return env.get_template("template.html.j2").render(
        title=title,
        sections=sections,
        sources=sources,
        version=__version__,
        made=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # trusted files of this package, inserted verbatim (escaping would change what their hashes cover)
        style=Markup(style),
        script=Markup(script),
        csp=content_security_policy(style, script),
    )


def build_report(paths: list[Path], storage: str | None = None, study: str | None = None, title: str | None = None) -> str:
    """The HTML for ``paths`` (run, sweep, cv, reproduce folders) and, with ``storage`` and ``study``, a sweep study."""
    paths = [Path(p) for p in paths]
    if not paths and storage is None:
        raise ReportError("give one or more run, sweep, cv or reproduce folders, or --storage and --study")
    if storage is not None and not study:
        raise ReportError("--storage needs --study (the study's name)")
    sections = sections_for(paths)
    sources = [str(p) for p in paths]
    if storage is not None:
        with tempfile.TemporaryDirectory(prefix="sppscl-report-") as tmp:
            sections.append(study_section(storage, study, Path(tmp)))
        sources.append(f"study {study}")
    if title is None:
        title = sections[0].title if len(sections) == 1 else f"sppscl report: {len(sections)} parts"
    return render(sections, title, sources)


def write_report(paths: list[Path], out: Path, storage: str | None = None, study: str | None = None, title: str | None = None) -> Path:
    """Write the report to ``out`` at once (a failure leaves the previous report whole). What is at ``out`` is checked
    before the report is built (a FIFO, a folder or a link there is refused before any work)."""
    out = Path(out)
    check_output_file(out, "the report")
    atomic_write(out, build_report(paths, storage, study, title), "the report")
    return out


def record_command(folder: Path, argv: list[str] | None = None) -> None:
    """Append the command that ran to ``folder/commands.txt`` (the report's 'commands that made it')."""
    import shlex

    argv = sys.argv[1:] if argv is None else argv
    folder = Path(folder)
    check_output_folder(folder, "the command record")
    folder.mkdir(parents=True, exist_ok=True)
    check_output_file(folder / COMMANDS_FILE, "the command record", flag="")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # a --storage URL is recorded with its password masked
    with open(folder / COMMANDS_FILE, "a") as fh:
        fh.write(f"# {stamp}\nsppscl {shlex.join(masked_argv(argv))}\n")
