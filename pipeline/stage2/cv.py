"""Cross-validated estimates: every configuration trained and scored on K stratified folds of the labelled train+dev rows.

A model selected as the best of many epochs on a 450-post dev split is selected partly for luck, so its dev
score overstates what it does on new data. Here each fold's model is selected on a validation part carved from
the training folds and scored on the held-out fold, which took no part in training or selection. Each fold's
seeds are averaged first (they share its rows); the mean ± std over the folds of those seed means, with a t
interval over the folds, estimates the score on new data; the seeds' own spread is reported apart
(``stats.over_folds``, docs/statistics.md). The cache's test split is never read.

It is a sweep: every (configuration, fold, seed) is an ordinary ``train`` run (``cv_folds``/``cv_fold`` in its
configuration, see ``folds.py``) in ``<runs>/``, resumable and parallel. Beside the single runs: for every
configuration and fold the ensemble of its seeds (``ensemble.py``), and the logistic-regression probe fitted and
selected the same way on the same folds, so all of them are compared on identical rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..cache import FeatureCache
from ..config import Config, ConfigError
from ..errors import safe
from ..outputs import atomic_write, check_output_file, check_output_folder, csv_text, read_stored_json
from .ensemble import cached_ensemble
from .folds import FoldView
from .metrics import classification_report
from .ownership import own_run
from .probe import pooled_features, select_probe
from .stats import FoldEstimate, over_folds
from .sweeps import Execution, SweepResult, cell, config_slug, run_configs
from .sweeps.worker import SharedCache

METRICS = ("accuracy", "weighted_f1", "macro_f1")


@dataclass
class CVRow:
    label: str
    kind: str  # runs | ensemble | probe
    n: int  # folds with a result (each fold's seeds averaged first)
    stats: dict[str, FoldEstimate | None]  # metric -> over the held-out folds (None: no fold has a value)
    overrides: dict[str, Any]
    note: str = ""


@dataclass
class CVResult:
    out: Path
    folds: int
    seeds: list[int]
    classes: list[str]
    primary_f1: str
    rows: list[CVRow]
    sweep: SweepResult
    markdown: str


def fold_config(overrides: dict[str, Any], folds: int, fold: int) -> dict[str, Any]:
    return {**overrides, "cv_folds": folds, "cv_fold": fold}


def _stats(by_fold: list[list[dict]], classes: list[str], extra: dict[str, list[list[float]]] | None = None) -> dict[str, FoldEstimate | None]:
    """Accuracy, weighted/macro F1 and every class's F1 over the held-out folds: ``by_fold[k]`` holds fold k's reports
    (one per seed; one for an ensemble or the probe), averaged per fold, then over folds (``stats.over_folds``)."""
    values: dict[str, list[list[float]]] = {m: [[r[m] for r in fold] for fold in by_fold] for m in METRICS}
    for c in classes:
        values[f"f1_{c}"] = [[r["per_class"][c]["f1"] for r in fold] for fold in by_fold]
    out = {k: over_folds(v) for k, v in values.items()}
    for k, v in (extra or {}).items():
        e = over_folds(v)
        # the selection split's score, not a held-out one: its spread is shown, no interval claimed
        out[k] = replace(e, ci95=None) if e is not None else None
    return out


def probe_folds(cache: FeatureCache, folds: int, cv_seed: int, val_fraction: float, seed: int = 0) -> list[dict]:
    """The probe on every fold: standardised and C chosen on the fold's validation part, scored on its held-out rows."""
    views = [FoldView(cache, folds, k, cv_seed, val_fraction) for k in range(folds)]
    pool = views[0].pool()
    feats = pooled_features(pool)  # one row per usable pool row, in pool.rows order
    labels = pool.labels[pool.rows]
    out = []
    for view in views:
        fr = view.rows()
        tr, dv, te = (np.searchsorted(pool.rows, r) for r in (fr.train, fr.dev, fr.test))
        c, scaler, clf = select_probe(feats[tr], labels[tr], feats[dv], labels[dv], cache.classes, seed)
        rep = classification_report(labels[te], clf.predict(scaler.transform(feats[te])), cache.classes)
        out.append({"fold": view.fold, "C": c, "test": rep})
    return out


def _cached_probe(path: Path, cache: FeatureCache, folds: int, cv_seed: int, val_fraction: float) -> list[dict]:
    key = {"folds": folds, "cv_seed": cv_seed, "val_fraction": val_fraction, "provenance": cache.provenance}
    check_output_file(path, "the probe's cross-validation results", flag="")  # a FIFO there: refused before the work
    stored = read_stored_json(path)
    if stored is not None and stored.get("key") == key and "folds" in stored:
        return stored["folds"]
    res = probe_folds(cache, folds, cv_seed, val_fraction)
    # atomic: `cv` and `reproduce --cv` on one --out share this file and may both compute it
    atomic_write(path, json.dumps({"key": key, "folds": res}, indent=2), "the probe's cross-validation results", shared=True)
    return res


