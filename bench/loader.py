"""3. Loader overhead of stage two: epochs read from the HDF5 cache against the same epochs from RAM.

Ours: ``FeatureCache.load`` (in RAM, or streamed with ``RowFile`` pread reads) + ``SplitBatches``, which
keeps features float16 and converts one batch at a time. Alternative: every feature already in RAM as
float32 tensors, tokens padded per sample, batches indexed directly. Both run the same shuffled batches
through the same two-step update from the same initial heads, so the difference is the loader.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sppscl.cache import FeatureCache, SplitData
from sppscl.stage2.data import Batch, SplitBatches
from sppscl.stage2.train import two_step_update

from .common import Context, Row, Section, Target, median, new_heads, train_config
from .synth import write_cache

TARGET = Target("<=", 1.10)


class Float32Batches(SplitBatches):
    """The alternative: the whole split as float32 tensors; a batch is a direct index (same shuffling as ours)."""

    def __init__(self, split: SplitData):
        super().__init__(split)
        lens = self._lengths
        n, width = len(split.offsets) - 1, int(lens.max())
        self.image = torch.from_numpy(np.asarray(split.image)).float()  # (n, C, h, w)
        self.tokens = torch.zeros((n, width, *split.tokens.shape[1:]))  # (n, N, L, H)
        self.mask = torch.zeros((n, width), dtype=torch.bool)
        for i in range(n):
            start, k = int(split.offsets[i]), int(lens[i])
            self.tokens[i, :k] = torch.from_numpy(np.asarray(split.tokens[start : start + k])).float()
            self.mask[i, :k] = True
        self.labels = torch.from_numpy(split.labels)

    def batch(self, rows: np.ndarray) -> Batch:
        width = int(self._lengths[rows].max())
        idx = torch.from_numpy(rows)
        return Batch(rows, self.image[idx], self.tokens[idx, :width], self.mask[idx, :width], self.labels[idx])


def lockstep(variants: dict[str, SplitBatches], batch_size: int, rounds: int, step=None) -> dict[str, list[float]]:
    """Per-batch seconds of ``rounds`` epochs of every variant, run in lockstep: batch i of each variant back
    to back (the order rotating per round), so a burst of other people's load hits every variant alike.

    ``step(name)`` returns a function applied to each batch (the training step of that variant's own heads);
    without it only batch assembly is timed. The shuffle is seeded: every variant sees the same batches.
    """
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        iters = {k: variants[k].train_batches(batch_size, np.random.default_rng(0)) for k in names}
        apply = {k: step(k) if step else (lambda batch: None) for k in names}
        order = names[r % len(names) :] + names[: r % len(names)]
        running = True
        while running:
            for k in order:
                t0 = time.perf_counter()
                batch = next(iters[k], None)
                if batch is None:
                    running = False
                    break
                apply[k](batch)
                times[k].append(time.perf_counter() - t0)
    return times


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("loader")
    tc = train_config(p.batch_size)
    path = ctx.workdir / "loader.h5"
    stats = write_cache(path, {"train": p.loader_rows}, p.image_shape, p.layers, p.hidden, p.mean_tokens, p.max_length)
    cache = FeatureCache(path)
    dims = (p.image_shape[0], p.hidden, p.layers)

    variants: dict[str, SplitBatches] = {}
    load_s: dict[str, float] = {}
    for name, in_memory in (("ram", True), ("stream", False)):
        t0 = time.perf_counter()
        variants[name] = SplitBatches(cache.load("train", in_memory=in_memory))
        load_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants["float32"] = Float32Batches(cache.load("train", in_memory=True))
    load_s["float32"] = time.perf_counter() - t0
    assembly_times = lockstep(variants, p.batch_size, 2)
    assembly = {k: median(v) for k, v in assembly_times.items()}
    n_batches = len(assembly_times["ram"]) // 2
    ctx.log("loader", f"{p.loader_rows} rows ({stats.file_bytes / 1e6:.0f} MB), {n_batches} batches/epoch; batch assembly "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in assembly.items()))

    def trainer(name: str):
        model, opt = new_heads(*dims, tc)
        return lambda batch: two_step_update(model, opt, batch, tc)

    lockstep({"float32": variants["float32"]}, p.batch_size, 1, trainer)  # warm-up
    per_batch = lockstep(variants, p.batch_size, p.loader_repeats, trainer)
    # an epoch is the median batch times the batches: robust to the stalls a shared machine throws in
    epochs = {name: median(v) * n_batches for name, v in per_batch.items()}
    ctx.log("loader", "epoch (median batch × batches): " + ", ".join(f"{k} {v:.2f} s" for k, v in epochs.items()))
    del variants
    if not ctx.keep:
        path.unlink()

    alt = epochs["float32"]
    sec.raw = {
        "cache": stats.to_dict(),
        "batches_per_epoch": n_batches,
        "batch_seconds": per_batch,
        "epoch_seconds": epochs,
        "load_seconds": load_s,
        "assembly_seconds_per_batch": assembly,
    }
    labels = {"ram": "cache fits in RAM (in_memory=True)", "stream": "cache streamed (in_memory=False, pread)"}
    for i, name in enumerate(("ram", "stream")):
        ours = epochs[name]
        note = ""
        if i == 0:
            note = (
                f"{p.loader_rows} synthetic rows of realistic shapes, {n_batches} batches of {p.batch_size} per epoch, "
                f"two-step update on the CPU; epoch = median batch (assembly + update) × batches, over {p.loader_repeats} "
                "epoch(s) of each variant run in lockstep (batch i of every variant back to back). Batch assembly alone: "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in assembly.items())
                + " per batch. Loading, once per run, is excluded: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in load_s.items())
                + ". Streamed reads hit the page cache (the file was just written)."
            )
        sec.rows.append(
            Row("loader", name, f"Loader overhead, {labels[name]}", ours, "s", alt, "float32 in RAM", ours / alt, target=TARGET, note=note)
        )
    return sec
