"""Records are true: a run names the encoders, precision and data folder of the cache it used, never the preset's;
a cross-validation fold's checkpoint is not scored on the rows that trained or selected it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from sppscl.cli import main
from sppscl.stage2 import train as train_mod
from sppscl.stage2.loggers import flat_params


@pytest.fixture(scope="module")
def fold_run(tiny_cache, tmp_path_factory):
    """Fold 0 of 3, trained through the CLI with a preset that names no encoders: its defaults (resnet50 +
    bert-base-uncased, fp32, cache/demo-data) are what a run on the tiny-cnn + tiny-bert cache used to record in
    config.json and the tracker's hyperparameters. Returns (cache, run, the tracker's hyperparameters)."""
    path, cfg = tiny_cache
    root = tmp_path_factory.mktemp("fold")
    preset = root / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": dict(cfg.train.__dict__)}))
    tracked = []
    real = train_mod.make_logger
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_logger", lambda c, d: tracked.append(flat_params(c)) or real(c, d))
        argv = ["train", "--cache", str(path), "--config", str(preset), "--set", "epochs=1", "--set", "cv_folds=3", "--set", "cv_fold=0"]
        assert main([*argv, "--out", str(root / "f0"), "--quiet"]) == 0
    return path, root / "f0", tracked


def test_a_run_records_the_cache_it_used_not_the_preset(fold_run):
    path, run, tracked = fold_run
    data_dir = str((path.parent / "data").resolve())
    stored = json.loads((run / "config.json").read_text())
    assert stored["encoders"] == {"image": "tiny-cnn", "text": "tiny-bert", "max_length": 32, "layers": 4}
    assert stored["dataset"]["name"] == "tiny" and stored["dataset"]["format"] == "synthetic"
    assert stored["dataset"]["data_dir"] == data_dir
    assert stored["extract"]["precision"] == "fp32" and stored["extract"]["dtype"] == "float16"
    (params,) = tracked
    assert params["encoders.image"] == "tiny-cnn" and params["encoders.text"] == "tiny-bert"
    assert params["dataset.data_dir"] == data_dir and params["extract.precision"] == "fp32"
    record = json.loads((run / "results.json").read_text())["cache"]
    assert record["path"] == str(path.resolve()) and record["data_dir"] == data_dir
    assert (record["image_encoder"], record["text_encoder"], record["precision"]) == ("tiny-cnn", "tiny-bert", "fp32")


@pytest.mark.parametrize("split", ["train", "dev"])
def test_a_cv_fold_checkpoint_is_refused_on_its_own_caches_train_and_dev(fold_run, capsys, split, tmp_path):
    path, run, _ = fold_run
    for argv in (["evaluate"], ["analyze", "--out", str(tmp_path / "a")]):
        assert main([*argv, "--checkpoint", str(run), "--cache", str(path), "--split", split]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"trained on cross-validation fold 0 of 3 of this cache's train+dev rows, so about 67% of {path}:{split}" in err, err
        assert "--split test" in err and f"sppscl ensemble {run / 'best.safetensors'} --cache {path}" in err
    assert not (tmp_path / "a").exists()


def test_a_cv_fold_checkpoint_is_scored_on_test_and_on_its_held_out_fold(fold_run, capsys, tmp_path):
    path, run, _ = fold_run
    assert main(["evaluate", "--checkpoint", str(run), "--cache", str(path), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"]["n"] > 0
    # the way the refusal points to: the fold view scores the held-out fold (none of its rows trained the model)
    assert main(["ensemble", str(run), "--cache", str(path), "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["cv"]["fold"] == 0 and res["cv"]["folds"] == 3
    fold_test = {r["id"] for r in _csv(tmp_path / "e" / "predictions-test.csv")}
    fold_train = {r["id"] for r in _csv(run / "predictions-train.csv")} | {r["id"] for r in _csv(run / "predictions-dev.csv")}
    assert fold_test and not fold_test & fold_train


def _csv(path: Path):
    with open(path) as fh:
        return list(csv.DictReader(fh))
