"""Where sppscl writes: one check of every output target, and writes that replace a file all or nothing.

Every command that writes asks :func:`check_output_file` or :func:`check_output_folder` about its target before
any work starts (``--force`` included), and every file is written through :func:`atomic_write`, which asks again.
What is at the target decides (``os.lstat``: a symbolic link is judged as a link, never followed):

* nothing: written;
* a regular file where a file is expected: replaced when the command was told to (``--force``, or an output the
  command always rewrites, such as ``results.json``); a damaged cache is a regular file, so ``--force`` still works;
* a folder where a folder is expected: written into (a run folder only when it holds nothing or that kind of output);
* anything else is refused with one line saying what is there: a device node, a FIFO or a socket (writing would
  hang on it or replace a system file), a folder where a file is expected and a file where a folder is expected,
  and a symbolic link (it leads elsewhere: writing through it changes a file that is not the run's, replacing it
  drops the link). The temporary siblings sppscl writes first (``NAME.tmp``, ``NAME.partial``, ``NAME.lock``) get
  the same check, so a planted link there cannot redirect a write either.

docs/safety.md lists what is refused and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from .errors import OutputError, SppsclError, disk_full, file_kind, is_disk_full

# shown for a path that names standard output (``predict --out -``)
STDOUT = "-"


def what_is_at(path: Path) -> str | None:
    """What occupies ``path`` in words ("a FIFO (named pipe)", "a symbolic link to /x", "a folder", ...), judged
    without following a link; None when nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # a loop in a parent's links, a path too long, no permission to look
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symbolic link to {os.readlink(path)}"
        except OSError:
            return "a symbolic link"
    return file_kind(st.st_mode)


def check_output_file(path: Path, what: str, flag: str = "--out") -> bool:
    """Refuse ``path`` as the place for the file ``what`` unless nothing or a regular file is there (see the module
    docstring); returns whether a regular file is there. Raises :class:`OutputError` (exit 2)."""
    there = what_is_at(Path(path))
    if there is None:
        return False
    if there == "a regular file":
        return True
    label = f"{flag} {path}" if flag else str(path)
    raise OutputError(f"{label} is {there}; refusing to write {what} there (--force does not change this). Choose another location.")


def check_output_folder(path: Path, what: str, flag: str = "--out", markers: tuple[str, ...] = ()) -> bool:
    """Refuse ``path`` as the folder for ``what`` unless nothing or a real folder is there; with ``markers``, a folder
    that holds files must hold one of them (it is that kind of output). Returns whether the folder exists."""
    path = Path(path)
    there = what_is_at(path)
    label = f"{flag} {path}" if flag else str(path)
    if there is None:
        return False
    if there != "a folder":
        raise OutputError(f"{label} is {there}, not a folder; refusing to write {what} there. Choose another location.")
    if markers:
        try:
            entries = sorted(p.name for p in path.iterdir())
        except OSError as e:
            raise OutputError(f"{label}: cannot list the folder ({e.strerror or e}). Choose another location.") from None
        if entries and not any(m in entries for m in markers):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(
                f"{label} is a folder holding other files ({shown}), not {what}; refusing to write into it. Choose a new or empty folder."
            )
    return True


def check_writable_dir(folder: Path, what: str) -> None:
    """Refuse early (before hours of work) when ``folder`` cannot be created or written."""
    folder = Path(os.path.abspath(folder))
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        there = what_is_at(p) or "missing"
        raise OutputError(f"cannot write {what} in {folder}: {p} is {there}, not a folder. Choose another location.")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} in {folder}: {p} is not writable. Choose another location or fix its permissions.")


def output_error(path: Path, e: OSError, what: str) -> SppsclError:
    """An OSError while writing ``path`` as one message: a full disk (exit 1) or an unwritable location (exit 2)."""
    if is_disk_full(e):
        return disk_full(path, None, "rerun the same command")
    reason = e.strerror or str(e)
    return OutputError(f"cannot write {what} {path}: {reason}. Choose another location or fix its permissions.")


def fresh_temp(path: Path, what: str) -> Path:
    """Clear the way for the temporary sibling ``path`` sppscl is about to create: a stale regular file from an
    interrupted run is removed; anything else there is refused (a link planted there would redirect the write)."""
    if check_output_file(path, what, flag=""):
        path.unlink()
    return path


def atomic_write(path: Path, data: bytes | str, what: str, resume: str = "rerun the same command", shared: bool = False) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file, fsync, then rename over ``path``.

    ``shared``: several processes may write ``path`` at once (a runs folder's cache record, a probe result shared
    by two commands): each gets its own temporary file, so neither renames the other's away.

    ``path`` must hold nothing or a regular file (:func:`check_output_file`). On any write failure the temporary
    file is removed (so no stray file confuses the next run), the old ``path`` is untouched, and the error names
    ``path``; a full disk says how many bytes were needed.
    """
    path = Path(path)
    check_output_file(path, what, flag="")
    # a lone surrogate (from JSON's \\ud800) is written escaped rather than failing the whole file
    raw = data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh_temp(tmp, what)
        # "x": created new (O_EXCL), so never through a link nor into a FIFO that appeared since the check
        with open(tmp, "xb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            if what_is_at(tmp) == "a regular file":
                tmp.unlink()
        if is_disk_full(e):
            raise disk_full(path, len(raw), resume) from None
        raise output_error(path, e, what) from None


def read_stored_json(path: Path) -> dict | None:
    """A JSON object sppscl wrote earlier to skip work next time (a stored ensemble, the probe's folds), or None when
    there is none to trust: absent, not a regular file (a FIFO would block the read; never opened), damaged, not
    UTF-8, nested too deeply or not an object. The work is then done again, and the write that follows refuses
    anything but a regular file at ``path`` with one line."""
    try:
        if what_is_at(Path(path)) != "a regular file":
            return None
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------ CSV from data

# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), +1+1, @SUM(...)); OWASP's
# advice for CSV injection: put a single quote in front, which the spreadsheet shows and never runs.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """``value`` as it goes into a CSV cell: text a spreadsheet would run as a formula gets a leading ``'``; numbers
    (negative ones too) are written as numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(header: list[str], rows) -> str:
    """A whole CSV (header, then ``rows`` of cells) as text, every cell through :func:`csv_cell`."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow([csv_cell(h) for h in header])
    for r in rows:
        w.writerow([csv_cell(v) for v in r])
    return buf.getvalue()


def save_figure(fig, path: Path, what: str = "the figure", **savefig_kwargs) -> None:
    """A matplotlib figure rendered in memory and written like every other file (:func:`atomic_write`)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write(Path(path), buf.getvalue(), what)
