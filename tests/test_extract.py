"""Stage one end to end with the tiny encoders on generated images."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import interrupt_on_call, tiny_config
from sppscl.cache import WRITTEN, CacheError, FeatureCache
from sppscl.stage1 import extract as extract_mod
from sppscl.stage1.extract import ExtractionError, extract


def _arrays(path):
    with h5py.File(path) as f:
        out = {}
        for split, g in f["splits"].items():
            for key in g:
                out[f"{split}/{key}"] = g[key][()]
        out["skipped"] = [f["skipped"][k][()].tolist() for k in ("split", "id", "reason")]
        return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def _manifest(tmp_path, rows, split="train"):
    """A manifest dataset whose rows we control (for bad-input cases)."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    for r in rows:
        if r.get("make_image", True):
            Image.new("RGB", (40, 30), (200, 30, 30)).save(img_dir / f"{r['id']}.jpg")
    lines = [json.dumps({"id": r["id"], "text": r["text"], "image": f"imgs/{r['id']}.jpg", "label": r["label"]}) for r in rows]
    (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tmp_path)
    cfg.dataset.format = "manifest"
    cfg.dataset.splits = {split: f"{split}.jsonl"}
    return cfg


def test_shapes_labels_and_provenance(tiny_cache):
    path, cfg = tiny_cache
    cache = FeatureCache(path)
    assert sorted(cache.splits) == ["dev", "test", "train"]
    assert cache.image_shape == (16, 7, 7)
    assert cache.layers == 4
    total = sum(len(cache.load(s).rows) for s in cache.splits)
    assert total == 80
    train = cache.load("train")
    assert train.image.dtype == np.float16 and train.tokens.dtype == np.float16
    # ragged: exactly one token row per real word piece, [CLS] first
    assert train.offsets[-1] == train.tokens.shape[0]
    assert (np.diff(train.offsets) >= 2).all() and (np.diff(train.offsets) <= 32).all()
    assert set(train.labels.tolist()) <= {0, 1, 2}
    p = cache.provenance
    assert p["encoders"]["image"]["name"] == "tiny-cnn" and p["encoders"]["text"]["name"] == "tiny-bert"
    assert p["encoders"]["text"]["layers"] == [1, 2, 3, 4]
    assert p["dtype"] == "float16" and "samples_sha256" in p["dataset"]
    assert p["dataset"]["classes"] == ["positive", "neutral", "negative"]


