"""7. Searches that stop bad runs early: a TPE search on MVSA-Single with and without ``--prune median``.

The same 24-trial TPE search (one seed, the same sampler seed, at most 10 epochs per trial) runs twice on the
MVSA-Single cache of the offline encoders (efficientnet-lite0 + minilm-l6), each as one ``sppscl sweep`` process
with one worker; the two share a wall-time budget (15 minutes by default: half each). A search the budget cuts is
stopped and its finished runs are read from its study (``sppscl sweep summary``), and the rows say so. Rows: the
best dev accuracy each search finds (the selection's score: dev only; MVSA-Single's test labels are withheld and
never read) and the epochs each trained, counted from its runs' metrics.jsonl (a run cut by the budget included).

The cache is built once with ``sppscl extract`` (several minutes for 4,511 tweets) at ``$SPPSCL_BENCH_MVSA_CACHE``
or ``bench/out/mvsa-single-offline.h5``, and reused by later runs. Without the data (``$SPPSCL_BENCH_MVSA``, default
``../shared/data/mvsa-single`` beside the repository) the section is skipped with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import Context, Row, Section

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPPSCL_BENCH_MVSA", REPO.parent / "shared" / "data" / "mvsa-single"))
CACHE = Path(os.environ.get("SPPSCL_BENCH_MVSA_CACHE", REPO / "bench" / "out" / "mvsa-single-offline.h5"))
TRIALS, EPOCHS, BUDGET_S = 24, 10, 900.0
SPACE = ("lr=1e-5:1e-2:log", "dropout=0.0:0.5", "tau=0.03:0.3:log")
PRUNER = "median"


def build_cache(ctx: Context, data: Path, cache: Path) -> None:
    """The offline encoders' MVSA-Single cache, extracted once (``extract`` finds a complete one up to date)."""
    cmd = [sys.executable, "-m", "sppscl", "extract", "-c", "mvsa-single", "--data-dir", str(data), "--image-encoder", "efficientnet-lite0",
           "--text-encoder", "minilm-l6", "--out", str(cache), "--quiet"]
    ctx.log("pruning", f"cache {cache}" + ("" if cache.exists() else " (first extraction: several minutes)"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"extract failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def epochs_spent(out: Path) -> int:
    """Every epoch the search trained: the lines of its runs' metrics.jsonl (a run the budget stopped included)."""
    return sum(sum(1 for ln in f.read_text().splitlines() if ln.strip()) for f in (out / "runs").glob("*/metrics.jsonl"))


def search(ctx: Context, cache: Path, out: Path, prune: str | None, budget: float) -> dict:
    """One search as a ``sppscl sweep`` process, stopped when ``budget`` seconds are spent; what it finished."""
    from sppscl.stage2.sweeps import summary

    cmd = [sys.executable, "-m", "sppscl", "sweep", "--cache", str(cache), "--set", f"epochs={EPOCHS}", "--set", "device=cpu",
           "--random", str(TRIALS), *[a for s in SPACE for a in ("--space", s)], "--sampler", "tpe", "--seeds", "0", "--jobs", "1",
           "--quiet", "--out", str(out), *(["--prune", prune] if prune else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this benchmark's thread count
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cut = False
    try:
        text = proc.communicate(timeout=budget)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()  # its workers die with it; the study keeps every finished run
        text = proc.communicate(timeout=60)[0]
        cut = True
    wall = time.perf_counter() - t0
    if not cut and proc.returncode not in (0, 1):
        raise RuntimeError(f"sweep failed (exit {proc.returncode}):\n{text[-3000:]}")
    res = summary(out)
    ok = [r for r in res.rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: (r["dev_accuracy"], r["dev_weighted_f1"] or 0.0), default=None)
    found = {
        "prune": prune, "wall_s": wall, "cut_by_budget": cut, "finished": len(ok) + len(res.pruned), "ok": len(ok), "pruned": len(res.pruned),
        "failed": len(res.failed), "epochs": epochs_spent(out), "best_dev_accuracy": best["dev_accuracy"] if best else None,
        "best_run": best["run"] if best else None,
    }
    ctx.log("pruning", f"{'--prune ' + prune if prune else 'no pruning'}: {found['finished']}/{TRIALS} trials finished "
                       f"({found['pruned']} pruned){' before the budget cut it' if cut else ''}, {found['epochs']} epochs, "
                       f"best dev accuracy {found['best_dev_accuracy']}, {wall:.0f} s")
    return found


def rows(off: dict, on: dict) -> list[Row]:
    """The section's rows from the two searches' findings (``search``)."""
    cut = [name for name, f in (("without", off), ("with", on)) if f["cut_by_budget"]]
    budget_note = f"; the budget stopped the search {' and '.join(cut)} pruning: finished runs only" if cut else ""
    trials = f"trials finished: {on['finished']} with ({on['pruned']} pruned), {off['finished']} without{budget_note}"
    ratio = on["best_dev_accuracy"] / off["best_dev_accuracy"] if on["best_dev_accuracy"] and off["best_dev_accuracy"] else None
    return [
        Row("pruning", "best_dev", f"Best dev accuracy of a {TRIALS}-trial TPE search (MVSA-Single, offline encoders), --prune {PRUNER}",
            on["best_dev_accuracy"], "", off["best_dev_accuracy"], "no pruning", ratio, note=f"selection on dev only; {trials}"),
        Row("pruning", "epochs", f"Epochs the search trained (≤ {EPOCHS} per trial), --prune {PRUNER}", on["epochs"], "epochs", off["epochs"],
            "no pruning", on["epochs"] / off["epochs"] if off["epochs"] else None, note=f"share of the epochs; {trials}"),
    ]


def run(ctx: Context) -> Section:
    sec = Section("pruning")
    if not (DATA / "train.json").is_file() and not any(DATA.glob("*/train.json")) and not (DATA / "labelResultAll.txt").is_file():
        ctx.log("pruning", f"skipped: no MVSA-Single data at {DATA} (set SPPSCL_BENCH_MVSA to its folder)")
        sec.raw = {"skipped": f"no MVSA-Single data at {DATA}"}
        return sec
    build_cache(ctx, DATA, CACHE)
    budget = float(os.environ.get("SPPSCL_BENCH_PRUNE_BUDGET", BUDGET_S))
    off = search(ctx, CACHE, ctx.workdir / "prune-off", None, budget / 2)
    on = search(ctx, CACHE, ctx.workdir / "prune-on", PRUNER, budget / 2)
    sec.raw = {"trials": TRIALS, "epochs_per_trial": EPOCHS, "budget_s": budget, "space": list(SPACE), "without": off, "with": on}
    sec.rows = rows(off, on)
    return sec
