"""Configurations from a command's options: the preset, then --set overrides restricted to the command's stage.

The commands and the Python API resolve a configuration the same way, so the functions live in ``sppscl.api``."""

from __future__ import annotations

from ..api import stage1_config, train_config

__all__ = ["stage1_config", "train_config"]
