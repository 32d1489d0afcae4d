"""6. Extraction on 2 processes against 1: ``torchrun --nproc-per-node 2`` ranks filling one cache (gloo, CPU)
against a single process, on the same rows, each process with the same threads and decoding workers.

Both run in fresh processes (``bench.extract_worker``), so each pays its own start-up; the table compares the
fill loops (the slowest rank's), and the note gives the wall time with start-up. It also checks that the two
caches are identical, array by array.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from sppscl.cache import differing_contents
from sppscl.config import Config

from .common import Context, Row, Section
from .extraction import MANIFEST, make_dataset

REPO = Path(__file__).resolve().parents[1]


def preset(root: Path, p) -> tuple[Path, str, int]:
    """A preset for the synthetic manifest with encoders that load by name in a fresh process."""
    cfg = Config()
    cfg.dataset.name = "bench-ranks"
    cfg.dataset.format = "manifest"
    cfg.dataset.data_dir = str(root)
    cfg.dataset.splits = {"train": MANIFEST}
    if p.offline_encoders:
        cfg.encoders.image, cfg.encoders.text, cfg.encoders.max_length = "efficientnet-lite0", "minilm-l6", 202
    else:
        cfg.encoders.image, cfg.encoders.text, cfg.encoders.max_length = "tiny-cnn", "tiny-bert", p.max_length
    cfg.encoders.layers = p.layers
    cfg.extract.device = "cpu"
    if p.extract_batch is not None:
        cfg.extract.batch_size = p.extract_batch
    if p.extract_workers is not None:
        cfg.extract.num_workers = p.extract_workers
    path = root / "preset.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "source"}))
    return path, f"{cfg.encoders.image} + {cfg.encoders.text}", cfg.extract.num_workers


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("ranks")
    n = p.offline_samples
    root = ctx.workdir / "ranks-data"
    make_dataset(root, n, p.image_size)
    path, label, workers = preset(root, p)
    threads = torch.get_num_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(p.extract_rounds):
        for procs in (1, 2):
            out, result = ctx.workdir / f"ranks-{procs}.h5", ctx.workdir / f"ranks-{procs}.json"
            worker = ["-m", "bench.extract_worker", str(path), str(out), str(n), str(threads), str(result)]
            launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
            t0 = time.perf_counter()
            done = subprocess.run([*launcher, *worker], cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"{procs}-process extraction failed:\n{done.stderr[-3000:]}")
            res = json.loads(result.read_text())
            runs[procs].append((res["seconds"], wall))
            ctx.log("ranks", f"{label}, {procs} process(es), round {r + 1}/{p.extract_rounds}: {n / res['seconds']:.1f} samples/s (loop {res['seconds']:.1f} s, wall with start-up {wall:.1f} s)")
    diff = differing_contents(ctx.workdir / "ranks-1.h5", ctx.workdir / "ranks-2.h5")
    if not ctx.keep:
        for procs in (1, 2):
            (ctx.workdir / f"ranks-{procs}.h5").unlink(missing_ok=True)
    one, two = (min(s for s, _ in runs[k]) for k in (1, 2))
    one_wall, two_wall = (min(w for _, w in runs[k]) for k in (1, 2))
    sec.raw = {
        "encoders": label,
        "samples": n,
        "torch_threads_per_process": threads,
        "decoding_workers_per_process": workers,
        "loop_seconds": {str(k): [s for s, _ in v] for k, v in runs.items()},
        "wall_seconds": {str(k): [w for _, w in v] for k, v in runs.items()},
        "speedup_loop": one / two,
        "speedup_wall": one_wall / two_wall,
        "identical": not diff,
        "differing": diff,
    }
    sec.rows.append(
        Row(
            "ranks",
            "two_processes",
            f"Extraction, {label}: 2 processes (torchrun) vs 1",
            n / two,
            "samples/s",
            n / one,
            "1 process",
            one / two,
            note=(
                f"{n} synthetic {p.image_size[0]}×{p.image_size[1]} JPEGs, one cache file, gloo on the CPU, {threads} torch "
                f"thread(s) and {workers} decoding worker(s) in every process, {os.cpu_count()} cores; fill loops (the slowest "
                f"rank's), best of {p.extract_rounds} round(s). With start-up (imports, process group, encoders) the wall times "
                f"are {two_wall:.1f} s vs {one_wall:.1f} s ({one_wall / two_wall:.2f}×). The two caches are "
                + ("identical array by array." if not diff else f"NOT identical: {', '.join(diff[:5])}.")
            ),
        )
    )
    return sec
