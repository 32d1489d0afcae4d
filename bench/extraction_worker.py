"""One extraction measurement in a fresh process: ``python -m bench.extraction_worker SPEC_JSON OUT_JSON`` (the quick
profile hands it a list of specs, measured one after another in the one process).

A fresh interpreter per variant, because glibc's allocator state (its thresholds and the heap it kept) would
otherwise leak from one variant into the next. The spec names the encoder pair, the synthetic dataset, the
variant (``extract``: the whole command's loop; ``bare``: the encoders' forward alone on the same batches,
already decoded), whether the allocator setting of ``sppscl.allocator`` is made, the device and precision.
Each timed round reports its seconds and this process's CPU time and minor page faults from ``getrusage``
(itself plus its reaped children: the DataLoader's decoding workers).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sppscl.allocator import keep_freed_memory
from sppscl.stage1.adapters import load_samples
from sppscl.stage1.batching import fixed_batches
from sppscl.stage1.extract import (
    decoding_workers,
    extract,
    pad_token_ids,
    precision_context,
    prepare_encoders,
)

from .extraction import encoder_pairs, encoders_patched, extract_config
from .profiles import Profile


def usage() -> dict[str, float]:
    """CPU seconds (user, system) and minor page faults of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "utime": me.ru_utime + kids.ru_utime,
        "stime": me.ru_stime + kids.ru_stime,
        "minflt": float(me.ru_minflt + kids.ru_minflt),
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def prepare_batches(cfg, n: int, image_enc, text_enc, dev: torch.device) -> tuple[list, float]:
    """The batches ``extract`` forms, decoded, preprocessed and padded as ``encode_batch`` pads them; and
    the seconds per image that decoding + preprocessing took in this one process."""
    samples = load_samples(cfg, cfg.data_dir()).samples[:n]
    transform = image_enc.preprocess()
    t0 = time.perf_counter()
    pixels = []
    for s in samples:
        with Image.open(s.image) as img:
            img.load()
            pixels.append(transform(img))
    decode_s = (time.perf_counter() - t0) / len(samples)
    token_ids = text_enc.tokenize([s.text for s in samples])
    batches = []
    for idx in fixed_batches(len(samples), cfg.extract.batch_size):
        ids, mask = pad_token_ids([token_ids[i] for i in idx], text_enc.pad_id)
        images = torch.stack([pixels[i] for i in idx])
        if dev.type == "cuda":
            # already on the device: the reference is the encoders alone, no host-to-device copies
            images = images.to(dev).contiguous(memory_format=torch.channels_last)
            ids, mask = ids.to(dev), mask.to(dev)
        batches.append((images, ids, mask))
    return batches, decode_s


def bare_forward(image_enc, text_enc, batches: list, dev: torch.device, precision: str) -> float:
    """Seconds of the encoders' forward passes alone over the prepared batches."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), precision_context(dev, precision):
        sync()
        t0 = time.perf_counter()
        for pixels, ids, mask in batches:
            image_enc(pixels)
            text_enc(ids, mask)
        sync()
    return time.perf_counter() - t0


def measure(spec: dict) -> dict:
    allocator = keep_freed_memory() if spec["allocator"] else None
    torch.set_num_threads(spec["threads"])
    profile = Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["profile"].items()})
    pair = {key: build for key, _, build, _ in encoder_pairs(profile)}[spec["pair"]]
    image_enc, text_enc = pair()
    dev = torch.device(spec["device"])
    image_enc.to(dev)
    text_enc.to(dev)
    prepare_encoders(image_enc, dev)
    cfg = extract_config(Path(spec["root"]), image_enc, text_enc, profile)
    cfg.extract.device = spec["device"]
    cfg.extract.precision = spec["precision"]
    if spec["workers"] is not None:
        cfg.extract.num_workers = spec["workers"]
    n = spec["samples"]
    batches, decode_s = prepare_batches(cfg, n, image_enc, text_enc, dev)
    bare_forward(image_enc, text_enc, batches[:1], dev, spec["precision"])  # warm-up: first-call costs paid by neither
    if spec["variant"] == "extract":
        del batches  # the extract variant must not carry the prepared batches' memory
    rounds, summary = [], None
    out = Path(spec["out"])
    with encoders_patched(image_enc, text_enc):
        for _ in range(spec["rounds"]):
            before = usage()
            if spec["variant"] == "bare":
                seconds = bare_forward(image_enc, text_enc, batches, dev, spec["precision"])
            else:
                summary = extract(cfg, out, limit=n, progress=False, force=True)
                seconds = summary.seconds
            rounds.append({"seconds": seconds, **delta(before, usage())})
    tokens = text_enc.tokenize([s.text for s in load_samples(cfg, cfg.data_dir()).samples[:n]])
    return {
        "spec": spec,
        "rounds": rounds,
        "batch_size": cfg.extract.batch_size,
        "num_workers": decoding_workers(cfg.extract.num_workers, dev),
        "torch_threads": torch.get_num_threads(),
        "decode_preprocess_s_per_image": decode_s,
        "mean_tokens_per_sample": float(np.mean([len(t) for t in tokens])),
        "bytes_per_sample": summary.bytes_per_sample if summary else None,
        "allocator": None if allocator is None else {"applied": allocator.applied, "reason": allocator.reason},
    }


if __name__ == "__main__":
    # one spec, or (the quick profile) a list of them measured one after another in this process
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    specs = json.loads(spec_path.read_text())
    out_path.write_text(json.dumps([measure(s) for s in specs] if isinstance(specs, list) else measure(specs)))
