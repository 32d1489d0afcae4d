"""SPP-SCL heads on cached encoder features (SPEC §3): image branch (Eq. 1), Hierarchical Attention
text branch (Eq. 2), Cross-Modal Fusion (Eq. 3) and the classifier.

Dimensions are the official ones: 128-wide stems, a shared embedding of ``D = cfg.dim`` (32) and a
64-wide classifier. Inputs come from the feature cache:

- ``image``  float32 ``[B, C, h, w]``: the CNN's last feature map;
- ``tokens`` float32 ``[B, N, L, H]``: the last ``L`` text-encoder layers at real positions, position 0
  is [CLS], zero padded after each sample's length;
- ``mask``   bool ``[B, N]``: True at real positions ([CLS] and [SEP] included), a prefix per row.

BatchNorm cannot compute batch statistics from one sample, so a train-mode forward with ``B == 1``
runs every BatchNorm with its running statistics for that call (see :func:`single_sample_batchnorm`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config import TrainConfig

STEM_WIDTH = 128  # Conv1x1 output channels and BiLSTM output width (2 x 64), official
LSTM_HIDDEN = 64  # per direction, official
CLASSIFIER_WIDTH = 64  # official


@contextmanager
def single_sample_batchnorm(module: nn.Module, batch_size: int) -> Iterator[None]:
    """Run ``module``'s BatchNorm layers with running statistics while a train-mode batch has one sample.

    PyTorch raises on a one-sample train-mode BatchNorm1d; using the running statistics (and not
    updating them) is the only well-defined behaviour. Dropout stays in train mode. Nested use is safe:
    only layers that are in train mode on entry are switched, and exactly those are restored.
    """
    if not (module.training and batch_size == 1):
        yield
        return
    switched = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in switched:
        m.train(False)
    try:
        yield
    finally:
        for m in switched:
            m.train(True)


def encoding_part(in_features: int, dim: int, dropout: float) -> nn.Sequential:
    """The "encoding part" shared by both branches: Linear -> BN -> ReLU -> Dropout -> Linear -> BN."""
    return nn.Sequential(
        nn.Linear(in_features, dim),
        nn.BatchNorm1d(dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(dim, dim),
        nn.BatchNorm1d(dim),
    )


def align_layer(dim: int, dropout: float) -> nn.Sequential:
    """The "align" layer that yields ``I_p`` / ``T_p``: Linear -> BN -> ReLU -> Dropout."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(dropout))


def classifier_head(in_features: int, dropout: float, num_classes: int) -> nn.Sequential:
    """Linear(in, 64) -> BN -> ReLU -> Dropout -> Linear(64, K)."""
    return nn.Sequential(
        nn.Linear(in_features, CLASSIFIER_WIDTH),
        nn.BatchNorm1d(CLASSIFIER_WIDTH),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(CLASSIFIER_WIDTH, num_classes),
    )


