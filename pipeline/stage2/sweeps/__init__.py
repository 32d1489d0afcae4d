"""Sweeps: many stage-two runs from one feature cache, resumable, in parallel, summarised over seeds.

A sweep is a set of configurations (a grid, or N draws from an Optuna study) times a set of seeds. The parts:

- ``spec``: parsing ``--grid``/``--space``/``--seeds``; configuration and run names.
- ``plans``: where configurations come from (a grid, an Optuna study).
- ``worker``: one process that opens the cache once and trains run after run.
- ``engine``: ``run_configs`` — run these (configuration, seed) runs, give me the rows and the tables.
- ``tables``: rows, aggregates over seeds, runs.csv / summary.csv / summary.md, the console table.
- ``command``: ``sppscl sweep``.

Other commands that are sweeps underneath (``reproduce``) call ``run_configs`` with their own configurations.
"""

from .command import sweep
from .engine import Execution, run_configs
from .spec import SweepError, config_slug, default_sweep_dir, grid_configs, parse_grid, parse_seeds, parse_space, run_config
from .tables import METRIC_COLUMNS, SweepResult, aggregate, cell, mean_std, print_summary, write_summary

__all__ = [
    "Execution",
    "METRIC_COLUMNS",
    "SweepError",
    "SweepResult",
    "aggregate",
    "cell",
    "config_slug",
    "default_sweep_dir",
    "grid_configs",
    "mean_std",
    "parse_grid",
    "parse_seeds",
    "parse_space",
    "print_summary",
    "run_config",
    "run_configs",
    "sweep",
    "write_summary",
]
