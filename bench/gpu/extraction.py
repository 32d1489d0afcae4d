"""Extraction on the device: ``extract`` samples/s in fp32 and bf16, with channels_last on and off, for each encoder
pair; the encoders' forward alone on the same batches beside each; the largest differences between the caches.

Everything runs in this process through ``sppscl.stage1.extract.extract`` (decode, preprocess, encode, write; setup
excluded), with the pair's encoders built once and handed to ``extract`` (``bench.extraction.encoders_patched``),
because ResNet-50 + BERT-base have no weights to load by name. Each variant pays one batch of warm-up first.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sppscl.cache import file_contents
from sppscl.stage1.encoders import EncoderUnavailable, load_image_encoder, load_text_encoder
from sppscl.stage1.extract import extract, precision_context, prepare_encoders, use_channels_last

from ..extraction import encoders_patched, extract_config, make_dataset
from ..extraction_worker import prepare_batches
from ..models import bert_random, resnet50_random, tiny_cnn_random

SECTION = "extraction"


def encoder_pairs(sizes) -> list[tuple[str, object]]:
    """(label, builder) of the offline pair and the paper's shapes; a builder raises EncoderUnavailable when its
    package is missing."""
    if sizes.real_encoders:
        return [
            ("efficientnet-lite0 + minilm-l6", lambda: (load_image_encoder("efficientnet-lite0"), load_text_encoder("minilm-l6", 202, 4))),
            ("resnet50 + bert-base shapes", lambda: (resnet50_random(), bert_random(False, 202, 4))),
        ]
    # the quick form runs one pair: the shapes' builders (bench.models), through the same code as the full run's
    return [("tiny random cnn + bert shapes", lambda: (tiny_cnn_random(16), bert_random(True, 32, 4)))]


def precisions(dev: torch.device) -> list[str]:
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["fp32"]
    return ["fp32", "bf16"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def encoders_alone(image_enc, text_enc, batches: list, dev: torch.device, precision: str, channels_last: bool, seconds: float) -> float:
    """Samples/s of the two encoders' forward passes alone over batches already on the device (at least one pass,
    then more until ``seconds`` have gone by)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    on_dev = [(px.to(dev).contiguous(memory_format=fmt), ids.to(dev), mask.to(dev)) for px, ids, mask in batches]
    n = sum(len(px) for px, _, _ in on_dev)
    with torch.inference_mode(), precision_context(dev, precision):
        image_enc(on_dev[0][0])  # warm-up: the layout's kernels are chosen on first use
        text_enc(on_dev[0][1], on_dev[0][2])
        _sync(dev)
        t0, passes = time.perf_counter(), 0
        while passes == 0 or time.perf_counter() - t0 < seconds:
            for px, ids, mask in on_dev:
                image_enc(px)
                text_enc(ids, mask)
            passes += 1
            _sync(dev)
        elapsed = time.perf_counter() - t0
    return passes * n / elapsed


def largest_difference(a: Path, b: Path) -> dict[str, tuple[float, float]]:
    """Per feature kind (image, tokens): the largest |a - b| over every split, and the largest |a| (its scale)."""
    x, y = file_contents(a), file_contents(b)
    out: dict[str, tuple[float, float]] = {}
    for key in x:
        kind = key.rsplit("/", 1)[-1]
        if kind not in ("image", "tokens") or not len(x[key]):
            continue
        xa, ya = x[key].astype(np.float32), y[key].astype(np.float32)
        diff, scale = float(np.abs(xa - ya).max()), float(np.abs(xa).max())
        old = out.get(kind, (0.0, 0.0))
        out[kind] = (max(old[0], diff), max(old[1], scale))
    return out


