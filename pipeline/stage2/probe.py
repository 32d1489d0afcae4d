"""The cheap, honest baseline: a logistic-regression probe on pooled cached features (dinov2-style).

Features per sample: the image map averaged over its spatial positions (C values) and the [CLS] state of
the text encoder's last layer (H values), standardised on train. The inverse regularisation strength C is
chosen on dev accuracy; test is only reported.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..cache import FeatureCache, SplitData, check_finite_rows
from ..config import ConfigError
from .intervals import report_interval
from .metrics import classification_report
from .runs import RunError

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)


def pooled_features(split: SplitData, modalities: str = "both", chunk: int = 512) -> np.ndarray:
    """(rows, C + H) float32: spatially pooled image map and last-layer [CLS], read in chunks of rows."""
    parts = []
    for start in range(0, len(split.rows), chunk):
        rows = split.rows[start : start + chunk]
        maps = np.asarray(split.image[rows]) if modalities in ("both", "image") else np.zeros((len(rows), 0))
        cls = split.cls_states(rows) if modalities in ("both", "text") else np.zeros((len(rows), 0))
        check_finite_rows(split, rows, maps, cls, np.ones(len(rows), dtype=np.int64))
        feats = []
        if modalities in ("both", "image"):
            feats.append(maps.astype(np.float32).mean(axis=(2, 3)))
        if modalities in ("both", "text"):
            feats.append(cls[:, -1, :].astype(np.float32))
        parts.append(np.concatenate(feats, axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


MODALITIES = ("both", "image", "text")


def select_probe(x_train, y_train, x_dev, y_dev, classes: list[str], seed: int = 0, c_grid=C_GRID):
    """Standardise on train, fit one logistic regression per C, keep the best on dev accuracy: (C, scaler, classifier)."""
    scaler = StandardScaler().fit(x_train)
    xt, xd = scaler.transform(x_train), scaler.transform(x_dev)
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(xt, y_train)
        dev = classification_report(y_dev, clf.predict(xd), classes)
        if best is None or dev["accuracy"] > best[1]["accuracy"]:
            best = (c, dev, clf)
    return best[0], scaler, best[2]


def run_probe(cache_path, seed: int = 0, modalities: str = "both", c_grid=C_GRID) -> dict:
    if modalities not in MODALITIES:
        raise ConfigError(f"--modalities must be one of {', '.join(MODALITIES)}, got {modalities!r}")
    cache = FeatureCache(cache_path)
    classes = cache.classes
    splits = {name: cache.load(name) for name in cache.splits}
    for needed in ("train", "dev"):
        if needed not in splits:
            raise RunError(f"{cache.path}: the probe needs a '{needed}' split; the cache has {', '.join(splits)}")
        present = np.unique(splits[needed].labels[splits[needed].rows])
        if not splits[needed].has_labels:
            raise RunError(f"{cache.path}: split {needed!r} has no labels (or no usable rows); the probe fits on train and selects C on dev")
        if needed == "train" and len(present) < 2:
            raise RunError(
                f"{cache.path}: split 'train' has a single class ({classes[int(present[0])]}); "
                "a classifier needs at least two. Extract a train split with more than one class."
            )
    feats = {name: pooled_features(s, modalities) for name, s in splits.items()}
    y = {name: s.labels[s.rows] for name, s in splits.items()}
    c, scaler, clf = select_probe(feats["train"], y["train"], feats["dev"], y["dev"], classes, seed, c_grid)
    out = {"C": c, "features": f"pooled image map + last-layer [CLS] ({modalities})", "classes": classes, "splits": {}}
    for name, s in splits.items():
        if s.has_labels:
            pred = clf.predict(scaler.transform(feats[name]))
            out["splits"][name] = classification_report(y[name], pred, classes)
            if name == "test":  # the one split that neither fitted the probe nor chose its C
                out["splits"][name].update(report_interval(y[name], pred, len(classes)))
        else:
            out["splits"][name] = {"n": int(len(s.rows)), "labels": "none: predictions only"}
    return out

