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

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from .spec import PRUNERS, SAMPLERS, SpaceDim, config_slug, run_name
from .study import attrs, by_run, is_pruned, is_queued, outcome


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

    def table(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        return self.runs

    def skipped(self, trials: list[FrozenTrial]) -> dict[str, str]:
        return {}  # a list is never pruned: every run is trained to its end

    def pruner(self) -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()

    def prunes(self, seed: int) -> bool:
        return False


class SearchPlan:
    """``n`` configurations drawn by a random or TPE sampler over ``space``, each run for every seed.

    A drawn trial runs the first seed and queues the others (so they train in parallel); every run's value is its
    dev accuracy, so TPE sees each seed as one observation of its configuration. A configuration drawn twice
    shares the runs of the first draw. A draw that dies before it has announced its run holds nothing and is
    not counted: another draw replaces it.

    ``prune`` (``median`` or ``hyperband``: Optuna's MedianPruner or HyperbandPruner): a configuration's first seed
    reports its dev accuracy after every epoch and stops when the pruner says so (a pruned run: finished, never
    retried, in no mean). Its other seeds are queued only once the first seed finished without being pruned, so
    a pruned configuration starts no other seed (``skipped``); they are never pruned themselves, so a surviving
    configuration's mean is over whole runs. ``epochs``: the longest run, the hyperband pruner's ``max_resource``."""

    kind = "search"

    def __init__(self, space: dict[str, SpaceDim], n: int, sampler: str, seeds: list[int], prune: str | None = None, epochs: int | None = None):
        from ...config import ConfigError

        if sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        if prune is not None and prune not in PRUNERS:
            raise ConfigError(f"--prune {prune!r} is not one of {', '.join(PRUNERS)}")
        self.space, self.n, self.sampler_name, self.seeds = space, n, sampler, list(seeds)
        self.prune, self.epochs = prune, epochs

    def meta(self) -> dict:
        meta = {"kind": self.kind, "space": {k: d.describe() for k, d in sorted(self.space.items())}, "seeds": self.seeds}
        # only when set: a search without pruning keeps the definition it had before pruning existed
        return {**meta, "prune": self.prune} if self.prune else meta

    def pruner(self) -> optuna.pruners.BasePruner:
        """The study's pruner (Optuna's own, with its defaults but for hyperband's resource: epochs, from 1 to ``epochs``)."""
        if self.prune == "median":
            return optuna.pruners.MedianPruner()
        if self.prune == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=self.epochs or "auto")
        return optuna.pruners.NopPruner()

    def prunes(self, seed: int) -> bool:
        """Whether the run of ``seed`` reports its epochs to the pruner and may be stopped: a configuration's first seed."""
        return self.prune is not None and seed == self.seeds[0]

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
        return len(self.table(trials)) - len(self.skipped(trials)) + self.fresh(trials)

    def table(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        """Drawn configurations in the order of their first draw, seeds inner: every run the tables list."""
        configs: dict[str, dict] = {}
        for t in sorted(trials, key=lambda t: t.number):
            if t.user_attrs.get("draw") and "run" in t.user_attrs:  # "run" is announced last: the rest is there
                configs.setdefault(config_slug(t.user_attrs["overrides"]), t.user_attrs["overrides"])
        return [(c, s) for c in configs.values() for s in self.seeds]

    def _first_outcomes(self, trials: list[FrozenTrial]) -> dict[str, FrozenTrial | None]:
        """Configuration slug -> the outcome of its first seed's run (None while it has none)."""
        held = by_run(trials)
        firsts = {config_slug(c): c for c, s in self.table(trials) if s == self.seeds[0]}
        return {slug: outcome(held.get(run_name(c, self.seeds[0]), []), local=False) for slug, c in firsts.items()}

    def ordered(self, trials: list[FrozenTrial]) -> list[tuple[dict, int]]:
        """The runs to train, in table order: with pruning, a configuration's other seeds only once its first seed
        finished unpruned (or failed with an error: a failure is no pruner's verdict)."""
        runs = self.table(trials)
        if self.prune is None or len(self.seeds) == 1:
            return runs
        first = self._first_outcomes(trials)
        released = {slug for slug, t in first.items() if t is not None and not is_pruned(t)}
        return [(c, s) for c, s in runs if s == self.seeds[0] or config_slug(c) in released]

    def skipped(self, trials: list[FrozenTrial]) -> dict[str, str]:
        """Run name -> why it is not started: its configuration's first seed was pruned (counted in the tables)."""
        if self.prune is None or len(self.seeds) == 1:
            return {}
        first = self._first_outcomes(trials)
        out = {}
        for c, s in self.table(trials):
            t = first.get(config_slug(c))
            if s != self.seeds[0] and t is not None and is_pruned(t):
                out[run_name(c, s)] = f"not started: seed {self.seeds[0]} of this configuration was pruned at epoch {attrs(t).get('pruned_epoch')}"
        return out
