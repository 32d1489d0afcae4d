"""Synthetic feature caches of realistic shapes, written with the pipeline's own cache writer.

Features are "realistic-ish" so that sizes and compression ratios mean something: image maps are ReLU'd
Gaussians (non-negative, about half the entries exactly zero, like a post-ReLU ResNet ``layer4`` map) and
token states are Gaussians. Token counts follow a gamma distribution around the profile's mean
(tweets average 24–31 word pieces plus [CLS] and [SEP]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sppscl.cache import CacheFiller, FeatureShapes, SplitPlan, create_cache, finalize_cache

from .common import CLASSES

# rows drawn per pool: large caches repeat pooled rows so that writing 9 GB is bounded by the disk, not the RNG
POOL_ROWS = 256
CHUNK_ROWS = 256


def token_lengths(n: int, mean: int, max_length: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens per sample, [CLS] and [SEP] included: 2 + gamma(shape 6) with the given mean, clipped to max_length."""
    body = rng.gamma(6.0, max(mean - 2, 1) / 6.0, size=n)
    return np.clip(np.rint(body).astype(np.int64) + 2, 3, max_length)


def image_features(n: int, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(n, C, h, w) float16, ReLU'd Gaussian."""
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    np.maximum(x, 0.0, out=x)
    return x.astype(np.float16)


def token_features(n_tokens: int, layers: int, hidden: int, rng: np.random.Generator) -> np.ndarray:
    """(T, L, H) float16 Gaussian token states."""
    return (rng.standard_normal((n_tokens, layers, hidden), dtype=np.float32) * 0.5).astype(np.float16)


@dataclass
class WriteStats:
    path: Path
    rows: dict[str, int]
    create_seconds: float  # create_cache: lays out (and zero-fills) every dataset
    fill_seconds: float  # CacheFiller.write of every row
    finalize_seconds: float
    file_bytes: int

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def write_cache(
    path: Path,
    split_rows: dict[str, int],
    image_shape: tuple[int, int, int],
    layers: int,
    hidden: int,
    mean_tokens: int,
    max_length: int,
    seed: int = 0,
    classes: list[str] = CLASSES,
) -> WriteStats:
    """A complete cache with ``split_rows[split]`` random rows per split, via create_cache/CacheFiller/finalize_cache.

    Rows are written in chunks of consecutive rows (large sequential writes); features repeat from a pool
    of ``POOL_ROWS`` rows, so big caches cost disk time, not random-number time.
    """
    rng = np.random.default_rng(seed)
    plans, lengths = [], {}
    for split, n in split_rows.items():
        lengths[split] = token_lengths(n, mean_tokens, max_length, rng)
        plans.append(
            SplitPlan(
                split,
                [f"{split}{i:06d}" for i in range(n)],
                [f"synthetic text {i}" for i in range(n)],
                rng.integers(0, len(classes), size=n).astype(np.int16),
                lengths[split],
            )
        )
    provenance = {
        "schema_version": 1,
        "dataset": {"name": "bench-synthetic", "format": "synthetic", "classes": list(classes), "primary_f1": "weighted"},
        "encoders": {"image": {"name": "synthetic", "shape": list(image_shape)}, "text": {"name": "synthetic", "layers": list(range(-layers, 0)), "hidden_size": hidden, "tokenizer": {"max_length": max_length}}},
        "dtype": "float16",
    }
    shapes = FeatureShapes(tuple(image_shape), layers, hidden, "float16")
    path = Path(path)
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    create_cache(path, plans, shapes, provenance, [])
    t1 = time.perf_counter()

    pool = min(POOL_ROWS, max(split_rows.values()))
    image_pool = image_features(pool, image_shape, rng)
    token_pool = token_features(pool * mean_tokens + max_length, layers, hidden, rng)
    filler = CacheFiller(path)
    try:
        for split, n in split_rows.items():
            lens = lengths[split]
            for start in range(0, n, CHUNK_ROWS):
                rows = np.arange(start, min(start + CHUNK_ROWS, n))
                image = image_pool[rows % pool]
                # each row's tokens start at a row-dependent place in the pool, so rows differ
                starts = (rows * 7919) % (len(token_pool) - max_length)
                tokens = [token_pool[s : s + k] for s, k in zip(starts, lens[rows])]
                filler.write(split, rows, image, tokens, np.ones(len(rows), dtype=bool))
    finally:
        filler.close()
    t2 = time.perf_counter()
    finalize_cache(path, [])
    t3 = time.perf_counter()
    return WriteStats(path, dict(split_rows), t1 - t0, t2 - t1, t3 - t2, path.stat().st_size)


def compressed_bytes_per_sample(
    workdir: Path, n: int, image_shape: tuple[int, int, int], layers: int, hidden: int, mean_tokens: int, max_length: int, seed: int = 1
) -> dict[str, dict[str, float]]:
    """Bytes per sample of ``n`` fresh rows stored uncompressed (the cache's layout) and with h5py gzip / lzf,
    chunked per row (image: one row per chunk; tokens: ``mean_tokens`` token rows per chunk)."""
    rng = np.random.default_rng(seed)
    lens = token_lengths(n, mean_tokens, max_length, rng)
    image = image_features(n, image_shape, rng)
    tokens = token_features(int(lens.sum()), layers, hidden, rng)
    out: dict[str, dict[str, float]] = {}
    for name, kwargs in (("none", {}), ("gzip", {"compression": "gzip", "compression_opts": 4}), ("lzf", {"compression": "lzf"})):
        path = Path(workdir) / f"compression-{name}.h5"
        with h5py.File(path, "w") as f:
            chunked = {} if not kwargs else {"chunks": (1, *image_shape), **kwargs}
            di = f.create_dataset("image", data=image, **chunked)
            chunked = {} if not kwargs else {"chunks": (max(1, mean_tokens), layers, hidden), **kwargs}
            dt = f.create_dataset("tokens", data=tokens, **chunked)
            f.flush()
            img_b, tok_b = di.id.get_storage_size(), dt.id.get_storage_size()
        path.unlink()
        out[name] = {"image": img_b / n, "tokens": tok_b / n, "total": (img_b + tok_b) / n}
    return out
