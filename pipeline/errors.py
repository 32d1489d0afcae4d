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

import contextlib
import errno
import os
import re
import shutil
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


def output_error(path: Path, e: OSError, what: str) -> SppsclError:
    """An OSError while writing ``path`` as one message: a full disk (exit 1) or an unwritable location (exit 2)."""
    if is_disk_full(e):
        return disk_full(path, None, "rerun the same command")
    reason = e.strerror or str(e)
    return OutputError(f"cannot write {what} {path}: {reason}. Choose another location or fix its permissions.")


def check_writable_dir(folder: Path, what: str) -> None:
    """Refuse early (before hours of work) when ``folder`` cannot be created or written."""
    folder = Path(os.path.abspath(folder))
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"cannot write {what} in {folder}: {p} is a file, not a folder. Choose another location.")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} in {folder}: {p} is not writable. Choose another location or fix its permissions.")


def atomic_write(path: Path, data: bytes | str, what: str, resume: str = "rerun the same command", shared: bool = False) -> None:
    """Write ``data`` to ``path`` all or nothing: a temporary file, fsync, then rename over ``path``.

    ``shared``: several processes may write ``path`` at once (a runs folder's cache record, a probe result shared
    by two commands): each gets its own temporary file, so neither renames the other's away.

    On any write failure the temporary file is removed (so no stray file confuses the next run), the old
    ``path`` is untouched, and the error names ``path``; a full disk says how many bytes were needed.
    """
    path = Path(path)
    # a lone surrogate (from JSON's \\ud800) is written escaped rather than failing the whole file
    raw = data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, len(raw), resume) from None
        raise output_error(path, e, what) from None
