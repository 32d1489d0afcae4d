"""Sweeps: many stage-two runs from one feature cache, resumable, in parallel, summarised over seeds.

A sweep is a set of configurations (a grid, or N draws from an Optuna study) times a set of seeds. Each
(configuration, seed) is one ``train`` run in ``<runs>/<config-slug>-seed<N>/``; a run is finished when its
directory holds ``results.json``. Rerunning the same command therefore trains only what is missing: a run
directory without ``results.json`` (interrupted, or failed with its ``error.txt``) is deleted and rerun.

Worker processes open the cache once (a pool initializer) and keep its splits for every run they do, so a
sweep reads the cache once per worker, not once per run. Model choice is on dev only: tables are sorted by
mean dev accuracy (ties by the dataset's primary F1); test columns are reported beside, never used to select.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..cache import FeatureCache, SplitData, default_memory_budget, diff_provenance
from ..config import Config, ConfigError, TrainConfig, coerce_value, apply_overrides, resolve_key
from ..progress import make_progress
from .train import RunError, train

METRICS = ("accuracy", "weighted_f1", "macro_f1")
SPLITS = ("dev", "test")
METRIC_COLUMNS = [f"{s}_{m}" for s in SPLITS for m in METRICS]
SAMPLERS = ("random", "tpe")


class SweepError(RunError):
    """A sweep cannot start or continue as asked (another cache or configuration in its directory, a changed study)."""


# ------------------------------------------------------------------------------------ what to run


def _sweep_key(key: str, where: str) -> str:
    section, name = resolve_key(key.strip())
    if section != "train":
        raise ConfigError(f"{where}: only train.* keys can be swept over a cache (the cache fixes {section}.{name})")
    if name == "seed":
        raise ConfigError(f"{where}: give seeds with --seeds, not as a swept key")
    return name


def _typed(name: str, text: str, where: str) -> Any:
    return coerce_value(text, getattr(TrainConfig(), name), where)


def _split_item(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"{flag} {item!r} must look like key=...")
    key, spec = item.split("=", 1)
    return key, spec


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["lr=1e-4,5e-5", "fusion=batch,concat"]`` -> {"lr": [1e-4, 5e-5], "fusion": ["batch", "concat"]}, typed by the config."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, spec = _split_item(item, "--grid")
        name = _sweep_key(key, f"--grid {item}")
        if name in grid:
            raise ConfigError(f"--grid {item}: {name} is given twice")
        values = [_typed(name, v, f"--grid {item}") for v in spec.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {item}: no values")
        grid[name] = list(dict.fromkeys(values))
    return grid


def grid_configs(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest; one empty configuration when nothing is swept."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


@dataclass(frozen=True)
class SpaceDim:
    """One Optuna search dimension: a numeric range (``low:high[:log]``) or a list of choices (``a,b,c``)."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return ",".join(_fmt(c) for c in self.choices)
        return f"{_fmt(self.low)}:{_fmt(self.high)}" + (":log" if self.log else "")


def parse_space(items: list[str]) -> dict[str, SpaceDim]:
    """``["lr=1e-5:1e-3:log", "fusion=batch,concat", "dim=16:64"]``; ranges are int or float by the config key's type."""
    space: dict[str, SpaceDim] = {}
    for item in items:
        key, spec = _split_item(item, "--space")
        where = f"--space {item}"
        name = _sweep_key(key, where)
        if name in space:
            raise ConfigError(f"{where}: {name} is given twice")
        if ":" not in spec:
            choices = tuple(dict.fromkeys(_typed(name, v, where) for v in spec.split(",") if v.strip()))
            if not choices:
                raise ConfigError(f"{where}: no values")
            space[name] = SpaceDim(name, choices=choices)
            continue
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
            raise ConfigError(f"{where}: a range is low:high or low:high:log")
        default = getattr(TrainConfig(), name)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ConfigError(f"{where}: {name} is not numeric; list its values instead ({name}=a,b,c)")
        low, high = _typed(name, parts[0], where), _typed(name, parts[1], where)
        log = len(parts) == 3
        if low >= high:
            raise ConfigError(f"{where}: low must be below high")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
        space[name] = SpaceDim(name, low, high, log)
    return space


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seeds")
    return list(dict.fromkeys(seeds))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, ".8g")
    return str(v)