def test_features_equal_a_direct_encoder_run(tiny_cache):
    """The cached rows are the encoders' outputs for those samples (to float16 precision), at the right index."""
    import torch

    from sppscl.stage1.adapters import load_samples
    from sppscl.stage1.encoders import load_image_encoder, load_text_encoder

    path, cfg = tiny_cache
    samples = [s for s in load_samples(cfg).samples if s.split == "dev"]
    split = FeatureCache(path).load("dev")
    ie, te = load_image_encoder("tiny-cnn"), load_text_encoder("tiny-bert", max_length=32)
    row = 3
    s = samples[row]
    assert split.ids[row] == s.id
    with torch.inference_mode(), Image.open(s.image) as img:
        fmap = ie(ie.preprocess()(img)[None])[0].numpy()
        ids = te.tokenize([s.text])[0]
        hs = te(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].numpy()
    np.testing.assert_allclose(split.image[row].astype(np.float32), fmap, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(split.tokens[split.offsets[row] : split.offsets[row + 1]].astype(np.float32), hs, rtol=2e-3, atol=2e-3)


def test_rerun_is_a_no_op_and_force_rebuilds(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    mtime = path.stat().st_mtime_ns
    s = extract(cfg, path, progress=False)
    assert s.status == "up-to-date" and path.stat().st_mtime_ns == mtime


def test_different_request_is_refused_with_what_differs(tiny_cache):
    path, cfg = tiny_cache
    other = tiny_config(cfg.data_dir(), size=80)
    other.encoders.max_length = 16
    with pytest.raises(CacheError, match=r"encoders.text.tokenizer.max_length: the cache on disk has 32, this command has 16"):
        extract(other, path, progress=False)


def test_interrupted_then_resumed_equals_clean(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "data", size=60)
    clean = tmp_path / "clean.h5"
    extract(cfg, clean, progress=False)

    real = interrupt_on_call(monkeypatch, extract_mod, "encode_batch", 4)
    resumed = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, resumed, progress=False)
    with pytest.raises(CacheError, match="did not finish"):
        FeatureCache(resumed)
    with h5py.File(resumed) as f:
        written_before = sum(int((g["status"][()] == WRITTEN).sum()) for g in f["splits"].values())
    assert written_before == 3 * cfg.extract.batch_size
    monkeypatch.setattr(extract_mod, "encode_batch", real)
    s = extract(cfg, resumed, progress=False)
    assert s.status == "resumed" and s.samples_encoded == 60 - written_before
    _assert_same(_arrays(clean), _arrays(resumed))


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"id": "b", "text": "  ", "label": 0}, "empty text"),
        ({"id": "a", "text": "again", "label": 0}, "duplicate id"),
        ({"id": "b", "text": "fine", "label": 9}, "unknown label: label 9"),
        ({"id": "b", "text": "fine", "label": 0, "make_image": False}, "missing image"),
    ],
)
def test_bad_input_stops_naming_id_and_keeps_written_rows(tmp_path, bad, reason):
    rows = [{"id": "a", "text": "good day", "label": 0}] + [{"id": f"g{i}", "text": "ok", "label": 1} for i in range(8)] + [bad]
    cfg = _manifest(tmp_path, rows)
    out = tmp_path / "c.h5"
    with pytest.raises(ExtractionError, match=rf"'{bad['id']}'.*{reason}"):
        extract(cfg, out, progress=False)
    if reason == "missing image":
        # the first batch (8 rows) was written before the bad row's batch and is still there
        with h5py.File(out) as f:
            assert int((f["splits/train/status"][()] == WRITTEN).sum()) == 8


def test_undecodable_image_stops_naming_the_file(tmp_path):
    cfg = _manifest(tmp_path, [{"id": "a", "text": "x", "label": 0}, {"id": "b", "text": "y", "label": 1}])
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ExtractionError, match=r"'b'.*undecodable image: .*b.jpg"):
        extract(cfg, tmp_path / "c.h5", progress=False)


def test_skip_records_and_counts_every_bad_sample(tmp_path):
    rows = [
        {"id": "a", "text": "good", "label": 0},
        {"id": "b", "text": "", "label": 0},
        {"id": "a", "text": "dup", "label": 1},
        {"id": "c", "text": "x", "label": 5},
        {"id": "d", "text": "no picture", "label": 2, "make_image": False},
        {"id": "e", "text": "fine", "label": 2},
    ]
    cfg = _manifest(tmp_path, rows)
    (tmp_path / "imgs" / "e.jpg").write_bytes(b"garbage")
    out = tmp_path / "c.h5"
    s = extract(cfg, out, on_error="skip", progress=False)
    reasons = {(sid, r.split(":")[0].split(" (")[0]) for _, sid, r in s.skipped}
    assert reasons == {("b", "empty text"), ("a", "duplicate id"), ("c", "unknown label"), ("d", "missing image"), ("e", "undecodable image")}
    assert s.rows == {"train": 1}
    cache = FeatureCache(out)
    assert len(cache.skipped) == 5
    train = cache.load("train")
    assert [train.ids[r] for r in train.rows] == ["a"]


def test_unlabeled_split_is_extracted(tmp_path):
    from sppscl.stage1.synthetic import generate

    data = tmp_path / "data"
    generate(data, 30, seed=1, unlabeled_splits=("test",))
    cfg = tiny_config(data, size=30)
    cfg.dataset.format = "manifest"
    out = tmp_path / "c.h5"
    extract(cfg, out, progress=False)
    test = FeatureCache(out).load("test")
    assert len(test.rows) > 0 and not test.has_labels and (test.labels == -1).all()


