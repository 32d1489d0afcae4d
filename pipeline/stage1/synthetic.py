"""A small synthetic image-text sentiment set for the demo and the tests, drawn with PIL in seconds.

Each class has a visual style (positive: warm bright circles with smile arcs; neutral: grey
rectangles; negative: dark backgrounds with red jagged shapes) and a text vocabulary. Positions,
sizes, colours, noise and templates vary, so neither modality is a lookup. A share of the pairs
(``one_modality_share``, 30% by default) carries the label in ONE modality only, the other being
ambiguous (filler text without sentiment words, or an image in no class's style), so a model that
fuses both modalities beats either alone. Output: ``<image_dir>/<id>.jpg`` and one JSONL manifest
per split (``id, text, image, label, cue``), readable by the ``manifest`` adapter.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sppscl.config import Config

DEFAULT_SPLITS = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
SPLIT_SHARES = {"train": 0.70, "dev": 0.15, "test": 0.15}
MARKER = ".synthetic-complete.json"
# The data set does not change with the training seed, so multi-seed runs see the same data.
SYNTHETIC_SEED = 0
DEFAULT_IMAGE_SIZE = 96
ONE_MODALITY_SHARE = 0.3
ID_PREFIX = "syn"
# Bump when drawing or templates change, so ensure_dataset redraws old folders.
GENERATOR_VERSION = 1

STYLES = {2: ("positive", "negative"), 3: ("positive", "neutral", "negative")}
AMBIGUOUS = "ambiguous"

SENTIMENT_WORDS = {
    "positive": ("love", "great", "happy", "wonderful", "amazing", "beautiful", "awesome", "fantastic",
                 "delighted", "lovely", "brilliant", "excited"),
    "neutral": ("okay", "ordinary", "average", "usual", "normal", "plain", "regular", "standard", "typical",
                "routine"),
    "negative": ("hate", "awful", "terrible", "sad", "horrible", "worst", "angry", "disgusting", "miserable",
                 "furious", "gloomy", "upset"),
}
NOUNS = ("game", "weather", "concert", "trip", "meeting", "coffee", "movie", "train ride", "dinner", "match",
         "show", "holiday", "weekend", "news", "traffic", "exam", "lecture", "parade")
PLACES = ("park", "office", "station", "beach", "stadium", "cafe", "city", "mall", "airport", "school", "harbour")
TIMES = ("today", "tonight", "this morning", "yesterday", "this weekend", "right now", "again")
SENTIMENT_TEMPLATES = (
    "feeling {w} about the {noun} {time}",
    "what a {w} {noun} at the {place}",
    "the {noun} was {w} {time}",
    "{noun} at the {place} {time}, honestly {w}",
    "so {w} after the {noun}",
    "this {noun} is {w} and {w2}",
    "{w} {noun}, {w2} {place}",
)
FILLER_TEMPLATES = (
    "just got back from the {place} {time}",
    "photo of the {noun} at the {place}",
    "the {noun} and the {noun2} {time}",
    "at the {place} for the {noun}",
    "anyone else at the {place} {time}?",
    "{noun} {time} then the {place}",
)


def _pick(rng: np.random.Generator, seq: tuple[str, ...]) -> str:
    return seq[int(rng.integers(len(seq)))]


def make_text(style: str, rng: np.random.Generator) -> str:
    """A tweet-like text: sentiment words of ``style`` in a template, or pure filler when ``style`` is ambiguous."""
    fields = {
        "noun": _pick(rng, NOUNS),
        "noun2": _pick(rng, NOUNS),
        "place": _pick(rng, PLACES),
        "time": _pick(rng, TIMES),
    }
    if style == AMBIGUOUS:
        text = _pick(rng, FILLER_TEMPLATES).format(**fields)
    else:
        words = SENTIMENT_WORDS[style]
        text = _pick(rng, SENTIMENT_TEMPLATES).format(w=_pick(rng, words), w2=_pick(rng, words), **fields)
    if rng.random() < 0.3:
        text = f"@user{int(rng.integers(1000))} {text}"
    if rng.random() < 0.3:
        text = f"{text} #{fields['noun'].replace(' ', '')}"
    return text


Range = tuple[float, float]


def _hsv(rng: np.random.Generator, h: Range, s: Range, v: Range) -> tuple[int, int, int]:
    """A random RGB colour from hue/saturation/value ranges (hue wraps, so red can span 0)."""
    hue = rng.uniform(*h) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(*s), rng.uniform(*v))
    return int(r * 255), int(g * 255), int(b * 255)


def _box(rng: np.random.Generator, size: int, lo: float, hi: float) -> tuple[float, float, float]:
    """A random centre and radius whose disc stays mostly inside the image."""
    r = rng.uniform(lo, hi) * size
    cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
    return float(cx), float(cy), float(r)


def _draw_positive(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    # warm hues: pink through red and orange to yellow
    for i in range(int(rng.integers(1, 4))):
        cx, cy, r = _box(rng, size, 0.22 if i == 0 else 0.08, 0.34 if i == 0 else 0.16)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_hsv(rng, (-0.08, 0.16), (0.6, 1.0), (0.85, 1.0)))
        if i == 0:
            ink = _hsv(rng, (0.0, 1.0), (0.3, 0.8), (0.1, 0.35))
            k = r * rng.uniform(0.45, 0.65)
            d.arc((cx - k, cy - k, cx + k, cy + k), start=20, end=160, fill=ink, width=max(2, size // 40))
            for ex in (-0.35, 0.35):
                e = max(1.5, r * 0.08)
                d.ellipse((cx + ex * r - e, cy - 0.3 * r - e, cx + ex * r + e, cy - 0.3 * r + e), fill=ink)


def _draw_neutral(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(0, size * 0.7, size=2)
        w, h = rng.uniform(size * 0.15, size * 0.5, size=2)
        d.rectangle((x0, y0, x0 + w, y0 + h), fill=_hsv(rng, (0.5, 0.7), (0.0, 0.15), (0.3, 0.85)))


def _draw_negative(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = _box(rng, size, 0.12, 0.32)
        n = int(rng.integers(6, 12))
        pts = []
        for j in range(2 * n):
            a = math.pi * j / n + rng.uniform(-0.15, 0.15)
            rad = r * (1.0 if j % 2 == 0 else rng.uniform(0.3, 0.55))
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=_hsv(rng, (-0.04, 0.03), (0.7, 1.0), (0.45, 0.9)))
    # a lightning-like zigzag
    x, y = rng.uniform(0, size), 0.0
    zig = [(x, y)]
    while y < size:
        x, y = x + rng.uniform(-size * 0.15, size * 0.15), y + rng.uniform(size * 0.08, size * 0.2)
        zig.append((x, y))
    d.line(zig, fill=_hsv(rng, (-0.04, 0.03), (0.5, 1.0), (0.5, 0.9)), width=max(1, size // 48))


def _draw_ambiguous(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(2, 5))):
        cx, cy, r = _box(rng, size, 0.05, 0.14)
        d.ellipse((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=_hsv(rng, (0.0, 1.0), (0.2, 0.6), (0.35, 0.8)))


BACKGROUNDS = {
    "positive": ((0.05, 0.17), (0.25, 0.55), (0.8, 1.0)),
    "neutral": ((0.0, 1.0), (0.0, 0.1), (0.45, 0.7)),
    "negative": ((0.6, 1.02), (0.3, 0.9), (0.04, 0.28)),
    AMBIGUOUS: ((0.0, 1.0), (0.15, 0.45), (0.35, 0.75)),
}
DRAWERS = {
    "positive": _draw_positive,
    "neutral": _draw_neutral,
    "negative": _draw_negative,
    AMBIGUOUS: _draw_ambiguous,
}


def make_image(style: str, rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """An RGB image in ``style``'s palette and shapes, with random distractor lines and pixel noise."""
    img = Image.new("RGB", (size, size), _hsv(rng, *BACKGROUNDS[style]))
    d = ImageDraw.Draw(img)
    DRAWERS[style](d, rng, size)
    for _ in range(int(rng.integers(0, 3))):
        a, b = rng.uniform(0, size, size=(2, 2))
        d.line((*a, *b), fill=_hsv(rng, (0.0, 1.0), (0.0, 1.0), (0.2, 1.0)), width=1)
    noise = rng.normal(0.0, 10.0, size=(size, size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _split_plan(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[str]:
    """Stratified 70/15/15: each split keeps the class balance."""
    plan = [""] * len(labels)
    names = list(SPLIT_SHARES)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_dev = round(SPLIT_SHARES["dev"] * len(idx))
        n_test = round(SPLIT_SHARES["test"] * len(idx))
        sizes = {"train": len(idx) - n_dev - n_test, "dev": n_dev, "test": n_test}
        start = 0
        for name in names:
            if sizes[name] < 1:
                raise ValueError(f"n={len(labels)} is too small: class {c} gets no {name} sample")
            for i in idx[start : start + sizes[name]]:
                plan[int(i)] = name
            start += sizes[name]
    return plan


def generate(
    data_dir: Path,
    n: int,
    classes: int = 3,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    splits: dict[str, str] | None = None,
    unlabeled_splits: Iterable[str] = (),
    one_modality_share: float = ONE_MODALITY_SHARE,
    image_dir: str = "images",
) -> dict[str, list[dict[str, Any]]]:
    """Draw ``n`` balanced pairs into ``data_dir`` and return the manifest rows per split.

    ``splits`` maps train/dev/test to manifest file names (default ``DEFAULT_SPLITS``); splits named in
    ``unlabeled_splits`` are written without labels. Each row's ``cue`` says which modality carries the
    label: ``both``, ``text`` or ``image``. The marker file is written last, so a folder without it is
    incomplete. Same arguments -> byte-identical files.
    """
    if classes not in STYLES:
        raise ValueError(f"synthetic data supports {sorted(STYLES)} classes, got {classes}")
    splits = dict(splits or DEFAULT_SPLITS)
    if set(splits) != set(SPLIT_SHARES):
        raise ValueError(f"synthetic splits must be exactly {', '.join(SPLIT_SHARES)}, got {', '.join(splits)}")
    unlabeled = set(unlabeled_splits)
    if not unlabeled <= set(splits):
        raise ValueError(f"unlabeled_splits {sorted(unlabeled - set(splits))} are not splits ({', '.join(splits)})")
    if not 0.0 <= one_modality_share <= 1.0:
        raise ValueError(f"one_modality_share must be in [0, 1], got {one_modality_share}")
    rng = np.random.default_rng(seed)
    styles = STYLES[classes]
    labels = (np.arange(n) % classes)[rng.permutation(n)]
    plan = _split_plan(labels, classes, rng)
    cues = np.array(["both"] * n, dtype=object)
    one = rng.permutation(n)[: round(one_modality_share * n)]
    cues[one[0::2]] = "text"
    cues[one[1::2]] = "image"

    data_dir = Path(data_dir)
    images = data_dir / image_dir
    images.mkdir(parents=True, exist_ok=True)
    marker = data_dir / MARKER
    marker.unlink(missing_ok=True)
    for old in images.glob(f"{ID_PREFIX}*.jpg"):
        old.unlink()

    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in splits}
    for i in range(n):
        # one generator per sample: a sample's content does not depend on the others
        srng = np.random.default_rng([seed, i])
        style = styles[int(labels[i])]
        sid = f"{ID_PREFIX}{i:05d}"
        path = images / f"{sid}.jpg"
        make_image(AMBIGUOUS if cues[i] == "text" else style, srng, image_size).save(path, quality=90)
        text = make_text(AMBIGUOUS if cues[i] == "image" else style, srng)
        manifest_dir = (data_dir / splits[plan[i]]).parent
        row: dict[str, Any] = {"id": sid, "text": text, "image": os.path.relpath(path, manifest_dir)}
        if plan[i] not in unlabeled:
            row["label"] = int(labels[i])
        row["cue"] = str(cues[i])
        rows[plan[i]].append(row)

    for name, file in splits.items():
        out = data_dir / file
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows[name]), encoding="utf-8")
    params = _params(
        n=n, classes=classes, seed=seed, image_size=image_size, splits=splits, unlabeled_splits=unlabeled,
        one_modality_share=one_modality_share, image_dir=image_dir,
    )
    marker.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    return rows


