"""The GPU acceptance run's CPU form (``python -m bench.run --gpu --quick``) as the quick profile's last section, so that
one ``python -m bench.run --quick`` (the bench smoke test in the default test suite) runs the GPU run's code too and it
cannot rot. It writes ``results-gpu.md`` and ``results-gpu.json`` beside ``results.json``, exactly as
``--gpu --quick --out`` would; this section adds no table rows, only the GPU run's outcome to ``results.json``.
"""

from __future__ import annotations

import json

from .common import Context, Section

# generous: on a loaded machine a section that runs past the GPU run's own quick budget (120 s) would be skipped, and a
# skipped section is what this check must never hide
BUDGET_S = 900


def run(ctx: Context) -> Section:
    from .gpu.main import main as gpu_main

    out = ctx.out if ctx.out is not None else ctx.workdir / "gpu-quick"
    code = gpu_main(["--quick", "--device", "cpu", "--budget", str(BUDGET_S), "--out", str(out), "--workdir", str(ctx.workdir)] + (["--keep"] if ctx.keep else []))
    report = json.loads((out / "results-gpu.json").read_text())
    ctx.log("gpu", f"--gpu --quick exited {code}: {len(report['figures'])} figures, {len(report['failed'])} failed, {len(report['skipped'])} skipped; {out / 'results-gpu.md'}")
    sec = Section("gpu")
    sec.raw = {
        "exit_code": code,
        "results": str(out / "results-gpu.json"),
        "sections_run": report["sections_run"],
        "failed": report["failed"],
        "skipped": report["skipped"],
        "section_timings": report["section_timings"],
    }
    return sec
