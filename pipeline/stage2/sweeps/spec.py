"""What a sweep runs: parsing ``--grid``/``--space``/``--seeds``, and the names of configurations and runs.

Pure functions over the configuration schema; nothing here trains or touches a file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import Config, ConfigError, TrainConfig, apply_overrides, check_value, coerce_value, resolve_key
from ..runs import RunError

SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "hyperband")  # Optuna's MedianPruner, HyperbandPruner (searches only)


class SweepError(RunError):
    """A sweep cannot start or continue as asked (another cache or configuration in its directory, a changed study)."""


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
        for v in values:
            # a value no run could use (nan, 0 epochs) is refused here, not once per failed run
            try:
                check_value("train", name, v)
            except ConfigError as e:
                raise ConfigError(f"--grid {item}: {e}") from None
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
            return ",".join(fmt(c) for c in self.choices)
        return f"{fmt(self.low)}:{fmt(self.high)}" + (":log" if self.log else "")


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
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ConfigError(f"--seeds {text!r}: seed {bad[0]} is not between 0 and 2**32-1")
    return list(dict.fromkeys(seeds))


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, ".8g")
    return str(v)


def config_slug(overrides: dict[str, Any]) -> str:
    """A configuration's directory name, from its overrides sorted by key (so the order given does not matter)."""
    if not overrides:
        return "base"
    slug = "__".join(f"{k}-{fmt(v)}" for k, v in sorted(overrides.items()))
    slug = re.sub(r"[^A-Za-z0-9._+-]", "_", slug)
    if len(slug) > 120:
        slug = slug[:100] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:10]
    return slug


def run_name(overrides: dict[str, Any], seed: int) -> str:
    """A run's name and directory: ``<config slug>-seed<N>``."""
    return f"{config_slug(overrides)}-seed{seed}"


def run_config(base: Config | dict, overrides: dict[str, Any], seed: int) -> Config:
    """The resolved configuration of one run: the sweep's base, its overrides, its seed."""
    base = Config.from_dict(base) if isinstance(base, dict) else base
    return apply_overrides(base, {**overrides, "seed": seed})


def default_sweep_dir(cache: Path, *parts: Any) -> Path:
    """``sweeps/<cache name>-<hash of the sweep's definition>``: the same command finds the same directory again."""
    digest = hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:8]
    return Path("sweeps") / f"{Path(cache).stem}-{digest}"
