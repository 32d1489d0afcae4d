"""Configurations from a command's options: the preset, then --set overrides restricted to the command's stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import CONFIG_DIR, STAGE_SECTIONS, Config, apply_overrides, load_config


def stage1_config(config: Optional[str], sets: list[str], command: str = "extract", **section_overrides) -> Config:
    """A stage-one configuration: --set keys resolve among the dataset, encoders and extract sections only."""
    cfg = load_config(config or "demo", sets, STAGE_SECTIONS["extract"], command)
    extra = {k: v for k, v in section_overrides.items() if v is not None}
    return apply_overrides(cfg, extra) if extra else cfg



def train_config(cache: Path, config: Optional[str], sets: list[str], seed: Optional[int], device: Optional[str] = None, command: str = "train") -> Config:
    """The preset given, else the one named after the cache's dataset, else defaults; then --set overrides (train keys only)."""
    from ..cache import FeatureCache

    if config is None:
        name = FeatureCache(cache).provenance["dataset"]["name"]
        config = name if (CONFIG_DIR / f"{name}.yaml").exists() else None
    cfg = load_config(config) if config else Config()
    if seed is not None:
        sets = [*sets, f"seed={seed}"]
    if device is not None:
        sets = [*sets, f"device={device}"]
    return apply_overrides(cfg, sets, STAGE_SECTIONS["train"], command)
