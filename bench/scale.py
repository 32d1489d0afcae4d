"""4. Scale: stage two's epoch time and peak memory as the cache grows, and the cache's bytes per sample.

Each size gets a synthetic cache of realistic shapes (80/10/10 train/dev/test, like HFM), written with
large sequential writes, measured by ``bench.scale_worker`` in a fresh process (so its peak RSS is stage
two's alone), and deleted before the next size is written. Epoch times are extrapolated from a fixed
number of batches.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from .common import Context, Row, Section, Target, median
from .synth import compressed_bytes_per_sample, write_cache

REPO = Path(__file__).resolve().parents[1]
TARGET_RSS = Target("<=", 4e9, on="ours", unit="B")


def split_rows(n: int) -> dict[str, int]:
    train, dev = round(0.8 * n), round(0.1 * n)
    return {"train": train, "dev": dev, "test": n - train - dev}


def run_worker(path: Path, batches: int, batch_size: int, out_json: Path) -> dict:
    """The measurement in a fresh interpreter with this process's torch thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    cmd = [sys.executable, "-m", "bench.scale_worker", str(path), str(batches), str(batch_size), str(out_json)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scale worker failed on {path} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("scale")
    sizes = sorted(p.scale_sizes)
    results = {}
    for n in sizes:
        path = ctx.workdir / f"scale-{n}.h5"
        stats = write_cache(path, split_rows(n), p.image_shape, p.layers, p.hidden, p.mean_tokens, p.max_length)
        ctx.log(
            "scale",
            f"{n:,} samples: cache {stats.file_bytes / 1e9:.2f} GB (create_cache {stats.create_seconds:.1f} s, "
            f"fill {stats.fill_seconds:.1f} s)",
        )
        try:
            w = run_worker(path, p.scale_batches, p.batch_size, ctx.workdir / f"scale-{n}.json")
        finally:
            if not ctx.keep:
                path.unlink(missing_ok=True)
        timed = w["batch_seconds"][1:] or w["batch_seconds"]
        batch_s = median(timed)
        n_batches = math.ceil(w["train_rows"] / p.batch_size)
        results[n] = {
            "cache": stats.to_dict(),
            "worker": w,
            "batch_median_s": batch_s,
            "train_batches": n_batches,
            "epoch_s": batch_s * n_batches,
            "bytes_per_sample": stats.file_bytes / n,
        }
        ctx.log(
            "scale",
            f"{n:,} samples: train {'in RAM' if w['train_in_memory'] else 'streamed'}, {batch_s:.3f} s/batch, "
            f"epoch ≈ {batch_s * n_batches:.0f} s, peak RSS {w['peak_rss'] / 1e9:.2f} GB",
        )
    comp = compressed_bytes_per_sample(ctx.workdir, p.compression_rows, p.image_shape, p.layers, p.hidden, p.mean_tokens, p.max_length)
    sec.raw = {"sizes": results, "compression": comp, "batches_timed": p.scale_batches}

    small = results[sizes[0]]
    for i, n in enumerate(sizes):
        r = results[n]
        linear = small["epoch_s"] * r["worker"]["train_rows"] / small["worker"]["train_rows"]
        note = ""
        if i == 0:
            note = (
                f"Epochs extrapolated from {p.scale_batches} timed batches of {p.batch_size} (after one warm-up) in a fresh "
                "process per size; the alternative column is the smallest size's epoch scaled linearly, so 1.00 means "
                "linear growth. Writing each cache: "
                + "; ".join(
                    f"{m:,}: create_cache {results[m]['cache']['create_seconds']:.1f} s + fill {results[m]['cache']['fill_seconds']:.1f} s"
                    for m in sizes
                )
                + "."
            )
        sec.rows.append(
            Row(
                "scale",
                f"epoch_{n}",
                f"Scale: stage-two epoch, {n:,} samples ({r['worker']['train_rows']:,} train)",
                r["epoch_s"],
                "s",
                linear,
                f"linear from {sizes[0]:,}",
                r["epoch_s"] / linear,
                note=note,
            )
        )
    for i, n in enumerate(sizes):
        r, w = results[n], results[n]["worker"]
        where = "train " + ("in RAM" if w["train_in_memory"] else "streamed") + ", dev " + ("in RAM" if w["dev_in_memory"] else "streamed")
        note = ""
        if i == 0:
            note = (
                "Peak RSS (VmHWM) of a fresh process that opens the cache, loads train and dev as train() does (the memory "
                "budget decides RAM or streaming), runs the timed batches and dev batches; "
                f"{w['rss_after_imports'] / 1e9:.2f} GB of it is the interpreter, torch and sppscl after import. "
                "The ratio is RSS ÷ cache file size; the target applies to the largest size."
            )
        sec.rows.append(
            Row(
                "scale",
                f"rss_{n}",
                f"Scale: stage-two peak RSS, {n:,} samples ({where})",
                float(w["peak_rss"]),
                "B",
                float(r["cache"]["file_bytes"]),
                "cache file",
                w["peak_rss"] / r["cache"]["file_bytes"],
                ratio_unit="share",
                target=TARGET_RSS if n == sizes[-1] else None,
                note=note,
            )
        )
    stored = results[sizes[-1]]["bytes_per_sample"]
    for i, kind in enumerate(("gzip", "lzf")):
        note = ""
        if i == 0:
            note = (
                "Ours: the cache file's bytes per sample as stored (contiguous, uncompressed float16: memory maps and pread "
                "need that), at "
                + ", ".join(f"{m:,}: {results[m]['bytes_per_sample'] / 1e3:.1f} kB" for m in sizes)
                + " (constant per sample: the file grows linearly). Alternative: "
                f"{p.compression_rows} fresh rows written with h5py compression, chunked per row; image maps are ReLU'd "
                "Gaussians (half the entries exactly zero, like a post-ReLU ResNet map), token states Gaussians, so "
                "the token part barely compresses; real features may compress somewhat differently. "
                + ", ".join(f"{k}: image {v['image'] / 1e3:.1f} kB + tokens {v['tokens'] / 1e3:.1f} kB" for k, v in comp.items())
                + "."
            )
        sec.rows.append(
            Row(
                "scale",
                f"bytes_{kind}",
                f"Cache bytes/sample, stored vs {kind}",
                stored,
                "B/sample",
                comp[kind]["total"],
                f"{kind}, chunk per row",
                stored / comp[kind]["total"],
                note=note,
            )
        )
    return sec
