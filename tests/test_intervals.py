"""Intervals from run folders' prediction files, and the sweep summary's interval columns (no training: fake runs)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from sppscl.stage2.intervals import read_predictions, report_interval, runs_interval
from sppscl.stage2.stats import bootstrap_interval
from sppscl.stage2.sweeps import aggregate, write_summary

CLASSES = ["positive", "neutral", "negative"]


def _write(run, split, ids, labels, preds):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / f"predictions-{split}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "pred", *[f"p_{c}" for c in CLASSES]])
        for i, y, p in zip(ids, labels, preds):
            w.writerow([i, "" if y < 0 else CLASSES[y], CLASSES[p], *(["0.333333"] * 3)])


def _runs(tmp_path, n_rows=40, seeds=(1, 2, 3), rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    y = rng.integers(0, 3, size=n_rows)
    ids = [f"id{i}" for i in range(n_rows)]
    preds = np.stack([np.where(rng.random(n_rows) < 0.7, y, rng.integers(0, 3, size=n_rows)) for _ in seeds])
    dirs = []
    for s, p in zip(seeds, preds):
        _write(tmp_path / f"run-seed{s}", "test", ids, y, p)
        dirs.append(tmp_path / f"run-seed{s}")
    return dirs, y, preds


def test_runs_interval_is_the_paired_bootstrap_of_the_files(tmp_path):
    dirs, y, preds = _runs(tmp_path)
    p = read_predictions(dirs[0] / "predictions-test.csv")
    assert p.classes == CLASSES and np.array_equal(p.labels, y) and np.array_equal(p.preds, preds[0])
    iv, why = runs_interval(dirs, "test")
    assert why == "" and iv == bootstrap_interval(y, preds, 3)
    single = report_interval(y, preds[0], 3)
    assert single["ci95"]["accuracy"] == list(bootstrap_interval(y, preds[0], 3)["accuracy"])
    assert "2000 resamples" in single["ci95_method"] and "40 rows" in single["ci95_method"]


def test_runs_interval_says_why_it_has_none(tmp_path):
    dirs, y, preds = _runs(tmp_path)
    assert runs_interval([*dirs, tmp_path / "elsewhere"], "test")[1].startswith("1 of 4 runs' predictions-test.csv not on this machine")
    _write(tmp_path / "other", "test", [f"x{i}" for i in range(len(y))], y, preds[0])
    assert "different rows" in runs_interval([dirs[0], tmp_path / "other"], "test")[1]
    _write(tmp_path / "unlabelled", "test", ["a", "b"], [-1, -1], [0, 1])
    assert runs_interval([tmp_path / "unlabelled"], "test") == (None, "test has no labels")
    bad = tmp_path / "bad" / "predictions-test.csv"
    bad.parent.mkdir()
    bad.write_text("id,label,pred,p_positive,p_neutral,p_negative\na,positive,angry,0,0,0\n")
    with pytest.raises(ValueError, match=r"bad/predictions-test.csv, line 2: class 'angry'"):
        read_predictions(bad)


def _row(config, seed, run_dir, acc):
    return {"config": config, "lr": config, "seed": seed, "status": "ok", "run_dir": str(run_dir) if run_dir else None,
            "dev_accuracy": acc, "dev_weighted_f1": acc, "dev_macro_f1": acc,
            "test_accuracy": acc, "test_weighted_f1": acc, "test_macro_f1": acc}


def test_sweep_summary_gets_interval_columns_and_says_where_they_are_missing(tmp_path):
    dirs, y, preds = _runs(tmp_path)
    rows = [_row("a", s, d, 0.7 + s / 100) for s, d in zip((1, 2, 3), dirs)] + [_row("b", 1, None, 0.6)]
    summary = aggregate(rows, ["lr"])
    a, b = summary
    want = bootstrap_interval(y, preds, 3)
    assert (a["test_accuracy_ci95_low"], a["test_accuracy_ci95_high"]) == want["accuracy"] and a["test_ci95_note"] == ""
    assert b["test_accuracy_ci95_low"] is None and b["test_ci95_note"] == "run folders unknown"
    write_summary(tmp_path, summary, ["lr"], "weighted", 3)
    md = (tmp_path / "summary.md").read_text()
    assert f"0.7200 ± 0.0100 [{want['accuracy'][0]:.4f}, {want['accuracy'][1]:.4f}]" in md
    assert "No interval for: b (run folders unknown)" in md and "paired" in md
    with open(tmp_path / "summary.csv") as fh:
        head = next(csv.reader(fh))
    assert {"test_accuracy_ci95_low", "test_accuracy_ci95_high", "test_weighted_f1_ci95_low", "test_macro_f1_ci95_high", "test_ci95_note"} <= set(head)