def _params(
    *, n: int, classes: int, seed: int, image_size: int, splits: dict[str, str], unlabeled_splits: Iterable[str],
    one_modality_share: float, image_dir: str,
) -> dict[str, Any]:
    """What the marker records: a folder is reused only when every generation argument matches."""
    return {
        "version": GENERATOR_VERSION,
        "n": n,
        "classes": classes,
        "seed": seed,
        "image_size": image_size,
        "splits": splits,
        "unlabeled_splits": sorted(unlabeled_splits),
        "one_modality_share": one_modality_share,
        "image_dir": image_dir,
    }


def ensure_dataset(data_dir: Path, cfg: Config) -> Path:
    """Generate the synthetic set ``cfg`` describes into ``data_dir`` unless a complete, matching one is there."""
    data_dir = Path(data_dir)
    splits = dict(cfg.dataset.splits or DEFAULT_SPLITS)
    kwargs: dict[str, Any] = {
        "n": cfg.dataset.synthetic_size,
        "classes": len(cfg.dataset.classes),
        "seed": SYNTHETIC_SEED,
        "image_size": DEFAULT_IMAGE_SIZE,
        "splits": splits,
        "one_modality_share": ONE_MODALITY_SHARE,
        "image_dir": cfg.dataset.image_dir,
    }
    wanted = _params(unlabeled_splits=(), **kwargs)
    marker = data_dir / MARKER
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        found = None
    if found == wanted and all((data_dir / f).is_file() for f in splits.values()):
        return data_dir
    generate(data_dir, **kwargs)
    return data_dir