def _label_sorted_manifest(tmp_path, counts: dict[str, list[int]]):
    """Splits sorted by label, as the published split files are: ``counts[split][c]`` rows of class c, in order."""
    from sppscl.stage1.synthetic import make_image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, per_class in counts.items():
        for label, n in enumerate(per_class):
            for _ in range(n):
                sid = f"{split}{len(rows)}"
                make_image(["positive", "neutral", "negative"][label], rng, size=32).save(tmp_path / "imgs" / f"{sid}.jpg")
                rows.append({"id": sid, "text": f"post {sid}", "image": f"imgs/{sid}.jpg", "label": label, "split": split})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path)
    cfg.dataset.format = "manifest"
    cfg.dataset.splits = {"all": "pairs.jsonl"}
    return cfg


def test_limit_per_split_is_stratified_seeded_and_keeps_file_order():
    from sppscl.stage1.extract import limit_per_split
    from sppscl.stage1.records import Sample

    # train sorted by label (60/30/10), dev sorted and unbalanced with a class of 1 row, test unlabelled
    samples = [Sample(f"t{i}", "x", None, 0 if i < 60 else 1 if i < 90 else 2, "train") for i in range(100)]
    samples += [Sample(f"d{i}", "x", None, 0 if i < 18 else 1 if i < 19 else 2, "dev") for i in range(20)]
    samples += [Sample(f"u{i}", "x", None, None, "test") for i in range(30)]
    kept = limit_per_split(samples, 10)
    by = {s: [x for x in kept if x.split == s] for s in ("train", "dev", "test")}
    assert {s: len(v) for s, v in by.items()} == {"train": 10, "dev": 10, "test": 10}
    # each class its share (60/30/10 of 10 -> 6/3/1); a one-row class still drawn
    assert [sum(x.label == c for x in by["train"]) for c in range(3)] == [6, 3, 1]
    assert {x.label for x in by["dev"]} == {0, 1, 2}
    # not the first rows: the first 10 of train are all class 0
    assert [x.id for x in by["train"]] != [f"t{i}" for i in range(10)]
    # file order kept, and the same rows every time (a resumed cache continues with its rows)
    index = {id(x): i for i, x in enumerate(samples)}
    assert [index[id(x)] for x in kept] == sorted(index[id(x)] for x in kept)
    assert [x.id for x in limit_per_split(samples, 10)] == [x.id for x in kept]
    assert [x.id for x in limit_per_split(samples, 10, seed=1)] != [x.id for x in kept]
    # a split no longer than the limit is kept whole; fewer slots than classes still gives exactly N rows
    assert len(limit_per_split(samples, 200)) == len(samples)
    assert sum(x.split == "train" for x in limit_per_split(samples, 2)) == 2


def test_extract_limit_on_label_sorted_files_gets_every_class_and_records_how(tmp_path, capsys):
    from sppscl.cli import main

    cfg = _label_sorted_manifest(tmp_path, {"train": [8, 8, 8], "dev": [4, 4, 4], "test": [9, 0, 0]})
    preset = tmp_path / "p.yaml"
    import yaml

    d = cfg.to_dict()
    d.pop("source")
    preset.write_text(yaml.safe_dump(d))
    out = tmp_path / "c.h5"
    assert main(["extract", "--config", str(preset), "--limit", "6", "--out", str(out), "--quiet"]) == 0
    cache = FeatureCache(out)
    for split in ("train", "dev"):
        labels = cache.load(split).labels.tolist()
        assert len(labels) == 6 and sorted(set(labels)) == [0, 1, 2], split
    prov = cache.provenance["dataset"]
    assert prov["limit_per_split"] == 6 and prov["limit_sampling"]["seed"] == 0
    captured = capsys.readouterr()
    # the test split is one class in the data itself: a warning on stderr naming the split, nothing on stdout
    assert "split 'test' holds one class only (positive, 6 rows)" in captured.err
    assert "one class" not in captured.out


# ------------------------------------------------------------------------------------ precision (issue 13)


@pytest.fixture(scope="module")
def bf16_cache(tiny_cache, tmp_path_factory):
    """The tiny cache's data extracted again with the encoders under bf16 autocast (CPU)."""
    _, cfg = tiny_cache
    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16.h5"
    extract(cfg, out, progress=False, precision="bf16")
    return out


