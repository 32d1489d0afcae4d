"""How big each measurement is: the full profile (``make bench``) and the quick one (smoke test, development).

The full profile is sized so that ``make bench`` finishes in about 15 minutes on 2 CPU cores: the slow
alternatives (the official encoders-in-the-loop training, the paper's encoders) are timed over a few
batches and extrapolated, and the output says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Train-split sizes the caching speed-up is extrapolated to, and each dataset's train+dev+test total
# (what stage one extracts once): MVSA-Single 3611/450/450, MVSA-Multiple 13624/1700/1700, HFM 19816/2410/2409.
DATASETS = {
    "MVSA-Single": (3611, 4511),
    "MVSA-Multiple": (13624, 17024),
    "HFM": (19816, 24635),
}
PROJECTED_EPOCHS = 150


@dataclass(frozen=True)
class Profile:
    name: str
    # cached feature shapes (float16 in the cache): image map (C, h, w), text layers x hidden, mean tokens/sample
    image_shape: tuple[int, int, int]
    layers: int
    hidden: int
    mean_tokens: int
    max_length: int  # the official text padding length
    batch_size: int
    # caching: cached rows written, batches timed on each side
    cached_rows: int
    official_batches: int
    paper_encoders: bool  # ResNet-50 + BERT-base (random init) rather than tiny random encoders
    # extraction: samples per encoder pair, JPEG size (w, h), extract batch size (None = the preset default)
    offline_samples: int
    paper_samples: int
    image_size: tuple[int, int]
    extract_batch: int | None
    extract_workers: int | None  # None = the preset default
    extract_rounds: int
    offline_encoders: bool  # efficientnet-lite0 + minilm-l6 rather than tiny-cnn + tiny-bert
    # loader: rows in the cache, timed epochs per variant (interleaved)
    loader_rows: int
    loader_repeats: int
    # scale: total samples per cache (80/10/10 train/dev/test), batches timed per size, rows for compression
    scale_sizes: tuple[int, ...]
    scale_batches: int
    compression_rows: int
    # compute: batches timed, matmul size and repetitions
    compute_batches: int
    matmul_n: int
    matmul_reps: int
    # sweeps: synthetic samples in the tiny-encoder cache, the grid (--grid args), seeds, epochs per run,
    # and trials timed with the training stubbed out (the study's own cost per trial)
    sweep_samples: int = 400
    sweep_grid: tuple[str, ...] = ("fusion=batch,concat", "ha_layers=2,4")
    sweep_seeds: str = "1,2"
    sweep_epochs: int = 6
    sweep_stub_trials: int = 40
    # serve: synthetic samples in the served run's cache, pairs sent, pairs per batch request, requests per client
    # level (single and batch; at least one per client), and `predict` processes timed one pair each
    serve_samples: int = 120
    serve_pairs: int = 24
    serve_batch: int = 8
    serve_requests: int = 48
    serve_batch_requests: int = 16
    serve_predict_calls: int = 3
    # extraction: each variant in a fresh interpreter (the allocator state of one never reaches the next); the quick
    # profile runs them all in one (its numbers mean nothing, and each interpreter costs seconds of imports)
    process_per_variant: bool = True

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Profile(
    name="full",
    image_shape=(2048, 7, 7),
    layers=4,
    hidden=768,
    mean_tokens=30,
    max_length=202,
    batch_size=64,
    cached_rows=640,
    official_batches=1,
    paper_encoders=True,
    offline_samples=256,
    paper_samples=64,
    image_size=(480, 360),
    extract_batch=None,
    extract_workers=None,
    extract_rounds=2,
    offline_encoders=True,
    loader_rows=640,
    loader_repeats=2,
    scale_sizes=(1000, 5000, 25000),
    scale_batches=12,
    compression_rows=64,
    compute_batches=8,
    matmul_n=2048,
    matmul_reps=5,
)

QUICK = Profile(
    name="quick",
    image_shape=(32, 7, 7),
    layers=4,
    hidden=32,
    mean_tokens=8,
    max_length=32,
    batch_size=8,
    cached_rows=32,
    official_batches=1,
    paper_encoders=False,
    offline_samples=16,
    paper_samples=16,
    image_size=(64, 48),
    extract_batch=8,
    extract_workers=1,
    extract_rounds=1,
    offline_encoders=False,
    loader_rows=32,
    loader_repeats=1,
    scale_sizes=(40,),  # one fresh worker interpreter: a second size shows nothing more in a smoke run
    scale_batches=2,
    compression_rows=8,
    compute_batches=2,
    matmul_n=128,
    matmul_reps=2,
    sweep_samples=60,
    sweep_grid=("fusion=batch,concat",),
    sweep_seeds="1",
    sweep_epochs=1,
    sweep_stub_trials=4,
    serve_samples=60,
    serve_pairs=8,
    serve_batch=4,
    serve_requests=4,
    serve_batch_requests=2,
    serve_predict_calls=1,
    process_per_variant=False,
)

PROFILES = {"full": FULL, "quick": QUICK}
