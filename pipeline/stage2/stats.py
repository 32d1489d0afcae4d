"""The statistics every table quotes: spreads, 95% intervals and their exact recipes (docs/statistics.md).

Two kinds of uncertainty, never mixed up:

- **Over rows** (one fixed evaluation split, e.g. a 450-post test split): a percentile bootstrap that resamples the
  split's rows with replacement (``bootstrap_interval``). For a summary over seeds the *same* resampled rows score
  every seed and the resample's value is the seed mean (a paired bootstrap), so the interval is the one of the
  number the table shows, the seed mean; the seeds' spread is reported beside it as ``± std``, not folded in.
- **Over folds** (K-fold cross-validation): every fold is one estimate (its seeds averaged first, ``over_folds``),
  and the interval is Student's t over the K fold estimates (``t_interval``).

Everything is numpy and SciPy's t quantile; the bootstrap draws its rows from ``np.random.default_rng(seed)`` with
a fixed ``seed`` and ``n_resamples``, both recorded in every caption (``bootstrap_method``), so a table's interval
is reproducible to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# resamples drawn and scored at once: bounds memory to CHUNK x rows indices whatever the split's size
CHUNK = 250
METRICS = ("accuracy", "weighted_f1", "macro_f1")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values``; the std of a single value is 0.0."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


@lru_cache(maxsize=256)
def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value for ``n`` estimates: the (1 + confidence)/2 quantile with n - 1 dof."""
    return float(_scipy_stats.t.ppf((1 + confidence) / 2, n - 1))


def t_interval_from_summary(mean: float, std: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """``mean ± t_{(1+c)/2, n-1} · std / sqrt(n)``: the t interval for the mean of ``n`` independent estimates whose
    sample std (ddof=1) is ``std``. None when n < 2 (no spread to scale)."""
    if n < 2:
        return None
    half = t_quantile(n, confidence) * std / math.sqrt(n)
    return mean - half, mean + half


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student's t interval for the mean of independent estimates (one per CV fold): ``t_interval_from_summary`` of
    their mean and sample std (ddof=1). None for fewer than two values. It assumes the estimates independent and
    roughly normal; CV folds share training rows, so it is a conventional, somewhat narrow, interval."""
    if len(values) < 2:
        return None
    m, s = mean_std(values)
    return t_interval_from_summary(m, s, len(values), confidence)


@dataclass(frozen=True)
class FoldEstimate:
    """A metric over K folds, each fold's seeds averaged first (``over_folds``)."""

    mean: float  # mean over folds of the per-fold seed mean
    std: float  # sample std (ddof=1) over folds of the per-fold seed mean
    n_folds: int
    ci95: tuple[float, float] | None  # t interval over the folds (None with one fold)
    seed_sd: float | None  # pooled within-fold std over seeds (None when no fold has two seeds)
    seeds: tuple[int, ...]  # seeds averaged in each fold, fold by fold


def seed_spread(values_by_fold: Sequence[Sequence[float]]) -> float | None:
    """The seeds' spread with the folds' differences taken out: ``sqrt(mean over folds of var_ddof1(fold's seeds))``,
    over the folds with two or more seeds (pooled within-fold std; folds weigh equally). None when no fold has two."""
    variances = [float(np.var(v, ddof=1)) for v in values_by_fold if len(v) >= 2]
    return math.sqrt(float(np.mean(variances))) if variances else None


def over_folds(values_by_fold: Sequence[Sequence[float]], confidence: float = CONFIDENCE) -> FoldEstimate | None:
    """A CV estimate: average each fold's seeds, then mean, sample std and t interval over the K fold means; the seed
    spread (``seed_spread``) separately. Folds with no value (every run failed) are left out, and ``n_folds`` says so.
    Seeds are averaged first because two seeds of one fold share its rows: they are not independent estimates."""
    folds = [list(v) for v in values_by_fold if len(v)]
    if not folds:
        return None
    means = [float(np.mean(v)) for v in folds]
    m, s = mean_std(means)
    return FoldEstimate(m, s, len(means), t_interval(means, confidence), seed_spread(folds), tuple(len(v) for v in folds))


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The bootstrap's resamples of ``n`` rows, ``(≤chunk, n)`` index arrays, drawn with replacement, uniformly, by
    ``np.random.default_rng(seed)``, chunk after chunk: ``n_resamples`` rows of indices in all."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_resamples - start), n))


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    """``(R, K, K)`` confusion matrices (rows true, columns predicted) of the rows ``idx[r]`` of each resample r."""
    k2 = num_classes * num_classes
    codes = (np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64))[idx]  # (R, n)
    flat = codes + k2 * np.arange(len(idx), dtype=np.int64)[:, None]
    return np.bincount(flat.ravel(), minlength=len(idx) * k2).reshape(len(idx), num_classes, num_classes)


