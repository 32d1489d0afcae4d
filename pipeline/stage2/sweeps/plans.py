"""What a sweep runs: a list of configurations (a grid, a paper table) or draws over a search space, times seeds.

A plan says which runs exist (``ordered``: every one the study knows of, in table order; ``study.requeue``
queues each as one named trial), how a trial reads or picks its run (``choose``), which sampler draws new
configurations, and how many draws are still to make (``fresh``). A list plan's runs are all known up front,
so every one of its trials is queued with its run named; only a search makes trials with a sampler (its
draws). Both plans are picklable, so the worker processes get the same one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from .spec import SAMPLERS, SpaceDim, config_slug, run_name
from .study import is_queued


class ListPlan:
    """Every configuration of a list times every seed, each (configuration, seed) one run queued as its own trial.

    Any list (a grid's product, a paper table's variants, CV folds) is run the same way. Configurations that are
    equal (same overrides) are kept once. A trial's params are the configuration's index and the seed."""

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
        # every trial is queued with fixed params: the sampler never chooses anything
        return optuna.samplers.RandomSampler(seed=worker)

    def choose(self, trial: Trial, frozen: FrozenTrial) -> tuple[dict, int, bool]:
        """The run a queued trial was created for (its params are recorded for the study's readers)."""
        index = trial.suggest_categorical("config", list(range(len(self.configs))))
        return self.configs[index], trial.suggest_categorical("seed", self.seeds), False

    def params(self, overrides: dict, seed: int) -> dict:
        return {"config": self.configs.index(overrides), "seed": seed}

    def surplus(self, number: int, trials: list[FrozenTrial]) -> bool:
        return True  # a trial the sampler made (two workers asked for the last queued one): it holds no run

    def fresh(self, trials: list[FrozenTrial]) -> int:
        return 0  # nothing is drawn: every run is queued by study.requeue

    def total(self, trials: list[FrozenTrial]) -> int:
        return len(self.runs)

    def ordered(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        return self.runs


class SearchPlan:
    """``n`` configurations drawn by a random or TPE sampler over ``space``, each run for every seed.

    A drawn trial runs the first seed and queues the others (so they train in parallel); every run's value is its
    dev accuracy, so TPE sees each seed as one observation of its configuration. A configuration drawn twice
    shares the runs of the first draw. A draw that dies before it has announced its run holds nothing and is
    not counted: another draw replaces it."""

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
        seed = (1009 * worker + 1) % 2**32  # `worker` is the worker's stream, offset by the study's progress
        return optuna.samplers.RandomSampler(seed=seed) if self.sampler_name == "random" else optuna.samplers.TPESampler(seed=seed)

    def choose(self, trial: Trial, frozen: FrozenTrial) -> tuple[dict, int, bool]:
        # a queued trial's suggestions return its fixed params: the sampler sees it as an observation of its configuration
        overrides = {name: dim.suggest(trial) for name, dim in self.space.items()}
        if is_queued(frozen):
            return overrides, frozen.user_attrs["seed"], False
        return overrides, self.seeds[0], True

    def params(self, overrides: dict, seed: int) -> dict:
        return dict(overrides)

    def _draws(self, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        # sampler-made trials that announced a run, or are still choosing one; one that died choosing is no draw
        return [t for t in trials if not is_queued(t) and ("run" in t.user_attrs or t.state == TrialState.RUNNING)]

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
            if t.user_attrs.get("draw") and "run" in t.user_attrs:  # "run" is announced last: the rest is there
                configs.setdefault(config_slug(t.user_attrs["overrides"]), t.user_attrs["overrides"])
        return [(c, s) for c in configs.values() for s in self.seeds]
