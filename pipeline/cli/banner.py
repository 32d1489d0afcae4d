"""What a stage-two command is about to do, said before it does it: the start banner on stderr and ``--dry-run``.

The banner names the device and threads, the cache's rows per split with each class's share, the resolved
configuration's differences from its preset, and the folder the command writes. ``--dry-run`` prints the banner
and the runs the command would train, then stops before anything is written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..config import Config

DRY_RUN_HELP = "Print the start banner and what would run, then stop: nothing is trained or written."


def split_classes(cache: Path, classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per split of the cache: its row count and each class's share (labels only; the features are not read)."""
    out: dict[str, dict[str, Any]] = {}
    with h5py.File(cache, "r") as f:
        order = {"train": 0, "dev": 1, "test": 2}
        for split in sorted(f["splits"], key=lambda s: (order.get(s, 3), s)):
            labels = np.asarray(f["splits"][split]["labels"][()])
            labelled = labels[labels >= 0]
            counts = np.bincount(labelled, minlength=len(classes)) if labelled.size else np.zeros(len(classes), int)
            out[split] = {"rows": int(labels.size), "labelled": int(labelled.size), "counts": {c: int(n) for c, n in zip(classes, counts)}}
    return out


def config_changes(cfg: Config, base: Config) -> list[str]:
    """``key: preset -> resolved`` for every train key the command line (or a file) changed."""
    now, before = dataclasses.asdict(cfg.train), dataclasses.asdict(base.train)
    return [f"{k} {before[k]!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]


def banner_lines(cache: Path, cfg: Config, base: Config, out: Path | None, what: str) -> list[str]:
    """The banner's lines: the command, device and threads, rows and class shares per split, changes from the
    preset (named by ``base.source``), and the output folder. Warns when a labelled split holds one class."""
    from ..cache import FeatureCache
    from ..devices import resolve_device

    import torch

    classes = list(FeatureCache(cache).provenance["dataset"]["classes"])
    dev = resolve_device(cfg.train.device)
    threads = cfg.train.threads or torch.get_num_threads()
    lines = [f"{what}: cache {cache}", f"device {dev}, {threads} torch thread(s)" + ("" if cfg.train.threads else " (torch's default)")]
    warnings = []
    for split, s in split_classes(cache, classes).items():
        if not s["labelled"]:
            lines.append(f"  {split}: {s['rows']} rows, unlabelled (predicted, not scored)")
            continue
        shares = ", ".join(f"{c} {n / s['labelled']:.0%}" for c, n in s["counts"].items())
        lines.append(f"  {split}: {s['rows']} rows ({shares})")
        present = [c for c, n in s["counts"].items() if n]
        if len(present) == 1 and s["labelled"] > 1:
            warnings.append(f"warning: split {split!r} holds one class only ({present[0]}): its accuracy says nothing about a model")
    source = Path(base.source).stem if base.source else "the defaults"
    changes = config_changes(cfg, base)
    lines.append(f"configuration: preset {source}" + (", changed: " + "; ".join(changes) if changes else ", unchanged"))
    if out is not None:
        lines.append(f"output: {out}")
    return lines + warnings


def print_banner(console, cache: Path, cfg: Config, base: Config, out: Path | None, what: str) -> None:
    for line in banner_lines(cache, cfg, base, out, what):
        style = "yellow" if line.startswith("warning:") else None
        console.print(line, style=style, highlight=False, markup=False, soft_wrap=True)
