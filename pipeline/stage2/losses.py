"""SPP-SCL losses (SPEC §4): intra-modal SupCon (Eq. 4, 5), inter-modal SupCon (Eq. 6) and the totals of
Eq. 7 as Algorithm 1 splits them.

All contrastive terms L2-normalise their inputs; half-precision inputs are computed in float32. Labels
must be class ids ``>= 0``: evaluation's "no label" (-1) is rejected, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_labels(labels: Tensor, batch: int, where: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{where}: labels must be [{batch}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be integer class ids, got {labels.dtype}")
    if batch and bool((labels < 0).any()):
        bad = (labels < 0).nonzero().flatten().tolist()
        raise ValueError(f"{where}: labels must be >= 0 (-1 means no label); batch rows {bad} are negative")


def _upcast(x: Tensor) -> Tensor:
    """Half precision cannot hold ``exp(1/τ)``-scale sums; float32 and float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_features(features: Tensor, where: str) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"{where}: features must be a non-empty [B, D], got {list(features.shape)}")


def intra_supcon(features: Tensor, labels: Tensor, tau: float = 0.07, self_term: bool = False) -> Tensor:
    """Intra-modal supervised contrastive loss, Eq. 4 (image, ``L_cl_i``) and Eq. 5 (text, ``L_cl_t``).

    With ``s_ij`` the cosine similarity and ``P(i) = {j != i : y_j = y_i}``::

        L = -(1/B) Σ_i (1/|P(i)|) Σ_{j∈P(i)} log( exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ) )

    An anchor without positives contributes 0 and still counts in the ``1/B`` (the official code's
    ``mean`` over all anchors), so a batch where no label repeats gives exactly 0. ``1/|P(i)|`` follows
    the official code and Khosla et al. (the paper prints ``1/B``). ``self_term=True`` reproduces the
    official denominator, which keeps the anchor itself with its logit zeroed: ``+ exp(0) = + 1``.
    """
    _check_features(features, "intra_supcon")
    b = features.shape[0]
    _check_labels(labels, b, "intra_supcon")
    z = F.normalize(_upcast(features), dim=1)
    logits = z @ z.T / tau  # (B, B)
    eye = torch.eye(b, dtype=torch.bool, device=features.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = positives.sum(dim=1)
    if not bool((n_pos > 0).any()):
        # keeps the graph (zero gradient) and avoids an empty denominator when B == 1
        return _upcast(features).sum() * 0.0
    denominator = logits.masked_fill(eye, 0.0 if self_term else float("-inf"))
    log_prob = logits - torch.logsumexp(denominator, dim=1, keepdim=True)
    per_anchor = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / n_pos.clamp(min=1)
    return -per_anchor.sum() / b


def inter_supcon(text: Tensor, image: Tensor, labels: Tensor, tau: float = 0.07, symmetric: bool = False) -> Tensor:
    """Inter-modal supervised contrastive loss ``L_cl_m``, Eq. 6.

    Anchors are the texts ``T_p'``, candidates the batch's images ``I_p'``; positives of text ``m`` are
    all images with its label, its own pair included, so every anchor has at least one::

        L = -(1/B) Σ_m (1/|P(m)|) Σ_{n∈P(m)} log( exp(s_mn/τ) / Σ_{t=1..B} exp(s_mt/τ) )

    Official: text->image only. ``symmetric=True`` also computes image->text (anchors the images,
    candidates the texts, the same formula on ``sᵀ``) and returns the mean of the two directions.
    """
    _check_features(text, "inter_supcon")
    if image.shape != text.shape:
        raise ValueError(f"inter_supcon: text and image must have the same shape, got {list(text.shape)} and {list(image.shape)}")
    b = text.shape[0]
    _check_labels(labels, b, "inter_supcon")
    t = F.normalize(_upcast(text), dim=1)
    v = F.normalize(_upcast(image), dim=1)
    logits = t @ v.T / tau  # (B, B): rows texts, columns images
    positives = labels[:, None] == labels[None, :]
    loss = _mean_positive_nll(logits, positives)
    if symmetric:
        loss = 0.5 * (loss + _mean_positive_nll(logits.T, positives.T))
    return loss


def _mean_positive_nll(logits: Tensor, positives: Tensor) -> Tensor:
    """``-(1/B) Σ_rows mean_{positives} log softmax(row)``; every row has a positive."""
    log_prob = logits.log_softmax(dim=1)
    per_anchor = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1) / positives.sum(dim=1)
    return -per_anchor.mean()


