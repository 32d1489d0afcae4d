"""95% intervals for the tables, computed from what run folders store: ``predictions-<split>.csv`` (one row per
scored sample: id, true label, predicted label, probabilities; written by training, ``evaluate`` and ``ensemble``).

The statistics themselves are ``stats.py``; this module finds the rows, checks that the runs of one summary scored
the same rows, and says why when an interval cannot be given (no labels, a run folder on another machine).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stats import METRICS, bootstrap_interval, bootstrap_method


@dataclass
class Predictions:
    ids: list[str]
    labels: np.ndarray  # class index of the true label, -1 where the split has none
    preds: np.ndarray  # class index of the prediction
    classes: list[str]


def read_predictions(path: Path) -> Predictions:
    """A ``predictions-<split>.csv``; the class order is its ``p_<class>`` columns'. A label or prediction that is
    not one of those classes is an error naming the file and line."""
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        head = next(reader, None)
        if head is None or head[:3] != ["id", "label", "pred"]:
            raise ValueError(f"{path}: not a predictions file (its header must start with id,label,pred)")
        classes = [h[2:] for h in head[3:] if h.startswith("p_")]
        index = {c: i for i, c in enumerate(classes)}
        ids, labels, preds = [], [], []
        for line, row in enumerate(reader, start=2):
            label, pred = row[1], row[2]
            if (label and label not in index) or pred not in index:
                raise ValueError(f"{path}, line {line}: class {label if label and label not in index else pred!r} is not one of {classes}")
            ids.append(row[0])
            labels.append(index[label] if label else -1)
            preds.append(index[pred])
    return Predictions(ids, np.asarray(labels, np.int64), np.asarray(preds, np.int64), classes)


def runs_interval(run_dirs: list[Path], split: str) -> tuple[dict[str, tuple[float, float]] | None, str]:
    """The 95% interval of the seed mean of ``run_dirs`` on ``split`` (a paired bootstrap over its rows: every resample
    scores every run on the same rows), from their ``predictions-<split>.csv``. Returns (interval per metric of
    ``stats.METRICS``, "") or (None, why not)."""
    if not run_dirs:
        return None, "no finished run"
    files = [Path(d) / f"predictions-{split}.csv" for d in run_dirs]
    missing = [f for f in files if not f.is_file()]
    if missing:
        return None, f"{len(missing)} of {len(files)} runs' predictions-{split}.csv not on this machine (e.g. {missing[0]})"
    read = [read_predictions(f) for f in files]
    first = read[0]
    for f, p in zip(files[1:], read[1:]):
        if p.ids != first.ids or p.classes != first.classes or not np.array_equal(p.labels, first.labels):
            return None, f"{f} and {files[0]} scored different rows or classes"
    if len(first.labels) == 0:
        return None, f"{split} has no rows"
    if (first.labels < 0).any():
        return None, f"{split} has no labels"
    return bootstrap_interval(first.labels, np.stack([p.preds for p in read]), len(first.classes)), ""


def report_interval(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """What a ``results.json`` split gets beside its metrics: ``ci95`` (metric -> [low, high]) and ``ci95_method``."""
    iv = bootstrap_interval(y_true, y_pred, num_classes)
    if iv is None:
        return {}
    return {"ci95": {m: list(iv[m]) for m in METRICS}, "ci95_method": bootstrap_method(len(y_true))}
