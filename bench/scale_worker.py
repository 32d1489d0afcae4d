"""One scale measurement in a fresh process: stage two's setup and a fixed number of batches on one cache.

``python -m bench.scale_worker CACHE BATCHES BATCH_SIZE OUT_JSON``. The process does what ``train`` does
before and during its epochs (open the cache, load train and dev as the memory budget decides, build the
heads, run two-step updates over shuffled batches, evaluate dev batches) and reports times and its peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sppscl.cache import FeatureCache
from sppscl.stage2.data import SplitBatches
from sppscl.stage2.train import two_step_update

from .common import new_heads, peak_rss_bytes, train_config


def measure(cache_path: Path, batches: int, batch_size: int) -> dict:
    rss_imports = peak_rss_bytes()
    tc = train_config(batch_size)
    t0 = time.perf_counter()
    cache = FeatureCache(cache_path)
    train = cache.load("train")
    dev = cache.load("dev")
    load_s = time.perf_counter() - t0
    model, opt = new_heads(int(cache.image_shape[0]), int(cache.hidden), int(cache.layers), tc)
    times = []
    t = time.perf_counter()
    for i, batch in enumerate(SplitBatches(train).train_batches(batch_size, np.random.default_rng(0))):
        two_step_update(model, opt, batch, tc)
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if i >= batches:  # batch 0 warms up; `batches` more are timed
            break
    model.eval()
    eval_times = []
    with torch.no_grad():
        t = time.perf_counter()
        for i, batch in enumerate(SplitBatches(dev).eval_batches(batch_size)):
            model(batch.image, batch.tokens, batch.mask)
            now = time.perf_counter()
            eval_times.append(now - t)
            t = now
            if i + 1 >= batches:
                break
    return {
        "train_rows": len(train.rows),
        "dev_rows": len(dev.rows),
        "train_in_memory": train.in_memory,
        "dev_in_memory": dev.in_memory,
        "load_seconds": load_s,
        "batch_seconds": times,
        "eval_batch_seconds": eval_times,
        "rss_after_imports": rss_imports,
        "peak_rss": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    cache, batches, batch_size, out = argv
    Path(out).write_text(json.dumps(measure(Path(cache), int(batches), int(batch_size))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
