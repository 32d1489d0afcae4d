"""One owner per run directory: whoever trains into a run directory holds its lock for the run's whole life.

The lock is an ``flock`` on ``.<run name>.owner`` beside the run directory (``runs/.base-seed1.owner`` for
``runs/base-seed1/``), taken by ``train`` (``sppscl train --out``) and by every sweep
worker (``sweep``, ``cv``, every ``reproduce`` table) before it reads, clears or writes the directory. It goes
with its process, so a run killed by ``kill -9`` leaves no stale lock: the next owner finds an unfinished
directory and trains it again from scratch. A live owner's directory is never cleared by anyone else:

- ``train --out DIR`` refuses a directory another process holds (exit 2, naming the holder);
- a sweep worker waits for the holder, then reuses the run if it finished with valid results (one run shared by
  several tables or commands is trained once), or trains it again if the holder died.

The lock file is beside the directory, not in it, so taking the ownership writes nothing into a run folder (a
refused ``train`` leaves a finished run byte for byte as it was) and the owner may delete and remake the folder.
It stays when its holder is done (removing a lock file lets a third process lock a fresh inode while the old
one is still held); it is hidden. A process holding a directory's lock may take it again (``train`` inside a
sweep worker): nested holds are counted, not re-locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SppsclError
from ..outputs import check_output_file

LOCK_SUFFIX = ".owner"


def lock_path(run_dir: Path) -> Path:
    """Where ``run_dir``'s ownership lock lives: ``<parent>/.<name>.owner``."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.parent / f".{run_dir.name}{LOCK_SUFFIX}"

_held: dict[str, int] = {}  # realpath -> nesting depth, for locks this process holds
_guard = threading.Lock()


class RunInUseError(SppsclError):
    """Another live process owns the run directory (exit 2: the command cannot run as given)."""


def _holder(fh) -> str:
    fh.seek(0)
    return fh.read().strip() or "another process (it has not written its name yet)"


@contextmanager
def own_run(run_dir: Path, wait: bool = False, what: str = "") -> Iterator[None]:
    """Hold ``run_dir``'s ownership for the ``with`` block (its parent is created if missing).

    ``wait``: block until the current holder is gone (sweep workers); otherwise refuse with ``RunInUseError``
    naming the holder (``train --out``). ``what`` describes this holder in the lock file (its command)."""
    lock = lock_path(run_dir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock.resolve())
    with _guard:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    check_output_file(lock, "the run folder's owner lock", flag="")
    fh = open(lock, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RunInUseError(
                    f"{run_dir} is in use by {_holder(fh)}; wait for it to finish or stop it, or choose another --out"
                ) from None
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}" + (f" ({what})" if what else "") + "\n")
        fh.flush()
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[key]
    finally:
        fh.close()  # releases the flock


def holds(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s ownership."""
    lock = lock_path(run_dir)
    return lock.exists() and str(lock.resolve()) in _held


def clear_run(run_dir: Path) -> None:
    """Delete a run directory this process owns (an unfinished or failed run about to be trained again)."""
    import shutil

    if not holds(run_dir):
        raise RuntimeError(f"{run_dir}: cleared without holding its ownership")
    if Path(run_dir).exists():
        shutil.rmtree(run_dir)


def new_run_dir(parent: Path, stem: str) -> Path:
    """A fresh run directory ``<parent>/<stem>-<date>-<time>`` created exclusively: two processes starting in the
    same second get ``...-2``, ``...-3`` instead of one folder."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 10_000):
        path = parent / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SppsclError(f"cannot make a new run directory in {parent}: {base}-1 .. -9999 all exist; give --out")
