"""Batches for stage two, assembled from a cache split held in RAM (or streamed from the file when it does not fit).

Features stay float16 in memory and become float32 one batch at a time. Ragged token states are gathered
with one vectorised index per batch, never a per-sample h5py read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..cache import SplitData, check_finite_rows, gather_ranges


@dataclass
class Batch:
    rows: np.ndarray  # file rows of the samples, in batch order
    image: torch.Tensor  # (B, C, h, w) float32
    tokens: torch.Tensor  # (B, N, L, H) float32, zero after each sample's length
    mask: torch.Tensor  # (B, N) bool, True at real positions ([CLS] at 0)
    labels: torch.Tensor  # (B,) long, -1 = no label

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.rows, self.image.to(device), self.tokens.to(device), self.mask.to(device), self.labels.to(device))


class SplitBatches:
    """Batch assembly over one split's usable rows."""

    def __init__(self, split: SplitData):
        self.split = split
        self.rows = split.rows
        self._lengths = np.diff(split.offsets)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows: np.ndarray) -> Batch:
        s = self.split
        lens = self._lengths[rows]
        n, width = len(rows), int(lens.max()) if len(rows) else 0
        # (sample, position) slot in the padded batch of every real token, in the order gather_ranges returns them
        pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        which = np.repeat(np.arange(n), lens)
        states = gather_ranges(s.tokens, s.offsets[rows], lens)
        maps = np.asarray(s.image[rows])
        check_finite_rows(s, rows, maps, states, lens)
        tok = torch.zeros((n, width, *s.tokens.shape[1:]), dtype=torch.float32)
        if len(pos):
            tok[which, pos] = torch.from_numpy(states).float()
        mask = torch.zeros((n, width), dtype=torch.bool)
        mask[which, pos] = True
        image = torch.from_numpy(maps).float()
        labels = torch.from_numpy(s.labels[rows].astype(np.int64))
        return Batch(rows, image, tok, mask, labels)

    def train_batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Shuffled batches; a trailing batch of one sample joins the previous one (BatchNorm needs two)."""
        order = rng.permutation(self.rows)
        bounds = list(range(0, len(order), batch_size))
        if len(bounds) > 1 and len(order) - bounds[-1] < 2:
            bounds.pop()
        for i, start in enumerate(bounds):
            end = bounds[i + 1] if i + 1 < len(bounds) else len(order)
            # sorted within the batch: the batch is the same set, and streamed reads move forward through the file
            yield self.batch(np.sort(order[start:end]))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Fixed order and size: with batch fusion (Eq. 3) a prediction depends on its batch, so evaluation pins both."""
        for start in range(0, len(self.rows), batch_size):
            yield self.batch(self.rows[start : start + batch_size])
