"""7. Searches that stop bad runs early: a TPE search on MVSA-Single with and without ``--prune median``.

The same 24-trial TPE search (one seed, the same sampler seed, at most 10 epochs per trial) runs twice on the
MVSA-Single cache of the offline encoders (efficientnet-lite0 + minilm-l6), each as one ``sppscl sweep`` process
with one worker and one torch thread, the two side by side (one per core) within one wall-time budget (15 minutes
by default, ``$SPPSCL_BENCH_PRUNE_BUDGET`` seconds). They train on the subset ``sppscl extract --limit 200`` would
write (at most 200 rows of every split, stratified by label, seed 0; ``$SPPSCL_BENCH_PRUNE_LIMIT``), cut from the
full cache in seconds (``subset_cache``): a stage-two epoch on the full 3,611 training rows takes 16 s on an idle
2-core machine and about 40 s on a loaded one, so the unpruned search's 240 epochs could not fit. A search the
budget cuts is stopped and its finished runs are read from its study (``sppscl sweep summary``), and the rows say
so. Rows: the best dev accuracy each search finds (the selection's score: dev only; MVSA-Single's test labels are
withheld and never read) and the epochs each trained, counted from its runs' metrics.jsonl (a run cut by the
budget included); their notes give the subset, the budget, the load average and the pruner's settings.

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

from .common import Context, Row, Section

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPPSCL_BENCH_MVSA", REPO.parent / "shared" / "data" / "mvsa-single"))
CACHE = Path(os.environ.get("SPPSCL_BENCH_MVSA_CACHE", REPO / "bench" / "out" / "mvsa-single-offline.h5"))
TRIALS, EPOCHS, BUDGET_S = 24, 10, 900.0
SPACE = ("lr=1e-5:1e-2:log", "dropout=0.0:0.5", "tau=0.03:0.3:log")
PRUNER = "median"
PRUNER_SETTINGS = "Optuna's MedianPruner defaults (n_startup_trials 5, n_warmup_steps 0)"  # what sweep --prune median builds
# train, dev and test rows each: the unpruned search's 240 epochs fit the budget on a loaded 2-core machine (docs/benchmarks.md)
LIMIT = 200


def build_cache(ctx: Context, data: Path, cache: Path) -> None:
    """The offline encoders' MVSA-Single cache, extracted once (``extract`` finds a complete one up to date)."""
    cmd = [sys.executable, "-m", "sppscl", "extract", "-c", "mvsa-single", "--data-dir", str(data), "--image-encoder", "efficientnet-lite0",
           "--text-encoder", "minilm-l6", "--out", str(cache), "--quiet"]
    ctx.log("pruning", f"cache {cache}" + ("" if cache.exists() else " (first extraction: several minutes)"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"extract failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def subset_cache(full: Path, out: Path, limit: int) -> dict:
    """The cache ``sppscl extract --limit LIMIT`` would write, cut from the full one instead of re-extracted (minutes).

    ``limit_per_split`` (the function behind ``--limit``: at most ``limit`` rows of every split, stratified by label,
    seed 0, file order kept) picks the rows; the provenance says ``limit_per_split`` and its sampling, with the digest
    of the rows kept, as ``extract --limit`` writes it, so every run records the subset. Rewritten only when missing
    or cut with another limit. Returns the rows per split."""
    import json

    import h5py
    import numpy as np

    from sppscl.stage1.extract import LIMIT_SEED, _samples_digest, limit_per_split
    from sppscl.stage1.records import Sample

    with h5py.File(full, "r") as src:
        prov = json.loads(src.attrs["provenance"])
        by_split = {}
        for split, g in src["splits"].items():
            ids, texts = g["ids"].asstr()[()], g["texts"].asstr()[()]
            labels = g["labels"][()]
            by_split[split] = [Sample(i, t, Path(), None if y < 0 else int(y), split) for i, t, y in zip(ids, texts, labels)]
        keep_ids = {(s.split, s.id) for s in limit_per_split([s for rows in by_split.values() for s in rows], limit)}
        kept = {split: [s for s in rows if (split, s.id) in keep_ids] for split, rows in by_split.items()}
        prov["dataset"].update(limit_per_split=limit, samples_sha256=_samples_digest(kept),
                               limit_sampling={"method": "stratified by label, order kept", "seed": LIMIT_SEED})
        counts = {split: len(rows) for split, rows in kept.items()}
        if out.is_file():
            with h5py.File(out, "r") as f:
                if f.attrs.get("complete") and json.loads(f.attrs["provenance"]) == prov:
                    return counts
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with h5py.File(tmp, "w") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            dst.attrs["provenance"] = json.dumps(prov, sort_keys=True)
            dst.attrs["complete"] = False
            src.copy(src["skipped"], dst, "skipped")
            for split, g in src["splits"].items():
                rows = np.array([i for i, s in enumerate(by_split[split]) if (split, s.id) in keep_ids], dtype=np.int64)
                d = dst.create_group(f"splits/{split}")
                for key in ("ids", "texts"):
                    d.create_dataset(key, data=g[key][()][rows], dtype=g[key].dtype)
                for key in ("labels", "status"):
                    d.create_dataset(key, data=g[key][()][rows])
                d.create_dataset("image", data=g["image"][()][rows] if len(rows) < len(by_split[split]) else g["image"][()])
                offsets = g["offsets"][()]
                tokens = g["tokens"]
                d.create_dataset("tokens", data=np.concatenate([tokens[offsets[i]:offsets[i + 1]] for i in rows]))
                d.create_dataset("offsets", data=np.concatenate([[0], np.cumsum(offsets[rows + 1] - offsets[rows])]).astype(offsets.dtype))
            dst.attrs["complete"] = True
        tmp.replace(out)
    return counts


def epochs_spent(out: Path) -> int:
    """Every epoch the search trained: the lines of its runs' metrics.jsonl (a run the budget stopped included)."""
    return sum(sum(1 for ln in f.read_text().splitlines() if ln.strip()) for f in (out / "runs").glob("*/metrics.jsonl"))


def start(cache: Path, out: Path, prune: str | None) -> subprocess.Popen:
    """One search as a ``sppscl sweep`` process with one worker and one torch thread (the two searches run side by
    side, one per core)."""
    cmd = [sys.executable, "-m", "sppscl", "sweep", "--cache", str(cache), "--set", f"epochs={EPOCHS}", "--set", "device=cpu",
           "--random", str(TRIALS), *[a for s in SPACE for a in ("--space", s)], "--sampler", "tpe", "--seeds", "0", "--jobs", "1",
           "--quiet", "--out", str(out), *(["--prune", prune] if prune else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".log"), "w") as log:  # a file, not a pipe: nobody reads it while both run
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], deadline: float) -> list[float]:
    """Waits for every process until ``deadline`` (``time.perf_counter``); when each ended (the deadline if not)."""
    ended = [None] * len(procs)
    while any(e is None for e in ended) and time.perf_counter() < deadline:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.perf_counter()
        time.sleep(0.5)
    return [deadline if e is None else e for e in ended]


