"""The sweep's tables: one row per run, aggregated over seeds into one row per configuration.

``runs.csv`` (every run), ``summary.csv`` (means and sample stds as numbers; for test, the 95% interval of the seed
mean as ``test_<metric>_ci95_low``/``_ci95_high``, a paired bootstrap over the test rows read from the runs'
predictions files, docs/statistics.md) and ``summary.md`` (``mean ± std [lo, hi]`` cells), and the same summary as
a rich table. Model choice is on dev only: configurations are sorted by mean dev
accuracy (ties by the dataset's primary F1); test columns are reported beside, never used to select.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ...errors import safe
from ...outputs import atomic_write, csv_text
from ..intervals import runs_interval
from ..stats import METRICS as INTERVAL_METRICS
from ..stats import bootstrap_method, mean_std
from .spec import fmt

METRICS = ("accuracy", "weighted_f1", "macro_f1")
SPLITS = ("dev", "test")
METRIC_COLUMNS = [f"{s}_{m}" for s in SPLITS for m in METRICS]


@dataclass
class SweepResult:
    out: Path  # where runs.csv and summary.{csv,md} were written
    runs_dir: Path
    keys: list[str]  # swept keys (table columns)
    rows: list[dict]  # one per run, in plan order
    summary: list[dict]  # one per configuration, best on dev first
    ran: list[str]  # runs trained by this invocation (the others were finished already)
    failed: list[str]
    primary_f1: str
    seeds: list[int]
    # configuration slug -> the ensemble of its seeds (``sppscl sweep``: ensembles/<slug>/, ensembles.md)
    ensembles: dict[str, dict] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)  # runs a search's pruner stopped early (finished, no result)
    skipped: list[str] = field(default_factory=list)  # seeds not started: their configuration's first seed was pruned


def read_run(run_dir: Path, status: str, error: str, wall_s: float | None) -> dict:
    """A run's row: its best epoch (1-based) and dev/test metrics from results.json; only the error when it failed;
    only the epoch it stopped at (``pruned_epoch``) when a search's pruner stopped it: a pruned run has no scores here,
    so no mean, ranking or ensemble can count it."""
    row: dict[str, Any] = {"status": status, "best_epoch": None, **{c: None for c in METRIC_COLUMNS}, "wall_s": wall_s, "error": error}
    if status == "failed":
        return row
    res = json.loads((run_dir / "results.json").read_text())
    if status == "pruned":
        row["pruned_epoch"] = res["pruned_at_epoch"]
    else:
        row["best_epoch"] = res["best_epoch"]
        for split in SPLITS:
            m = res["splits"].get(split, {})
            for metric in METRICS:
                row[f"{split}_{metric}"] = m.get(metric)
    if wall_s is None and (run_dir / "sweep-run.json").exists():
        row["wall_s"] = json.loads((run_dir / "sweep-run.json").read_text())["wall_s"]
    return row


def study_rows(trials: list, plan, keys: list[str], base_train: dict, local: bool) -> list[dict]:
    """The runs table from a sweep's study: one row per run that has a result, in the plan's order, seeds inner.

    A configuration's value of each key is its override, or the base configuration's when it does not set it."""
    from .spec import config_slug, run_name
    from .study import attrs, by_run, outcome

    held = by_run(trials)
    skipped = plan.skipped(trials)
    # a pruned search's table says where each pruned run stopped; other sweeps' tables keep their columns
    cols = ("status", "best_epoch", *METRIC_COLUMNS, "wall_s", "host", "run_dir", *(("pruned_epoch",) if getattr(plan, "prune", None) else ()))
    rows = []
    for overrides, seed in plan.table(trials):
        name = run_name(overrides, seed)
        values = {k: overrides.get(k, base_train[k]) for k in keys}
        t = outcome(held.get(name, []), local)
        if t is None:
            if name in skipped:
                # not a trial: a seed its configuration's pruned first seed kept from starting, listed so it is counted
                empty = {c: None for c in cols}
                rows.append({"run": name, "config": config_slug(overrides), **values, "seed": seed, "trial": None, **empty, "status": "skipped", "error": skipped[name]})
            continue
        a = attrs(t)
        result = {c: a.get(c) for c in cols}
        rows.append({"run": name, "config": a["config"], **values, "seed": seed, "trial": t.number, **result, "error": a.get("error", "")})
    return rows


def first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def test_interval(ok: list[dict]) -> dict[str, Any]:
    """``test_<metric>_ci95_low``/``_ci95_high`` of the finished runs' seed mean (``intervals.runs_interval`` on their
    ``run_dir``), empty with ``test_ci95_note`` saying why when the runs have no test score or their predictions are
    not on this machine."""
    cols = {f"test_{m}_ci95_{end}": None for m in INTERVAL_METRICS for end in ("low", "high")}
    if not any(r.get("test_accuracy") is not None for r in ok):
        return {**cols, "test_ci95_note": ""}
    dirs = [r.get("run_dir") for r in ok]
    if not all(dirs):
        return {**cols, "test_ci95_note": "run folders unknown"}
    iv, why = runs_interval([Path(d) for d in dirs], "test")
    if iv is not None:
        for m in INTERVAL_METRICS:
            cols[f"test_{m}_ci95_low"], cols[f"test_{m}_ci95_high"] = iv[m]
    return {**cols, "test_ci95_note": why}


def aggregate(rows: list[dict], keys: list[str], primary_f1: str = "weighted") -> list[dict]:
    """One row per configuration: n finished seeds, failures, mean and std of every metric; best on dev first.

    Sorted by mean dev accuracy, ties by mean dev primary F1; configurations with no finished seed last."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    pruning = any("pruned_epoch" in r for r in rows)
    summary = []
    for slug, rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        s: dict[str, Any] = {"config": slug, **{k: rs[0][k] for k in keys}, "n": len(ok), "n_failed": sum(r["status"] == "failed" for r in rs)}
        if pruning:
            # a pruned run is finished but no result: counted here, never in a mean
            pruned = [r for r in rs if r["status"] == "pruned"]
            s["n_pruned"] = len(pruned)
            s["pruned_at_epoch"] = min((r["pruned_epoch"] for r in pruned), default=None)
            s["n_skipped"] = sum(r["status"] == "skipped" for r in rs)
        for col in METRIC_COLUMNS:
            vals = [r[col] for r in ok if r[col] is not None]
            mean, std = mean_std(vals) if vals else (None, None)
            s[f"{col}_mean"], s[f"{col}_std"] = mean, std
        s.update(test_interval(ok))
        summary.append(s)

    def key(s: dict) -> tuple:
        return (s["n"] > 0, s["dev_accuracy_mean"] or 0.0, s[f"dev_{primary_f1}_f1_mean"] or 0.0)

    return sorted(summary, key=key, reverse=True)