def config_slug(overrides: dict[str, Any]) -> str:
    """A configuration's directory name, from its overrides sorted by key (so the order given does not matter)."""
    if not overrides:
        return "base"
    slug = "__".join(f"{k}-{_fmt(v)}" for k, v in sorted(overrides.items()))
    slug = re.sub(r"[^A-Za-z0-9._+-]", "_", slug)
    if len(slug) > 120:
        slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
    return slug


def run_config(base: Config | dict, overrides: dict[str, Any], seed: int) -> Config:
    """The resolved configuration of one run: the sweep's base, its overrides, its seed."""
    base = Config.from_dict(base) if isinstance(base, dict) else base
    return apply_overrides(base, {**overrides, "seed": seed})


def default_sweep_dir(cache: Path, *parts: Any) -> Path:
    """``sweeps/<cache name>-<hash of the sweep's definition>``: the same command finds the same directory again."""
    digest = hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:8]
    return Path("sweeps") / f"{Path(cache).stem}-{digest}"


# ------------------------------------------------------------------------------------ worker side


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
class _Job:
    run_dir: str
    base: dict  # Config.to_dict() of the sweep's base configuration
    overrides: dict
    seed: int


_WORKER_CACHE: SharedCache | None = None


def _init_worker(cache_path: str, threads: int, memory_budget: int) -> None:
    global _WORKER_CACHE
    # each worker gets its share of the cores: N workers x all cores would oversubscribe the CPU
    torch.set_num_threads(threads)
    _WORKER_CACHE = SharedCache(cache_path, memory_budget)


def _run_job(job: _Job, cache: FeatureCache | None = None) -> dict:
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