class IntraSupCon(nn.Module):
    """:func:`intra_supcon` (Eq. 4, 5) as a module."""

    def __init__(self, tau: float = 0.07, self_term: bool = False) -> None:
        super().__init__()
        self.tau = tau
        self.self_term = self_term

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return intra_supcon(features, labels, self.tau, self.self_term)


class InterSupCon(nn.Module):
    """:func:`inter_supcon` (Eq. 6) as a module."""

    def __init__(self, tau: float = 0.07, symmetric: bool = False) -> None:
        super().__init__()
        self.tau = tau
        self.symmetric = symmetric

    def forward(self, text: Tensor, image: Tensor, labels: Tensor) -> Tensor:
        return inter_supcon(text, image, labels, self.tau, self.symmetric)


@dataclass
class LossTerms:
    """A total and its parts, unweighted except ``ce`` which is already ``λ·CE``; parts that are off are 0."""

    total: Tensor
    ce: Tensor
    cl_i: Tensor
    cl_t: Tensor
    cl_m: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "ce", "cl_i", "cl_t", "cl_m")}


def step1_loss(
    logits: Tensor,
    labels: Tensor,
    image_emb: Tensor | None,
    text_emb: Tensor | None,
    *,
    lambda_ce: float,
    tau: float = 0.07,
    use_intra: bool = True,
    self_term: bool = False,
) -> LossTerms:
    """Eq. 7 as Algorithm 1 line 4 applies it: ``λ·CE(logits, y) + L_cl_i(I_p, y) + L_cl_t(T_p, y)``.

    ``use_intra=False`` drops both intra terms (Table 5 "w/o L_cl_i + L_cl_t"). A branch passed as
    None (unimodal model) has no intra term.
    """
    _check_labels(labels, logits.shape[0], "step1_loss")
    ce = lambda_ce * F.cross_entropy(_upcast(logits), labels)
    zero = ce.new_zeros(())
    cl_i = intra_supcon(image_emb, labels, tau, self_term) if use_intra and image_emb is not None else zero
    cl_t = intra_supcon(text_emb, labels, tau, self_term) if use_intra and text_emb is not None else zero
    return LossTerms(total=ce + cl_i + cl_t, ce=ce, cl_i=cl_i, cl_t=cl_t, cl_m=zero)


def step2_loss(text_emb: Tensor, image_emb: Tensor, labels: Tensor, *, tau: float = 0.07, symmetric: bool = False) -> LossTerms:
    """Algorithm 1 line 13, the second step's objective: ``L_cl_m(T_p', I_p', y)`` (Eq. 6) alone."""
    cl_m = inter_supcon(text_emb, image_emb, labels, tau, symmetric)
    zero = cl_m.new_zeros(())
    return LossTerms(total=cl_m, ce=zero, cl_i=zero, cl_t=zero, cl_m=cl_m)


def one_step_loss(
    logits: Tensor,
    labels: Tensor,
    image_emb: Tensor | None,
    text_emb: Tensor | None,
    *,
    lambda_ce: float,
    tau: float = 0.07,
    use_intra: bool = True,
    use_inter: bool = True,
    self_term: bool = False,
    symmetric: bool = False,
) -> LossTerms:
    """The full Eq. 7 in one update (Table 4 "one-step"): ``λ·CE + L_cl_i + L_cl_t + L_cl_m``.

    ``use_inter=False`` drops ``L_cl_m`` (Table 5 "w/o L_cl_m"); it needs both branches.
    """
    terms = step1_loss(
        logits, labels, image_emb, text_emb, lambda_ce=lambda_ce, tau=tau, use_intra=use_intra, self_term=self_term
    )
    if use_inter and image_emb is not None and text_emb is not None:
        terms.cl_m = inter_supcon(text_emb, image_emb, labels, tau, symmetric)
        terms.total = terms.total + terms.cl_m
    return terms