def cross_validate(
    cache_path: Path,
    base_cfg: Config,
    out: Path,
    folds: int,
    seeds: list[int],
    variants: list[tuple[str, dict[str, Any]]] | None = None,
    execution: Execution = Execution(),
    runs_dir: Path | None = None,
    probe: bool = True,
    progress: bool = True,
    console: Console | None = None,
) -> CVResult:
    """Train every variant (label, overrides) on every fold for every seed (resumably), then the seed ensembles of each
    fold and the probe on the same folds; write ``<out>/cv.md``, ``cv.csv`` and ``cv.json``."""
    check_output_folder(Path(out), "the cross-validation")
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    variants = variants or [("SPP-SCL", {})]
    tc = base_cfg.train
    cache = SharedCache(cache_path)
    classes = cache.classes
    # the folds are checked (class counts, labels) before anything trains: one clear error instead of K x seeds failures
    FoldView(cache, folds, 0, tc.cv_seed, tc.cv_val_fraction).rows()

    rows: list[CVRow] = []
    probe_res = None
    if probe:
        probe_res = _cached_probe(runs_dir / f"probe-cv{folds}-seed{tc.cv_seed}-val{tc.cv_val_fraction:g}.json", cache, folds, tc.cv_seed, tc.cv_val_fraction)
    del cache  # the probe's pool is not kept while the runs train

    keys = [*dict.fromkeys(k for _, o in variants for k in o), "cv_fold"]
    # fold-major: an interrupted run leaves every variant on the same first folds, compared pairwise
    configs = [fold_config(o, folds, k) for k in range(folds) for _, o in variants]
    result = run_configs(cache_path, base_cfg, configs, seeds, out / "per-fold", keys, runs_dir=runs_dir, execution=execution, progress=progress, console=console)

    ens_cache = SharedCache(cache_path)
    for label, o in variants:
        reports: list[list[dict]] = [[] for _ in range(folds)]
        val_acc: list[list[float]] = [[] for _ in range(folds)]
        ens: list[list[dict]] = [[] for _ in range(folds)]
        for k in range(folds):
            slug = config_slug(fold_config(o, folds, k))
            ok = [r for r in result.rows if r["config"] == slug and r["status"] == "ok"]
            for r in ok:
                res = json.loads((runs_dir / r["run"] / "results.json").read_text())
                reports[k].append(res["splits"]["test"])
                val_acc[k].append(res["splits"]["dev"]["accuracy"])
            if len(ok) >= 2:
                with own_run(out / "ensembles" / slug, wait=True, what="cv seed ensemble"):
                    e = cached_ensemble([runs_dir / r["run"] for r in ok], ens_cache, out / "ensembles" / slug)
                ens[k].append(e["splits"]["test"])
        rows.append(CVRow(label, "runs", sum(1 for f in reports if f), _stats(reports, classes, {"val_accuracy": val_acc}), o))
        if any(ens):
            rows.append(CVRow(f"{label}: ensemble of its seeds", "ensemble", sum(1 for f in ens if f), _stats(ens, classes), o, f"{len(seeds)} seeds per fold"))
    if probe_res is not None:
        rows.append(CVRow("logistic-regression probe (pooled image + [CLS])", "probe", len(probe_res), _stats([[p["test"]] for p in probe_res], classes), {}))

    primary = result.primary_f1
    cv = CVResult(out, folds, seeds, classes, primary, rows, result, "")
    cv.markdown = render_markdown(cv)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "cv.md", cv.markdown, "the CV table")
    atomic_write(out / "cv.json", json.dumps([{**r.__dict__, "stats": {k: _estimate_dict(v) for k, v in r.stats.items()}} for r in rows], indent=2), "the CV results")
    _write_csv(out / "cv.csv", rows, classes)
    return cv


def _columns(classes: list[str]) -> list[tuple[str, str]]:
    return [("accuracy", "ACC"), ("weighted_f1", "weighted F1"), ("macro_f1", "macro F1"), *[(f"f1_{c}", f"F1 {c}") for c in classes]]


def _estimate_dict(e: FoldEstimate | None) -> dict | None:
    """A FoldEstimate as cv.json stores it (the CSV's column names without the metric prefix)."""
    if e is None:
        return None
    lo, hi = e.ci95 or (None, None)
    return {"mean": e.mean, "std": e.std, "n_folds": e.n_folds, "ci95_low": lo, "ci95_high": hi, "seed_sd": e.seed_sd, "seeds_per_fold": list(e.seeds)}


