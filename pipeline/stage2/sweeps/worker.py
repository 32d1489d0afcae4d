"""The worker side of a sweep: a process that opens the cache once and trains the study's runs one after another.

A worker joins the sweep's study and runs ``study.optimize``: every trial it is given names one (configuration,
seed): a queued trial from its creation, a search's draw once it has drawn; the worker claims it
(``study.claim``), takes the run directory's ownership (``stage2/ownership.py``: it waits while another process
trains that run), trains it (or reuses a finished run directory), and stores the results on the trial. It keeps the cache's splits for all
its runs, so a sweep reads the cache once per worker, not once per run. A worker started by a sweep process dies
with it (``die_with_parent``): a killed sweep leaves no training processes behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, Trial, TrialState

from ...cache import FeatureCache, SplitData, diff_provenance
from ...config import Config
from ...outputs import atomic_write
from ..ownership import clear_run, own_run
from ...errors import SppsclError
from ..provenance import config_as_trained
from ..train import train
from .plans import ListPlan, SearchPlan, run_name
from .spec import SweepError, config_slug, run_config
from .study import RESULT_KEY, all_trials, check_stale, claim, database_error, is_queued, open_storage, requeue
from .tables import read_run

# a worker process's exit status when the shared study's database stopped answering (EX_TEMPFAIL)
EXIT_STORAGE_LOST = 75

# seconds between two looks at a shared study while only runs of other workers are left (one read of its open trials)
WAIT_POLL = 0.25

# placement, not configuration: a run trained on another device or thread count is the same run
PLACEMENT_KEYS = ("device", "threads")


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
class WorkerSpec:
    """Everything a worker process needs (picklable: it crosses the spawn boundary)."""

    cache_path: str
    runs_dir: str
    base: dict  # Config.to_dict() of the sweep's base configuration
    plan: ListPlan | SearchPlan
    storage: str | None  # None: the local journal in `out`
    out: str
    study: str
    heartbeat: int
    invocation: str  # this sweep command's id: which runs it trained
    index: int = 0
    device: str | None = None  # None: the base configuration's train.device
    threads: int = 0  # 0: leave torch's setting
    memory_budget: int | None = None


class RunFailed(Exception):
    """A run raised; the trial is failed with the error stored on it (caught by optimize, not a worker crash)."""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def die_with_parent(parent_pid: int) -> None:
    """End this process when the sweep process that started it dies, even by ``kill -9``.

    Linux: the kernel sends SIGTERM at the parent's death (PR_SET_PDEATHSIG); SIGTERM raises SystemExit, so
    the journal's file lock and the trial's heartbeat thread are released on the way out. Elsewhere, and as a
    fallback, a watchdog thread notices the parent is gone (re-parented) within a second."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)  # SIGTERM waits for the current torch op; after this, stop regardless
        os._exit(143)

    # the parent may have died before prctl took effect: the watchdog's first look covers that
    threading.Thread(target=watch, name="sppscl-parent-watchdog", daemon=True).start()


def worker_main(spec: WorkerSpec, parent_pid: int) -> None:
    """Entry point of a worker process."""
    die_with_parent(parent_pid)
    if spec.threads:
        # each worker gets its share of the cores: N workers x all cores would oversubscribe the CPU
        torch.set_num_threads(spec.threads)
    try:
        work(spec, SharedCache(spec.cache_path, spec.memory_budget))
    except Exception as e:
        if spec.storage is not None and (database_error(e) or isinstance(e, SweepError)):
            # the parent says it once, for every worker: no traceback per process
            sys.exit(EXIT_STORAGE_LOST)
        raise


def _quiet_lost_database_in_threads() -> None:
    """Optuna's heartbeat thread meets a lost database too; the main thread reports it once, so the thread's own
    traceback is not printed."""
    previous = threading.excepthook
    if getattr(previous, "sppscl_quiet", False):
        return

    def hook(args) -> None:
        if not database_error(args.exc_value):
            previous(args)

    hook.sppscl_quiet = True
    threading.excepthook = hook