def _projection(dim: int, dropout: float) -> nn.Sequential:
    """A CMF query/key/value map: Linear(D, D) -> Dropout."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))


class ImageHead(nn.Module):
    """Eq. 1, ``I_p = M(P(c(F)))``: Conv1x1(C->128) -> BN2d -> ReLU -> Dropout -> AdaptiveAvgPool,
    then the encoding part (128->D) and the align layer. ``[B, C, h, w] -> [B, D]``."""

    def __init__(self, in_channels: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_WIDTH, kernel_size=1),
            nn.BatchNorm2d(STEM_WIDTH),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.encode = encoding_part(STEM_WIDTH, dim, dropout)
        self.align = align_layer(dim, dropout)

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(f"image must be [B, {self.in_channels}, h, w], got {list(image.shape)}")
        with single_sample_batchnorm(self, image.shape[0]):
            return self.align(self.encode(self.stem(image)))  # (B, D)


class HierarchicalAttention(nn.Module):
    """Eq. 2, the text branch: layer weights from the [CLS] states, weighted sum of token states, BiLSTM,
    mean pooling, encoding part and align layer. ``tokens [B, N, L, H], mask [B, N] -> T_p [B, D]``.

    Uses the last ``num_layers`` of the ``L >= num_layers`` cached layers (Table 6 varies it).
    ``c_l`` is the mean over the hidden dimension of layer ``l``'s [CLS] state; the weights
    ``w = Sigmoid(W2 ReLU(W1 c))`` are per layer and not normalised (official). The LSTM reads the
    positions after [CLS] ([SEP] included, as in the official ``[:, 1:-1]`` slice of a padded
    sequence) packed to each sample's length, so padding never enters it, and the outputs are
    averaged over real positions only (SPEC §7.2). A sample with nothing after [CLS] is read as one
    zero vector, so it still yields a finite embedding.
    """

    def __init__(self, num_layers: int, hidden: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.hidden = hidden
        self.layer_fc = nn.Sequential(
            nn.Linear(num_layers, num_layers, bias=False),
            nn.ReLU(),
            nn.Linear(num_layers, num_layers, bias=False),
        )
        self.lstm = nn.LSTM(hidden, LSTM_HIDDEN, num_layers=1, bias=False, batch_first=True, bidirectional=True)
        self.encode = encoding_part(2 * LSTM_HIDDEN, dim, dropout)
        self.align = align_layer(dim, dropout)

    def layer_weights(self, tokens: Tensor) -> Tensor:
        """Per-layer weights ``w = Sigmoid(W2 ReLU(W1 c))`` in (0, 1), ``[B, num_layers]``."""
        c = tokens[:, 0, -self.num_layers :, :].mean(dim=-1)  # (B, k)
        return torch.sigmoid(self.layer_fc(c))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        self._check(tokens, mask)
        b = tokens.shape[0]
        w = self.layer_weights(tokens)  # (B, k)
        words = tokens[:, 1:, -self.num_layers :, :]  # (B, N-1, k, H)
        word_mask = mask[:, 1:]
        # the mask, not the zero padding, is authoritative for what counts as a real position
        x = torch.einsum("bk,bnkh->bnh", w, words) * word_mask[..., None].to(tokens.dtype)  # (B, N-1, H)
        if x.shape[1] == 0:
            x = tokens.new_zeros(b, 1, self.hidden)
        lengths = word_mask.sum(dim=1).clamp(min=1)  # (B,) a zero-length sample reads one zero vector
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, N-1, 128), 0 past length
        pooled = out.sum(dim=1) / lengths[:, None].to(out.dtype)  # (B, 128)
        with single_sample_batchnorm(self, b):
            return self.align(self.encode(pooled))  # (B, D)

    def _check(self, tokens: Tensor, mask: Tensor) -> None:
        if tokens.dim() != 4 or tokens.shape[2] < self.num_layers or tokens.shape[3] != self.hidden:
            raise ValueError(
                f"tokens must be [B, N, L>={self.num_layers}, {self.hidden}], got {list(tokens.shape)}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"mask must be bool {list(tokens.shape[:2])}, got {mask.dtype} {list(mask.shape)}")
        if tokens.shape[1] == 0 or not bool(mask[:, 0].all()):
            bad = [] if tokens.shape[1] == 0 else (~mask[:, 0]).nonzero().flatten().tolist()
            raise ValueError(f"every sample needs its [CLS] state at position 0 (mask False in batch rows {bad})")
        gaps = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1)
        if bool(gaps.any()):
            raise ValueError(f"mask must be True on a prefix of each row; batch rows {gaps.nonzero().flatten().tolist()} have gaps")


class CrossModalFusion(nn.Module):
    """Eq. 3, Cross-Modal Fusion and the classifier. ``(I_p, T_p) -> (logits [B, K], fused [B, F])``.

    ``fused`` is ``M_p``, the classifier's input (used for the t-SNE of Fig. 3):
    ``[T_m, I_m, I_p, T_p]`` (F = 4D) for ``batch`` and ``sample``, ``[I_p, T_p]`` (F = 2D) for ``concat``.
    ``Q_*, K_*, V_*`` are Linear(D, D) -> Dropout.

    Modes:

    - ``batch`` (paper, official): ``A_I = softmax((T_p ⊙ Q_I(I_p)) (T_p ⊙ K_I(I_p))ᵀ / √D)`` is
      ``[B, B]``, ``I_m = A_I V_I(I_p)``, and symmetrically ``T_m`` with the roles swapped. Each
      sample attends over the other samples of its batch, so its prediction depends on them.
    - ``sample`` (batch-independent variant, not in the paper): each sample attends only over its own
      two modality tokens. For ``I_m`` the tokens are ``z ∈ {I_p, T_p}`` with query
      ``T_p ⊙ Q_I(I_p)``, keys ``T_p ⊙ K_I(z)`` and values ``V_I(z)``: a 2-way softmax per sample
      with the same gating by the other modality as Eq. 3; ``T_m`` likewise with ``z ∈ {T_p, I_p}``,
      gate ``I_p`` and ``Q_T, K_T, V_T``. A prediction never depends on other samples.
    - ``concat`` (Table 7 "w/o CMF"): no attention, classifier on ``[I_p, T_p]``.
    """

    MODES = ("batch", "sample", "concat")

    def __init__(self, dim: int, dropout: float, num_classes: int, mode: str = "batch") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {', '.join(self.MODES)}")
        self.mode = mode
        self.dim = dim
        if mode != "concat":
            self.q_i, self.k_i, self.v_i = (_projection(dim, dropout) for _ in range(3))
            self.q_t, self.k_t, self.v_t = (_projection(dim, dropout) for _ in range(3))
        self.fused_dim = 2 * dim if mode == "concat" else 4 * dim
        self.classifier = classifier_head(self.fused_dim, dropout, num_classes)

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
        if image_emb.shape != text_emb.shape or image_emb.dim() != 2 or image_emb.shape[1] != self.dim:
            raise ValueError(
                f"I_p and T_p must both be [B, {self.dim}], got {list(image_emb.shape)} and {list(text_emb.shape)}"
            )
        if self.mode == "concat":
            fused = torch.cat([image_emb, text_emb], dim=1)  # (B, 2D)
        else:
            attend = self._batch_attention if self.mode == "batch" else self._sample_attention
            image_m = attend(image_emb, text_emb, self.q_i, self.k_i, self.v_i)
            text_m = attend(text_emb, image_emb, self.q_t, self.k_t, self.v_t)
            fused = torch.cat([text_m, image_m, image_emb, text_emb], dim=1)  # (B, 4D) = M_p
        with single_sample_batchnorm(self, fused.shape[0]):
            return self.classifier(fused), fused

    def _batch_attention(self, own: Tensor, gate: Tensor, q: nn.Module, k: nn.Module, v: nn.Module) -> Tensor:
        scores = (gate * q(own)) @ (gate * k(own)).T / math.sqrt(self.dim)  # (B, B)
        return scores.softmax(dim=-1) @ v(own)  # (B, D)

    def _sample_attention(self, own: Tensor, gate: Tensor, q: nn.Module, k: nn.Module, v: nn.Module) -> Tensor:
        tokens = torch.stack([own, gate], dim=1)  # (B, 2, D): the sample's own two modality tokens
        query = gate * q(own)  # (B, D)
        keys = gate[:, None, :] * k(tokens)  # (B, 2, D)
        scores = (keys @ query[:, :, None]).squeeze(-1) / math.sqrt(self.dim)  # (B, 2)
        return (scores.softmax(dim=-1)[:, :, None] * v(tokens)).sum(dim=1)  # (B, D)


@dataclass
class ModelOutput:
    """``logits [B, K]``; ``image_emb`` = ``I_p`` and ``text_emb`` = ``T_p`` ``[B, D]``, raw (the losses
    normalise), None for the branch a unimodal model lacks; ``fused [B, F]`` = the classifier's input
    (``M_p`` with fusion, else the single embedding)."""

    logits: Tensor
    image_emb: Tensor | None
    text_emb: Tensor | None
    fused: Tensor


class SPPSCLModel(nn.Module):
    """The SPP-SCL heads: ImageHead (Eq. 1) + HierarchicalAttention (Eq. 2) + CrossModalFusion (Eq. 3).

    ``cfg.modalities`` selects ``both`` (the paper), or ``text`` / ``image``: unimodal baselines that
    build only one branch and classify its embedding with Linear(D, 64) -> BN -> ReLU -> Dropout ->
    Linear(64, K). ``cfg.ha_layers`` of the ``cached_layers`` are used (the last ones).
    """

    def __init__(
        self,
        image_channels: int,
        text_hidden: int,
        cached_layers: int,
        num_classes: int,
        cfg: TrainConfig,
    ) -> None:
        super().__init__()
        if cfg.modalities not in ("both", "text", "image"):
            raise ValueError(f"train.modalities={cfg.modalities!r} is not one of both, text, image")
        if not 1 <= cfg.ha_layers <= cached_layers:
            raise ValueError(f"train.ha_layers={cfg.ha_layers} must be between 1 and the {cached_layers} cached layers")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.modalities = cfg.modalities
        self.cached_layers = cached_layers
        self.num_classes = num_classes
        self.image_head = ImageHead(image_channels, cfg.dim, cfg.dropout) if cfg.modalities != "text" else None
        self.text_head = (
            HierarchicalAttention(cfg.ha_layers, text_hidden, cfg.dim, cfg.dropout) if cfg.modalities != "image" else None
        )
        if cfg.modalities == "both":
            self.fusion: CrossModalFusion | None = CrossModalFusion(cfg.dim, cfg.dropout, num_classes, cfg.fusion)
            self.classifier: nn.Sequential | None = None
            self.fused_dim = self.fusion.fused_dim
        else:
            self.fusion = None
            self.classifier = classifier_head(cfg.dim, cfg.dropout, num_classes)
            self.fused_dim = cfg.dim

    def forward(self, image: Tensor | None, tokens: Tensor | None, mask: Tensor | None) -> ModelOutput:
        b = self._batch_size(image, tokens, mask)
        with single_sample_batchnorm(self, b):
            image_emb = self.image_head(image) if self.image_head is not None else None
            text_emb = self.text_head(tokens, mask) if self.text_head is not None else None
            if self.fusion is not None:
                logits, fused = self.fusion(image_emb, text_emb)
            else:
                fused = image_emb if image_emb is not None else text_emb
                logits = self.classifier(fused)
        return ModelOutput(logits=logits, image_emb=image_emb, text_emb=text_emb, fused=fused)

    def _batch_size(self, image: Tensor | None, tokens: Tensor | None, mask: Tensor | None) -> int:
        sizes = {}
        if self.image_head is not None:
            if image is None:
                raise ValueError(f"modalities={self.modalities!r} needs the image feature map, got None")
            sizes["image"] = image.shape[0]
        if self.text_head is not None:
            if tokens is None or mask is None:
                raise ValueError(f"modalities={self.modalities!r} needs tokens and mask, got None")
            if tokens.dim() != 4 or tokens.shape[2] != self.cached_layers:
                raise ValueError(f"tokens must be [B, N, {self.cached_layers}, H], got {list(tokens.shape)}")
            sizes["tokens"] = tokens.shape[0]
            sizes["mask"] = mask.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes differ: {sizes}")
        b = next(iter(sizes.values()))
        if b == 0:
            raise ValueError("empty batch")
        return b
