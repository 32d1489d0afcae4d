"""The synthetic generator: deterministic, balanced, one-modality share, visual cue, marker and regeneration."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppscl.config import Config
from sppscl.stage1 import synthetic
from sppscl.stage1.adapters import DataError, load_samples
from sppscl.stage1.verify import verify_samples

N = 120


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_rows(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name).read_text().splitlines()]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate(root, N, classes=3, seed=3)
    return root


def all_rows(root: Path) -> list[dict]:
    return [r for name in synthetic.DEFAULT_SPLITS.values() for r in read_rows(root, name)]


def test_same_seed_gives_identical_files(generated, tmp_path):
    synthetic.generate(tmp_path / "again", N, classes=3, seed=3)
    synthetic.generate(tmp_path / "other", N, classes=3, seed=4)
    assert files(tmp_path / "again") == files(generated)
    assert files(tmp_path / "other") != files(generated)


def test_split_sizes_and_class_balance(generated):
    splits = synthetic.DEFAULT_SPLITS.items()
    counts = {split: Counter(r["label"] for r in read_rows(generated, name)) for split, name in splits}
    # 40 per class: 6 dev, 6 test, 28 train each
    assert counts == {"train": {0: 28, 1: 28, 2: 28}, "dev": {0: 6, 1: 6, 2: 6}, "test": {0: 6, 1: 6, 2: 6}}
    rows = all_rows(generated)
    assert len({r["id"] for r in rows}) == N
    for r in rows:
        with Image.open(generated / r["image"]) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (96, 96), "RGB")


def test_one_modality_share_and_text_cue(generated):
    rows = all_rows(generated)
    cues = Counter(r["cue"] for r in rows)
    assert cues == {"both": 84, "text": 18, "image": 18}  # 30% of 120, half per modality
    vocab = {style: set(ws) for style, ws in synthetic.SENTIMENT_WORDS.items()}
    every_word = set().union(*vocab.values())
    for r in rows:
        style = synthetic.STYLES[3][r["label"]]
        if r["cue"] == "image":
            assert not words(r["text"]) & every_word, r
        else:
            found = words(r["text"]) & every_word
            assert found and found <= vocab[style], r


def image_stats(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        x = np.asarray(im, dtype=np.float32) / 255
    return np.concatenate([x.mean((0, 1)), x.std((0, 1))])


def test_images_carry_the_label_only_where_the_cue_says(generated):
    rows = all_rows(generated)
    feats = np.stack([image_stats(generated / r["image"]) for r in rows])
    labels = np.array([r["label"] for r in rows])
    visual = np.array([r["cue"] != "text" for r in rows])
    centroids = np.stack([feats[visual & (labels == c)].mean(0) for c in range(3)])
    predicted = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    # a nearest-centroid rule on mean/std colour already reads the visual classes...
    assert (predicted[visual] == labels[visual]).mean() > 0.9
    # ...but not the ambiguous images of text-only pairs
    assert (predicted[~visual] == labels[~visual]).mean() < 0.6


def test_unlabeled_splits_and_two_classes(tmp_path):
    synthetic.generate(tmp_path, 40, classes=2, seed=0, unlabeled_splits=["test"])
    assert all("label" not in r for r in read_rows(tmp_path, "test.jsonl"))
    assert Counter(r["label"] for r in read_rows(tmp_path, "train.jsonl")) == {0: 14, 1: 14}

    cfg = Config()
    cfg.dataset.format = "manifest"
    cfg.dataset.splits = dict(synthetic.DEFAULT_SPLITS)
    report = load_samples(cfg, tmp_path)
    assert report.label_counts()["test"] == {None: 6}
    assert any("test" in n and "no labels" in n for n in report.notes)


def test_bad_arguments():
    with pytest.raises(ValueError, match="supports"):
        synthetic.generate(Path("unused"), 100, classes=4)
    with pytest.raises(ValueError, match="exactly train, dev, test"):
        synthetic.generate(Path("unused"), 100, splits={"train": "a.jsonl", "val": "b.jsonl"})
    with pytest.raises(ValueError, match="unlabeled_splits"):
        synthetic.generate(Path("unused"), 100, unlabeled_splits=["holdout"])


def test_too_small_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        synthetic.generate(tmp_path, 6, classes=3)
    with pytest.raises(DataError, match="cannot generate the synthetic set .*too small"):
        load_samples(demo_cfg(6), tmp_path / "demo")


def demo_cfg(size: int) -> Config:
    cfg = Config()
    cfg.dataset.format = "synthetic"
    cfg.dataset.splits = {"train": "m/train.jsonl", "dev": "m/dev.jsonl", "test": "m/test.jsonl"}
    cfg.dataset.synthetic_size = size
    return cfg


def test_load_samples_generates_on_first_use(tmp_path):
    root = tmp_path / "demo"
    report = load_samples(demo_cfg(60), root)

    assert report.split_counts() == {"train": 42, "dev": 9, "test": 9}
    assert all(s.label is not None for s in report.samples)
    assert all(s.image.parent == root / "images" for s in report.samples)
    assert verify_samples(report.samples, num_classes=3).ok


def test_ensure_dataset_reuses_complete_folder_and_redraws_otherwise(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    synthetic.ensure_dataset(root, demo_cfg(60))
    before = files(root)

    def fail(*args, **kwargs):
        raise AssertionError("a complete folder was regenerated")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "generate", fail)
        assert synthetic.ensure_dataset(root, demo_cfg(60)) == root

    # a half-written folder (no marker) is drawn again, identically
    (root / synthetic.MARKER).unlink()
    (root / "images" / "syn00005.jpg").unlink()
    (root / "m" / "dev.jsonl").write_text("")
    synthetic.ensure_dataset(root, demo_cfg(60))
    assert files(root) == before

    # a different size is a different set: no stale images remain
    synthetic.ensure_dataset(root, demo_cfg(30))
    assert len(list((root / "images").glob("*.jpg"))) == 30
    assert json.loads((root / synthetic.MARKER).read_text())["n"] == 30