def finish(ctx: Context, proc: subprocess.Popen, out: Path, prune: str | None, wall: float) -> dict:
    """One search after ``wait_all``: stopped if it still runs (the budget cut it); what it finished."""
    from sppscl.stage2.sweeps import summary

    cut = proc.poll() is None
    if cut:
        proc.terminate()  # its workers die with it; the study keeps every finished run
        proc.wait(timeout=60)
    if not cut and proc.returncode not in (0, 1):
        text = out.with_name(out.name + ".log").read_text()
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


def rows(off: dict, on: dict, setup: dict | None = None) -> list[Row]:
    """The section's rows from the two searches' findings (``finish``); ``setup`` (``run``'s raw record) adds the
    subset, budget, load average and pruner settings to the notes."""
    cut = [name for name, f in (("without", off), ("with", on)) if f["cut_by_budget"]]
    budget_note = (f"; the budget stopped the search {' and '.join(cut)} pruning: finished runs only" if cut
                   else "; neither search was cut by the budget")
    trials = f"trials finished: {on['finished']} with ({on['pruned']} pruned), {off['finished']} without{budget_note}"
    where = ""
    if setup:
        n = setup["rows"]
        load = setup["loadavg"]
        where = (f"; --limit {setup['limit']} subset (train {n['train']}, dev {n['dev']}); both searches side by side, 1 torch thread each, "
                 f"{setup['budget_s'] / 60:g}-minute budget; {PRUNER} pruner: {PRUNER_SETTINGS}; "
                 f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end")
    subset = f" `--limit {setup['limit']}`" if setup else ""
    ratio = on["best_dev_accuracy"] / off["best_dev_accuracy"] if on["best_dev_accuracy"] and off["best_dev_accuracy"] else None
    return [
        Row("pruning", "best_dev", f"Best dev accuracy of a {TRIALS}-trial TPE search (MVSA-Single{subset}, offline encoders), --prune {PRUNER}",
            on["best_dev_accuracy"], "", off["best_dev_accuracy"], "no pruning", ratio, note=f"selection on dev only; {trials}{where}"),
        Row("pruning", "epochs", f"Epochs the search trained (≤ {EPOCHS} per trial), --prune {PRUNER}", on["epochs"], "epochs", off["epochs"],
            "no pruning", on["epochs"] / off["epochs"] if off["epochs"] else None, note=f"share of the epochs; {trials}{where}"),
    ]


def run(ctx: Context) -> Section:
    sec = Section("pruning")
    if not (DATA / "train.json").is_file() and not any(DATA.glob("*/train.json")) and not (DATA / "labelResultAll.txt").is_file():
        ctx.log("pruning", f"skipped: no MVSA-Single data at {DATA} (set SPPSCL_BENCH_MVSA to its folder)")
        sec.raw = {"skipped": f"no MVSA-Single data at {DATA}"}
        return sec
    build_cache(ctx, DATA, CACHE)
    limit = int(os.environ.get("SPPSCL_BENCH_PRUNE_LIMIT", LIMIT))
    subset = CACHE.with_name(f"{CACHE.stem}-limit{limit}.h5")
    n = subset_cache(CACHE, subset, limit)
    ctx.log("pruning", f"subset {subset}: --limit {limit} ({', '.join(f'{k} {v}' for k, v in sorted(n.items()))})")
    budget = float(os.environ.get("SPPSCL_BENCH_PRUNE_BUDGET", BUDGET_S))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    outs = {prune: ctx.workdir / f"prune-{'on' if prune else 'off'}" for prune in (None, PRUNER)}
    procs = {prune: start(subset, out, prune) for prune, out in outs.items()}
    ended = dict(zip(procs, wait_all(list(procs.values()), t0 + budget)))
    off, on = (finish(ctx, procs[p], outs[p], p, ended[p] - t0) for p in (None, PRUNER))
    setup = {"limit": limit, "rows": n, "budget_s": budget, "loadavg": {"start": load0, "end": os.getloadavg()[0]}, "side_by_side": True}
    sec.raw = {"trials": TRIALS, "epochs_per_trial": EPOCHS, "space": list(SPACE), "pruner": {"name": PRUNER, "settings": PRUNER_SETTINGS},
               **setup, "without": off, "with": on}
    sec.rows = rows(off, on, setup)
    return sec
