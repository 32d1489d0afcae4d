"""Device choice shared by extraction, training, evaluation and prediction."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the GPU when there is one; asking for CUDA where there is none is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available on this machine (use cpu or auto)")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: only cpu and cuda are supported (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device {device!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})")
    return dev
