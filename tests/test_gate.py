"""The step-2 gate (Algorithm 1, lines 7-12) on hand-built similarity matrices."""

from __future__ import annotations

import math

import pytest
import torch

from sppscl.stage2.gate import GateDecision, two_step_gate


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _raw_pair(products: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """T = identity and I = Mᵀ, so that the raw products T Iᵀ are exactly M."""
    m = torch.tensor(products, dtype=torch.float64)
    return torch.eye(m.shape[0], dtype=torch.float64), m.T.contiguous()


def test_official_gate_does_not_fire_when_pairs_are_aligned() -> None:
    # S = sigmoid(M); diag sig(2)=.881, sig(3)=.953, sig(1)=.731 -> d = .855
    t, v = _raw_pair([[2.0, 0.0, -1.0], [1.0, 3.0, 0.0], [0.0, -2.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    d = (_sig(2) + _sig(3) + _sig(1)) / 3
    # below d: row 0: sig(0), sig(-1); row 1: sig(1), sig(0); row 2: sig(0), sig(-2), sig(1)  -> c = 7
    # same-label pairs incl. the diagonal: {0,1}x{0,1} and (2,2) -> c_mask = 5
    decision = two_step_gate(t, v, labels, alpha=2 / 3)
    assert decision == GateDecision(fire=False, c=7, c_mask=5, d=pytest.approx(d, rel=1e-12))
    # floor(2/3 * 5) = 3 <= 7; only a threshold above 7 fires: floor(1.5 * 5) = 7 does not, floor(1.6 * 5) = 8 does
    assert not two_step_gate(t, v, labels, alpha=1.5).fire
    assert two_step_gate(t, v, labels, alpha=1.6).fire


def test_official_gate_fires_when_off_diagonal_pairs_dominate() -> None:
    # diag sig(0)=.5, sig(1)=.731, sig(-2)=.119 -> d = .450; every off-diagonal product is positive,
    # so its sigmoid is above .5 > d: only (2,2) lies below d -> c = 1
    t, v = _raw_pair([[0.0, 3.0, 2.0], [4.0, 1.0, 3.0], [2.0, 5.0, -2.0]])
    labels = torch.tensor([1, 1, 1])  # c_mask = 9, floor(2/3 * 9) = 6
    decision = two_step_gate(t, v, labels, alpha=2 / 3)
    assert (decision.fire, decision.c, decision.c_mask) == (True, 1, 9)
    assert decision.d == pytest.approx((_sig(0) + _sig(1) + _sig(-2)) / 3, rel=1e-12)
    assert not two_step_gate(t, v, labels, alpha=0.2).fire  # floor(1.8) = 1, and 1 < 1 is false


def test_cosine_gate_normalises_the_features() -> None:
    t = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    v = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # unit rows: t = e1, e2; v = e1, (1,1)/√2 -> S = [[1, .707], [0, .707]], d = .854 -> c = 3
    labels = torch.tensor([0, 1])  # c_mask = 2
    decision = two_step_gate(t, v, labels, alpha=2 / 3, mode="cosine")
    assert (decision.fire, decision.c, decision.c_mask) == (False, 3, 2)
    assert decision.d == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-6)
    assert two_step_gate(t, v, labels, alpha=2.0, mode="cosine").fire  # floor(4) = 4 > 3
    # rescaling any row changes nothing for cosine, but does change the official sigmoid gate
    assert two_step_gate(10 * t, 0.1 * v, labels, alpha=2 / 3, mode="cosine") == decision
    assert two_step_gate(10 * t, v, labels, alpha=2 / 3).d != pytest.approx(
        two_step_gate(t, v, labels, alpha=2 / 3).d
    )


def test_gate_runs_without_autograd() -> None:
    t = torch.randn(5, 4, requires_grad=True)
    v = torch.randn(5, 4, requires_grad=True)
    decision = two_step_gate(t, v, torch.tensor([0, 1, 0, 2, 1]), alpha=2 / 3)
    assert isinstance(decision.fire, bool) and isinstance(decision.c, int) and isinstance(decision.d, float)
    assert decision.c_mask == 5 + 2 + 2 + 0  # diagonal + pairs (0,2),(2,0) + (1,4),(4,1)
    assert t.grad is None and torch.is_grad_enabled()


def test_gate_rejects_bad_input() -> None:
    t = torch.randn(3, 4)
    with pytest.raises(ValueError, match="-1 means no label"):
        two_step_gate(t, t, torch.tensor([0, -1, 1]), alpha=2 / 3)
    with pytest.raises(ValueError, match="gate mode"):
        two_step_gate(t, t, torch.tensor([0, 1, 1]), alpha=2 / 3, mode="dot")
    with pytest.raises(ValueError, match="labels must be"):
        two_step_gate(t, t, torch.tensor([0, 1]), alpha=2 / 3)
    with pytest.raises(ValueError, match="same|non-empty"):
        two_step_gate(t, t[:2], torch.tensor([0, 1, 1]), alpha=2 / 3)