def write_csv(path: Path, rows: list[dict]) -> None:
    head = list(rows[0]) if rows else []
    text = csv_text(head, [["" if r.get(k) is None else r.get(k) for k in head] for r in rows]) if rows else ""
    atomic_write(path, text, "the runs table")


def cell(mean: float | None, std: float | None, n: int | None = None, ci: tuple[float, float] | None = None) -> str:
    """``0.7311 ± 0.0042`` (then `` [0.7102, 0.7520]`` when a 95% interval ``ci`` is given, and `` (n=3)`` when n is);
    empty when there is no value."""
    if mean is None:
        return "" if n is None else f"- (n={n})"
    text = f"{mean:.4f} ± {std:.4f}"
    if ci is not None:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text if n is None else f"{text} (n={n})"


PRUNED_CAPTION = (
    "pruned: the search's pruner stopped the configuration's first seed at that epoch (its dev curve was behind); a "
    "pruned run is finished, not failed, and in no mean, ensemble or ranking; its other seeds were not started."
)


def _label(col: str) -> str:
    split, metric = col.split("_", 1)
    return f"{split} " + {"accuracy": "acc", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}[metric]


def summary_cell(s: dict, col: str) -> str:
    """A summary cell: ``mean ± std``, and `` [lo, hi]`` when the summary holds a 95% interval for ``col``."""
    lo, hi = s.get(f"{col}_ci95_low"), s.get(f"{col}_ci95_high")
    return cell(s[f"{col}_mean"], s[f"{col}_std"], ci=(lo, hi) if lo is not None else None)


def interval_caption(summary: list[dict]) -> str:
    """What the test columns' brackets are, and which configurations lack one and why ("" without test columns)."""
    if not any(s.get("test_accuracy_mean") is not None for s in summary):
        return ""
    text = (
        f"Test cells: mean ± std [95% CI]: {bootstrap_method()} of the test split, the same resampled rows for every "
        "seed and the seed mean per resample (paired); it covers which test rows were drawn, not the seeds (their "
        "spread is the ± std). Dev cells have no interval: dev selected the checkpoints."
    )
    return text + (f" {missing_intervals(summary)}" if missing_intervals(summary) else "")


def missing_intervals(summary: list[dict]) -> str:
    """"No interval for: <config> (<why>); ..." for the configurations with a test score but no interval ("" if none)."""
    lacking = [f"{s['config']} ({s['test_ci95_note']})" for s in summary if s.get("test_accuracy_mean") is not None and s.get("test_accuracy_ci95_low") is None]
    return "No interval for: " + "; ".join(lacking) + "." if lacking else ""


