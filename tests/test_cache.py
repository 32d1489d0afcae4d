"""The cache schema on its own: layout, filling by positioned writes, completeness, reader."""

from pathlib import Path

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
    _row_file,
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


def _rss() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_filling_does_not_grow_the_writers_memory_by_the_file(tmp_path):
    """A memory-mapped writer keeps every written page resident (an HFM cache is ~10 GB); positioned writes do not."""
    path, n = tmp_path / "big.h5", 160
    plans = [SplitPlan("train", [str(i) for i in range(n)], ["t"] * n, np.zeros(n, np.int16), np.ones(n, np.int64))]
    create_cache(path, plans, FeatureShapes((100, 32, 32), 1, 8), {"k": 1}, [])
    image = np.ones((n, 100, 32, 32), np.float16)  # 33 MB
    filler = CacheFiller(path)
    before = _rss()
    filler.write("train", np.arange(n), image, [np.ones((1, 1, 8), np.float16)] * n, np.ones(n, bool))
    grown = _rss() - before
    filler.close()
    assert grown < image.nbytes / 4
    finalize_cache(path, [])
    np.testing.assert_array_equal(FeatureCache(path).load("train", in_memory=False).image[n - 1], image[n - 1])


def test_row_writes_outside_the_dataset_are_refused(tmp_path):
    path = tmp_path / "c.h5"
    create_cache(path, _plans(), FeatureShapes((4, 2, 2), 2, 3), {"k": 1}, [])
    with h5py.File(path, "r") as f:
        rows = _row_file(path, f["splits/train/image"], writable=True)
    with pytest.raises(CacheError, match="at row 2"):
        rows.write(2, np.zeros((2, 4, 2, 2), np.float16))
    with pytest.raises(CacheError, match="cannot write"):
        rows.write(0, np.zeros((1, 4, 2, 3), np.float16))