def work(spec: WorkerSpec, cache: FeatureCache, after_trial: Callable[[list[FrozenTrial]], None] | None = None, study: optuna.Study | None = None) -> None:
    """Train the study's runs until none is left to start (and, on a shared study, none is left running elsewhere).

    ``study``: the sweep's study when the sweep process is its own worker (one storage, one connection pool and one
    cache of the study's trials per process); None opens it (a worker process)."""
    if spec.storage is not None:
        _quiet_lost_database_in_threads()
    # on a shared study every process is worker 0 of its own machine: their samplers must not draw the same stream
    stream = spec.index if spec.storage is None else hash((socket.gethostname(), os.getpid(), spec.index)) % 2**31
    if study is None:
        study = optuna.load_study(study_name=spec.study, storage=open_storage(spec.storage, Path(spec.out), spec.heartbeat))
    # the pruner reads the other trials' per-epoch dev accuracies from the study (a search's --prune; else none)
    study.pruner = spec.plan.pruner()
    # the stream also depends on how far the study is: a rerun continues the search instead of replaying its first draws
    study.sampler = spec.plan.sampler(stream + 7919 * len(all_trials(study)))
    local = spec.storage is None

    def stop_when_done(study: optuna.Study, _trial: FrozenTrial) -> None:
        trials = all_trials(study)  # one read of the study for the progress report and the question "work left?"
        if after_trial is not None:
            after_trial(trials)
        if not work_left(study, spec.plan, local, spec.heartbeat, trials):
            study.stop()

    if work_left(study, spec.plan, local, spec.heartbeat):
        study.optimize(Objective(spec, cache, study), catch=(RunFailed,), callbacks=[stop_when_done])


def work_left(study: optuna.Study, plan, local: bool, heartbeat: int, trials: list[FrozenTrial] | None = None) -> bool:
    """Whether to ask for another trial: a run is queued, or a draw is still to make.

    Runs whose trial died without an outcome (or that were never queued) are queued first. On a shared study,
    runs still running elsewhere are waited for: if their worker dies, Optuna's heartbeat check (run here every
    heartbeat interval) fails them, ``requeue`` queues them again, and this worker takes them. ``trials``: the study
    as just read, if it was."""
    checked = time.monotonic()
    while True:
        trials = all_trials(study) if trials is None else trials
        if requeue(study, plan, local, include_failed=False, trials=trials):
            return True
        if any(t.state == TrialState.WAITING for t in trials) or plan.fresh(trials) > 0:
            return True
        if local or not any(t.state == TrialState.RUNNING for t in trials):
            return False
        # a run ending elsewhere is seen within WAIT_POLL: the last worker to finish is not kept waiting long
        time.sleep(min(WAIT_POLL, heartbeat))
        trials = None
        if time.monotonic() - checked >= heartbeat:
            checked = time.monotonic()
            check_stale(study)


