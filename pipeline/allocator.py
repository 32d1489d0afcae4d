"""Keep glibc's malloc from handing tensor-sized blocks back to the kernel after every free (issue 13).

Why: glibc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and unmaps it on ``free``, and it returns the heap's free top to the kernel once it
exceeds ``M_TRIM_THRESHOLD``. A CNN forward allocates and frees activations of tens of MB per batch, so each
batch maps new pages that the kernel must zero on first touch: on EfficientNet-Lite0 + MiniLM-L6 that was
~26,000 minor page faults per sample and ~44% of the process's CPU time in the kernel. Fixing both thresholds
high keeps freed blocks in the heap, where the next batch reuses them without a system call. The price: the
process keeps its peak heap until it exits instead of shrinking between batches (docs/performance.md).

The setting is process-wide and applies to allocations made after it, so it is made once, where a command
starts. It is a no-op off glibc, when another allocator (jemalloc, tcmalloc, mimalloc) is loaded, and for
each threshold the user already set through glibc's environment variables or ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap: a larger one costs so much compute that its mmap is noise.
HIGH_THRESHOLD = 1 << 30
# glibc before 2.35 refuses an mmap threshold above half its 64 MiB arena heap size.
OLD_GLIBC_MMAP_MAX = 32 << 20
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# (mallopt parameter, environment variable, GLIBC_TUNABLES name) per threshold.
_PARAMETERS = (
    (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)


@dataclass(frozen=True)
class AllocatorSetting:
    """What :func:`keep_freed_memory` did: ``applied`` thresholds by name, or why it did nothing."""

    applied: dict[str, int]
    reason: str = ""


_done: AllocatorSetting | None = None


def _other_allocator() -> str | None:
    """Name of a malloc replacement mapped into this process (preloaded or linked), if any."""
    maps = Path("/proc/self/maps")
    try:
        text = maps.read_text()
    except OSError:
        text = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _OTHER_ALLOCATORS if name in text), None)


def _user_set(env_var: str, tunable: str) -> bool:
    return env_var in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> AllocatorSetting:
    """Fix glibc's mmap and trim thresholds high (once per process); see the module docstring for why."""
    global _done
    if _done is not None:
        return _done
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _done = AllocatorSetting({}, "not glibc")
        return _done
    other = _other_allocator()
    if other:
        _done = AllocatorSetting({}, f"{other} is loaded")
        return _done
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied, kept = {}, []
    for param, env_var, tunable in _PARAMETERS:
        if _user_set(env_var, tunable):
            kept.append(env_var)
            continue
        if libc.mallopt(param, HIGH_THRESHOLD):
            applied[env_var] = HIGH_THRESHOLD
        elif param == M_MMAP_THRESHOLD and libc.mallopt(param, OLD_GLIBC_MMAP_MAX):
            applied[env_var] = OLD_GLIBC_MMAP_MAX
    _done = AllocatorSetting(applied, f"user settings kept: {', '.join(kept)}" if kept else "")
    return _done
