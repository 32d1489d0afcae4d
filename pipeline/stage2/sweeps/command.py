"""``sppscl sweep``: a grid or a random/TPE search over one cache, times seeds, summarised over seeds; and its summary."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ...cache import FeatureCache
from ...config import Config, ConfigError
from ...outputs import check_output_folder
from .engine import Execution, run_configs
from .plans import ListPlan, SearchPlan
from .spec import SweepError, grid_configs, parse_grid, parse_space
from .study import DEFAULT_HEARTBEAT, LOCAL_STUDY_FILE, all_trials, load_meta, masked, open_storage
from .tables import SweepResult, aggregate, study_rows, write_csv, write_summary

def sweep(
    cache_path: Path,
    base_cfg: Config,
    out: Path,
    grid: list[str] | None = None,
    space: list[str] | None = None,
    n_random: int | None = None,
    sampler: str = "tpe",
    seeds: list[int] | None = None,
    execution: Execution = Execution(),
    progress: bool = True,
    console: Console | None = None,
    prune: str | None = None,
) -> SweepResult:
    """``sppscl sweep``: a grid (``key=v1,v2``) or ``n_random`` draws from an Optuna study over ``space``, times ``seeds``.

    ``seeds`` default to the base configuration's ``train.seed``. ``prune`` (``median`` or ``hyperband``, searches
    only): stop a configuration's first seed early when Optuna's pruner finds its dev curve behind (``SearchPlan``).
    Returns the tables also written to ``out``."""
    grid, space = grid or [], space or []
    seeds = seeds or [base_cfg.train.seed]
    out = Path(out)
    if prune is not None and n_random is None:
        raise ConfigError(f"--prune {prune}: only a search prunes (--random N --space ... --sampler tpe|random); a grid trains every run to its end")
    if n_random is not None:
        if grid:
            raise ConfigError("--grid and --random are alternatives: give the random search's dimensions with --space")
        if not space:
            raise ConfigError("--random needs --space (key=low:high[:log] or key=a,b,c)")
        if n_random < 1:
            raise ConfigError(f"--random must be at least 1, got {n_random}")
        dims = parse_space(space)
        FeatureCache(cache_path)  # a missing or incomplete cache is refused before a study is created
        epochs = base_cfg.train.epochs
        if "epochs" in dims:  # the longest run is the hyperband pruner's resource
            epochs = max(dims["epochs"].choices) if dims["epochs"].choices else int(dims["epochs"].high)
        plan = SearchPlan(dims, n_random, sampler, seeds, prune, epochs)
        return run_configs(cache_path, base_cfg, plan, seeds, out, list(dims), execution=execution, progress=progress, console=console)
    if space:
        raise ConfigError("--space needs --random N (the number of draws)")
    parsed = parse_grid(grid)
    return run_configs(cache_path, base_cfg, grid_configs(parsed), seeds, out, list(parsed), execution=execution, progress=progress, console=console)


def summary(out: Path, storage: str | None = None, study: str | None = None) -> SweepResult:
    """``sppscl sweep summary``: the tables of a sweep from its study alone (any machine, no cache, no run directories).

    ``storage`` None reads the journal in the sweep folder ``out``; otherwise the study ``study`` in ``storage``.
    Writes runs.csv, summary.csv and summary.md to ``out``, as the sweep itself does."""
    out = Path(out)
    local = storage is None
    if local:
        check_output_folder(out, "the sweep's tables")  # a FIFO or file at --out is named as what it is
    if local and not (out / LOCAL_STUDY_FILE).exists():
        raise SweepError(f"{out} holds no sweep study ({LOCAL_STUDY_FILE}); give the sweep folder with --out, or --storage and --study")
    store = open_storage(storage, out, DEFAULT_HEARTBEAT)
    where = str(out / LOCAL_STUDY_FILE) if local else masked(storage)
    if study is None:
        import optuna

        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        if len(names) != 1:
            raise SweepError(f"{where} holds {len(names)} studies ({', '.join(names) or 'none'}): name one with --study")
        study = names[0]
    opened, meta = load_meta(store, study, where)
    seeds = meta["seeds"]
    if meta["kind"] == "grid":
        plan = ListPlan(meta["configs"], seeds)
    else:
        plan = SearchPlan(parse_space([f"{k}={v}" for k, v in meta["space"].items()]), 0, "random", seeds, meta.get("prune"))
    keys, primary = meta["keys"], meta["primary_f1"]
    rows = study_rows(all_trials(opened), plan, keys, meta["base"], local)
    write_csv(out / "runs.csv", rows)
    table = aggregate(rows, keys, primary)
    write_summary(out, table, keys, primary, len(seeds))
    failed, pruned, skipped = ([r["run"] for r in rows if r["status"] == s] for s in ("failed", "pruned", "skipped"))
    return SweepResult(out, out / "runs", keys, rows, table, [], failed, primary, seeds, pruned=pruned, skipped=skipped)