def estimate_cell(e: FoldEstimate | None, interval: bool = True) -> str:
    """``mean ± std [95% CI lo, hi]`` of a fold estimate ("-" when there is none)."""
    if e is None:
        return "-"
    return cell(e.mean, e.std, ci=e.ci95 if interval else None)


def _seeds(r: CVRow) -> str:
    """Seeds averaged per fold: one number when every fold has the same, else fold by fold."""
    e = r.stats.get("accuracy")
    if e is None:
        return "-"
    return str(e.seeds[0]) if len(set(e.seeds)) == 1 else ",".join(map(str, e.seeds))


def _seed_sd(r: CVRow) -> str:
    e = r.stats.get("accuracy")
    return "-" if e is None or e.seed_sd is None else f"{e.seed_sd:.4f}"


def table_cells(cv: CVResult) -> tuple[list[str], list[list[str]]]:
    cols = _columns(cv.classes)
    head = ["model", "folds", "seeds per fold", *[f"held-out {name}" for _, name in cols], "seed sd of held-out ACC", "validation ACC (selection)"]
    body = []
    for r in cv.rows:
        val = r.stats.get("val_accuracy")
        body.append([r.label, str(r.n), _seeds(r), *[estimate_cell(r.stats[k]) for k, _ in cols], _seed_sd(r), estimate_cell(val, interval=False)])
    return head, body


def notes(cv: CVResult) -> list[str]:
    failed = [r for r in cv.sweep.rows if r["status"] != "ok"]
    out = [
        f"{cv.folds}-fold stratified cross-validation over the labelled train+dev rows (the cache's test split is not used); "
        f"seeds {', '.join(map(str, cv.seeds))}. Each run is selected on a stratified validation part of its training folds "
        "(best validation accuracy, ties by the primary F1) and scored on the held-out fold.",
        "Cells: mean ± sample std (ddof=1) over the folds of each fold's seed mean (seeds of one fold share its rows, so "
        "they are averaged first), then [95% CI]: Student's t interval over the folds, mean ± t(0.975, folds-1)·std/√folds. "
        "Seed ensembles average the seeds' class probabilities; the probe is standardised and its C chosen on the same validation parts.",
        "Seed sd: the seeds' spread within a fold, sqrt of the mean over folds of the seeds' variance (ddof=1); '-' with one seed.",
        "The validation column is the score the selection saw (no interval: it is not held out); its excess over the held-out "
        "score is the optimism of selecting on it.",
    ]
    if failed:
        out.append(f"{len(failed)} runs failed (rerun the same command to retry): " + "; ".join(f"{r['run']}: {r['error']}" for r in failed))
    return out


def render_markdown(cv: CVResult, title: str | None = None) -> str:
    head, body = table_cells(cv)
    lines = [f"# {title or 'Cross-validated estimates'}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", *[f"- {n}" for n in notes(cv)]]
    return "\n".join(lines) + "\n"


CSV_STATS = ("mean", "std", "ci95_low", "ci95_high", "seed_sd")


def _write_csv(path: Path, rows: list[CVRow], classes: list[str]) -> None:
    """One row per model: ``<metric>_{mean,std,ci95_low,ci95_high,seed_sd}`` for every held-out metric, then the
    validation accuracy (no interval); empty cells where a value does not exist (one seed: no seed_sd)."""
    keys = [k for k, _ in _columns(classes)] + ["val_accuracy"]
    body = []
    for r in rows:
        cells = []
        for k in keys:
            d = _estimate_dict(r.stats.get(k)) or {}
            cells += ["" if d.get(s) is None else d[s] for s in CSV_STATS]
        body.append([r.label, r.kind, r.n, _seeds(r), *cells])
    head = ["model", "kind", "folds", "seeds_per_fold", *[f"{k}_{s}" for k in keys for s in CSV_STATS]]
    atomic_write(path, csv_text(head, body), "the CV table")


def print_cv(cv: CVResult, console: Console, title: str | None = None) -> None:
    head, body = table_cells(cv)
    t = Table(title=safe(title) if title else f"{cv.folds}-fold cross-validation: held-out scores, mean ± std over folds [95% CI, t over folds]")
    for i, h in enumerate(head):
        t.add_column(safe(h), justify="left" if i == 0 else "right")
    for b in body:
        t.add_row(*[safe(x) for x in b])
    console.print(t)
    for n in notes(cv):
        console.print(safe(n), highlight=False)
    console.print(f"written: {safe(cv.out / 'cv.md')}, {safe(cv.out / 'cv.csv')}, {safe(cv.out / 'cv.json')} (runs: {safe(cv.sweep.runs_dir)})", highlight=False)
