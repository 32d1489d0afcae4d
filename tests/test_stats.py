"""The statistics module against slow, obvious references (plain loops, scikit-learn per resample) and by coverage:
on simulated data whose true value is known, a 95% interval must cover it in about 95% of draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, f1_score

from sppscl.stage2 import stats

# ------------------------------------------------------------------ references, written the slow obvious way


def ref_mean_sd(xs: list[float]) -> tuple[float, float]:
    total = 0.0
    for x in xs:
        total += x
    m = total / len(xs)
    ss = 0.0
    for x in xs:
        ss += (x - m) ** 2
    return m, math.sqrt(ss / (len(xs) - 1))


def ref_t_interval(xs: list[float]) -> tuple[float, float]:
    m, sd = ref_mean_sd(xs)
    half = scipy_stats.t.ppf(0.975, len(xs) - 1) * sd / math.sqrt(len(xs))
    return m - half, m + half


def sklearn_metrics(y: np.ndarray, p: np.ndarray, k: int) -> dict[str, float]:
    labels = list(range(k))
    return {
        "accuracy": accuracy_score(y, p),
        "weighted_f1": f1_score(y, p, labels=labels, average="weighted", zero_division=0),
        "macro_f1": f1_score(y, p, labels=labels, average="macro", zero_division=0),
    }


def ref_metrics(y, p, k: int) -> dict[str, float]:
    """Counting row by row (checked against scikit-learn below; fast enough to call once per resample)."""
    tp, true, pred = [0] * k, [0] * k, [0] * k
    for a, b in zip(y, p):
        true[a] += 1
        pred[b] += 1
        tp[a] += a == b
    f1 = [2 * tp[c] / (true[c] + pred[c]) if true[c] + pred[c] else 0.0 for c in range(k)]
    return {
        "accuracy": sum(tp) / len(y),
        "weighted_f1": sum(f1[c] * true[c] for c in range(k)) / len(y),
        "macro_f1": sum(f1) / k,
    }


def ref_bootstrap(y: np.ndarray, preds: np.ndarray, k: int, n_resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """One resample at a time, one seed at a time, scikit-learn's metrics; the seed mean per resample; quantiles."""
    values: dict[str, list[float]] = {m: [] for m in stats.METRICS}
    for chunk in stats.resample_indices(len(y), n_resamples, seed):
        for idx in chunk:
            per_seed = [ref_metrics([int(y[i]) for i in idx], [int(p[i]) for i in idx], k) for p in preds]
            for m in stats.METRICS:
                values[m].append(sum(s[m] for s in per_seed) / len(per_seed))
    return {m: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for m, v in values.items()}


# ------------------------------------------------------------------ equal to the references


def test_t_interval_is_mean_plus_minus_t_times_standard_error():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 10):
        xs = list(rng.normal(0.7, 0.02, size=n))
        assert stats.t_interval(xs) == pytest.approx(ref_t_interval(xs), abs=1e-12)
        m, sd = ref_mean_sd(xs)
        assert stats.t_interval(xs) == pytest.approx(scipy_stats.t.interval(0.95, n - 1, loc=m, scale=sd / math.sqrt(n)), abs=1e-12)
        assert stats.t_interval_from_summary(m, sd, n) == pytest.approx(ref_t_interval(xs), abs=1e-12)
    assert stats.t_interval([0.7]) is None and stats.t_interval_from_summary(0.7, 0.0, 1) is None
    # 5 folds: t_{0.975, 4} = 2.776, not the normal 1.96
    assert stats.t_interval_from_summary(0.0, 1.0, 5)[1] == pytest.approx(2.7764451 / math.sqrt(5), abs=1e-6)


def test_metrics_from_confusion_match_scikit_learn_with_absent_classes():
    rng = np.random.default_rng(0)
    for trial in range(40):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 30))
        # few classes drawn from k, so some are absent from the truth, the predictions or both
        y = rng.integers(0, max(1, k - trial % 3), size=n)
        p = rng.integers(0, k, size=n)
        idx = np.arange(n)[None, :]
        got = stats.metrics_from_confusion(stats.confusion_counts(y, p, idx, k))
        want, loops = sklearn_metrics(y, p, k), ref_metrics(list(y), list(p), k)
        for m in stats.METRICS:
            assert got[m][0] == pytest.approx(want[m], abs=1e-12), (m, y, p)
            assert loops[m] == pytest.approx(want[m], abs=1e-12), (m, y, p)


def test_bootstrap_of_one_model_equals_the_loop_over_resamples():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    p = np.where(rng.random(60) < 0.7, y, rng.integers(0, 3, size=60))
    got = stats.bootstrap_interval(y, p, 3, n_resamples=300, seed=5)
    want = ref_bootstrap(y, p[None, :], 3, 300, 5)
    for m in stats.METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-12), m
    assert got["accuracy"][0] < accuracy_score(y, p) < got["accuracy"][1]


def test_paired_bootstrap_takes_the_seed_mean_on_the_same_rows():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=50)
    u = rng.random(50)  # shared difficulty: the seeds err on the same rows, as seeds of one model do
    preds = np.stack([np.where(u < q, y, (y + 1) % 3) for q in (0.6, 0.7, 0.8)])
    got = stats.bootstrap_interval(y, preds, 3, n_resamples=250, seed=7)
    want = ref_bootstrap(y, preds, 3, 250, 7)
    for m in stats.METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-12), m
    # not the same as pooling the seeds' rows into one long split (3x the rows: a narrower, wrong interval)
    pooled = stats.bootstrap_interval(np.tile(y, 3), preds.ravel(), 3, n_resamples=250, seed=7)
    assert pooled["accuracy"][1] - pooled["accuracy"][0] < 0.8 * (got["accuracy"][1] - got["accuracy"][0])


