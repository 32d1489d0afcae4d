"""The lock that keeps uncoordinated writers of one cache apart (two ``extract`` or ``cache merge`` commands on one
``--out``), and the holder record it shows to the one refused."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..cache import CacheError
from ..outputs import check_output_file


class CacheLocked(CacheError):
    """Another process is writing this cache."""


class CacheLock:
    """An exclusive ``flock`` on ``<cache>.lock``, taken before the cache is opened for writing.

    The kernel drops the lock when its holder exits, however it exits (``kill -9`` included), so a stale lock
    file never blocks anyone. The holder writes its pid, host and start time into the file for the refusal
    message. Removing the file on release races with a process that opened it just before: each acquirer
    therefore checks that the file it locked is still the one at the path (the usual open-lock-stat loop).
    On NFS, Linux implements ``flock`` with byte-range locks, so the lock holds across machines too.
    """

    def __init__(self, target: Path, fd: int, path: Path):
        self.target, self._fd, self.path = target, fd, path

    @classmethod
    def acquire(cls, target: Path) -> "CacheLock":
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        path = target.with_name(target.name + ".lock")
        while True:
            check_output_file(path, "the cache's lock", flag="")
            # never through a link planted at the lock's name (truncating its target) nor into a FIFO
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CacheLocked(
                    f"{target} is being written by another process ({holder}); refusing to touch it. Wait for that "
                    f"process to finish (or stop it), then rerun: an unfinished cache continues where it stopped. Lock: {path}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        return cls(target, fd, path)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "CacheLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (ValueError, KeyError, OSError):
        return "holder not yet recorded: it has only just started"
