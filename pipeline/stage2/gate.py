"""The inter-modal check that decides whether step 2 of Algorithm 1 runs on a batch (SPEC §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GATE_MODES = ("official", "cosine")


@dataclass(frozen=True)
class GateDecision:
    """``fire``: run step 2; ``c``: entries of S below ``d``; ``c_mask``: same-label pairs; ``d``: mean(diag S)."""

    fire: bool
    c: int
    c_mask: int
    d: float


@torch.no_grad()
def two_step_gate(
    text_emb: Tensor, image_emb: Tensor, labels: Tensor, alpha: float, mode: str = "official"
) -> GateDecision:
    """Algorithm 1, lines 7-12: the check after step 1 on the re-extracted ``T_p'``, ``I_p'``.

    ``S = sim(T_p', I_p')`` is ``[B, B]`` (rows texts, columns images); ``d = mean(diag S)``;
    ``c = #{(m, n) : S_mn < d}`` over all ``B²`` entries; ``c_mask = #{(m, n) : y_m = y_n}`` over all
    ``B²`` entries, diagonal included. Step 2 fires iff ``c < floor(α · c_mask)`` (official: ``int()``).

    ``mode="official"``: ``S = sigmoid(T_p' I_p'ᵀ)`` on the raw features, as the official code does;
    ``mode="cosine"``: ``S`` = cosine similarities of the L2-normalised features.
    """
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode {mode!r} is not one of {', '.join(GATE_MODES)}")
    if text_emb.dim() != 2 or text_emb.shape != image_emb.shape or text_emb.shape[0] == 0:
        raise ValueError(f"gate: T_p' and I_p' must both be a non-empty [B, D], got {list(text_emb.shape)} and {list(image_emb.shape)}")
    b = text_emb.shape[0]
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"gate: labels must be [{b}], got {list(labels.shape)}")
    if bool((labels < 0).any()):
        raise ValueError(f"gate: labels must be >= 0 (-1 means no label); batch rows {(labels < 0).nonzero().flatten().tolist()} are negative")
    if alpha < 0:
        raise ValueError(f"gate: alpha must be >= 0, got {alpha}")
    # half precision would blur the ties this count is sensitive to
    t, v = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in (text_emb, image_emb))
    if mode == "official":
        s = torch.sigmoid(t @ v.T)
    else:
        s = F.normalize(t, dim=1) @ F.normalize(v, dim=1).T
    d = s.diagonal().mean()
    c = int((s < d).sum())
    c_mask = int((labels[:, None] == labels[None, :]).sum())
    return GateDecision(fire=c < math.floor(alpha * c_mask), c=c, c_mask=c_mask, d=float(d))