def test_bootstrap_is_reproducible_and_depends_on_its_seed():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=80)
    p = np.where(rng.random(80) < 0.6, y, 0)
    a = stats.bootstrap_interval(y, p, 3, n_resamples=200, seed=0)
    assert a == stats.bootstrap_interval(y, p, 3, n_resamples=200, seed=0)
    assert a != stats.bootstrap_interval(y, p, 3, n_resamples=200, seed=1)
    assert stats.bootstrap_interval(y[:0], p[:0], 3) is None
    with pytest.raises(ValueError, match="predictions"):
        stats.bootstrap_interval(y, p[:10], 3)


def test_over_folds_averages_each_folds_seeds_first():
    by_fold = [[0.70, 0.74], [0.72, 0.70], [0.75], [], [0.69, 0.71]]
    est = stats.over_folds(by_fold)
    fold_means = [0.72, 0.71, 0.75, 0.70]
    assert est.n_folds == 4 and est.seeds == (2, 2, 1, 2)
    m, sd = ref_mean_sd(fold_means)
    assert (est.mean, est.std) == pytest.approx((m, sd), abs=1e-12)
    assert est.ci95 == pytest.approx(ref_t_interval(fold_means), abs=1e-12)
    # pooled within-fold sd over the folds with two seeds: variances 0.0008, 0.0002, 0.0002
    assert est.seed_sd == pytest.approx(math.sqrt((0.0008 + 0.0002 + 0.0002) / 3), abs=1e-12)
    one_seed = stats.over_folds([[0.7], [0.8]])
    assert one_seed.seed_sd is None and one_seed.ci95 is not None
    assert stats.over_folds([[], []]) is None
    assert stats.over_folds([[0.7, 0.8]]).ci95 is None


# ------------------------------------------------------------------ coverage on simulated data


def _covered(interval: tuple[float, float], truth: float) -> bool:
    return interval[0] <= truth <= interval[1]


def _coverage(samples, truth: float, num_classes: int) -> tuple[float, float]:
    """How often the 95% and the 80% percentile intervals of each sample's bootstrap cover ``truth``."""
    hits95 = hits80 = 0
    for i, (y, preds) in enumerate(samples):
        dist = stats.bootstrap_distribution(y, preds, num_classes, n_resamples=400, seed=i)["accuracy"]
        hits95 += _covered(stats.percentile_interval(dist), truth)
        hits80 += _covered(stats.percentile_interval(dist, 0.80), truth)
    return hits95 / len(samples), hits80 / len(samples)


@pytest.mark.parametrize(
    "draws, low, high", [(400, 0.92, 0.98), pytest.param(3000, 0.94, 0.965, marks=pytest.mark.slow, id="3000-draws")]
)
def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time(draws, low, high):
    """Test splits of 250 rows from a model whose true accuracy is 0.7: the 95% interval covers 0.7 in about 95% of
    them (95.3-95.6% in runs of 3,000 draws; the binomial sd of the rate is 1.1 points at 400 draws, 0.4 at 3,000),
    and an 80% interval (about 80%) must land outside the band."""
    rng = np.random.default_rng(2026)
    truth, n = 0.7, 250

    def draw():
        y = rng.integers(0, 3, size=n)
        return y, np.where(rng.random(n) < truth, y, (y + 1 + rng.integers(0, 2, size=n)) % 3)

    rate95, rate80 = _coverage([draw() for _ in range(draws)], truth, 3)
    assert low <= rate95 <= high, rate95
    assert not low <= rate80 <= high, rate80


def test_paired_bootstrap_covers_the_true_seed_mean_accuracy():
    """Three fixed "seeds" (correlated: they share each row's difficulty) over a population of 50,000 rows; the true
    value is the population's seed-mean accuracy. 300 samples of 200 rows: coverage 92-98%; 80% lands outside."""
    rng = np.random.default_rng(7)
    pop, k = 50_000, 3
    y_pop = rng.integers(0, k, size=pop)
    easy = rng.random(pop)
    correct = np.stack([(easy + 0.25 * rng.random(pop)) > c for c in (0.35, 0.40, 0.45)])
    preds_pop = np.where(correct, y_pop, (y_pop + 1) % k)
    truth = float(correct.mean())
    samples = [(y_pop[rows], preds_pop[:, rows]) for rows in rng.integers(0, pop, size=(300, 200))]
    rate95, rate80 = _coverage(samples, truth, k)
    assert 0.92 <= rate95 <= 0.98, rate95
    assert not 0.92 <= rate80 <= 0.98, rate80


def test_t_interval_over_five_folds_covers_the_mean_and_a_normal_interval_would_not():
    """5 normal fold estimates, 4,000 draws: t covers the true mean 94-96% of the time; the normal 1.96 interval
    (what the test must be able to catch) only about 88%."""
    rng = np.random.default_rng(11)
    draws, truth = 4000, 0.73
    samples = rng.normal(truth, 0.015, size=(draws, 5))
    t_rate = np.mean([_covered(stats.t_interval(list(s)), truth) for s in samples])
    assert 0.94 <= t_rate <= 0.96, t_rate
    z = [(s.mean() - 1.96 * s.std(ddof=1) / math.sqrt(5), s.mean() + 1.96 * s.std(ddof=1) / math.sqrt(5)) for s in samples]
    z_rate = np.mean([_covered(iv, truth) for iv in z])
    assert not 0.94 <= z_rate <= 0.96, z_rate
