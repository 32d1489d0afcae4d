"""One configuration object, resolved once: defaults, then a preset file, then ``key=value`` overrides.

The resolved config is saved in every run directory and checkpoint (the nanoGPT / open_clip habit),
so a resumed or evaluated run takes its architecture from the checkpoint, not from the command line.
Overrides are typed by the default's type and an unknown key is an error.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SppsclError, check_input_file, shown, shown_key


def _preset_dir() -> Path:
    """The presets: ``sppscl/configs`` in an installed wheel, ``configs/`` beside the package in a source checkout.

    ``configs/`` is the one copy in the source tree; pyproject maps it into the wheel as ``sppscl/configs`` (not
    ``sppscl/presets``: that name is the ``presets`` command's module).
    """
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


PRESET_DIR = _preset_dir()
# the name cli.py and other modules import
CONFIG_DIR = PRESET_DIR


class ConfigError(SppsclError, ValueError):
    """A preset or an override is malformed; the message names the key and what is wrong."""


@dataclass
class DatasetConfig:
    name: str = "demo"
    # auto (recognise the public layouts, see stage1/layouts.py) | clmlf | hfm-raw | mvsa-raw | mmsd2 | manifest | synthetic
    format: str = "synthetic"
    # A relative data_dir resolves against the folder of the YAML file that sets it; a built-in preset's against
    # the current directory. image_dir, splits and label_dir resolve against data_dir.
    data_dir: str = "cache/demo-data"
    image_dir: str = "images"
    # split name -> file inside data_dir (format-specific meaning)
    splits: dict[str, str] = field(default_factory=dict)
    classes: list[str] = field(default_factory=lambda: ["positive", "neutral", "negative"])
    # weighted (MVSA) or macro (HFM): the F1 used to break dev-accuracy ties and reported first
    primary_f1: str = "weighted"
    # MMSD2.0 label folder (format mmsd2) or HFM keyword filter switch (format hfm-raw)
    label_dir: str = ""
    hfm_keyword_filter: bool = True
    # synthetic generator size (format synthetic)
    synthetic_size: int = 900


@dataclass
class EncoderConfig:
    image: str = "resnet50"
    text: str = "bert-base-uncased"
    # word pieces incl. [CLS] and [SEP]; official max_length=202
    max_length: int = 202
    # how many of the text encoder's last layers are cached
    layers: int = 4


@dataclass
class ExtractConfig:
    batch_size: int = 32
    # image-decoding worker processes; -1 = auto (2 on CPU, on CUDA every core but one, up to 8)
    num_workers: int = -1
    dtype: str = "float16"
    device: str = "auto"
    # the encoders' compute precision: bf16/fp16 run them under autocast (docs/performance.md: when bf16 is right)
    precision: str = "fp32"


@dataclass
class TrainConfig:
    # Table 2 defaults are MVSA-Single's; presets override per dataset.
    lambda_ce: float = 5.0
    lr: float = 1e-4
    weight_decay: float = 1e-6
    step_size: int = 10
    gamma: float = 0.5
    dropout: float = 0.2
    batch_size: int = 64
    eval_batch_size: int = 64
    epochs: int = 150
    tau: float = 0.07
    alpha: float = 2 / 3
    dim: int = 32
    # batch (paper Eq. 3) | sample (batch-independent) | concat (Table 7 "w/o CMF")
    fusion: str = "batch"
    # HA over the last k cached layers (Table 6)
    ha_layers: int = 4
    # two-step (Algorithm 1) | one-step (Table 4)
    update: str = "two-step"
    # official | cosine
    gate: str = "official"
    # step 2's optimizer step on parameters L_cl_m does not reach (fusion, classifier): "none" leaves them untouched
    # (zero_grad(set_to_none=True)); "zero" zero-fills their gradients like the official code (torch 1.8), so AdamW's
    # momentum and weight decay still move them on every fired step 2 (SPEC §7.6)
    step2_grads: str = "none"
    use_intra: bool = True
    use_inter: bool = True
    supcon_self_term: bool = False
    inter_symmetric: bool = False
    # both | text | image: unimodal variants for the demo's comparison table
    modalities: str = "both"
    seed: int = 42
    device: str = "auto"
    # stop when dev has not improved for this many epochs; 0 = train every epoch
    patience: int = 0
    # cross-validation over the labelled train+dev rows (stage2/folds.py): 0 = the cache's own splits; K >= 2 = this
    # run trains on fold cv_fold of K (its validation part carved from the other folds, scored on the held-out fold)
    cv_folds: int = 0
    cv_fold: int = 0
    # the fold assignment's seed, separate from `seed`, so every training seed sees the same folds
    cv_seed: int = 0
    # share of the training folds set aside (stratified) as the validation part that selects the model
    cv_val_fraction: float = 0.125
    # torch intra-op threads for stage two; 0 = torch's default (one per core). On a machine shared with other
    # jobs, threads beyond the free cores wait for each other at every small op: 1 is then much faster.
    threads: int = 0
    # none | tensorboard | mlflow: an experiment tracker mirroring metrics.jsonl (each an optional extra)
    logger: str = "none"


SECTIONS = {"dataset": DatasetConfig, "encoders": EncoderConfig, "extract": ExtractConfig, "train": TrainConfig}

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("dataset", "format"): ("auto", "clmlf", "hfm-raw", "mvsa-raw", "mmsd2", "manifest", "synthetic"),
    ("dataset", "primary_f1"): ("weighted", "macro"),
    ("extract", "dtype"): ("float16", "float32"),
    ("extract", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "fusion"): ("batch", "sample", "concat"),
    ("train", "update"): ("two-step", "one-step"),
    ("train", "gate"): ("official", "cosine"),
    ("train", "step2_grads"): ("none", "zero"),
    ("train", "modalities"): ("both", "text", "image"),
    ("train", "logger"): ("none", "tensorboard", "mlflow"),
}


# (low, high, in words) for every numeric key with a limit; a value outside is an error, never replaced.
_POS = (1, math.inf, "a positive whole number")
RANGES: dict[tuple[str, str], tuple[float, float, str]] = {
    ("dataset", "synthetic_size"): (3, math.inf, "at least 3 (one sample per class)"),
    ("encoders", "max_length"): (2, 100_000, "at least 2 ([CLS] and [SEP])"),
    ("encoders", "layers"): _POS,
    ("extract", "batch_size"): _POS,
    ("extract", "num_workers"): (-1, 1024, "-1 (auto), 0 (decode in this process) or a count of processes"),
    ("train", "lr"): (sys.float_info.min, math.inf, "positive"),
    ("train", "tau"): (sys.float_info.min, math.inf, "positive"),
    ("train", "lambda_ce"): (0, math.inf, "zero or positive"),
    ("train", "weight_decay"): (0, math.inf, "zero or positive"),
    ("train", "gamma"): (sys.float_info.min, 1, "in (0, 1]"),
    ("train", "alpha"): (0, math.inf, "zero or positive"),
    ("train", "batch_size"): (2, math.inf, "at least 2 (the contrastive losses need pairs)"),
    ("train", "eval_batch_size"): _POS,
    ("train", "epochs"): _POS,
    ("train", "dim"): _POS,
    ("train", "step_size"): _POS,
    ("train", "seed"): (0, 2**32 - 1, "between 0 and 2**32-1"),
    ("train", "threads"): (0, 4096, "0 (torch's default) or a positive count"),
    ("train", "patience"): (0, math.inf, "0 (off) or a number of epochs"),
    ("train", "cv_folds"): (0, math.inf, "0 (the cache's own splits) or at least 2"),
    ("train", "cv_fold"): (0, math.inf, "between 0 and cv_folds-1"),
    ("train", "cv_seed"): (0, 2**32 - 1, "between 0 and 2**32-1"),
    ("train", "cv_val_fraction"): (sys.float_info.min, 1 - sys.float_info.epsilon, "in (0, 1)"),
}


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the YAML file it was loaded from ("" for defaults); see data_dir() for what relative paths resolve against
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls(source=d.get("source", ""))
        for section in SECTIONS:
            _merge_section(cfg, section, d.get(section, {}), origin="stored config")
        return cfg

    def data_dir(self, override: str | Path | None = None) -> Path:
        """The dataset folder, absolute.

        ``override`` (a command-line path) resolves against the current directory. The config's own
        ``dataset.data_dir`` resolves against the folder of the YAML file that set it, except in a built-in preset,
        whose ``data/<dataset>`` means "under the current directory" wherever the package is installed.
        """
        if override is not None:
            p, base = Path(override).expanduser(), Path.cwd()
        else:
            p = Path(self.dataset.data_dir).expanduser()
            base = Path(self.source).parent if self.source and not is_preset_file(self.source) else Path.cwd()
        # abspath, not resolve(): keep the user's symlinks in the paths we report
        return Path(os.path.abspath(base / p))

    def validate(self) -> None:
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                check_value(section, key, value)
        t = self.train
        if not 1 <= t.ha_layers <= self.encoders.layers:
            raise ConfigError(f"train.ha_layers={t.ha_layers} must be between 1 and encoders.layers={self.encoders.layers}")
        if t.cv_folds == 1:
            raise ConfigError("train.cv_folds=1: must be 0 (the cache's own splits) or at least 2")
        if t.cv_folds and not 0 <= t.cv_fold < t.cv_folds:
            raise ConfigError(f"train.cv_fold={t.cv_fold} must be between 0 and cv_folds-1={t.cv_folds - 1}")
        if not 0 <= t.dropout < 1:
            raise ConfigError(f"train.dropout must be in [0, 1), got {t.dropout}")
        if not t.use_intra and not t.use_inter and t.lambda_ce <= 0:
            raise ConfigError("with use_intra=false, use_inter=false and lambda_ce<=0 nothing is trained")


# the largest integer a setting may hold: every JSON reader keeps it exact (a float's 53-bit mantissa)
MAX_INT = 2**53


def check_value(section: str, key: str, value: Any) -> None:
    """The checks one value must pass whatever the other keys hold: a listed choice, finite, within its range."""
    allowed = CHOICES.get((section, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{section}.{key}={shown(value)} is not one of {', '.join(allowed)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{section}.{key}={shown(value)}: must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
        # a count this large means nothing here, and records (HDF5 attributes, JSON readers) cannot hold it
        raise ConfigError(f"{section}.{key}={shown(value)}: must be between -2^53 and 2^53")
    if (section, key) in RANGES:
        low, high, what = RANGES[(section, key)]
        if not low <= value <= high:
            raise ConfigError(f"{section}.{key}={shown(value)}: must be {what}")


def coerce_value(value: Any, default: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the type of ``default``."""
    target = type(default)
    if isinstance(value, str) and target is not str:
        text = value.strip()
        if target is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {shown(value)}")
        if target in (int, float):
            try:
                # accept fractions such as 2/3 for alpha
                if "/" in text:
                    num, den = text.split("/", 1)
                    ratio = float(num) / float(den)
                    if target is int and not ratio.is_integer():
                        raise ValueError(text)  # 5/2 for a count would silently become 2
                    return target(ratio)
                return target(float(text)) if target is float else int(text)
            except (ValueError, ZeroDivisionError, OverflowError):
                raise ConfigError(f"{where}: expected a {target.__name__}, got {shown(value)}") from None
        if target in (list, dict):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                if target is list:
                    return [v.strip() for v in text.split(",") if v.strip()]
                raise ConfigError(f"{where}: expected a {target.__name__}, got {shown(value)}") from None
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected a {target.__name__}, got {shown(value)} ({type(value).__name__})")
    return value


def _merge_section(cfg: Config, section: str, values: dict[str, Any], origin: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: section {shown(section)} must be a mapping")
    obj = getattr(cfg, section)
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown key {section}.{shown_key(key)} (known: {', '.join(sorted(known))})")
        setattr(obj, key, coerce_value(value, getattr(obj, key), f"{origin}: {section}.{key}"))


# The sections each command reads: a --set key must belong to the stage that uses it (extract's batch_size is not
# train's), so a bare key resolves among these sections only, and a key from another section is an error.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "extract": ("dataset", "encoders", "extract"),
    "train": ("train",),
}


def resolve_key(key: str, sections: tuple[str, ...] | None = None, command: str = "") -> tuple[str, str]:
    """``lr`` or ``train.lr`` -> ("train", "lr"). Bare keys are looked up in ``sections`` (default: every section);
    ambiguity is an error, and so is a key outside ``sections`` (``command`` names who does not use it)."""
    allowed = sections or tuple(SECTIONS)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {shown(section)} in key {shown(key)} (sections: {', '.join(SECTIONS)})")
        if name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ConfigError(f"unknown key {shown(key)}{did_you_mean(key, allowed)}")
        if section not in allowed:
            raise ConfigError(_unused(key, allowed, command))
        return section, name
    hits = [s for s in allowed if key in {f.name for f in dataclasses.fields(SECTIONS[s])}]
    if not hits:
        elsewhere = [s for s, c in SECTIONS.items() if key in {f.name for f in dataclasses.fields(c)}]
        raise ConfigError(_unused(f"{elsewhere[0]}.{key}", allowed, command) if elsewhere else f"unknown key {shown(key)}{did_you_mean(key, allowed)}")
    if len(hits) > 1:
        # train is where sweeps and --set overrides live; the others need their section named
        if "train" in hits:
            return "train", key
        raise ConfigError(f"key {shown(key)} is ambiguous: write one of {', '.join(h + '.' + key for h in hits)}")
    return hits[0], key


def config_keys(sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """Every key of ``sections`` (default: all), bare name -> ``section.name`` (train's name wins a clash, as in
    :func:`resolve_key`)."""
    keys: dict[str, str] = {}
    for section in sections or tuple(SECTIONS):
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name not in keys or section == "train":
                keys[f.name] = f"{section}.{f.name}"
    return keys


def did_you_mean(key: str, sections: tuple[str, ...] | None = None) -> str:
    """`` (did you mean 'epochs'?)`` for a mistyped key among ``sections``' keys, else the empty string."""
    if "." in key:
        section, name = key.split(".", 1)
        names = [f.name for f in dataclasses.fields(SECTIONS[section])] if section in SECTIONS else []
        close = [f"{section}.{c}" for c in difflib.get_close_matches(name, names, n=3, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(key, list(config_keys(sections)), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"


def _unused(key: str, allowed: tuple[str, ...], command: str) -> str:
    who = f"`sppscl {command}`" if command else "this command"
    return f"--set {key}: {who} does not use this key (it reads {', '.join(s + '.*' for s in allowed)}); drop it or pass it to the command that does"


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any], sections: tuple[str, ...] | None = None, command: str = "") -> Config:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (typed, unknown keys rejected; with ``sections``,
    only keys of those sections are accepted, bare keys resolving among them)."""
    cfg = copy.deepcopy(cfg)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for key, value in items:
        section, name = resolve_key(key, sections, command)
        _merge_section(cfg, section, {name: value}, origin="override")
    cfg.validate()
    return cfg


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), value


def preset_names() -> list[str]:
    """The built-in presets, by name."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def is_preset_file(path: str | Path) -> bool:
    """Whether ``path`` is one of the built-in presets (by location, however it was named)."""
    return Path(path).resolve().parent == PRESET_DIR.resolve()


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``hfm``) or a YAML path."""
    p = Path(name_or_path)
    # a folder named like a preset (the HFM release cloned into ./hfm) is data, not a configuration file
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise ConfigError(f"no preset named {shown(name_or_path)} (presets: {', '.join(preset_names())}; `sppscl presets` lists them)")
    return candidate


# A preset is a few hundred bytes; a bigger file is not one (and is not read whole into memory)
MAX_YAML_BYTES = 1 << 20


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a preset needs none, and ``&a [*b, *b, ...]`` nested a few levels deep
    (a 1 KB "billion laughs" file) expands to gigabytes once anything walks it."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ConfigError(f"{self.name}: line {mark.line + 1}: YAML aliases (*name) are not accepted in a configuration; write the value out")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):
        """An integer; one longer than Python converts (4300 digits) is the file's error, not an internal one."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise ConfigError(
                f"{self.name}: line {node.start_mark.line + 1}: the number {shown(node.value)} has {len(node.value)} characters; no setting takes a number that long"
            ) from None


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def read_yaml(path: Path) -> Any:
    """A configuration file parsed by :class:`BoundedLoader`: regular files only (a FIFO would block), at most
    MAX_YAML_BYTES, no aliases, nesting bounded by the parser's recursion; every failure is one ConfigError."""
    if not check_input_file(path, "a YAML configuration"):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as fh:
        data = fh.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KB; a configuration is a few lines of YAML")
    try:
        loader = BoundedLoader(data.decode("utf-8"))
        loader.name = str(path)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {shown(str(e), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, sections: tuple[str, ...] | None = None, command: str = "") -> Config:
    path = preset_path(name_or_path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    cfg = Config(source=str(path.resolve()))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {shown(section)} (sections: {', '.join(SECTIONS)})")
        _merge_section(cfg, section, values or {}, origin=str(path))
    cfg = apply_overrides(cfg, overrides or [], sections, command)
    return cfg
