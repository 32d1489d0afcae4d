"""The cache schema on its own: layout, memory-mapped filling, completeness, reader."""

import h5py
import numpy as np
import pytest

from sppscl.cache import (
    PENDING,
    SKIPPED,
    WRITTEN,
    CacheError,
    CacheFiller,
    FeatureCache,
    FeatureShapes,
    SplitPlan,
    create_cache,
    diff_provenance,
    finalize_cache,
)


def _plans():
    return [
        SplitPlan("train", ["a", "b", "c"], ["x", "y y", "z z z"], np.array([0, 1, 2]), np.array([2, 3, 4])),
        SplitPlan("test", ["d"], ["w"], np.array([-1]), np.array([3])),
    ]


def _fill(path, rng):
    f = CacheFiller(path)
    expected = {}
    for split, n_tok in (("train", [2, 3, 4]), ("test", [3])):
        rows = np.arange(len(n_tok))
        img = rng.standard_normal((len(rows), 4, 2, 2)).astype(np.float16)
        toks = [rng.standard_normal((k, 2, 3)).astype(np.float16) for k in n_tok]
        ok = np.array([True] * len(rows))
        if split == "train":
            ok[1] = False
        f.write(split, rows, img, toks, ok)
        expected[split] = (img, toks, ok)
    f.close()
    return expected


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    create_cache(path, _plans(), FeatureShapes((4, 2, 2), 2, 3), {"k": 1}, [("train", "q", "empty text")])
    expected = _fill(path, np.random.default_rng(0))
    finalize_cache(path, [("train", "q", "empty text"), ("train", "b", "missing image: b.jpg")])
    cache = FeatureCache(path)
    assert cache.provenance == {"k": 1}
    assert cache.splits == ["test", "train"]
    assert cache.image_shape == (4, 2, 2) and (cache.layers, cache.hidden) == (2, 3)
    assert cache.skipped == [("train", "q", "empty text"), ("train", "b", "missing image: b.jpg")]
    for in_memory in (True, False):
        s = cache.load("train", in_memory=in_memory)
        img, toks, ok = expected["train"]
        assert list(s.rows) == [0, 2]  # the skipped row is not usable
        assert list(s.ids) == ["a", "b", "c"] and list(s.labels) == [0, 1, 2]
        np.testing.assert_array_equal(s.image[0], img[0])
        np.testing.assert_array_equal(s.tokens[s.offsets[2] : s.offsets[3]], toks[2])
        np.testing.assert_array_equal(s.cls_states(), np.stack([toks[0][0], toks[2][0]]))
        assert s.in_memory is in_memory
    t = cache.load("test")
    assert not t.has_labels and list(t.labels) == [-1]


def test_incomplete_cache_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    create_cache(path, _plans(), FeatureShapes((4, 2, 2), 2, 3), {}, [])
    with pytest.raises(CacheError, match="did not finish"):
        FeatureCache(path)
    with pytest.raises(CacheError, match="unwritten rows"):
        finalize_cache(path, [])
    with h5py.File(path) as f:
        assert not f.attrs["complete"]


def test_missing_cache_names_the_command(tmp_path):
    with pytest.raises(CacheError, match="sppscl extract"):
        FeatureCache(tmp_path / "none.h5")


def test_status_marks_written_and_skipped(tmp_path):
    path = tmp_path / "c.h5"
    create_cache(path, _plans(), FeatureShapes((4, 2, 2), 2, 3), {}, [])
    f = CacheFiller(path)
    assert (f.status("train") == PENDING).all()
    f.close()
    _fill(path, np.random.default_rng(1))
    f = CacheFiller(path)
    assert list(f.status("train")) == [WRITTEN, SKIPPED, WRITTEN]
    f.close()


def test_big_arrays_are_contiguous_and_preallocated(tmp_path):
    """What makes kill -9 safe and multi-writer filling possible: no chunking, no compression, bytes allocated up front."""
    path = tmp_path / "c.h5"
    create_cache(path, _plans(), FeatureShapes((4, 2, 2), 2, 3), {}, [])
    with h5py.File(path) as f:
        for key in ("image", "tokens", "status"):
            d = f["splits/train"][key]
            assert d.chunks is None and d.compression is None and d.id.get_offset() is not None


def test_diff_provenance_names_paths():
    a = {"encoders": {"image": {"name": "resnet50"}}, "dtype": "float16"}
    b = {"encoders": {"image": {"name": "tiny-cnn"}}, "dtype": "float16"}
    assert diff_provenance(a, b) == ["encoders.image.name: cache has 'resnet50', request has 'tiny-cnn'"]
    assert diff_provenance(a, a) == []
