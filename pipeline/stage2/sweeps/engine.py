"""Running a sweep: the study, the worker processes (on CPU cores or GPUs), one progress bar, the tables.

Each (configuration, seed) is one ``train`` run in ``<runs>/<config-slug>-seed<N>/`` and one trial of the
sweep's Optuna study, queued with its name before any worker starts. Rerunning the same command trains only
what is missing: finished runs are kept; every failed run, every one an interrupted sweep left running and
every one never started is queued again by that one command. Any number of machines can run the same command
against one ``--storage`` study; each run is trained once across all of them. Run directories shared by
several sweeps (the tables of ``reproduce``, ``cv``) have one owner at a time (``stage2/ownership.py``).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.markup import escape

from ...cache import FeatureCache, default_memory_budget, diff_provenance
from ...config import Config, ConfigError
from ...devices import resolve_device
from ...outputs import atomic_write, check_output_file, check_output_folder
from ...progress import make_progress
from .plans import ListPlan, SearchPlan, run_name
from .spec import SweepError, run_config
from .study import (
    DEFAULT_HEARTBEAT, LOCAL_STUDY_FILE, all_trials, attrs, by_run, database_error, fail_running, has_result, masked, open_storage,
    open_study, outcome, requeue, storage_lost,
)
from .tables import SweepResult, aggregate, first_line, study_rows, write_csv, write_summary
from ..provenance import config_as_trained
from .worker import EXIT_STORAGE_LOST, PLACEMENT_KEYS, SharedCache, WorkerSpec, check_finished_run, cpu_count, work, worker_main


def parse_devices(text: str | None) -> tuple[str, ...]:
    """``cuda:0,cuda:1`` or ``all`` (every visible GPU) -> the devices workers are placed on, round-robin."""
    if not text:
        return ()
    if text.strip() == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--devices all: this machine has no CUDA device (leave --devices out to train on CPU)")
        return tuple(f"cuda:{i}" for i in range(n))
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in devices if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()))]
    if bad or not devices:
        raise ConfigError(f"--devices {text!r}: expected all, or a list like cuda:0,cuda:1 (or cpu)")
    for d in devices:
        # a device this machine lacks is a usage error now, not a failure of every run later
        resolve_device(d)
    return tuple(dict.fromkeys(devices))


@dataclass(frozen=True)
class Execution:
    """How a sweep's runs are executed, whatever the runs are (a grid, a study's draws, a paper table's variants).

    ``workers``: None uses min(runs to start, cores) processes (or ``len(devices) * runs_per_device``), each with
    cores // workers torch threads; 1 runs in this process. ``devices``: workers are placed on them round-robin.
    ``storage``/``study``: a shared Optuna study (e.g. PostgreSQL) instead of the sweep folder's own journal file."""

    workers: int | None = None
    devices: tuple[str, ...] = ()
    runs_per_device: int = 1
    storage: str | None = None
    study: str | None = None
    heartbeat: int = DEFAULT_HEARTBEAT

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.workers}")
        if self.runs_per_device < 1:
            raise ConfigError(f"--runs-per-device must be at least 1, got {self.runs_per_device}")
        if (self.storage is None) != (self.study is None):
            raise ConfigError("--storage and --study go together: the storage holds studies, --study names this sweep's")

    def worker_count(self, todo: int) -> int:
        wanted = self.workers or (len(self.devices) * self.runs_per_device if self.devices else cpu_count())
        return max(1, min(wanted, todo or 1))