class Objective:
    """One trial = one run: choose it, claim it, train it (or reuse it), store its results on the trial."""

    def __init__(self, spec: WorkerSpec, cache: FeatureCache, study: optuna.Study):
        self.spec, self.cache, self.study = spec, cache, study
        self.local = spec.storage is None
        self.host = socket.gethostname()

    def __call__(self, trial: Trial) -> float:
        study, plan = self.study, self.spec.plan
        # the trial as ask() read it, just after this worker took it (another read would ask the database again)
        frozen = getattr(trial, "_cached_frozen_trial", None) or study._storage.get_trial(trial._trial_id)
        queued = is_queued(frozen)
        # who holds it: a dead local worker's trials are found by its pid
        who = {"host": self.host, "pid": os.getpid(), "invocation": self.spec.invocation}
        if not queued and plan.surplus(trial.number, all_trials(study)):
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned()
        overrides, seed, draw = plan.choose(trial, frozen)
        name = run_name(overrides, seed)
        if queued:
            if frozen.user_attrs.get("run") != name:
                raise SweepError(f"trial {trial.number} was queued for run {frozen.user_attrs.get('run')!r} but its params say {name!r}")
            for key, value in who.items():
                trial.set_user_attr(key, value)
        else:
            # a draw announces its run, "run" last: a trial that has "run" has the rest (plans.SearchPlan.ordered)
            for key, value in {"config": config_slug(overrides), "overrides": overrides, "seed": seed, "draw": draw, **who, "run": name}.items():
                trial.set_user_attr(key, value)
        owner = claim(study, trial.number, name, self.local, self.spec.heartbeat)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            raise optuna.TrialPruned()
        if draw:
            # the draw's other seeds, queued now so other workers train them in parallel
            requeue(study, plan, self.local, include_failed=False)
        row = self._run(overrides, seed, name, trial if plan.prunes(seed) else None)
        trial.set_user_attr(RESULT_KEY, row)
        if row["status"] == "pruned":
            # finished, not failed: the result says pruned, which tells it from a duplicate that stepped aside
            raise optuna.TrialPruned(f"pruned at epoch {row['pruned_epoch']}")
        if row["status"] != "ok":
            raise RunFailed(row["error"])
        return row["dev_accuracy"]

    def _run(self, overrides: dict, seed: int, name: str, trial: Trial | None = None) -> dict:
        """Train the run (never raises: a failure comes back as its error, with the traceback in error.txt).

        ``trial``: the run reports each epoch's dev accuracy to it and stops when the study's pruner says so."""
        run_dir = Path(self.spec.runs_dir) / name
        about = {"run_dir": str(run_dir.resolve()), "host": self.host, "pid": os.getpid(), "invocation": self.spec.invocation, "reused": False}
        t0 = time.perf_counter()
        # one owner per run directory across every process and command: wait while another one trains this run
        with own_run(run_dir, wait=True, what=f"sweep worker, invocation {self.spec.invocation}"):
            try:
                # as train records it (the cache's encoders, precision, data folder), so a finished run compares equal
                cfg = config_as_trained(run_config(self.spec.base, overrides, seed), self.cache)
                if self.spec.device is not None:
                    cfg.train.device = self.spec.device
                if (run_dir / "results.json").exists():
                    check_finished_run(run_dir, cfg)  # finished before (another sweep or table sharing these runs): reuse it
                    return {**read_run(run_dir, run_status(run_dir), "", None), **about, "reused": True}
                clear_run(run_dir)  # interrupted or failed: rerun from scratch
                results = train(self.cache, cfg, run_dir, progress=False, on_epoch=pruning(trial, cfg.train.epochs) if trial is not None else None)
            except Exception as e:
                if self.spec.storage is not None and database_error(e):
                    raise  # the study's database, met by a pruned run's per-epoch report: the sweep's error, not the run's
                # an error the user can act on is its own message ("non-finite loss at epoch 3, ..."); a bug keeps its type
                error = str(e) if isinstance(e, SppsclError) else f"{type(e).__name__}: {e}"
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(run_dir / "error.txt", error + "\n\n" + traceback.format_exc(), "the run's error")
                return {**read_run(run_dir, "failed", error, time.perf_counter() - t0), **about}
            wall = time.perf_counter() - t0
            atomic_write(run_dir / "sweep-run.json", json.dumps({"wall_s": wall, "pid": os.getpid(), "host": self.host}), "the run record")
            return {**read_run(run_dir, results.get("status", "ok"), "", wall), **about}


def pruning(trial: Trial, epochs: int) -> Callable[[int, dict], bool]:
    """``train``'s per-epoch callback for a pruned search: report the epoch's dev accuracy (the selection's score) to
    the trial and stop when the study's pruner (Optuna's MedianPruner or HyperbandPruner) says the run is behind.
    The last of the run's ``epochs`` is reported but never pruned: stopping there would save nothing and throw
    away a whole run's result."""

    def on_epoch(epoch: int, record: dict) -> bool:
        trial.report(record["dev_accuracy"], epoch)
        return epoch < epochs and trial.should_prune()

    return on_epoch


def run_status(run_dir: Path) -> str:
    """``pruned`` for a run folder a pruner stopped (its results.json says so), else ``ok``."""
    return "pruned" if json.loads((run_dir / "results.json").read_text()).get("status") == "pruned" else "ok"


def _identity(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("source", None)
    for key in PLACEMENT_KEYS:
        d["train"].pop(key, None)
    return d


def check_finished_run(run_dir: Path, cfg: Config) -> None:
    # through Config so that keys added to the config since the run was trained compare as their defaults
    stored = _identity(Config.from_dict(json.loads((run_dir / "config.json").read_text())))
    diffs = diff_provenance(stored, _identity(cfg), names=("the run", "this sweep"))
    if diffs:
        raise SweepError(
            f"{run_dir} was trained with another configuration than this sweep asks for:\n  "
            + "\n  ".join(diffs)
            + "\nuse another --out, or delete that run directory to retrain it"
        )
