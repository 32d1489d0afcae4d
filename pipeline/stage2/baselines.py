"""What a model's dev accuracy is read against: the majority class, and the probe when one was run on the cache.

A model at 0.30 dev accuracy means little until one knows that always answering the train split's most frequent class
scores 0.59 and a logistic-regression probe on the same features 0.67. ``train`` computes the first and looks for the
second; both go to the console, ``results.json`` (``baselines``) and the model card.

The probe's convention: ``sppscl probe`` (``modalities`` both, the baseline) records its result beside the cache, as
``<cache stem>.probe.json`` (``cache/mvsa-single.h5`` -> ``cache/mvsa-single.probe.json``). The record names the cache
by the digest of its provenance, so a probe of another cache once at the same path (rebuilt, other encoders, another
``--limit``) is never taken for this one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..cache import FeatureCache
from ..errors import SppsclError, check_input_file
from ..outputs import atomic_write
from .folds import FoldView


def baselines(cache: FeatureCache | FoldView, train_labels: np.ndarray, dev_labels: np.ndarray, classes: list[str]) -> dict:
    """What a dev accuracy is read against: the accuracy of always predicting the train split's most frequent class,
    and the probe's dev accuracy when ``sppscl probe`` recorded one for this very cache beside it (see the
    module's docstring; never for a CV fold, whose dev rows are not the cache's)."""
    counts = np.bincount(train_labels, minlength=len(classes))
    k = int(counts.argmax())
    out: dict = {
        "majority_class": {
            "class": classes[k],
            "train_share": float(counts[k] / counts.sum()),
            "dev_accuracy": float(np.mean(dev_labels == k)) if len(dev_labels) else 0.0,
        }
    }
    probe = None if isinstance(cache, FoldView) else find_probe(cache)
    if probe is not None and "dev" in probe["splits"]:
        out["probe"] = {"dev_accuracy": probe["splits"]["dev"]["accuracy"], "C": probe["C"], "path": probe["path"]}
    return out


def probe_record_path(cache_path: Path) -> Path:
    """``cache/mvsa-single.h5`` -> ``cache/mvsa-single.probe.json``."""
    return Path(cache_path).with_suffix(".probe.json")


def provenance_digest(provenance: dict) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()


def record_probe(cache_path: Path, result: dict, seed: int) -> str | None:
    """Write the probe's record beside the cache; returns its path, or None when the probe is not the both-modality
    baseline or the cache's folder cannot be written (the probe's own output does not depend on it)."""
    if not result["features"].endswith("(both)"):
        return None
    path = probe_record_path(cache_path)
    record = {
        "cache_provenance_sha256": provenance_digest(FeatureCache(cache_path).provenance),
        "C": result["C"],
        "seed": seed,
        "features": result["features"],
        "splits": {
            name: {k: m[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1")} for name, m in result["splits"].items() if "accuracy" in m
        },
    }
    try:
        atomic_write(path, json.dumps(record, indent=2), "the probe's record beside the cache")
    except SppsclError:  # a read-only cache folder only means train will not find the reference
        return None
    return str(path)


def find_probe(cache: FeatureCache) -> dict | None:
    """The probe recorded beside ``cache`` for this very cache (same provenance), with its ``path``; else None."""
    path = probe_record_path(cache.path)
    try:
        # only a regular file is read (a FIFO planted there would block train); anything unreadable is no record
        if not check_input_file(path, "a probe record"):
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError, SppsclError):
        return None
    if not isinstance(record, dict) or record.get("cache_provenance_sha256") != provenance_digest(cache.provenance):
        return None
    return {**record, "path": str(path)}


def baseline_lines(results: dict) -> list[str]:
    """The references a dev accuracy is read against, one sentence each (also printed by ``sppscl train``)."""
    base = results.get("baselines") or {}
    dev = results["splits"].get("dev", {}).get("accuracy")
    out = []
    maj = base.get("majority_class")
    if maj is not None:
        out.append(
            f"majority class ({maj['class']}, the train split's most frequent) on dev: accuracy {maj['dev_accuracy']:.4f}"
            + (" - this model does not beat it" if dev is not None and dev <= maj["dev_accuracy"] else "")
        )
    probe = base.get("probe")
    if probe is not None:
        out.append(f"logistic-regression probe on the same cache ({probe['path']}, C={probe['C']}) on dev: accuracy {probe['dev_accuracy']:.4f}")
    return out