def metrics_from_confusion(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, weighted F1 and macro F1 of ``(..., K, K)`` confusion matrices, as ``classification_report`` computes
    them with scikit-learn (every class listed, zero_division=0): F1 of a class = 2·TP / (true + predicted), 0 when
    it is neither true nor predicted; macro = plain mean over the K classes; weighted = mean weighted by true count."""
    conf = np.asarray(conf, np.float64)
    total = conf.sum(axis=(-2, -1))
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    true = conf.sum(axis=-1)
    pred = conf.sum(axis=-2)
    denom = true + pred
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    support = true.sum(axis=-1)
    return {
        "accuracy": np.divide(tp.sum(axis=-1), total, out=np.zeros_like(total), where=total > 0),
        "weighted_f1": np.divide((f1 * true).sum(axis=-1), support, out=np.zeros_like(support), where=support > 0),
        "macro_f1": f1.mean(axis=-1),
    }


def bootstrap_distribution(
    y_true: np.ndarray, y_preds: np.ndarray, num_classes: int, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, np.ndarray]:
    """Every metric of ``METRICS`` on each of ``n_resamples`` resamples of the rows: ``y_preds`` is ``(S, n)``, one row
    of predicted labels per seed (or a single ``(n,)`` row); each resample scores every seed on the same rows and
    keeps the mean over seeds (the paired bootstrap of a seed mean)."""
    preds = np.atleast_2d(np.asarray(y_preds, np.int64))
    y = np.asarray(y_true, np.int64)
    if preds.shape[1] != len(y):
        raise ValueError(f"{preds.shape[1]} predictions for {len(y)} labelled rows")
    out: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for idx in resample_indices(len(y), n_resamples, seed):
        per_seed = [metrics_from_confusion(confusion_counts(y, p, idx, num_classes)) for p in preds]
        for m in METRICS:
            out[m].append(np.mean([s[m] for s in per_seed], axis=0))
    return {m: np.concatenate(v) for m, v in out.items()}


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution: its (1 - c)/2 and (1 + c)/2 quantiles (numpy's default
    linear interpolation)."""
    lo, hi = np.quantile(np.asarray(values, np.float64), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_interval(
    y_true: np.ndarray,
    y_preds: np.ndarray,
    num_classes: int,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, tuple[float, float]] | None:
    """The percentile-bootstrap interval over rows of each metric of ``METRICS`` for one split: of the single model
    when ``y_preds`` is ``(n,)``, of the seed mean when it is ``(S, n)`` (paired: same rows for every seed; see
    ``bootstrap_distribution``). It covers the row sampling of the split only, not the seeds' spread. None for no rows."""
    if len(y_true) == 0:
        return None
    dist = bootstrap_distribution(y_true, y_preds, num_classes, n_resamples, seed)
    return {m: percentile_interval(dist[m], confidence) for m in METRICS}


def bootstrap_method(n_rows: int | None = None, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> str:
    """The caption's words for ``bootstrap_interval``'s recipe (rows, resamples, seed)."""
    rows = f"the {n_rows} rows" if n_rows is not None else "the rows"
    return f"95% percentile bootstrap over {rows} ({n_resamples} resamples, numpy seed {seed})"
