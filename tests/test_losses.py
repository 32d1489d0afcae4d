"""SPP-SCL losses (Eq. 4-7) against slow loop references and pytorch-metric-learning's SupConLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SupConLoss

from sppscl.stage2.losses import (
    InterSupCon,
    IntraSupCon,
    inter_supcon,
    intra_supcon,
    one_step_loss,
    step1_loss,
    step2_loss,
)

TAU = 0.07

LABEL_PATTERNS = {
    "mixed": [0, 1, 2, 0, 1, 2, 0, 0],
    "singletons": [0, 0, 1, 2, 2, 3, 4],  # anchors 1..: classes 1, 3, 4 have no positive
    "all_distinct": [0, 1, 2, 3, 4],
    "one_class": [1, 1, 1, 1],
    "pair": [2, 2],
    "single": [0],
}


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = x.tolist()
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def ref_intra(features: torch.Tensor, labels: list[int], tau: float, self_term: bool = False) -> float:
    z = _unit_rows(features)
    b = len(z)
    total = 0.0
    for i in range(b):
        pos = [j for j in range(b) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(_dot(z[i], z[k]) / tau) for k in range(b) if k != i)
        if self_term:
            denom += math.exp(0.0)
        total += sum(math.log(math.exp(_dot(z[i], z[j]) / tau) / denom) for j in pos) / len(pos)
    return -total / b


def ref_inter_direction(anchors: torch.Tensor, candidates: torch.Tensor, labels: list[int], tau: float) -> float:
    a, c = _unit_rows(anchors), _unit_rows(candidates)
    b = len(a)
    total = 0.0
    for m in range(b):
        pos = [n for n in range(b) if labels[n] == labels[m]]
        denom = sum(math.exp(_dot(a[m], c[t]) / tau) for t in range(b))
        total += sum(math.log(math.exp(_dot(a[m], c[n]) / tau) / denom) for n in pos) / len(pos)
    return -total / b


def _features(b: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
@pytest.mark.parametrize("self_term", [False, True])
def test_intra_supcon_matches_loop_reference(pattern: str, self_term: bool) -> None:
    labels = LABEL_PATTERNS[pattern]
    for seed in range(3):
        x = _features(len(labels), seed=seed)
        got = intra_supcon(x, torch.tensor(labels), TAU, self_term=self_term)
        assert got.item() == pytest.approx(ref_intra(x, labels, TAU, self_term), rel=1e-9, abs=1e-9)


def test_intra_supcon_edge_values() -> None:
    x = _features(5)
    assert intra_supcon(x, torch.tensor([0, 1, 2, 3, 4]), TAU).item() == 0.0
    assert intra_supcon(x[:1], torch.tensor([0]), TAU).item() == 0.0
    # the self term adds +1 to every denominator, so it can only raise the loss
    y = torch.tensor([0, 0, 1, 1, 0])
    assert intra_supcon(x, y, TAU, self_term=True) > intra_supcon(x, y, TAU)


def test_intra_supcon_anchor_without_positive_counts_in_one_over_b() -> None:
    x = _features(5)
    full = intra_supcon(x, torch.tensor([0, 0, 1, 1, 2]), TAU)
    # anchor 4 has no positive: it contributes 0 but the sum over anchors 0..3 is still divided by B = 5
    per_anchor = []
    z = F.normalize(x, dim=1)
    s = z @ z.T / TAU
    for i, pos in enumerate([[1], [0], [3], [2]]):
        denom = torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1 :]]), dim=0)
        per_anchor.append(torch.stack([s[i, j] - denom for j in pos]).mean())
    assert full.item() == pytest.approx(-torch.stack(per_anchor).sum().item() / 5, rel=1e-9)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1, 1, 0], [3, 3, 3, 5, 5]])
def test_intra_supcon_equals_pml_supcon_when_every_anchor_has_a_positive(labels: list[int]) -> None:
    # PML's SupConLoss also excludes self from the denominator, but averages only over anchors with a
    # positive (AvgNonZeroReducer); with a positive for every anchor the two definitions coincide.
    pml = SupConLoss(temperature=TAU)
    for seed in range(3):
        x = _features(len(labels), seed=seed).float()
        y = torch.tensor(labels)
        assert intra_supcon(x, y, TAU).item() == pytest.approx(pml(x, y).item(), rel=1e-5)


def test_intra_supcon_differs_from_pml_with_lone_anchors_by_the_averaging() -> None:
    labels = [0, 0, 0, 1, 2]  # anchors 3 and 4 have no positive
    x = _features(len(labels)).float()
    y = torch.tensor(labels)
    ours = intra_supcon(x, y, TAU).item()
    pml = SupConLoss(temperature=TAU)(x, y).item()  # mean over the 3 anchors with positives
    assert ours == pytest.approx(pml * 3 / 5, rel=1e-5)


@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
def test_inter_supcon_matches_loop_reference(pattern: str) -> None:
    labels = LABEL_PATTERNS[pattern]
    for seed in range(3):
        t, v = _features(len(labels), seed=seed), _features(len(labels), seed=seed + 10)
        y = torch.tensor(labels)
        t2i = ref_inter_direction(t, v, labels, TAU)
        i2t = ref_inter_direction(v, t, labels, TAU)
        assert inter_supcon(t, v, y, TAU).item() == pytest.approx(t2i, rel=1e-9, abs=1e-9)
        assert inter_supcon(t, v, y, TAU, symmetric=True).item() == pytest.approx((t2i + i2t) / 2, rel=1e-9, abs=1e-9)


def test_inter_supcon_is_text_anchored() -> None:
    t, v, y = _features(6, seed=1), _features(6, seed=2), torch.tensor([0, 1, 1, 2, 0, 2])
    assert inter_supcon(t, v, y, TAU).item() != pytest.approx(inter_supcon(v, t, y, TAU).item(), rel=1e-6)
    assert inter_supcon(t, v, y, TAU, symmetric=True).item() == pytest.approx(
        inter_supcon(v, t, y, TAU, symmetric=True).item(), rel=1e-9
    )


def test_losses_are_scale_invariant() -> None:
    x, v, y = _features(6), _features(6, seed=3), torch.tensor([0, 0, 1, 1, 2, 2])
    assert intra_supcon(7.5 * x, y, TAU).item() == pytest.approx(intra_supcon(x, y, TAU).item(), rel=1e-9)
    assert inter_supcon(0.01 * x, 3 * v, y, TAU).item() == pytest.approx(inter_supcon(x, v, y, TAU).item(), rel=1e-9)


@pytest.mark.parametrize("pattern", sorted(LABEL_PATTERNS))
@pytest.mark.parametrize("tau", [TAU, 0.002])
def test_losses_and_gradients_are_finite(pattern: str, tau: float) -> None:
    labels = torch.tensor(LABEL_PATTERNS[pattern])
    b = len(labels)
    for self_term in (False, True):
        x = _features(b, seed=4).float().requires_grad_()
        loss = intra_supcon(x, labels, tau, self_term=self_term)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        if pattern in ("all_distinct", "single"):
            assert loss.item() == 0.0 and not x.grad.any()
    t = _features(b, seed=5).float().requires_grad_()
    v = _features(b, seed=6).float().requires_grad_()
    loss = inter_supcon(t, v, labels, tau, symmetric=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all() and torch.isfinite(v.grad).all()


def test_half_precision_inputs_are_computed_in_float32() -> None:
    x, y = _features(6).half(), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = intra_supcon(x, y, 0.002)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_unlabelled_and_malformed_inputs_are_rejected() -> None:
    x = _features(4)
    with pytest.raises(ValueError, match=r"-1 means no label.*\[2\]"):
        intra_supcon(x, torch.tensor([0, 1, -1, 1]), TAU)
    with pytest.raises(ValueError, match="-1 means no label"):
        inter_supcon(x, x, torch.tensor([-1, 1, 0, 1]), TAU)
    with pytest.raises(ValueError, match="labels must be"):
        intra_supcon(x, torch.tensor([0, 1, 1]), TAU)
    with pytest.raises(ValueError, match="same shape"):
        inter_supcon(x, x[:3], torch.tensor([0, 1, 1, 0]), TAU)
    with pytest.raises(ValueError, match="-1 means no label"):
        step1_loss(torch.zeros(4, 3), torch.tensor([0, -1, 1, 2]), x, x, lambda_ce=1.0)


def test_modules_wrap_the_functions() -> None:
    t, v, y = _features(6), _features(6, seed=7), torch.tensor([0, 0, 1, 1, 2, 0])
    assert IntraSupCon(0.1, self_term=True)(t, y).item() == intra_supcon(t, y, 0.1, self_term=True).item()
    assert InterSupCon(0.1, symmetric=True)(t, v, y).item() == inter_supcon(t, v, y, 0.1, symmetric=True).item()


def test_totals_compose_eq7() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 3, generator=g), torch.tensor([0, 0, 1, 1, 2, 0])
    i_p, t_p = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    ce = F.cross_entropy(logits, y)
    li, lt, lm = intra_supcon(i_p, y, TAU), intra_supcon(t_p, y, TAU), inter_supcon(t_p, i_p, y, TAU)

    s1 = step1_loss(logits, y, i_p, t_p, lambda_ce=5.0, tau=TAU)
    assert s1.total.item() == pytest.approx((5 * ce + li + lt).item(), rel=1e-6)
    assert s1.cl_m.item() == 0.0 and s1.ce.item() == pytest.approx(5 * ce.item(), rel=1e-6)
    assert step1_loss(logits, y, i_p, t_p, lambda_ce=5.0, use_intra=False).total.item() == pytest.approx(5 * ce.item(), rel=1e-6)
    text_only = step1_loss(logits, y, None, t_p, lambda_ce=2.0)
    assert text_only.total.item() == pytest.approx((2 * ce + lt).item(), rel=1e-6) and text_only.cl_i.item() == 0.0

    s2 = step2_loss(t_p, i_p, y, tau=TAU)
    assert s2.total.item() == pytest.approx(lm.item(), rel=1e-6) and s2.ce.item() == 0.0

    one = one_step_loss(logits, y, i_p, t_p, lambda_ce=5.0, tau=TAU)
    assert one.total.item() == pytest.approx((5 * ce + li + lt + lm).item(), rel=1e-6)
    assert one_step_loss(logits, y, i_p, t_p, lambda_ce=5.0, use_inter=False).total.item() == pytest.approx(
        s1.total.item(), rel=1e-6
    )
    assert set(one.as_floats()) == {"total", "ce", "cl_i", "cl_t", "cl_m"}
