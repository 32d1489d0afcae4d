"""A stage-two epoch on the device, with MVSA-Single's and HFM's presets and feature shapes (ResNet-50 maps,
BERT-base token states): ``train`` itself (batches to the device, the two-step update, the dev evaluation, the
checkpoints) on a synthetic cache whose dev split is an eighth of its train split, like both datasets'. The last
epoch is timed (the first pays the device's warm-up) and projected, per sample, to each dataset's train split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sppscl.config import apply_overrides, load_config
from sppscl.stage2.train import train

from ..synth import write_cache
from .sizes import DATASETS

SECTION = "stage2"


def synthetic_cache(ctx, name: str, classes: list[str]) -> Path:
    """A cache with this section's shapes for a dataset's classes (written once per run, shared with ``sweeps``)."""
    path = ctx.workdir / f"stage2-{name}.h5"
    if not path.exists():
        s = ctx.sizes
        rows = {"train": s.train_rows, "dev": max(2, s.train_rows // 8), "test": max(2, s.train_rows // 8)}
        write_cache(path, rows, s.image_shape, s.layers, s.hidden, s.mean_tokens, s.max_length, classes=list(classes))
    return path


def run(ctx, report) -> None:
    s, dev = ctx.sizes, ctx.device
    last_wall = 0.0
    for dataset, (preset, n_train, n_dev) in DATASETS.items():
        if not ctx.budget.fits(last_wall):
            report.skip(SECTION, f"{dataset}: not enough budget left ({ctx.budget.left():.0f} s; the previous dataset took {last_wall:.0f} s)")
            continue
        t0 = time.perf_counter()
        base = load_config(preset)
        cache = synthetic_cache(ctx, preset, base.dataset.classes)
        cfg = apply_overrides(base, {"epochs": s.epochs, "device": str(dev)})
        out = ctx.workdir / f"stage2-run-{preset}"
        train(cache, cfg, out, progress=False)
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        epoch_s = epochs[-1]["epoch_seconds"]
        per_sample = epoch_s / s.train_rows
        last_wall = time.perf_counter() - t0
        report.figure(
            SECTION,
            f"stage-two epoch, {dataset} ({n_train:,} train, batch {cfg.train.batch_size})",
            f"{n_train * per_sample:.2f} s",
            f"projected from epoch {len(epochs)} on {s.train_rows:,} synthetic rows ({epoch_s:.2f} s: {s.train_rows / epoch_s:,.0f} "
            f"train samples/s, dev evaluation included); feature shapes [{','.join(map(str, s.image_shape))}] and "
            f"{s.layers}×{s.hidden}, {len(base.dataset.classes)} classes, {preset} preset",
            epoch_seconds=n_train * per_sample,
            measured_epoch_seconds=epoch_s,
            rows=s.train_rows,
        )
        if dataset == "MVSA-Single":
            ctx.shared["sweep_cache"], ctx.shared["sweep_preset"] = cache, preset