class _InlineExecutor:
    """The executor interface run in this process (``--workers 1``): no process start-up, the caller's cache reused."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def submit(self, fn, job: _Job) -> Future:
        fut: Future = Future()
        fut.set_result(fn(job, self.cache))
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


# ------------------------------------------------------------------------------------ parent side


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Plan(Protocol):
    expected: int  # configurations the plan will produce (for the progress total)

    def more(self, wanted: int) -> list[tuple[dict, int | None]]:
        """Up to ``wanted`` new (overrides, trial number) configurations; an empty list means the plan is exhausted."""

    def done(self, trial: int | None, rows: list[dict]) -> None:
        """Every seed of a configuration has finished (``rows``: one per seed)."""


class _GridPlan:
    """A grid is known up front: every configuration is handed out at once (the workers drain the queue)."""

    def __init__(self, configs: list[dict]):
        self.configs, self.expected = configs, len(configs)

    def more(self, wanted: int) -> list[tuple[dict, int | None]]:
        out, self.configs = self.configs, []
        return [(c, None) for c in out]

    def done(self, trial: int | None, rows: list[dict]) -> None:
        pass


class _StudyPlan:
    """Configurations drawn from an Optuna study in ``<out>/study.db``; a trial's value is its mean dev accuracy over seeds.

    Resuming: finished trials are reused as they are; a trial that failed or was left running by an interrupted
    sweep is marked failed and its configuration retried as a new trial with the same parameters (its finished
    runs are reused, so only the missing seeds train)."""

    def __init__(self, out: Path, space: dict[str, SpaceDim], n: int, sampler: str, seeds: list[int]):
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        self.space, self.n = space, n
        self.study = optuna.create_study(
            storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name="sppscl", direction="maximize", load_if_exists=True
        )
        meta = {"space": {k: d.describe() for k, d in sorted(space.items())}, "seeds": seeds}
        stored = self.study.user_attrs.get("sppscl")
        if stored is None:
            self.study.set_user_attr("sppscl", meta)
        elif stored != meta:
            raise SweepError(
                f"{out / 'study.db'} holds a study with another space or other seeds:\n  "
                + "\n  ".join(diff_provenance(stored, meta))
                + "\nuse the same --space and --seeds to continue it, or another --out"
            )
        trials = self.study.get_trials(deepcopy=False)
        # the sampler's random state is not stored: seeding it by the history keeps a resumed study from redrawing old points
        seed = len(trials)
        self.study.sampler = optuna.samplers.RandomSampler(seed=seed) if sampler == "random" else optuna.samplers.TPESampler(seed=seed)
        superseded = {t.user_attrs.get("retry_of") for t in trials} - {None}
        self.told: set[int] = set()
        self.backlog: list[tuple[dict, int | None]] = []
        for _ in [t for t in trials if t.state == TrialState.WAITING]:
            self.backlog.append(self._ask())
        for t in trials:
            if t.number in superseded or t.state == TrialState.WAITING:
                continue
            if t.state == TrialState.COMPLETE:
                self.told.add(t.number)
                self.backlog.append((dict(t.params), t.number))
                continue
            if t.state == TrialState.RUNNING:
                self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            self.backlog.append(self._ask())
        self.backlog.sort(key=lambda c: c[1])
        self.active = len(self.backlog)
        self.expected = max(n, self.active)

    def _ask(self) -> tuple[dict, int]:
        trial = self.study.ask()
        return {name: dim.suggest(trial) for name, dim in self.space.items()}, trial.number

    def more(self, wanted: int) -> list[tuple[dict, int | None]]:
        if self.backlog:
            out, self.backlog = self.backlog, []
            return out
        out = []
        while len(out) < wanted and self.active < self.n:
            out.append(self._ask())
            self.active += 1
        return out

    def done(self, trial: int | None, rows: list[dict]) -> None:
        from optuna.trial import TrialState

        if trial is None or trial in self.told:
            return
        self.told.add(trial)
        if all(r["status"] == "ok" for r in rows):
            self.study.tell(trial, float(np.mean([r["dev_accuracy"] for r in rows])))
        else:
            self.study.tell(trial, state=TrialState.FAIL)


@dataclass
class _Entry:
    """One configuration of the sweep and the runs (one per seed) it waits for."""

    overrides: dict
    slug: str
    trial: int | None
    names: list[str]
    pending: set[str] = field(default_factory=set)


@dataclass
class SweepResult:
    out: Path  # where runs.csv and summary.{csv,md} were written
    runs_dir: Path
    keys: list[str]  # swept keys (table columns)
    rows: list[dict]  # one per run, in plan order
    summary: list[dict]  # one per configuration, best on dev first
    ran: list[str]  # runs trained by this invocation (the others were finished already)
    failed: list[str]
    primary_f1: str
    seeds: list[int]


def _expected_config_dict(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("source", None)
    return d


def _check_finished_run(run_dir: Path, cfg: Config) -> None:
    # through Config so that keys added to the config since the run was trained compare as their defaults
    stored = _expected_config_dict(Config.from_dict(json.loads((run_dir / "config.json").read_text())))
    diffs = diff_provenance(stored, _expected_config_dict(cfg))
    if diffs:
        raise SweepError(
            f"{run_dir} was trained with another configuration than this sweep asks for:\n  "
            + "\n  ".join(d.replace("cache has", "run has") for d in diffs)
            + "\nuse another --out, or delete that run directory to retrain it"
        )


def _check_cache(runs_dir: Path, cache: FeatureCache) -> None:
    """Runs in one directory must come from one cache: refuse to mix, record it on first use."""
    record = runs_dir / "cache.json"
    if record.exists():
        diffs = diff_provenance(json.loads(record.read_text())["provenance"], cache.provenance)
        if diffs:
            raise SweepError(f"{runs_dir} holds runs trained on another cache than {cache.path}:\n  " + "\n  ".join(diffs) + "\nuse another --out")
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"path": str(cache.path), "provenance": cache.provenance}, indent=2))


def _read_run(run_dir: Path, status: str, error: str, wall_s: float | None) -> dict:
    row: dict[str, Any] = {"status": status, "best_epoch": None, **{c: None for c in METRIC_COLUMNS}, "wall_s": wall_s, "error": error}
    if status != "ok":
        return row
    res = json.loads((run_dir / "results.json").read_text())
    row["best_epoch"] = res["best_epoch"] + 1  # 1-based, as `sppscl train` prints it
    for split in SPLITS:
        m = res["splits"].get(split, {})
        for metric in METRICS:
            row[f"{split}_{metric}"] = m.get(metric)
    if wall_s is None and (run_dir / "sweep-run.json").exists():
        row["wall_s"] = json.loads((run_dir / "sweep-run.json").read_text())["wall_s"]
    return row


def run_configs(
    cache_path: Path,
    base_cfg: Config,
    plan: _Plan | list[dict],
    seeds: list[int],
    out: Path,
    keys: list[str],
    runs_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """Run every configuration of ``plan`` (a list of override dicts, or a study plan) for every seed, then write the tables.

    ``keys`` are the table's configuration columns (a configuration's value, or the base's when it does not set the key).
    ``workers``: None uses min(runs to do, cores) processes with cores // workers torch threads each; 1 runs in this process."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    plan = _GridPlan(plan) if isinstance(plan, list) else plan
    cache = SharedCache(cache_path)
    _check_cache(runs_dir, cache)
    primary = cache.provenance["dataset"].get("primary_f1", base_cfg.dataset.primary_f1)
    base_dict = base_cfg.to_dict()
    cpus = cpu_count()
    todo_estimate = plan.expected * len(seeds)
    if isinstance(plan, _GridPlan):
        todo_estimate = sum(not (runs_dir / f"{config_slug(c)}-seed{s}" / "results.json").exists() for c in plan.configs for s in seeds)
    workers = max(1, min(workers if workers is not None else cpus, todo_estimate or 1))

    def make_executor():
        if workers == 1:
            return _InlineExecutor(cache)
        # the sweep as a whole stays within the budget of one run (SPPSCL_MEMORY_BUDGET or the default)
        budget = default_memory_budget() // workers
        return ProcessPoolExecutor(
            max_workers=workers,
            # spawn: a forked child would inherit torch's thread pools and any CUDA state of the parent
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(cache_path), max(1, cpus // workers), budget),
        )

    entries: list[_Entry] = []
    rows: dict[str, dict] = {}
    waiting: dict[str, list[_Entry]] = {}  # run name -> configurations waiting for it (queued or in flight)
    queue: deque[tuple[str, _Job]] = deque()
    ran: list[str] = []
    total = plan.expected * len(seeds)

    with make_progress(enabled=progress, console=console, unit="runs/s") as prog:
        task = prog.add_task(f"runs ({workers} worker{'s' if workers > 1 else ''})", total=total)

        def settle(entry: _Entry, name: str) -> None:
            entry.pending.discard(name)
            if not entry.pending:
                plan.done(entry.trial, [rows[n] for n in entry.names])

        def add(overrides: dict, trial: int | None) -> None:
            nonlocal total
            slug = config_slug(overrides)
            entry = _Entry(overrides, slug, trial, [f"{slug}-seed{s}" for s in seeds])
            if any(e.slug == slug for e in entries):
                # a repeated draw shares the runs of the first one, counted once
                total -= len(seeds)
                prog.update(task, total=total)
            entries.append(entry)
            entry.pending = {n for n in entry.names if n not in rows}
            for seed, name in zip(seeds, entry.names):
                if name in rows:
                    continue
                if name in waiting:
                    waiting[name].append(entry)
                    continue
                run_dir = runs_dir / name
                if (run_dir / "results.json").exists():
                    _check_finished_run(run_dir, run_config(base_dict, overrides, seed))
                    rows[name] = _read_run(run_dir, "ok", "", None)
                    prog.advance(task)
                    entry.pending.discard(name)
                    continue
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # interrupted or failed: rerun from scratch
                waiting[name] = [entry]
                queue.append((name, _Job(str(run_dir), base_dict, dict(overrides), seed)))
            if not entry.pending:
                plan.done(trial, [rows[n] for n in entry.names])

        def finish(name: str, result: dict) -> None:
            run_dir = runs_dir / name
            r = rows[name] = _read_run(run_dir, result["status"], result["error"], result["wall_s"])
            ran.append(name)
            prog.advance(task)
            if r["status"] == "ok":
                prog.note(f"[green]done[/] {escape(name)}: dev acc {r['dev_accuracy']:.4f} (best epoch {r['best_epoch']}, {r['wall_s']:.1f}s)")
            else:
                prog.note(f"[red]failed[/] {escape(name)}: {escape(_first_line(r['error']))} (traceback: {escape(str(run_dir / 'error.txt'))})")
            for entry in waiting.pop(name):
                settle(entry, name)
            _write_csv(out / "runs.csv", _ordered_rows(entries, rows, keys, seeds, base_cfg))

        executor = make_executor()
        in_flight: dict[Future, str] = {}
        broken, exhausted = False, False
        try:
            while True:
                open_runs = len(queue) + len(in_flight)
                # ask for configurations only as workers free up, so a TPE study sees finished trials before drawing
                wanted = math.ceil(max(0, workers - open_runs) / len(seeds))
                if not exhausted and wanted:
                    new = plan.more(wanted)
                    exhausted = not new
                    for overrides, trial in new:
                        add(overrides, trial)
                    if new:
                        continue
                if broken and not in_flight:
                    executor.shutdown(wait=False)
                    executor, broken = make_executor(), False
                while not broken and queue and len(in_flight) < workers:
                    name, job = queue.popleft()
                    in_flight[executor.submit(_run_job, job)] = name
                if not in_flight:
                    if exhausted and not queue:
                        break
                    continue
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as e:
                        # every run in flight fails with the pool; which one killed its process cannot be told
                        broken = True
                        error = f"a worker process died (killed, out of memory, or crashed) during this or a concurrent run: {e}"
                        (runs_dir / name).mkdir(parents=True, exist_ok=True)
                        (runs_dir / name / "error.txt").write_text(error + "\n")
                        result = {"status": "failed", "error": error, "wall_s": None}
                    finish(name, result)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    table = _ordered_rows(entries, rows, keys, seeds, base_cfg)
    _write_csv(out / "runs.csv", table)
    summary = aggregate(table, keys, primary)
    write_summary(out, summary, keys, primary, len(seeds))
    failed = [r["run"] for r in table if r["status"] != "ok"]
    return SweepResult(out, runs_dir, keys, table, summary, ran, failed, primary, seeds)


def _ordered_rows(entries: list[_Entry], rows: dict[str, dict], keys: list[str], seeds: list[int], base_cfg: Config) -> list[dict]:
    """The runs table: one row per run (a repeated configuration once), in plan order, seeds inner."""
    table, seen = [], set()
    for entry in entries:
        values = {k: entry.overrides.get(k, getattr(base_cfg.train, k)) for k in keys}
        for name, seed in zip(entry.names, seeds):
            if name in seen or name not in rows:
                continue
            seen.add(name)
            table.append({"run": name, "config": entry.slug, **values, "seed": seed, "trial": entry.trial, **rows[name]})
    return table


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------------------ tables


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; the std of a single seed is 0.0."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def aggregate(rows: list[dict], keys: list[str], primary_f1: str = "weighted") -> list[dict]:
    """One row per configuration: n finished seeds, failures, mean and std of every metric; best on dev first.

    Sorted by mean dev accuracy, ties by mean dev primary F1; configurations with no finished seed last."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    summary = []
    for slug, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        s: dict[str, Any] = {"config": slug, **{k: rs[0][k] for k in keys}, "n": len(ok), "n_failed": len(rs) - len(ok)}
        for col in METRIC_COLUMNS:
            vals = [r[col] for r in ok if r[col] is not None]
            mean, std = mean_std(vals) if vals else (None, None)
            s[f"{col}_mean"], s[f"{col}_std"] = mean, std
        summary.append(s)

    def key(s: dict) -> tuple:
        return (s["n"] > 0, s["dev_accuracy_mean"] or 0.0, s[f"dev_{primary_f1}_f1_mean"] or 0.0)

    return sorted(summary, key=key, reverse=True)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    os.replace(tmp, path)


def cell(mean: float | None, std: float | None, n: int | None = None) -> str:
    """``0.7311 ± 0.0042`` (with ``(n=3)`` when n is given); empty when there is no value."""
    if mean is None:
        return "" if n is None else f"- (n={n})"
    text = f"{mean:.4f} ± {std:.4f}"
    return text if n is None else f"{text} (n={n})"


def _label(col: str) -> str:
    split, metric = col.split("_", 1)
    return f"{split} " + {"accuracy": "acc", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}[metric]


def _shown_columns(summary: list[dict]) -> list[str]:
    return [c for c in METRIC_COLUMNS if c.startswith("dev") or any(s[f"{c}_mean"] is not None for s in summary)]


def write_summary(out: Path, summary: list[dict], keys: list[str], primary_f1: str, n_seeds: int) -> None:
    """summary.csv (means and stds as numbers) and summary.md (``mean ± std`` cells, best on dev in bold)."""
    _write_csv(out / "summary.csv", summary)
    cols = _shown_columns(summary)
    head = [*(keys or ["config"]), "n", "failed", *[_label(c) for c in cols]]
    lines = [
        f"Mean ± sample std (ddof=1; 0 when n=1) over seeds ({n_seeds} per configuration asked; n = seeds finished). "
        f"Sorted by mean dev accuracy, ties by dev {primary_f1} F1; the best configuration (chosen on dev only) is in bold; "
        "test is reported beside, never used to select.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for i, s in enumerate(summary):
        names = [_fmt(s[k]) for k in keys] or [s["config"]]
        if i == 0 and s["n"] > 0:
            names = [f"**{x}**" for x in names]
        lines.append("| " + " | ".join([*names, str(s["n"]), str(s["n_failed"]), *[cell(s[f"{c}_mean"], s[f"{c}_std"]) for c in cols]]) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def print_summary(result: SweepResult, console: Console) -> None:
    """The aggregate as a rich table, best configuration (on dev) highlighted; then the failures, if any."""
    cols = _shown_columns(result.summary)
    t = Table(
        title=f"sweep {result.out}: {len(result.summary)} configurations x {len(result.seeds)} seeds, mean ± std over seeds",
        caption=f"sorted by dev accuracy (ties: dev {result.primary_f1} F1); highlighted: best on dev; test never used to select",
    )
    for k in result.keys or ["config"]:
        t.add_column(k)
    t.add_column("n", justify="right")
    t.add_column("failed", justify="right")
    for c in cols:
        t.add_column(_label(c), justify="right")
    for i, s in enumerate(result.summary):
        names = [_fmt(s[k]) for k in result.keys] or [s["config"]]
        cells = [cell(s[f"{c}_mean"], s[f"{c}_std"]) for c in cols]
        t.add_row(*names, str(s["n"]), str(s["n_failed"]), *cells, style="bold green" if i == 0 and s["n"] > 0 else None)
    console.print(t)
    # a failed run is always retried, so every row not trained now was finished before
    console.print(f"trained now: {len(result.ran)} runs; finished before: {len(result.rows) - len(result.ran)}")
    console.print(f"tables: {result.out / 'runs.csv'}, {result.out / 'summary.csv'}, {result.out / 'summary.md'}")
    if result.failed:
        console.print(f"[bold red]{len(result.failed)} runs failed[/] (rerun the same command to retry them):")
        for r in result.rows:
            if r["status"] != "ok":
                console.print(f"  {escape(r['run'])}: {escape(_first_line(r['error']))}  ({escape(str(result.runs_dir / r['run'] / 'error.txt'))})")


# ------------------------------------------------------------------------------------ the command


def sweep(
    cache_path: Path,
    base_cfg: Config,
    out: Path,
    grid: list[str] | None = None,
    space: list[str] | None = None,
    n_random: int | None = None,
    sampler: str = "tpe",
    seeds: list[int] | None = None,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """``sppscl sweep``: a grid (``key=v1,v2``) or ``n_random`` draws from an Optuna study over ``space``, times ``seeds``.

    ``seeds`` default to the base configuration's ``train.seed``. Returns the tables also written to ``out``."""
    grid, space = grid or [], space or []
    seeds = seeds or [base_cfg.train.seed]
    out = Path(out)
    if n_random is not None:
        if grid:
            raise ConfigError("--grid and --random are alternatives: give the random search's dimensions with --space")
        if not space:
            raise ConfigError("--random needs --space (key=low:high[:log] or key=a,b,c)")
        if n_random < 1:
            raise ConfigError(f"--random must be at least 1, got {n_random}")
        dims = parse_space(space)
        FeatureCache(cache_path)  # a missing or incomplete cache is refused before a study is created
        out.mkdir(parents=True, exist_ok=True)
        plan = _StudyPlan(out, dims, n_random, sampler, seeds)
        return run_configs(cache_path, base_cfg, plan, seeds, out, list(dims), workers=workers, progress=progress, console=console)
    if space:
        raise ConfigError("--space needs --random N (the number of draws)")
    parsed = parse_grid(grid)
    return run_configs(cache_path, base_cfg, grid_configs(parsed), seeds, out, list(parsed), workers=workers, progress=progress, console=console)
