"""Sweeps: many stage-two runs from one feature cache, resumable, in parallel, summarised over seeds.

A sweep is a set of configurations (a grid, or N draws from an Optuna study) times a set of seeds. The parts:

- ``spec``: parsing ``--grid``/``--space``/``--seeds``; configuration and run names.
- ``study``: the Optuna study every sweep is (local journal file or ``--storage``), and exactly-once claims.
- ``plans``: what the study samples: a list of configurations (GridSampler) or draws (random/TPE).
- ``worker``: one process that opens the cache once and trains the study's runs one after another.
- ``engine``: ``run_configs`` — run these (configuration, seed) runs, give me the rows and the tables.
- ``tables``: rows, aggregates over seeds, runs.csv / summary.csv / summary.md, the console table.
- ``command``: ``sppscl sweep`` and ``sppscl sweep summary``.

Other commands that are sweeps underneath (``reproduce``) call ``run_configs`` with their own configurations.
"""

from .command import summary, sweep
from .engine import Execution, parse_devices, run_configs
from .plans import ListPlan, SearchPlan
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
    "ListPlan",
    "SearchPlan",
    "grid_configs",
    "mean_std",
    "parse_devices",
    "parse_grid",
    "parse_seeds",
    "parse_space",
    "print_summary",
    "run_config",
    "run_configs",
    "summary",
    "sweep",
    "write_summary",
]