def _diff_text(d: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{kind} {diff:.3g} (largest value {scale:.3g})" for kind, (diff, scale) in d.items())


def run(ctx, report) -> None:
    s, dev = ctx.sizes, ctx.device
    root = ctx.workdir / "extract-data"
    t0 = time.perf_counter()
    make_dataset(root, s.extract_samples, s.image_size)
    ctx.shared["extract_data"] = root
    report.figure(SECTION, "synthetic data", f"{s.extract_samples} JPEGs {s.image_size[0]}×{s.image_size[1]}", f"made in {time.perf_counter() - t0:.1f} s")
    default_cl = use_channels_last(dev)
    variants = [(p, cl) for p in precisions(dev) for cl in (True, False)]
    if "bf16" not in precisions(dev):
        report.skip(SECTION, f"bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16 (torch.cuda.is_bf16_supported() is False)")
    for i, (label, build) in enumerate(encoder_pairs(s)):
        if ctx.budget.spent():
            report.skip(SECTION, f"{label}: the budget is spent")
            continue
        try:
            image_enc, text_enc = build()
        except EncoderUnavailable as e:
            report.skip(SECTION, f"{label}: {str(e).split(':')[0]}")
            continue
        label = f"{image_enc.name} + {text_enc.name}" if "shapes" in label else label
        image_enc.to(dev)
        text_enc.to(dev)
        cfg = extract_config(root, image_enc, text_enc, s)
        cfg.extract.device = str(dev)
        cpu_batches, _ = prepare_batches(cfg, s.extract_samples, image_enc, text_enc, torch.device("cpu"))
        caches: dict[tuple[str, bool], Path] = {}
        rates: dict[tuple[str, bool], float] = {}
        with encoders_patched(image_enc, text_enc):
            for precision, cl in variants:
                if ctx.budget.spent():
                    report.skip(SECTION, f"{label}, {precision}, channels_last {'on' if cl else 'off'}: the budget is spent")
                    continue
                out = ctx.workdir / f"extract-{i}-{precision}-{'cl' if cl else 'nchw'}.h5"
                run_args = dict(device=str(dev), progress=False, force=True, precision=precision, channels_last=cl)
                if dev.type == "cuda":  # lazy module loading, cuBLAS handles and kernel choice happen on first use
                    extract(cfg, ctx.workdir / "warm-up.h5", limit=cfg.extract.batch_size, **run_args)
                best = 0.0
                for _ in range(s.extract_rounds):
                    summary = extract(cfg, out, limit=s.extract_samples, **run_args)
                    best = max(best, summary.samples_encoded / summary.seconds)
                caches[precision, cl], rates[precision, cl] = out, best
                alone = encoders_alone(image_enc, text_enc, cpu_batches, dev, precision, cl, s.bare_seconds)
                report.figure(
                    SECTION,
                    f"{label}: extract, {precision}, channels_last {'on' if cl else 'off'}",
                    f"{best:,.1f} samples/s",
                    f"encoders alone {alone:,.1f} samples/s; extract reaches {best / alone:.2f} of it; batch {cfg.extract.batch_size}, "
                    f"best of {s.extract_rounds}",
                    samples_per_s=best,
                    encoders_alone_samples_per_s=alone,
                    precision=precision,
                    channels_last=cl,
                    pair=label,
                )
        fp32, bf16 = ("fp32", default_cl), ("bf16", default_cl)
        if fp32 in rates and bf16 in rates:
            report.figure(SECTION, f"{label}: bf16 vs fp32 (channels_last {'on' if default_cl else 'off'})", f"{rates[bf16] / rates[fp32]:.2f}×",
                          "extract samples/s, bf16 over fp32", ratio=rates[bf16] / rates[fp32])
            d = largest_difference(caches[fp32], caches[bf16])
            report.figure(SECTION, f"{label}: largest fp32 − bf16 difference in the cache", _diff_text(d), "largest absolute difference over every stored value (float16 in the cache)",
                          **{k: {"max_abs_diff": v[0], "max_abs_value": v[1]} for k, v in d.items()})
        for precision in precisions(dev):
            on, off = (precision, True), (precision, False)
            if on in rates and off in rates:
                report.figure(SECTION, f"{label}: channels_last on vs off ({precision})", f"{rates[on] / rates[off]:.2f}×",
                              "extract samples/s, on over off", ratio=rates[on] / rates[off])
        if ("fp32", True) in caches and ("fp32", False) in caches:
            d = largest_difference(caches["fp32", True], caches["fp32", False])
            report.figure(SECTION, f"{label}: largest channels_last on − off difference in the cache (fp32)", _diff_text(d),
                          "another memory layout can pick other convolution algorithms",
                          **{k: {"max_abs_diff": v[0], "max_abs_value": v[1]} for k, v in d.items()})
        if not ctx.keep:
            for path in caches.values():
                path.unlink(missing_ok=True)
        del image_enc, text_enc
        if dev.type == "cuda":
            torch.cuda.empty_cache()
