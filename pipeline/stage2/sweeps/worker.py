"""The worker side of a sweep: a process that opens the cache once and trains one run after another.

Worker processes open the cache once (a pool initializer) and keep its splits for every run they do, so a
sweep reads the cache once per worker, not once per run.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import FeatureCache, SplitData
from ..train import train
from .spec import run_config


class SharedCache(FeatureCache):
    """A FeatureCache that reads each split once and hands the same arrays to every run in its process.

    ``memory_budget`` is this process's share of the stage-two memory budget: with many workers a split that
    does not fit in each one's share is streamed instead, and the OS page cache then holds one copy for all."""

    def __init__(self, path: str | Path, memory_budget: int | None = None):
        super().__init__(path)
        self._budget = memory_budget
        self._loaded: dict[tuple[str, bool | None], SplitData] = {}

    def load(self, split: str, in_memory: bool | None = None, memory_budget: int | None = None) -> SplitData:
        key = (split, in_memory)
        if key not in self._loaded:
            self._loaded[key] = super().load(split, in_memory, memory_budget if memory_budget is not None else self._budget)
        return self._loaded[key]


@dataclass(frozen=True)
class RunJob:
    run_dir: str
    base: dict  # Config.to_dict() of the sweep's base configuration
    overrides: dict
    seed: int


_WORKER_CACHE: SharedCache | None = None


def init_worker(cache_path: str, threads: int, memory_budget: int) -> None:
    global _WORKER_CACHE
    # each worker gets its share of the cores: N workers x all cores would oversubscribe the CPU
    torch.set_num_threads(threads)
    _WORKER_CACHE = SharedCache(cache_path, memory_budget)


def run_job(job: RunJob, cache: FeatureCache | None = None) -> dict:
    """One quiet training run. Never raises: a failure comes back as its error, with the traceback in error.txt."""
    run_dir = Path(job.run_dir)
    t0 = time.perf_counter()
    try:
        train(cache if cache is not None else _WORKER_CACHE, run_config(job.base, job.overrides, job.seed), run_dir, progress=False)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(error + "\n\n" + traceback.format_exc())
        return {"status": "failed", "error": error, "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    (run_dir / "sweep-run.json").write_text(json.dumps({"wall_s": wall, "pid": os.getpid()}))
    return {"status": "ok", "error": "", "wall_s": wall}


class InlineExecutor:
    """The executor interface run in this process (``--jobs 1``): no process start-up, the caller's cache reused."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def submit(self, fn, job: RunJob) -> Future:
        fut: Future = Future()
        fut.set_result(fn(job, self.cache))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass



def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
