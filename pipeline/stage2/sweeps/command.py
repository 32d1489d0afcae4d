"""``sppscl sweep``: a grid or a random/TPE search over one cache, times seeds, summarised over seeds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ...cache import FeatureCache
from ...config import Config, ConfigError
from .engine import Execution, run_configs
from .plans import StudyPlan
from .spec import grid_configs, parse_grid, parse_space
from .tables import SweepResult


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
        plan = StudyPlan(out, dims, n_random, sampler, seeds)
        return run_configs(cache_path, base_cfg, plan, seeds, out, list(dims), execution=execution, progress=progress, console=console)
    if space:
        raise ConfigError("--space needs --random N (the number of draws)")
    parsed = parse_grid(grid)
    return run_configs(cache_path, base_cfg, grid_configs(parsed), seeds, out, list(parsed), execution=execution, progress=progress, console=console)
