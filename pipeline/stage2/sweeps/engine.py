"""Running a sweep's (configuration, seed) runs: resumable run directories, worker processes, one progress bar.

Each (configuration, seed) is one ``train`` run in ``<runs>/<config-slug>-seed<N>/``; a run is finished when its
directory holds ``results.json``. Rerunning the same command therefore trains only what is missing: a run
directory without ``results.json`` (interrupted, or failed with its ``error.txt``) is deleted and rerun.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ...cache import FeatureCache, default_memory_budget, diff_provenance
from ...config import Config, ConfigError
from ...progress import make_progress
from .plans import GridPlan, Plan
from .spec import SweepError, config_slug, run_config
from .tables import SweepResult, aggregate, first_line, read_run, write_csv, write_summary
from .worker import InlineExecutor, RunJob, SharedCache, cpu_count, init_worker, run_job


@dataclass(frozen=True)
class Execution:
    """How a sweep's runs are executed, whatever the runs are (a grid, a study's draws, a paper table's variants).

    ``workers``: None uses min(runs to do, cores) processes with cores // workers torch threads each; 1 runs in this process."""

    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.workers}")


@dataclass
class _Entry:
    """One configuration of the sweep and the runs (one per seed) it waits for."""

    overrides: dict
    slug: str
    trial: int | None
    names: list[str]
    pending: set[str] = field(default_factory=set)


def _expected_config_dict(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("source", None)
    return d


def _check_finished_run(run_dir: Path, cfg: Config) -> None:
    # through Config so that keys added to the config since the run was trained compare as their defaults
    stored = _expected_config_dict(Config.from_dict(json.loads((run_dir / "config.json").read_text())))
    diffs = diff_provenance(stored, _expected_config_dict(cfg), names=("the run", "this sweep"))
    if diffs:
        raise SweepError(
            f"{run_dir} was trained with another configuration than this sweep asks for:\n  "
            + "\n  ".join(diffs)
            + "\nuse another --out, or delete that run directory to retrain it"
        )


def _check_cache(runs_dir: Path, cache: FeatureCache) -> None:
    """Runs in one directory must come from one cache: refuse to mix, record it on first use."""
    record = runs_dir / "cache.json"
    if record.exists():
        diffs = diff_provenance(json.loads(record.read_text())["provenance"], cache.provenance, names=("their cache", "this cache"))
        if diffs:
            raise SweepError(f"{runs_dir} holds runs trained on another cache than {cache.path}:\n  " + "\n  ".join(diffs) + "\nuse another --out")
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"path": str(cache.path), "provenance": cache.provenance}, indent=2))


def run_configs(
    cache_path: Path,
    base_cfg: Config,
    plan: Plan | list[dict],
    seeds: list[int],
    out: Path,
    keys: list[str],
    runs_dir: Path | None = None,
    execution: Execution = Execution(),
    progress: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """Run every configuration of ``plan`` (a list of override dicts, or a study plan) for every seed, then write the tables.

    ``keys`` are the table's configuration columns (a configuration's value, or the base's when it does not set the key).
    Returns every run's row (finished before or now) and the summary over seeds, also written to ``out``."""
    workers = execution.workers
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    plan = GridPlan(plan) if isinstance(plan, list) else plan
    cache = SharedCache(cache_path)
    _check_cache(runs_dir, cache)
    primary = cache.provenance["dataset"].get("primary_f1", base_cfg.dataset.primary_f1)
    base_dict = base_cfg.to_dict()
    cpus = cpu_count()
    todo_estimate = plan.expected * len(seeds)
    if isinstance(plan, GridPlan):
        todo_estimate = sum(not (runs_dir / f"{config_slug(c)}-seed{s}" / "results.json").exists() for c in plan.configs for s in seeds)
    workers = max(1, min(workers if workers is not None else cpus, todo_estimate or 1))

    def make_executor():
        if workers == 1:
            return InlineExecutor(cache)
        # the sweep as a whole stays within the budget of one run (SPPSCL_MEMORY_BUDGET or the default)
        budget = default_memory_budget() // workers
        return ProcessPoolExecutor(
            max_workers=workers,
            # spawn: a forked child would inherit torch's thread pools and any CUDA state of the parent
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(str(cache_path), max(1, cpus // workers), budget),
        )

    entries: list[_Entry] = []
    rows: dict[str, dict] = {}
    waiting: dict[str, list[_Entry]] = {}  # run name -> configurations waiting for it (queued or in flight)
    queue: deque[tuple[str, RunJob]] = deque()
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
                    rows[name] = read_run(run_dir, "ok", "", None)
                    prog.advance(task)
                    entry.pending.discard(name)
                    continue
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # interrupted or failed: rerun from scratch
                waiting[name] = [entry]
                queue.append((name, RunJob(str(run_dir), base_dict, dict(overrides), seed)))
            if not entry.pending:
                plan.done(trial, [rows[n] for n in entry.names])

        def finish(name: str, result: dict) -> None:
            run_dir = runs_dir / name
            r = rows[name] = read_run(run_dir, result["status"], result["error"], result["wall_s"])
            ran.append(name)
            prog.advance(task)
            if r["status"] == "ok":
                prog.note(f"[green]done[/] {escape(name)}: dev acc {r['dev_accuracy']:.4f} (best epoch {r['best_epoch']}, {r['wall_s']:.1f}s)")
            else:
                prog.note(f"[red]failed[/] {escape(name)}: {escape(first_line(r['error']))} (traceback: {escape(str(run_dir / 'error.txt'))})")
            for entry in waiting.pop(name):
                settle(entry, name)
            write_csv(out / "runs.csv", _ordered_rows(entries, rows, keys, seeds, base_cfg))

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
                    in_flight[executor.submit(run_job, job)] = name
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
    write_csv(out / "runs.csv", table)
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
