"""Checkpoints that load without unpickling: tensors in safetensors, everything else as JSON.

A checkpoint ``NAME`` is two files in a run directory:

- ``NAME.safetensors``: every tensor (the heads' weights; in ``last`` also the optimiser state and torch's RNG
  state). Its header carries the checkpoint's metadata as JSON too, so this one file is complete and is replaced
  atomically: a crash never leaves weights and metadata from different epochs.
- ``NAME.json``: the same metadata for people and tools: format, epoch (1-based), the resolved config, the model
  dims, classes, the cache's provenance, the best epoch so far, and (``last``) the optimiser's hyperparameters,
  the scheduler and the RNG states. Tensors appear in it as ``{"__tensor__": key}`` references into the weights.

JSON has no tuples and only string keys, which Python's RNG state and an optimiser's state need; they are
written as ``{"__tuple__": [...]}`` and ``{"__items__": [[key, value], ...]}``.

Checkpoints written before this format (``best.pt``/``last.pt``, a torch pickle) are read with torch's
restricted unpickler (``weights_only=True``: tensors, containers and primitives only, no code runs), or refused
with the conversion command when they hold anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..cache import parse_header
from ..errors import SppsclError, check_input_file, shown
from ..outputs import atomic_write, check_output_file

FORMAT = "sppscl-checkpoint"
# 1: a torch pickle (best.pt), 0-based epochs; 2: safetensors + JSON, 1-based epochs
VERSION = 2
WEIGHTS_SUFFIX = ".safetensors"
META_KEY = "sppscl"


class CheckpointError(SppsclError, ValueError):
    """A checkpoint cannot be read or written; the message names the file and what to do."""


# ------------------------------------------------------------------------------------ JSON <-> tensors


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        # safetensors refuses views that share storage; a contiguous copy of each tensor stands alone
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {key!r} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ paths


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) of a checkpoint given as NAME.safetensors, NAME.json or NAME."""
    p = Path(path)
    if p.suffix in (WEIGHTS_SUFFIX, ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + WEIGHTS_SUFFIX), p.with_name(p.name + ".json")


# ------------------------------------------------------------------------------------ save and load


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` (nested dicts/lists/tuples of tensors and JSON values) as NAME.safetensors + NAME.json."""
    weights, meta_path = checkpoint_files(path)
    # both names first: a refused JSON name must not leave new weights beside old metadata
    for p in (weights, meta_path):
        check_output_file(p, "the checkpoint", flag="")
    tensors: dict[str, torch.Tensor] = {}
    meta = {k: _encode(v, k, tensors) for k, v in state.items()}
    text = json.dumps(meta, indent=1)
    # the weights file holds the metadata too and is the one replaced atomically; the JSON is its readable copy.
    # Serialised in memory first, so a full disk is an error naming the file and the bytes it needs, never half a file.
    resume = "rerun the same command (train: with --resume; the run continues from its last complete epoch)"
    atomic_write(weights, save(tensors, metadata={META_KEY: text}), "the checkpoint", resume)
    atomic_write(meta_path, text, "the checkpoint", resume)
    return weights


def load_checkpoint_file(path: str | Path) -> dict:
    """The checkpoint at ``path`` as a dict (tensors on the CPU). Never unpickles anything but torch's restricted
    set (tensors, containers, primitives) for a legacy ``.pt``; anything else is refused with what to do."""
    p = Path(path)
    if p.suffix == ".pt":
        return _load_legacy(p)
    if p.suffix != ".safetensors" and os.path.lexists(p):
        _present(p)  # the path as given is a FIFO or a device: say so, not "no such checkpoint" about NAME.safetensors
    weights, meta_path = checkpoint_files(p)
    if not _present(weights):
        legacy = weights.with_suffix(".pt")
        hint = f" (an older checkpoint {legacy} is there: pass it instead)" if legacy.exists() else ""
        raise CheckpointError(f"{weights}: no such checkpoint{hint}")
    try:
        with safe_open(weights, framework="pt", device="cpu") as fh:
            text = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    if text is None:
        raise CheckpointError(f"{weights}: a safetensors file without sppscl metadata, not an sppscl checkpoint")
    meta = parse_header(text, weights, "metadata", CheckpointError)
    try:
        ckpt = _decode(meta, tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{weights}: damaged checkpoint metadata ({type(e).__name__}: {shown(str(e))})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: not an sppscl checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{weights}: checkpoint version {ckpt.get('version')!r}, this sppscl reads version {VERSION}")
    check_finite_weights(ckpt, weights)
    return ckpt


def _present(path: Path) -> bool:
    """Whether a checkpoint file is there; a FIFO, device or folder in its place is refused before any open."""
    try:
        return check_input_file(path, "a checkpoint file")
    except SppsclError as e:
        raise CheckpointError(str(e)) from None


def check_finite_weights(ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint whose model weights hold NaN or infinity, naming the file and the first such tensor: a
    model with them predicts NaN probabilities (and class 0 for every row) instead of failing."""
    model = ckpt.get("model")
    for name, t in (model.items() if isinstance(model, dict) else ()):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: model tensor {name!r} holds {bad} NaN or infinite value(s) of {t.numel()}; the weights are "
                "damaged or the run diverged. Use another checkpoint (the run's other one, or retrain)"
            )


def _load_legacy(path: Path) -> dict:
    """A version-1 ``.pt`` checkpoint, unpickled only by torch's allow-list; epochs renumbered 1-based."""
    if not _present(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler's refusal, or a file that is no pickle at all
        raise CheckpointError(
            f"{path}: refused to load: not a checkpoint of tensors, containers and numbers ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'unreadable'}). sppscl's .pt checkpoints hold nothing else, so "
            "this file was written by something else or altered; unpickling it could run code, so it was not loaded"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sppscl checkpoint")
    ckpt = dict(ckpt)
    # version 1 counted epochs from 0
    try:
        ckpt["epoch"] = int(ckpt["epoch"]) + 1
        ckpt["best"] = {**ckpt["best"], "epoch": int(ckpt["best"]["epoch"]) + 1}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field epoch or best.epoch missing or not a number ({type(e).__name__}: {shown(str(e))})") from None
    ckpt["version"] = VERSION
    ckpt["converted_from"] = str(path)
    check_finite_weights(ckpt, path)
    return ckpt


def convert_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """A legacy ``.pt`` checkpoint rewritten as NAME.safetensors + NAME.json (beside it unless ``out``)."""
    src = Path(path)
    if src.suffix != ".pt":
        raise CheckpointError(f"{src}: only legacy .pt checkpoints need converting")
    # ``converted_from`` stays: such a checkpoint evaluates and predicts, but its run (0-based logs) is not resumed
    return save_checkpoint(_load_legacy(src), out if out is not None else src.with_suffix(""))
