"""Where a sweep's configurations come from: a grid known up front, or draws from an Optuna study."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ...cache import diff_provenance
from ...config import ConfigError
from .spec import SAMPLERS, SpaceDim, SweepError


class Plan(Protocol):
    expected: int  # configurations the plan will produce (for the progress total)

    def more(self, wanted: int) -> list[tuple[dict, int | None]]:
        """Up to ``wanted`` new (overrides, trial number) configurations; an empty list means the plan is exhausted."""

    def done(self, trial: int | None, rows: list[dict]) -> None:
        """Every seed of a configuration has finished (``rows``: one per seed)."""


class GridPlan:
    """A grid is known up front: every configuration is handed out at once (the workers drain the queue)."""

    def __init__(self, configs: list[dict]):
        self.configs, self.expected = configs, len(configs)

    def more(self, wanted: int) -> list[tuple[dict, int | None]]:
        out, self.configs = self.configs, []
        return [(c, None) for c in out]

    def done(self, trial: int | None, rows: list[dict]) -> None:
        pass


class StudyPlan:
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
                + "\n  ".join(diff_provenance(stored, meta, names=("the stored study", "this command")))
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