@contextmanager
def folder_lock(out: Path):
    """One local sweep per folder at a time; the lock goes with its process, so a killed sweep never blocks a rerun."""
    out.mkdir(parents=True, exist_ok=True)
    check_output_file(out / "sweep.lock", "the sweep's lock", flag="")
    fh = open(out / "sweep.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise SweepError(f"{out} is in use by another sweep (pid {holder}); wait for it to finish or stop it, or use another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fh.close()


def check_cache(runs_dir: Path, cache: FeatureCache) -> None:
    """Runs in one directory must come from one cache: refuse to mix, record it on first use."""
    record = runs_dir / "cache.json"
    if record.exists():
        diffs = diff_provenance(json.loads(record.read_text())["provenance"], cache.provenance, names=("their cache", "this cache"))
        if diffs:
            raise SweepError(f"{runs_dir} holds runs trained on another cache than {cache.path}:\n  " + "\n  ".join(diffs) + "\nuse another --out")
        return
    # atomic: two commands starting on one runs folder (two tables, cv beside reproduce --cv) may both write it
    atomic_write(record, json.dumps({"path": str(cache.path), "provenance": cache.provenance}, indent=2), "the runs folder's cache record", shared=True)


def study_meta(plan: ListPlan | SearchPlan, base_cfg: Config, cache: FeatureCache, keys: list[str], primary: str) -> dict:
    """What makes two sweep commands the same sweep (placement, paths and the worker count are not part of it)."""
    base = {k: v for k, v in base_cfg.to_dict()["train"].items() if k not in PLACEMENT_KEYS}
    return {**plan.meta(), "keys": keys, "base": base, "primary_f1": primary, "cache": cache.provenance}


def run_configs(
    cache_path: Path,
    base_cfg: Config,
    plan: ListPlan | SearchPlan | list[dict],
    seeds: list[int],
    out: Path,
    keys: list[str],
    runs_dir: Path | None = None,
    execution: Execution = Execution(),
    progress: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """Run every configuration of ``plan`` (a list of override dicts, or a search plan) for every seed, then write the tables.

    ``keys`` are the table's configuration columns (a configuration's value, or the base's when it does not set the key).
    Returns every run's row (finished before or now) and the summary over seeds, also written to ``out``."""
    check_output_folder(Path(out), "the sweep")
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    plan = ListPlan(plan, seeds) if isinstance(plan, list) else plan
    cache = SharedCache(cache_path)
    check_cache(runs_dir, cache)
    primary = cache.provenance["dataset"].get("primary_f1", base_cfg.dataset.primary_f1)
    local = execution.storage is None
    where = str(out / LOCAL_STUDY_FILE) if local else f"{masked(execution.storage)} (study {execution.study})"
    base_dict = base_cfg.to_dict()
    if isinstance(plan, ListPlan):
        for overrides, seed in plan.runs:  # refuse before anything trains, as the worker would for each run
            run_dir = runs_dir / run_name(overrides, seed)
            if (run_dir / "results.json").exists():
                check_finished_run(run_dir, config_as_trained(run_config(base_dict, overrides, seed), cache))

    try:
        with folder_lock(out) if local else nullcontext():
            storage = open_storage(execution.storage, out, execution.heartbeat)
            name = execution.study or plan.local_study_name()
            study = open_study(storage, name, study_meta(plan, base_cfg, cache, keys, primary), where)
            if local:
                # this folder's lock is ours: whatever its study says is running was left by a sweep that died
                fail_running(study, "the sweep running this run was interrupted (killed or crashed) before it finished")
            # what a rerun does: every run not finished and not held by a live trial is queued again, each as one trial
            requeue(study, plan, local, include_failed=True)
            invocation = uuid.uuid4().hex
            trials = all_trials(study)
            todo = sum(t.state.name == "WAITING" for t in trials) + plan.fresh(trials)
            n_workers = execution.worker_count(todo)
            cpus = cpu_count()
            spec = WorkerSpec(
                str(cache_path), str(runs_dir), base_dict, plan, execution.storage, str(out), name, execution.heartbeat, invocation,
                threads=max(1, cpus // n_workers), memory_budget=default_memory_budget() // n_workers,
            )
            with make_progress(enabled=progress, console=console, unit="runs/s") as prog:
                label = f"runs ({n_workers} worker{'s' if n_workers > 1 else ''}" + (f" on {', '.join(execution.devices)})" if execution.devices else ")")
                task = prog.add_task(label, total=plan.total(trials))
                report = _Reporter(study, plan, local, prog, task, out / "runs.csv", keys, base_cfg)
                report()
                if todo or not local:
                    if n_workers == 1 and len(execution.devices) <= 1:
                        device = execution.devices[0] if execution.devices else None
                        work(replace(spec, device=device, threads=0), cache, after_trial=report, study=study)
                    else:
                        _run_processes(spec, n_workers, execution.devices, study, local, report)
                if local:
                    # every worker is gone and the folder is ours: a trial still running lost its worker between taking
                    # the trial and saying who it is; it is recorded failed (the table says so) and the next command retries it
                    fail_running(study, "the worker running this run died before it recorded its outcome")
                report()
            trials = all_trials(study)
    except Exception as e:
        if local or not database_error(e):
            raise
        # one line naming the storage (password masked) and what to do, whatever call met the lost database
        raise storage_lost(execution.storage, e) from None

    rows = study_rows(trials, plan, keys, base_dict["train"], local)
    write_csv(out / "runs.csv", rows)
    summary = aggregate(rows, keys, primary)
    write_summary(out, summary, keys, primary, len(plan.seeds))
    by_number = {t.number: attrs(t) for t in trials}
    trained = [r for r in rows if r["trial"] is not None]  # not the seeds a pruned first seed kept from starting
    ran = [r["run"] for r in trained if by_number[r["trial"]].get("invocation") == invocation and not by_number[r["trial"]].get("reused")]
    failed, pruned, skipped = ([r["run"] for r in rows if r["status"] == s] for s in ("failed", "pruned", "skipped"))
    return SweepResult(out, runs_dir, keys, rows, summary, ran, failed, primary, plan.seeds, pruned=pruned, skipped=skipped)



def placements(n: int, devices: tuple[str, ...]) -> list[str | None]:
    """The device of each of ``n`` workers: round-robin over ``devices`` (None: the configuration's own)."""
    return [devices[i % len(devices)] if devices else None for i in range(n)]


def _run_processes(spec: WorkerSpec, n: int, devices: tuple[str, ...], study, local: bool, report) -> None:
    """Start ``n`` worker processes and watch them; a worker that dies is replaced, its run recorded as failed."""
    # spawn: a forked child would inherit torch's thread pools and any CUDA state of this process
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.Process] = {}

    def start(i: int) -> None:
        device = placements(i + 1, devices)[i]
        p = ctx.Process(target=worker_main, args=(replace(spec, index=i, device=device), os.getpid()), name=f"sppscl-sweep-worker-{i}", daemon=True)
        p.start()
        procs[i] = p

    for i in range(n):
        start(i)
    next_index = n
    try:
        while procs:
            time.sleep(0.5)
            report()
            for i, p in list(procs.items()):
                if p.is_alive():
                    continue
                del procs[i]
                if p.exitcode == EXIT_STORAGE_LOST and not local:
                    # the database is gone for every worker: no replacement would get further; the others are
                    # killed (their unfinished runs are rerun from scratch anyway), so none prints a traceback on the way out
                    for q in procs.values():
                        q.kill()
                    raise storage_lost(spec.storage, ConnectionError("a worker process lost its connection to the study database"))
                if p.exitcode != 0 and local:
                    # on a shared study the heartbeat gives its run to another worker; here nobody else would
                    reason = f"a worker process died (killed, out of memory, or crashed; exit code {p.exitcode}) during this run"
                    fail_running(study, reason, only=lambda t, pid=p.pid: t.user_attrs.get("pid") == pid)
                if p.exitcode != 0:
                    start(next_index)
                    next_index += 1
    except Exception as e:
        if not local and database_error(e):
            for q in procs.values():
                q.kill()
        raise
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.join(5)


@dataclass
class _Reporter:
    """Progress from the study: the bar, one line per finished run, runs.csv kept current."""

    study: object
    plan: ListPlan | SearchPlan
    local: bool
    prog: object
    task: int
    runs_csv: Path
    keys: list[str]
    base_cfg: Config
    seen: set[int] = field(default_factory=set)
    first: bool = True  # runs finished before this command are counted, not announced

    def __call__(self, trials: list[FrozenTrial] | None = None) -> None:
        trials = all_trials(self.study) if trials is None else trials
        new = [t for t in trials if t.number not in self.seen and t.state.is_finished() and has_result(t)]
        for t in new:
            self.seen.add(t.number)
            if not self.first:
                self._note(t)
        self.first = False
        held = by_run(trials)
        finished = sum(outcome(held.get(run_name(c, s), []), self.local) is not None for c, s in self.plan.ordered(trials))
        self.prog.update(self.task, completed=finished, total=self.plan.total(trials))
        if new:
            write_csv(self.runs_csv, study_rows(trials, self.plan, self.keys, self.base_cfg.to_dict()["train"], self.local))

    def _note(self, t: FrozenTrial) -> None:
        a = attrs(t)
        where = "" if self.local else f" on {a.get('host')}"
        if a["status"] == "ok":
            if not a.get("reused"):
                self.prog.note(f"[green]done[/] {escape(a['run'])}{where}: dev acc {a['dev_accuracy']:.4f} (best epoch {a['best_epoch']}, {a['wall_s']:.1f}s)")
        elif a["status"] == "pruned":
            if not a.get("reused"):
                self.prog.note(f"[yellow]pruned[/] {escape(a['run'])}{where}: stopped at epoch {a['pruned_epoch']} ({a['wall_s']:.1f}s)")
        else:
            self.prog.note(f"[red]failed[/] {escape(a['run'])}{where}: {escape(first_line(a['error']))} (traceback: {escape(str(Path(a['run_dir']) / 'error.txt'))})")
