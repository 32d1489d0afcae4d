"""The cheap, honest baseline: a logistic-regression probe on pooled cached features (dinov2-style).

Features per sample: the image map averaged over its spatial positions (C values) and the [CLS] state of
the text encoder's last layer (H values), standardised on train. The inverse regularisation strength C is
chosen on dev accuracy; test is only reported.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..cache import FeatureCache, SplitData
from .metrics import classification_report

C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)


def pooled_features(split: SplitData, modalities: str = "both", chunk: int = 512) -> np.ndarray:
    """(rows, C + H) float32: spatially pooled image map and last-layer [CLS], read in chunks of rows."""
    parts = []
    for start in range(0, len(split.rows), chunk):
        rows = split.rows[start : start + chunk]
        feats = []
        if modalities in ("both", "image"):
            feats.append(np.asarray(split.image[rows], dtype=np.float32).mean(axis=(2, 3)))
        if modalities in ("both", "text"):
            feats.append(split.cls_states(rows)[:, -1, :].astype(np.float32))
        parts.append(np.concatenate(feats, axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def run_probe(cache_path, seed: int = 0, modalities: str = "both", c_grid=C_GRID) -> dict:
    cache = FeatureCache(cache_path)
    classes = cache.classes
    splits = {name: cache.load(name) for name in cache.splits}
    feats = {name: pooled_features(s, modalities) for name, s in splits.items()}
    y = {name: s.labels[s.rows] for name, s in splits.items()}
    scaler = StandardScaler().fit(feats["train"])
    x = {name: scaler.transform(f) for name, f in feats.items()}
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(x["train"], y["train"])
        dev = classification_report(y["dev"], clf.predict(x["dev"]), classes)
        if best is None or dev["accuracy"] > best[1]["accuracy"]:
            best = (c, dev, clf)
    c, _, clf = best
    out = {"C": c, "features": f"pooled image map + last-layer [CLS] ({modalities})", "classes": classes, "splits": {}}
    for name, s in splits.items():
        if s.has_labels:
            out["splits"][name] = classification_report(y[name], clf.predict(x[name]), classes)
        else:
            out["splits"][name] = {"n": int(len(s.rows)), "labels": "none: predictions only"}
    return out
