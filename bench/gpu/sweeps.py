"""Sweep throughput on one device: runs per minute with ``--runs-per-device`` 1, 2, 4, 8, 16, and the GPU's
utilisation while they train (when ``nvidia-smi`` answers).

Each setting is one sweep (``run_configs``, the engine ``sppscl sweep`` drives, here with ``--devices DEVICE
--runs-per-device K``) of K x waves short MVSA-Single-shaped runs on the stage-two section's synthetic cache, start-up
of its worker processes included. A setting that would not fit in what is left of the budget is skipped, and says so.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from sppscl.config import apply_overrides, load_config
from sppscl.stage2.sweeps import Execution, run_configs

from .stage2 import synthetic_cache

SECTION = "sweeps"
POLL_S = 0.5


def _uuid(dev: torch.device) -> str | None:
    uuid = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
    return None if uuid is None else str(uuid).lower().removeprefix("gpu-")


def utilisation(dev: torch.device) -> float | None:
    """This GPU's utilisation (percent) as ``nvidia-smi`` reports it now; None when it does not answer."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid,utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rows = [line.split(",") for line in done.stdout.strip().splitlines() if line.count(",") == 1]
    wanted = _uuid(dev)
    for uuid, util in rows:
        if wanted is not None and uuid.strip().lower().removeprefix("gpu-") == wanted:
            return float(util)
    return float(rows[0][1]) if len(rows) == 1 else None


@contextmanager
def sampled_utilisation(dev: torch.device) -> Iterator[list[float]]:
    """Poll the GPU's utilisation every POLL_S seconds while the block runs; the list fills as it goes."""
    samples: list[float] = []
    if dev.type != "cuda":
        yield samples
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            u = utilisation(dev)
            if u is not None:
                samples.append(u)
            stop.wait(POLL_S)

    thread = threading.Thread(target=poll, name="bench-gpu-utilisation", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(10)


def run(ctx, report) -> None:
    s, dev = ctx.sizes, ctx.device
    preset = ctx.shared.get("sweep_preset", "mvsa-single")
    base = load_config(preset)
    cache = ctx.shared.get("sweep_cache") or synthetic_cache(ctx, preset, base.dataset.classes)
    base = apply_overrides(base, {"epochs": s.sweep_epochs})
    last: tuple[int, float] | None = None
    for k in s.runs_per_device:
        n = k * s.sweep_waves
        # K times more concurrent runs take at most K times longer per wave (the device saturated)
        estimate = 0.0 if last is None else last[1] * k / last[0]
        if not ctx.budget.fits(estimate):
            report.skip(SECTION, f"--runs-per-device {k}: about {estimate:.0f} s needed, {ctx.budget.left():.0f} s left in the budget")
            continue
        configs = [{"lr": round(1e-4 * (1 + i / n), 8)} for i in range(n)]
        execution = Execution(devices=(str(dev),), runs_per_device=k)
        out = ctx.workdir / f"sweep-k{k}"
        with sampled_utilisation(dev) as util:
            t0 = time.perf_counter()
            res = run_configs(cache, base, configs, [0], out, ["lr"], execution=execution, progress=False)
            wall = time.perf_counter() - t0
        if res.failed:
            error = Path(res.runs_dir) / res.failed[0] / "error.txt"
            first = error.read_text().splitlines()[0] if error.exists() else "no error.txt"
            raise RuntimeError(f"--runs-per-device {k}: {len(res.failed)} of {n} runs failed (first, {res.failed[0]}: {first}; traceback in {error})")
        if len(res.rows) != n:
            raise RuntimeError(f"--runs-per-device {k}: the sweep returned {len(res.rows)} finished runs of the {n} it was given")
        placed = {json.loads((Path(res.runs_dir) / r["run"] / "config.json").read_text())["train"]["device"] for r in res.rows}
        last = (k, wall)
        gpu = f"GPU utilisation {sum(util) / len(util):.0f}% (mean of {len(util)} samples)" if util else (
            "GPU utilisation: nvidia-smi did not answer" if dev.type == "cuda" else "no GPU"
        )
        report.figure(
            SECTION,
            f"--runs-per-device {k}",
            f"{n / wall * 60:.1f} runs/min",
            f"{n} runs of {s.sweep_epochs} epoch(s) on {s.train_rows:,} rows in {wall:.1f} s, worker start-up included; "
            f"trained on {', '.join(sorted(placed))}; {gpu}",
            runs_per_device=k,
            runs=n,
            wall_seconds=wall,
            runs_per_minute=n / wall * 60,
            gpu_utilisation_percent=sum(util) / len(util) if util else None,
            devices=sorted(placed),
        )
