"""``python -m bench.run --gpu [--quick] [--budget SECONDS] [--device cuda:N] [--only a,b] [--out DIR]``.

Imports only the standard library and torch at the top: each section imports what it needs when it starts, and a
missing package skips that section with one line naming it (see the package docstring for the sections).
Exit code 0 when every section that ran finished and every equality check held (a skipped section is not a
failure: it says why); 1 when a section failed or a check did not hold; 2 for bad arguments or no CUDA device.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from .report import Budget, Report
from .sizes import FULL, QUICK

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "bench"
# Run order: the correctness checks and the figures users ask first come first, the longest (sweeps) last.
SECTIONS = ("extraction", "ranks", "stage2", "sweeps")
MIN_TORCH = (2, 1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run --gpu", description="The GPU acceptance run (bench/gpu): measures every CUDA path once.")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, on the CPU unless --device says otherwise (smoke test)")
    ap.add_argument("--budget", type=float, default=None, help="seconds the whole run may take (default 300; quick: 120)")
    ap.add_argument("--device", default=None, help="the device to measure (default cuda, the current CUDA device; quick: cpu)")
    ap.add_argument("--only", default="", help=f"comma-separated sections (default all): {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=None, help="folder for results-gpu.md and results-gpu.json (default bench/; quick: bench/out/quick)")
    ap.add_argument("--workdir", type=Path, default=None, help="folder under which temporary files go (default: bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    return ap.parse_args(argv)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def resolve(args: argparse.Namespace) -> tuple[object, torch.device, list[str], float]:
    """(sizes, device, sections, budget seconds); ValueError says what is wrong."""
    if torch_version() < MIN_TORCH:
        raise ValueError(f"torch {torch.__version__}: the GPU run needs torch 2.1 or newer")
    sizes = QUICK if args.quick else FULL
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"--only: unknown section(s) {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    budget = args.budget if args.budget is not None else sizes.budget_s
    if budget <= 0:
        raise ValueError(f"--budget {args.budget}: expected a positive number of seconds")
    name = args.device or ("cpu" if args.quick else "cuda")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cuda, cuda:N or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "on a machine without one, run the CPU form: python -m bench.run --gpu --quick"
            )
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"--device {name!r}: only cuda and cpu are measured")
    elif not args.quick:
        raise ValueError("the full GPU run needs a CUDA device; its CPU form is --quick")
    return sizes, dev, [s for s in SECTIONS if s in sections], budget


def importable_sppscl(workdir: Path) -> str:
    """Make ``import sppscl`` work without installing anything: the installed package when there is one, else this
    checkout's ``pipeline/`` through a symlink named ``sppscl`` on sys.path and PYTHONPATH (the latter for the
    sections' fresh processes: torchrun's ranks and the sweep's spawned workers)."""
    if importlib.util.find_spec("sppscl") is not None:
        return "installed"
    shim = workdir / "import-path"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sppscl").symlink_to(REPO / "pipeline", target_is_directory=True)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return f"this checkout's pipeline/ (not installed; linked from {shim})"


def device_facts(dev: torch.device) -> str:
    """One line about the device and the software that drives it."""
    cpu = f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} CPU cores"
    if dev.type != "cuda":
        return f"CPU ({cpu}), torch {torch.__version__}"
    p = torch.cuda.get_device_properties(dev)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"
    return (
        f"{p.name} ({dev}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {cudnn}, NCCL {_nccl_version()}, {cpu}"
    )


def _nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001 - a fact for the header, never a reason to stop
        return f"unknown ({type(e).__name__})"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def run_section(name: str, ctx, report: Report) -> None:
    """Run one section; a missing package skips it (one line naming the package), any other error fails it
    and the run goes on with the next section."""
    report.start(name)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        module = importlib.import_module(f"{__package__}.{name}")
        module.run(ctx, report)
    except ModuleNotFoundError as e:
        report.skip(name, f"needs the Python package {e.name!r}, which is not installed here")
    except Exception as e:  # noqa: BLE001 - an acceptance run reports every failure and measures the rest
        report.fail(name, f"{type(e).__name__}: {e}", traceback.format_exc())
    report.done(name, time.perf_counter() - t0, _cpu_seconds() - cpu0)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (torchrun ranks, sweep workers, decoding workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Context:
    """What a section gets: the sizes, the device, the budget, a work folder, and values earlier sections left."""

    def __init__(self, sizes, device: torch.device, budget: Budget, workdir: Path, keep: bool):
        self.sizes, self.device, self.budget, self.workdir, self.keep = sizes, device, budget, workdir, keep
        self.shared: dict = {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        sizes, dev, sections, budget_s = resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (BENCH_DIR / "out" / "quick" if args.quick else BENCH_DIR)
    workdir = (args.workdir or BENCH_DIR / "out") / f"gpu-work-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    budget = Budget(budget_s)
    package = importable_sppscl(workdir)
    report = Report(out / "results-gpu.md", out / "results-gpu.json")
    report.header(
        f"`python -m bench.run --gpu{' --quick' if args.quick else ''}` ({sizes.name} sizes, budget {budget_s:.0f} s) on "
        f"{device_facts(dev)}; sppscl from {package}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start.",
        {"sizes": sizes.name, "device": str(dev), "budget_s": budget_s, "argv": sys.argv[1:] if argv is None else list(argv)},
    )
    ctx = Context(sizes, dev, budget, workdir, args.keep)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # the CPU form is a smoke test on shared machines, where threads beyond the free cores stall at every
        # parallel region (as the CPU suite's --threads 1 default); on a GPU the CPU threads are left as they are
        torch.set_num_threads(1)
    try:
        for name in sections:
            if budget.spent():
                report.skip(name, f"the budget of {budget_s:.0f} s is spent")
                continue
            run_section(name, ctx, report)
    finally:
        torch.set_num_threads(threads)
        report.finish(budget.elapsed())
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {report.md_path} and {report.json_path}", flush=True)
    return 1 if report.failures else 0