def test_precision_is_recorded_and_caches_of_different_precision_are_never_mixed(tiny_cache, bf16_cache):
    path, cfg = tiny_cache
    assert FeatureCache(path).provenance["precision"] == "fp32"
    assert FeatureCache(bf16_cache).provenance["precision"] == "bf16"
    with pytest.raises(CacheError, match=r"precision: the cache on disk has 'bf16', this command has 'fp32'"):
        extract(cfg, bf16_cache, progress=False)
    with pytest.raises(CacheError, match=r"precision: the cache on disk has 'fp32', this command has 'bf16'"):
        extract(cfg, path, progress=False, precision="bf16")


def test_a_partial_cache_is_not_resumed_in_another_precision(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "data", size=40)
    out = tmp_path / "c.h5"
    real = extract_mod.CacheFiller.write
    calls = {"n": 0}

    def crash_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(extract_mod.CacheFiller, "write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, out, progress=False, precision="bf16")
    monkeypatch.setattr(extract_mod.CacheFiller, "write", real)
    with pytest.raises(CacheError, match=r"precision: the cache on disk has 'bf16', this command has 'fp32'"):
        extract(cfg, out, progress=False)
    assert extract(cfg, out, progress=False, precision="bf16").status == "resumed"


def test_bf16_features_are_fp32_features_to_bf16_rounding(tiny_cache, bf16_cache):
    a, b = FeatureCache(tiny_cache[0]).load("dev"), FeatureCache(bf16_cache).load("dev")
    np.testing.assert_array_equal(a.offsets, b.offsets)
    for x, y in ((a.image, b.image), (a.tokens, b.tokens)):
        x, y = x.astype(np.float32), y.astype(np.float32)
        assert not np.array_equal(x, y)  # the encoders really ran in bf16
        # bf16 keeps 8 significant bits: a few ulps through a handful of layers, relative to each tensor's scale
        assert np.abs(x - y).max() <= 0.05 * np.abs(x).max()


def test_caches_from_before_the_precision_option_read_as_fp32(tiny_cache, tmp_path):
    import shutil

    path, cfg = tiny_cache
    old = tmp_path / "old.h5"
    shutil.copy(path, old)
    with h5py.File(old, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        del prov["precision"]
        f.attrs["provenance"] = json.dumps(prov, sort_keys=True)
    assert extract(cfg, old, progress=False).status == "up-to-date"
    with pytest.raises(CacheError, match=r"precision: the cache on disk has 'fp32', this command has 'bf16'"):
        extract(cfg, old, progress=False, precision="bf16")


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path):
    cfg = tiny_config(tmp_path / "data", size=20)
    with pytest.raises(ExtractionError, match=r"fp16 on the CPU.*use fp32, or bf16"):
        extract(cfg, tmp_path / "c.h5", progress=False, precision="fp16", device="cpu")
    assert not (tmp_path / "c.h5").exists()


def test_unknown_precision_is_one_clear_error(tmp_path, capsys):
    from sppscl.cli import main

    code = main(["extract", "--config", "demo", "--data-dir", str(tmp_path), "--precision", "fp8", "--out", str(tmp_path / "c.h5")])
    assert code == 2
    assert "extract.precision='fp8' is not one of fp32, bf16, fp16" in capsys.readouterr().err


def test_decoding_workers(monkeypatch):
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert extract_mod.decoding_workers(3, cuda) == 3 and extract_mod.decoding_workers(0, cpu) == 0
    # on CPU, auto: none on 2 cores or fewer (workers would take the encoders' cores), else 2
    for cores, expected in ((1, 0), (2, 0), (3, 2), (16, 2)):
        monkeypatch.setattr(extract_mod.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert extract_mod.decoding_workers(-1, cpu) == expected
    # on CUDA, auto: every core but one, at least one, at most MAX_AUTO_WORKERS (8)
    for cores, expected in ((1, 1), (2, 1), (5, 4), (16, 8), (64, 8)):
        monkeypatch.setattr(extract_mod.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert extract_mod.decoding_workers(-1, cuda) == expected
