"""What a sweep's study samples: a list of configurations (a grid, a paper table) or draws over a search space.

A plan says how a trial picks its run (configuration and seed), which sampler hands out configurations, how
many runs there are still to start, and in which order the runs form the table. Both plans are picklable, so
the worker processes get the same one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from .spec import SAMPLERS, SpaceDim, config_slug
from .study import by_run, is_queued


def run_name(overrides: dict[str, Any], seed: int) -> str:
    return f"{config_slug(overrides)}-seed{seed}"


class ListPlan:
    """Every configuration of a list times every seed, each (configuration, seed) one grid point of Optuna's GridSampler.

    The grid is over the configuration's index and the seed, so any list (a grid's product, a paper table's
    variants) is a grid to the sampler. Configurations that are equal (same overrides) are kept once."""

    kind = "grid"

    def __init__(self, configs: list[dict], seeds: list[int]):
        unique = {config_slug(c): dict(c) for c in configs}
        self.configs, self.seeds = list(unique.values()), list(seeds)
        self.runs = [(c, s) for c in self.configs for s in self.seeds]  # table order: configurations, seeds inner

    def meta(self) -> dict:
        return {"kind": self.kind, "configs": self.configs, "seeds": self.seeds}

    def local_study_name(self) -> str:
        # one study per definition: another grid or other seeds in the same folder reuse its run directories
        return "grid-" + hashlib.sha1(json.dumps(self.meta(), sort_keys=True, default=str).encode()).hexdigest()[:10]

    def sampler(self, worker: int) -> optuna.samplers.BaseSampler:
        # the same seed in every process: GridSampler's shuffled order (trial number -> point) must agree everywhere
        return optuna.samplers.GridSampler({"config": list(range(len(self.configs))), "seed": self.seeds}, seed=0)

    def choose(self, trial: Trial, frozen: FrozenTrial) -> tuple[dict, int, bool]:
        index = trial.suggest_categorical("config", list(range(len(self.configs))))
        return self.configs[index], trial.suggest_categorical("seed", self.seeds), False

    def params(self, overrides: dict, seed: int) -> dict:
        return {"config": self.configs.index(overrides), "seed": seed}

    def surplus(self, number: int, trials: list[FrozenTrial]) -> bool:
        return False  # a grid trial beyond the grid picks a point already held, and claim() steps it aside

    def fresh(self, trials: list[FrozenTrial]) -> int:
        """Runs no trial has taken yet."""
        held = by_run(trials)
        return sum(run_name(c, s) not in held for c, s in self.runs)

    def total(self, trials: list[FrozenTrial]) -> int:
        return len(self.runs)

    def ordered(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        return self.runs


class SearchPlan:
    """``n`` configurations drawn by a random or TPE sampler over ``space``, each run for every seed.

    A drawn trial runs the first seed and queues the others (so they train in parallel); every run's value is its
    dev accuracy, so TPE sees each seed as one observation of its configuration. A configuration drawn twice
    shares the runs of the first draw."""

    kind = "search"

    def __init__(self, space: dict[str, SpaceDim], n: int, sampler: str, seeds: list[int]):
        if sampler not in SAMPLERS:
            from ...config import ConfigError

            raise ConfigError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        self.space, self.n, self.sampler_name, self.seeds = space, n, sampler, list(seeds)

    def meta(self) -> dict:
        return {"kind": self.kind, "space": {k: d.describe() for k, d in sorted(self.space.items())}, "seeds": self.seeds}

    def local_study_name(self) -> str:
        return "sppscl"  # one search per sweep folder: another space there is refused

    def sampler(self, worker: int) -> optuna.samplers.BaseSampler:
        # workers draw from different streams; the seed is fixed so a local one-worker search is reproducible
        seed = (1009 * worker + 1) % 2**32
        return optuna.samplers.RandomSampler(seed=seed) if self.sampler_name == "random" else optuna.samplers.TPESampler(seed=seed)

    def choose(self, trial: Trial, frozen: FrozenTrial) -> tuple[dict, int, bool]:
        overrides = {name: dim.suggest(trial) for name, dim in self.space.items()}
        if is_queued(frozen) and "seed" in frozen.user_attrs:
            return overrides, frozen.user_attrs["seed"], bool(frozen.user_attrs.get("draw"))
        return overrides, self.seeds[0], True

    def params(self, overrides: dict, seed: int) -> dict:
        return dict(overrides)

    def _draws(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        # sampler-made trials are draws, except those given up before choosing a configuration
        return [t for t in trials if not is_queued(t) and not (t.state == TrialState.FAIL and "run" not in t.user_attrs)]

    def surplus(self, number: int, trials: list[FrozenTrial]) -> bool:
        """Trial ``number`` was made after the n-th draw (two workers asked at once for the last one)."""
        return sum(t.number < number for t in self._draws(trials)) >= self.n

    def fresh(self, trials: list[FrozenTrial]) -> int:
        return max(0, self.n - len(self._draws(trials))) * len(self.seeds)

    def total(self, trials: list[FrozenTrial]) -> int:
        return len(self.ordered(trials)) + self.fresh(trials)

    def ordered(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        """Drawn configurations in the order of their first draw, seeds inner."""
        configs: dict[str, dict] = {}
        for t in sorted(trials, key=lambda t: t.number):
            if t.user_attrs.get("draw") and "overrides" in t.user_attrs:
                configs.setdefault(config_slug(t.user_attrs["overrides"]), t.user_attrs["overrides"])
        return [(c, s) for c in configs.values() for s in self.seeds]
