"""How big each GPU measurement is: the full sizes (one CUDA device, about 3-4 minutes on a current data-centre GPU
with 16 cores, inside the 5-minute default budget) and the quick ones (the CPU smoke test)."""

from __future__ import annotations

from dataclasses import dataclass

# train / dev rows of each dataset (CLMLF splits) and its preset: what a stage-two epoch is projected to
DATASETS = {"MVSA-Single": ("mvsa-single", 3611, 450), "HFM": ("hfm", 19816, 2410)}


@dataclass(frozen=True)
class Sizes:
    name: str
    budget_s: float
    # extraction: synthetic JPEGs (w, h) per encoder pair, batch (None: the preset default), timed rounds per variant,
    # seconds each encoders-alone timing runs for; the real encoders (offline pair, ResNet-50 + BERT-base) or tiny ones
    extract_samples: int
    image_size: tuple[int, int]
    extract_batch: int | None
    extract_workers: int | None  # decoding workers (None: the preset default, every core but one on CUDA, up to 8)
    extract_rounds: int
    bare_seconds: float
    real_encoders: bool
    # ranks: rows each of the two extractions encodes
    ranks_samples: int
    # stage two: synthetic cache rows (train; dev and test are an eighth each, like the datasets' splits), feature shapes,
    # epochs per run (the last one is timed: the first pays the device's warm-up)
    train_rows: int
    image_shape: tuple[int, int, int]
    layers: int
    hidden: int
    mean_tokens: int
    max_length: int
    epochs: int
    # sweeps: concurrent runs per device tried, waves of runs per setting (runs = waves x runs per device), epochs per run
    runs_per_device: tuple[int, ...]
    sweep_waves: int
    sweep_epochs: int


FULL = Sizes(
    name="full",
    budget_s=300.0,
    extract_samples=512,
    image_size=(480, 360),
    extract_batch=None,
    extract_workers=None,
    extract_rounds=2,
    bare_seconds=2.0,
    real_encoders=True,
    ranks_samples=256,
    train_rows=2048,
    image_shape=(2048, 7, 7),
    layers=4,
    hidden=768,
    mean_tokens=30,
    max_length=202,
    epochs=2,
    runs_per_device=(1, 2, 4, 8, 16),
    sweep_waves=2,
    sweep_epochs=2,
)

QUICK = Sizes(
    name="quick",
    budget_s=120.0,
    extract_samples=16,
    image_size=(64, 48),
    extract_batch=8,
    extract_workers=0,
    extract_rounds=1,
    bare_seconds=0.0,
    real_encoders=False,
    ranks_samples=8,
    train_rows=24,
    image_shape=(16, 7, 7),
    layers=4,
    hidden=32,
    mean_tokens=8,
    max_length=32,
    epochs=2,
    runs_per_device=(1,),
    sweep_waves=1,
    sweep_epochs=1,
)
