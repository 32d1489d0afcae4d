"""Run the benchmark suite: ``python -m bench.run [--quick] [--only caching,extraction,...] [--scale 1000,5000,25000]``.

``python -m bench.run --gpu [--quick] [--budget SECONDS]`` is the GPU acceptance run instead (``bench.gpu``): it is
dispatched before anything but the standard library is imported, because a GPU node's own Python may lack the
suite's packages (each GPU section says which one it misses). ``--quick`` also runs that GPU run's CPU form as its
last section (``gpu``), so the one quick run of the bench smoke test covers both.

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``bench/``; ``bench/out/quick/`` with
``--quick``, so a development run never overwrites the committed results). Temporary files (synthetic data,
caches up to ~10 GB) go to a fresh ``work-<pid>`` folder under ``--workdir`` (default the git-ignored
``bench/out/``), deleted at the end unless ``--keep``. Exit code 0 whatever the numbers (benchmarks report,
they never fail on a time); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# Execution order: extraction first, so the caching section's 150-epoch projection can use its measured rate.
# Each section is a module of this package (section name -> module); its run(ctx) measures it.
RUNNERS = {
    "extraction": "extraction",
    "ranks": "ranks",
    "caching": "caching",
    "loader": "loader",
    "scale": "scale",
    "compute": "compute",
    "sweeps": "sweeps",
    "pruning": "pruning",
    "serve": "serving",
    # the GPU run's CPU form (``--gpu --quick``): quick profile only, it writes results-gpu.md beside results.json
    "gpu": "gpu_quick",
}
# Table order: the issue's.
TABLE_ORDER = ["caching", "extraction", "ranks", "loader", "scale", "compute", "sweeps", "pruning", "serve", "gpu"]
QUICK_ONLY = {"gpu"}
# the pruning searches train on the real MVSA-Single cache for up to 15 minutes: full profile (or --only pruning) only
FULL_ONLY = {"pruning"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU acceptance run instead of this suite (--gpu --help for its options)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and tiny encoders (smoke test, development)")
    ap.add_argument("--only", default="", help=f"comma-separated sections to run (default all): {','.join(TABLE_ORDER)}")
    ap.add_argument("--scale", default="", help="total samples per scale cache, e.g. 1000,5000,25000")
    ap.add_argument("--official-batches", type=int, default=None, help="batches of the official way to time")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine, threads beyond the free cores stall at every "
        "parallel region, which buries the ratios in noise; 0 = torch's default, one per core)",
    )
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    ap.add_argument("--workdir", type=Path, default=None, help="folder under which temporary files go (default: bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace):
    """(profile, sections) from the arguments; ValueError names the bad value."""
    from .profiles import FULL, QUICK

    profile = QUICK if args.quick else FULL
    if args.scale:
        try:
            sizes = tuple(int(s) for s in args.scale.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"--scale {args.scale!r}: expected comma-separated sample counts, e.g. 1000,5000,25000") from None
        if not sizes or min(sizes) < 20:
            raise ValueError(f"--scale {args.scale!r}: every size must be at least 20 samples (80/10/10 splits)")
        profile = profile.replace(scale_sizes=sizes)
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected 0 (torch's default) or a positive count")
    if args.official_batches is not None:
        if args.official_batches < 1:
            raise ValueError("--official-batches must be at least 1")
        profile = profile.replace(official_batches=args.official_batches)
    sections = [s.strip() for s in args.only.split(",") if s.strip()] or [
        s for s in RUNNERS if (args.quick or s not in QUICK_ONLY) and not (args.quick and s in FULL_ONLY)
    ]
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        raise ValueError(f"--only: unknown section(s) {', '.join(unknown)}; choose from {','.join(TABLE_ORDER)}")
    if not args.quick and QUICK_ONLY & set(sections):
        raise ValueError("--only gpu: the GPU run's CPU form is part of --quick; on a GPU node run python -m bench.run --gpu")
    return profile, [s for s in RUNNERS if s in sections]


def main(argv: list[str] | None = None, console=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu" in argv:
        from .gpu.main import main as gpu_main

        return gpu_main([a for a in argv if a != "--gpu"])
    import torch
    from rich.console import Console

    from .common import Context, Section, default_threads, load_average, machine_info, markdown, rich_table, write_json

    if console is None:
        console = Console()
        if not console.is_terminal:
            # logs and CI: the results table is wider than the 80 columns rich assumes without a terminal
            console = Console(width=200)
    args = parse_args(argv)
    try:
        profile, sections = resolve(args)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    out = args.out or (BENCH_DIR / "out" / "quick" if args.quick else BENCH_DIR)
    # a fresh folder of our own, so that removing it at the end can never touch the user's files
    workdir = (args.workdir or BENCH_DIR / "out") / f"work-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    ctx = Context(profile, workdir, console, keep=args.keep, out=out)
    started = time.time()
    t0 = time.perf_counter()
    load_start = load_average()
    results: dict[str, Section] = {}
    try:
        for name in sections:
            ctx.log(name, f"start (load average {load_average()[0]})")
            s0 = time.perf_counter()
            results[name] = importlib.import_module(f"{__package__}.{RUNNERS[name]}").run(ctx)
            results[name].seconds = time.perf_counter() - s0
            ctx.log(name, f"done in {results[name].seconds:.0f} s")
    finally:
        torch.set_num_threads(threads_before)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0

    rows = [row for name in TABLE_ORDER if name in results for row in results[name].rows]
    machine = {
        **machine_info(),
        "torch_threads": threads,
        "torch_default_threads": default_threads(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    header = (
        f"Measured {time.strftime('%Y-%m-%d', time.localtime(started))} by `python -m bench.run` ({profile.name} profile, "
        f"{wall / 60:.1f} min): {machine['cpu']}, {machine['cores_usable']} cores, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, load average {load_start[0]} at the start (shared machine). "
        "Ratios come from one run; absolute times are this machine's."
    )
    report = {
        "profile": profile.to_dict(),
        "sections_run": sections,
        "argv": argv,
        "machine": machine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": wall,
        "rows": [r.to_dict() for r in rows],
        "targets": [
            {"measurement": r.measurement, "target": r.target.text(), "ratio": r.ratio, "ours": r.ours, "met": r.met}
            for r in rows
            if r.target is not None
        ],
        "sections": {name: {"seconds": s.seconds, "raw": s.raw} for name, s in results.items()},
    }
    write_json(out / "results.json", report)
    (out / "results.md").write_text(markdown(rows, header))
    console.print(rich_table(rows, f"sppscl bench ({profile.name}), {wall / 60:.1f} min"))
    met = [r.met for r in rows if r.met is not None]
    console.print(f"targets met: {sum(met)} of {len(met)}; wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
