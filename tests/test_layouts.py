"""The public releases' folder layouts, recognised by the presets (``dataset.format: auto``) with no YAML editing.

Each layout is a small fixture tree built here the way the release (or CLMLF's README) lays it out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import load_config
from sppscl.stage1.adapters import DataError, load_samples
from sppscl.stage1.layouts import resolve_dataset

TINY = ["--image-encoder", "tiny-cnn", "--text-encoder", "tiny-bert", "--set", "encoders.max_length=32"]


def write_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")


def write_images(folder: Path, ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ids):
        Image.new("RGB", (16, 12), (40 * i % 256, 90, 160)).save(folder / f"{sid}.jpg")


def clmlf_repo(root: Path) -> Path:
    """The CLMLF repository: dataset/data/MVSA-single/10-flod-1/*.json, images in dataset_image/ (CLMLF's README)."""
    folder = root / "dataset" / "data" / "MVSA-single"
    fold = folder / "10-flod-1"
    write_json(fold / "train.json", [{"id": str(i), "text": f"tweet {i}", "emotion_label": i % 3} for i in range(1, 7)])
    write_json(fold / "dev.json", [{"id": "7", "text": "tweet 7", "emotion_label": 1}, {"id": "8", "text": "t 8", "emotion_label": 2}])
    write_json(fold / "test.json", [{"id": "9", "text": "tweet 9", "emotion_label": 0}, {"id": "10", "text": "t 10", "emotion_label": 0}])
    # CLMLF also ships a translation file beside the fold; it must not confuse the detection
    write_json(folder / "MVSA-single_translation.json", [])
    write_images(folder / "dataset_image", range(1, 11))
    return folder


def clmlf_hfm(root: Path) -> Path:
    """CLMLF's HFM: train/valid/test.json in dataset/data/HFM, images in dataset_image/."""
    folder = root / "HFM"
    write_json(folder / "train.json", [{"id": f"9{i}", "text": f"post {i}", "emotion_label": i % 2} for i in range(4)])
    write_json(folder / "valid.json", [{"id": "80", "text": "post a", "emotion_label": 1}])
    write_json(folder / "test.json", [{"id": "81", "text": "post b", "emotion_label": 0}])
    write_images(folder / "dataset_image", ["90", "91", "92", "93", "80", "81"])
    return folder


def hfm_release(root: Path) -> Path:
    """HFM's own release: text/train.txt ([id, text, label]), valid2/test2 ([id, text, hashtag label, label])."""
    folder = root / "hfm-release"
    (folder / "text").mkdir(parents=True)
    (folder / "text" / "train.txt").write_text(
        "['101', 'what a lovely monday', 1]\n['102', 'my cat sleeps', 0]\n['103', 'this is a joke right', 1]\n"
    )
    (folder / "text" / "valid2.txt").write_text("['201', 'great, rain again', 1, 1]\n")
    (folder / "text" / "test2.txt").write_text("['301', 'sunny day', 0, 0]\n")
    write_images(folder / "dataset_image", ["101", "102", "103", "201", "301"])
    return folder


def mvsa_release(root: Path) -> Path:
    """The raw MVSA-Single release: data/<id>.jpg and data/<id>.txt, labelResultAll.txt (text,image per line)."""
    folder = root / "MVSA_Single"
    labels = {str(i): pair for i, pair in enumerate(
        ["positive,positive", "neutral,negative", "positive,negative", "negative,negative", "neutral,neutral",
         "positive,neutral", "negative,neutral", "neutral,positive", "positive,positive", "negative,negative"], start=1)}
    folder.mkdir(parents=True)
    (folder / "labelResultAll.txt").write_text("ID\ttext,image\n" + "".join(f"{i}\t{p}\n" for i, p in labels.items()))
    write_images(folder / "data", labels)
    for sid in labels:
        (folder / "data" / f"{sid}.txt").write_text(f"raw tweet {sid}")
    return folder


def test_clmlf_repository_layout_by_dataset_folder_and_by_repository_root(tmp_path):
    folder = clmlf_repo(tmp_path / "CLMLF")
    cfg = load_config("mvsa-single")
    for given in (folder, tmp_path / "CLMLF"):
        resolved, root, note = resolve_dataset(cfg, given)
        assert root == folder
        assert resolved.dataset.format == "clmlf" and resolved.dataset.image_dir == "dataset_image"
        assert resolved.dataset.splits == {"train": "10-flod-1/train.json", "dev": "10-flod-1/dev.json", "test": "10-flod-1/test.json"}
        assert "10-flod-1" in note and "dataset_image" in note
    report = load_samples(cfg, tmp_path / "CLMLF")
    assert report.split_counts() == {"train": 6, "dev": 2, "test": 2}
    assert all(s.image == folder / "dataset_image" / f"{s.id}.jpg" and s.image.is_file() for s in report.samples)
    assert "CLMLF split files" in report.notes[0]


def test_clmlf_hfm_valid_json_is_the_dev_split(tmp_path):
    folder = clmlf_hfm(tmp_path)
    report = load_samples(load_config("hfm"), folder)
    assert report.split_counts() == {"train": 4, "dev": 1, "test": 1}
    assert {s.id for s in report.samples if s.split == "dev"} == {"80"}


def test_hfm_release_with_its_keyword_filter(tmp_path):
    folder = hfm_release(tmp_path)
    resolved, _, note = resolve_dataset(load_config("hfm"), folder)
    assert resolved.dataset.format == "hfm-raw"
    assert resolved.dataset.splits == {"train": "text/train.txt", "dev": "text/valid2.txt", "test": "text/test2.txt"}
    report = load_samples(load_config("hfm"), folder)
    # "joke" is one of the standard filter's keywords: 103 is dropped, and counted
    assert report.split_counts() == {"train": 2, "dev": 1, "test": 1}
    assert sum(len(ids) for ids in report.dropped.values()) == 1
    assert all(s.image.parent == folder / "dataset_image" for s in report.samples)


def test_raw_mvsa_release_cleaned_and_split(tmp_path):
    folder = mvsa_release(tmp_path)
    report = load_samples(load_config("mvsa-single"), tmp_path)  # found by its folder name MVSA_Single
    assert "raw MVSA release" in report.notes[0]
    # 3 is positive vs negative: dropped by the cleaning rule; the other 9 are split 8:1:1
    assert sum(report.split_counts().values()) == 9
    assert [ids for ids in report.dropped.values()] == [["3"]]
    assert all(s.image == folder / "data" / f"{s.id}.jpg" and s.text == f"raw tweet {s.id}" for s in report.samples)


def test_clmlf_split_files_with_the_raw_release_images(tmp_path):
    """CLMLF's JSON copied into the raw MVSA folder: the standard split, images read from data/."""
    folder = mvsa_release(tmp_path)
    write_json(folder / "10-flod-1" / "train.json", [{"id": "1", "text": "x", "emotion_label": 0}])
    resolved, _, _ = resolve_dataset(load_config("mvsa-single"), folder)
    assert (resolved.dataset.format, resolved.dataset.image_dir) == ("clmlf", "data")


def test_unknown_layout_and_missing_images_say_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"(?s)no known layout.*train\.json.*text/train\.txt.*labelResultAll\.txt") as caught:
        load_samples(load_config("hfm"), tmp_path / "empty")
    assert str(tmp_path / "empty") in str(caught.value)
    write_json(tmp_path / "noimg" / "train.json", [{"id": "1", "text": "x", "emotion_label": 0}])
    with pytest.raises(DataError, match="(?s)no image folder.*dataset_image"):
        load_samples(load_config("hfm"), tmp_path / "noimg")
    fold = clmlf_repo(tmp_path / "CLMLF") / "10-flod-1"
    with pytest.raises(DataError, match="CLMLF's split folder; pass the dataset folder above it"):
        load_samples(load_config("mvsa-single"), fold)
    with pytest.raises(DataError, match="(?s)does not exist.*--data-dir"):
        load_samples(load_config("hfm"), tmp_path / "nowhere")


def test_explicit_splits_need_an_explicit_format(tmp_path):
    clmlf_hfm(tmp_path)
    cfg = load_config("hfm", ["dataset.splits={'train': 'train.json'}"])
    with pytest.raises(DataError, match="dataset.splits is set but dataset.format is auto"):
        load_samples(cfg, tmp_path / "HFM")
    cfg = load_config("hfm", ["dataset.format=clmlf", "dataset.splits={'train': 'train.json'}", "dataset.image_dir=dataset_image"])
    assert load_samples(cfg, tmp_path / "HFM").split_counts() == {"train": 4}


def test_verify_and_extract_from_another_directory_with_a_relative_data_dir(tmp_path, monkeypatch, capsys):
    clmlf_repo(tmp_path / "downloads" / "CLMLF")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel = "../downloads/CLMLF/dataset/data/MVSA-single"

    assert main(["data", "verify", "--config", "mvsa-single", "--data-dir", rel, "--set", "encoders.max_length=32"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out

    code = main(["extract", "--config", "mvsa-single", "--data-dir", rel, "--out", "c.h5", "--device", "cpu",
                 "--workers", "0", "--quiet", *TINY])
    assert code == 0
    cache = FeatureCache(work / "c.h5")
    assert {s: len(cache.load(s).rows) for s in ("train", "dev", "test")} == {"train": 6, "dev": 2, "test": 2}
    assert cache.provenance["dataset"]["format"] == "clmlf"
    assert set(cache.provenance["dataset"]["split_files_sha256"]) == {"train", "dev", "test"}

    # the preset's own default is data/<dataset> under the current directory
    assert main(["data", "verify", "--config", "mvsa-single"]) == 2
    assert str(work / "data" / "mvsa-single") in capsys.readouterr().err


def test_extract_names_the_download_rule_and_the_flag_sets_it(tmp_path, monkeypatch, capsys):
    """Without --allow-download a missing Hugging Face model is an error naming the flag; with it, downloads are
    allowed (here HF_HUB_OFFLINE, which the test suite sets, still forbids the hub and says so)."""
    monkeypatch.delenv("SPPSCL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = clmlf_hfm(tmp_path)
    args = ["extract", "--config", "hfm", "--data-dir", str(folder), "--out", str(tmp_path / "c.h5"), "--device", "cpu",
            "--quiet", "--image-encoder", "tiny-cnn", "--text-encoder", "sppscl-tests/no-such-model"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "downloads are not allowed" in err and "--allow-download" in err and "SPPSCL_ALLOW_DOWNLOAD=1" in err
    assert main([*args, "--allow-download"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert "SPPSCL_ALLOW_DOWNLOAD" not in os.environ