def pruned_cell(s: dict) -> str:
    """A configuration's pruning: ``at epoch 3`` (its first seed stopped there), ``, 2 seeds not started``; "" if none."""
    if not s.get("n_pruned"):
        return ""
    text = f"at epoch {s['pruned_at_epoch']}"
    return text + (f", {s['n_skipped']} seed{'s' * (s['n_skipped'] > 1)} not started" if s.get("n_skipped") else "")


def _shown_columns(summary: list[dict]) -> list[str]:
    return [c for c in METRIC_COLUMNS if c.startswith("dev") or any(s[f"{c}_mean"] is not None for s in summary)]


def write_summary(out: Path, summary: list[dict], keys: list[str], primary_f1: str, n_seeds: int) -> None:
    """summary.csv (means and stds as numbers) and summary.md (``mean ± std`` cells, best on dev in bold)."""
    write_csv(out / "summary.csv", summary)
    cols = _shown_columns(summary)
    pruning = any("n_pruned" in s for s in summary)
    head = [*(keys or ["config"]), "n", "failed", *(["pruned"] if pruning else []), *[_label(c) for c in cols]]
    lines = [
        f"Mean ± sample std (ddof=1; 0 when n=1) over seeds ({n_seeds} per configuration asked; n = seeds finished). "
        f"Sorted by mean dev accuracy, ties by dev {primary_f1} F1; the best configuration (chosen on dev only) is in bold; "
        "test is reported beside, never used to select." + (f" {interval_caption(summary)}" if interval_caption(summary) else "")
        + (f" {PRUNED_CAPTION}" if pruning else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for i, s in enumerate(summary):
        names = [fmt(s[k]) for k in keys] or [s["config"]]
        if i == 0 and s["n"] > 0:
            names = [f"**{x}**" for x in names]
        pruned = [pruned_cell(s) or "-"] if pruning else []
        lines.append("| " + " | ".join([*names, str(s["n"]), str(s["n_failed"]), *pruned, *[summary_cell(s, c) for c in cols]]) + " |")
    atomic_write(out / "summary.md", "\n".join(lines) + "\n", "the sweep summary")


def print_summary(result: SweepResult, console: Console, trained: bool = True) -> None:
    """The aggregate as a rich table, best configuration (on dev) highlighted; then the failures, if any.

    ``trained``: say how many runs this command trained (not for a summary read from a study)."""
    cols = _shown_columns(result.summary)
    t = Table(
        title=f"sweep {safe(result.out)}: {len(result.summary)} configurations x {len(result.seeds)} seeds, mean ± std over seeds",
        caption=f"sorted by dev accuracy (ties: dev {result.primary_f1} F1); highlighted: best on dev; test never used to select",
    )
    for k in result.keys or ["config"]:
        t.add_column(safe(k))
    pruning = any("n_pruned" in s for s in result.summary)
    t.add_column("n", justify="right")
    t.add_column("failed", justify="right")
    if pruning:
        t.add_column("pruned")
    for c in cols:
        t.add_column(_label(c), justify="right")
    for i, s in enumerate(result.summary):
        names = [safe(fmt(s[k])) for k in result.keys] or [safe(s["config"])]
        cells = [summary_cell(s, c) for c in cols]
        pruned = [pruned_cell(s)] if pruning else []
        t.add_row(*names, str(s["n"]), str(s["n_failed"]), *pruned, *cells, style="bold green" if i == 0 and s["n"] > 0 else None)
    console.print(t)
    if interval_caption(result.summary):
        console.print(safe(interval_caption(result.summary)), highlight=False)
    if trained:
        # a failed run is always retried, so every row not trained now was finished before
        runs = [r for r in result.rows if r["status"] != "skipped"]
        console.print(f"trained now: {len(result.ran)} runs; finished before: {len(runs) - len(result.ran)}")
    pruned, skipped = [r for r in result.rows if r["status"] == "pruned"], [r for r in result.rows if r["status"] == "skipped"]
    if pruned:
        stops = ", ".join(f"{r['run']} at epoch {r['pruned_epoch']}" for r in pruned)
        console.print(f"pruned (stopped early, finished, never retried): {len(pruned)} runs: {safe(stops)}", highlight=False)
    if skipped:
        console.print(f"not started because their configuration's first seed was pruned: {len(skipped)} runs", highlight=False)
    console.print(f"tables: {safe(result.out / 'runs.csv')}, {safe(result.out / 'summary.csv')}, {safe(result.out / 'summary.md')}", highlight=False)
    if result.failed:
        console.print(f"[bold red]{len(result.failed)} runs failed[/] (rerun the same command to retry them):")
        for r in result.rows:
            if r["status"] == "failed":
                console.print(f"  {safe(r['run'])}: {safe(first_line(r['error']))}  ({safe(result.runs_dir / r['run'] / 'error.txt')})", highlight=False)
