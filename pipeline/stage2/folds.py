"""Cross-validation folds as a view of the cache: virtual train/dev/test splits drawn from the labelled train+dev rows.

``train`` only asks a cache for ``load("train")``, ``load("dev")`` and the other splits it evaluates, and a
:class:`~sppscl.cache.SplitData` already says which of its rows are usable (``rows``). So a fold is the pooled
train+dev arrays, shared and never copied, with three row subsets:

- ``test``: the held-out fold (stratified K-fold over the pool);
- ``dev``: the validation part, carved (stratified) from the other K-1 folds; it selects the model;
- ``train``: the rest of those folds.

The cache's own test split is never read. The assignment depends on ``cv_folds``, ``cv_seed`` and
``cv_val_fraction`` only, not on the training seed, so every seed and the probe see the same folds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import h5py
import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from ..cache import WRITTEN, CacheError, FeatureCache, SplitData, gather_ranges

POOLED = ("train", "dev")
VIEW_SPLITS = ("train", "dev", "test")


class StackedRows:
    """Several row arrays (in RAM or streamed ``RowFile``s) addressed as one: row ``i`` of part ``k`` is row
    ``starts[k] + i``. Reads go to the parts; nothing is concatenated, so a pool costs no extra memory."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = np.dtype(parts[0].dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def _part(self, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, idx, side="right") - 1

    def __getitem__(self, key) -> np.ndarray:
        idx = np.asarray(key, dtype=np.int64)
        flat = np.atleast_1d(idx)
        out = np.empty((len(flat), *self.shape[1:]), self.dtype)
        part = self._part(flat)
        for k, p in enumerate(self.parts):
            sel = np.flatnonzero(part == k)
            if len(sel):
                out[sel] = np.asarray(p[flat[sel] - self.starts[k]])
        return out[0] if idx.ndim == 0 else out

    def ranges(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Rows ``starts[i] : starts[i] + counts[i]``, concatenated; a range never crosses parts (one row's tokens)."""
        out = np.empty((int(counts.sum()), *self.shape[1:]), self.dtype)
        at = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        part = self._part(starts)
        for k, p in enumerate(self.parts):
            sel = np.flatnonzero(part == k)
            if not len(sel):
                continue
            # where each selected range lands in the output, in the order gather_ranges returns them
            pos = np.concatenate([np.arange(at[i], at[i + 1]) for i in sel])
            out[pos] = gather_ranges(p, starts[sel] - self.starts[k], counts[sel])
        return out


def pool_splits(parts: list[SplitData]) -> SplitData:
    """The labelled rows of several splits as one split (file rows renumbered part after part)."""
    n_rows = np.cumsum([0] + [len(p.labels) for p in parts])
    n_tok = np.cumsum([0] + [int(p.offsets[-1]) for p in parts])
    offsets = np.concatenate([p.offsets[:-1] + n_tok[k] for k, p in enumerate(parts)] + [[n_tok[-1]]]).astype(np.int64)
    return SplitData(
        name="+".join(p.name for p in parts),
        ids=np.concatenate([p.ids for p in parts]),
        texts=np.concatenate([p.texts for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        offsets=offsets,
        image=StackedRows([p.image for p in parts]),
        tokens=StackedRows([p.tokens for p in parts]),
        rows=np.concatenate([p.rows + n_rows[k] for k, p in enumerate(parts)]).astype(np.int64),
        in_memory=all(p.in_memory for p in parts),
        path=parts[0].path,
    )


def pool_labels(cache: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """(labels, usable rows) of the pooled train+dev rows, numbered as ``pool_splits`` numbers them; no features read."""
    labels, rows, n = [], [], 0
    with h5py.File(cache.path, "r") as f:
        for s in POOLED:
            g = f[f"splits/{s}"]
            labels.append(g["labels"][()].astype(np.int64))
            rows.append(np.flatnonzero(g["status"][()] == WRITTEN) + n)
            n += len(labels[-1])
    return np.concatenate(labels), np.concatenate(rows).astype(np.int64)


@dataclass(frozen=True)
class FoldRows:
    train: np.ndarray
    dev: np.ndarray  # the validation part: selects the model
    test: np.ndarray  # the held-out fold: scored


def fold_rows(labels: np.ndarray, rows: np.ndarray, folds: int, fold: int, seed: int, val_fraction: float, where: str = "") -> FoldRows:
    """Stratified K-fold over ``rows`` (by ``labels[rows]``); fold ``fold`` held out; a stratified validation part of
    ``val_fraction`` carved from the others. Deterministic in (rows, labels, folds, seed, val_fraction)."""
    y = labels[rows]
    counts = np.bincount(y[y >= 0]) if len(y) else np.zeros(0, np.int64)
    if (y < 0).any():
        raise CacheError(f"{where}: cross-validation needs labelled train and dev rows; {int((y < 0).sum())} have no label")
    smallest = int(counts[counts > 0].min()) if len(counts) else 0
    if smallest < folds:
        raise CacheError(
            f"{where}: the rarest class has {smallest} labelled train+dev rows, fewer than cv_folds={folds}; "
            "use fewer folds (--folds) so every fold holds each class"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    rest_idx, test_idx = list(splitter.split(rows, y))[fold]
    rest = rows[rest_idx]
    try:
        train, dev = train_test_split(rest, test_size=val_fraction, stratify=labels[rest], random_state=seed)
    except ValueError as e:
        raise CacheError(f"{where}: cannot carve a stratified validation part of {val_fraction} from fold {fold}'s training rows ({e})") from None
    return FoldRows(np.sort(train), np.sort(dev), np.sort(rows[test_idx]))


class FoldView:
    """A cache seen through one cross-validation fold: ``load`` answers train/dev/test with row subsets of the
    pooled labelled train+dev rows; everything else (provenance, classes, shapes, path) is the cache's."""

    def __init__(self, cache: FeatureCache, folds: int, fold: int, seed: int = 0, val_fraction: float = 0.125):
        missing = [s for s in POOLED if s not in cache.splits]
        if missing:
            raise CacheError(f"{cache.path}: cross-validation pools the train and dev splits; the cache has no {', '.join(missing)}")
        self.base = cache
        self.folds, self.fold, self.seed, self.val_fraction = folds, fold, seed, val_fraction
        self.splits = list(VIEW_SPLITS)
        self._pool: dict[bool | None, SplitData] = {}
        self._rows: FoldRows | None = None

    def __getattr__(self, name):
        # provenance, classes, path, image_shape, layers, hidden, skipped: the underlying cache's
        return getattr(self.base, name)

    def pool(self, in_memory: bool | None = None) -> SplitData:
        if in_memory not in self._pool:
            self._pool[in_memory] = pool_splits([self.base.load(s, in_memory=in_memory) for s in POOLED])
        return self._pool[in_memory]

    def rows(self) -> FoldRows:
        if self._rows is None:
            labels, rows = pool_labels(self.base)
            where = f"{self.base.path} (fold {self.fold} of {self.folds})"
            self._rows = fold_rows(labels, rows, self.folds, self.fold, self.seed, self.val_fraction, where)
        return self._rows

    def load(self, split: str, in_memory: bool | None = None, memory_budget: int | None = None) -> SplitData:
        if split not in VIEW_SPLITS:
            raise CacheError(f"{self.base.path}: a cross-validation fold has splits {', '.join(VIEW_SPLITS)}, not {split!r}")
        return replace(self.pool(in_memory), name=split, rows=getattr(self.rows(), split))

    def describe(self) -> dict:
        r = self.rows()
        return {
            "folds": self.folds,
            "fold": self.fold,
            "cv_seed": self.seed,
            "val_fraction": self.val_fraction,
            "pooled": list(POOLED),
            "splits": {
                "train": f"{len(r.train)} rows of the other folds",
                "dev": f"{len(r.dev)} rows: validation part carved from the other folds (selects the model)",
                "test": f"{len(r.test)} rows: held-out fold {self.fold} (scored; the cache's own test split is not used)",
            },
        }


def fold_view(cache: FeatureCache, tc) -> FoldView:
    """The view a training configuration asks for (``tc.cv_folds`` >= 2)."""
    base = cache.base if isinstance(cache, FoldView) else cache
    return FoldView(base, tc.cv_folds, tc.cv_fold, tc.cv_seed, tc.cv_val_fraction)

