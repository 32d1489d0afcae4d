"""The Python API (issue 18): docs/api.md run as written, the run folder as one object, run folders wherever a
checkpoint goes (--which), the baselines beside dev accuracy, and the model card."""

from __future__ import annotations

import csv
import doctest
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import sppscl
from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.cli.console import print_results
from sppscl.stage2.baselines import baselines, find_probe, probe_record_path
from sppscl.stage2.predict import Predictor, read_pairs
from sppscl.stage2.runs import RunError, RunFolder, load_checkpoint
from sppscl.stage2.train import train

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "api.md"


def _tiny_demo(path: Path) -> Path:
    """The demo preset with the tiny random encoders and 60 samples: the doc's one substitution."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["encoders"].update(image="tiny-cnn", text="tiny-bert", max_length=32)
    raw["dataset"]["synthetic_size"] = 60
    raw["extract"] = {**(raw.get("extract") or {}), "batch_size": 8, "num_workers": 0, "device": "cpu"}
    raw["train"].update(device="cpu")
    path.write_text(yaml.safe_dump(raw))
    return path


def test_api_doc_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/api.md in one folder: the opening block (quoted by README; two of the demo's images for its file names),
    then the session's examples as doctests."""
    monkeypatch.chdir(tmp_path)
    original = DOC.read_text()
    text = original.replace('sppscl.extract("demo"', f'sppscl.extract("{_tiny_demo(tmp_path / "tiny-demo.yaml")}"')
    assert text.count("tiny-demo.yaml") == 2
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    block = block.replace('"photo.jpg"', '"cache/demo-data/images/syn00001.jpg"').replace('"cat.png"', '"cache/demo-data/images/syn00002.jpg"')
    block = block.replace('sppscl.train("cache/demo.h5", "runs/demo")', 'sppscl.train("cache/demo.h5", "runs/demo", overrides=["epochs=3"])')
    assert block.count("syn0000") == 2 and block.count("epochs=3") == 1
    exec(compile(block, str(DOC), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    pred, probs = printed[0].split(" ", 1)
    assert pred in ("positive", "neutral", "negative") and set(eval(probs)) == {"positive", "neutral", "negative"}
    assert printed[1].startswith("['positive', 'neutral', 'negative'] ") and printed[1].endswith(" tiny-bert")

    test = doctest.DocTestParser().get_doctest(text, {}, "docs/api.md", str(DOC), 0)
    assert len(test.examples) >= 30
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, "docs/api.md: see the failing examples above"


def test_import_is_cheap_and_names_resolve():
    code = "import sys, sppscl; assert 'torch' not in sys.modules, 'torch'; print(sorted(set(sppscl.__all__) - set(dir(sppscl))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    for name in sppscl.__all__:
        assert getattr(sppscl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sppscl.nope  # noqa: B018


# ------------------------------------------------------------------------------------ one run, shared


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    path, cfg = tiny_cache
    out = tmp_path_factory.mktemp("api") / "run"
    train(path, apply_overrides(cfg, ["epochs=3"]), out, progress=False)
    return path, out


def test_run_folder_reads_what_train_wrote(run):
    cache, out = run
    r = RunFolder(out)
    assert r.config.train.epochs == 3 and len(r.metrics) == 3 and [m["epoch"] for m in r.metrics] == [1, 2, 3]
    assert r.results == json.loads((out / "results.json").read_text())
    assert r.checkpoint() == out / "best.safetensors" and r.checkpoint("last") == out / "last.safetensors"
    rows = r.predictions("dev")
    with open(out / "predictions-dev.csv", newline="") as fh:
        assert rows == list(csv.DictReader(fh))
    assert len(rows) == r.results["splits"]["dev"]["n"]
    with pytest.raises(RunError, match=r"no predictions for split 'nope' in this run \(it has: dev, test, train\)"):
        r.predictions("nope")
    with pytest.raises(RunError, match="'middle' is not one of best, last"):
        r.checkpoint("middle")


def test_run_folder_errors_name_the_file(tmp_path):
    with pytest.raises(RunError, match="no such run folder"):
        RunFolder(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    r = RunFolder(tmp_path)
    with pytest.raises(RunError, match=r"config.json: damaged the run's configuration \(not JSON"):
        r.config
    with pytest.raises(RunError, match="without a best checkpoint"):
        r.checkpoint()
    assert r.results is None and r.metrics == []


def test_which_last_on_evaluate_predict_ensemble_and_load(run, tiny_cache, tmp_path, capsys):
    cache, out = run
    last = load_checkpoint(out / "last.safetensors")
    # a run where best != last makes the two choices distinguishable
    assert last["epoch"] == 3
    for which, file in (("best", "best.safetensors"), ("last", "last.safetensors")):
        assert main(["evaluate", "--checkpoint", str(out), "--cache", str(cache), "--split", "dev", "--which", which, "--json", "--device", "cpu"]) == 0
        by_folder = json.loads(capsys.readouterr().out)
        assert main(["evaluate", "--checkpoint", str(out / file), "--cache", str(cache), "--split", "dev", "--json", "--device", "cpu"]) == 0
        by_file = json.loads(capsys.readouterr().out)
        assert by_folder == by_file and by_folder["checkpoint"] == str(out / file)
    from sppscl.stage2.ensemble import ensemble

    alone = ensemble([out], cache, tmp_path / "ens", "cpu", which="last")
    ev = sppscl.evaluate(out, cache, "dev", which="last", device="cpu")
    keys = ("n", "accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix")
    assert {k: alone["splits"]["dev"][k] for k in keys} == {k: ev["splits"]["dev"][k] for k in keys}
    assert alone["members"] == [str(out / "last.safetensors")]
    assert "each member's last checkpoint" in alone["how"]
    m = sppscl.load(out, which="last", device="cpu")
    assert m.checkpoint == out / "last.safetensors" and m.epoch == 3 and m.run.path == out and m.which == "last"
    assert m.metrics == {"dev": {k: last["record"][f"dev_{k}"] for k in ("accuracy", "weighted_f1", "macro_f1")}}
    preds = tmp_path / "last.jsonl"
    dev = tiny_cache[1].data_dir() / "dev.jsonl"
    assert main(["predict", "--checkpoint", str(out), "--which", "last", "--input", str(dev), "--out", str(preds), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    want = Predictor(out / "last.safetensors", "cpu").predict(read_pairs(dev))
    assert [json.loads(x)["probabilities"] for x in preds.read_text().splitlines()] == [p.probs for p in want]
    assert main(["evaluate", "--checkpoint", str(out), "--cache", str(cache), "--which", "first"]) == 2
    assert "'first' is not one of best, last" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ baselines and the card


def test_majority_class_and_probe_beside_dev_accuracy(run, tmp_path, capsys):
    cache_src, out = run
    fc = FeatureCache(cache_src)
    train_y = fc.load("train").labels[fc.load("train").rows]
    dev_y = fc.load("dev").labels[fc.load("dev").rows]
    k = int(np.bincount(train_y).argmax())
    res = RunFolder(out).results
    maj = res["baselines"]["majority_class"]
    assert maj["class"] == fc.classes[k] and maj["dev_accuracy"] == pytest.approx(float(np.mean(dev_y == k)))
    assert maj["train_share"] == pytest.approx(float(np.mean(train_y == k)))
    print_results(res)  # what `sppscl train` prints after its table
    printed = capsys.readouterr().out
    assert f"reference: majority class ({fc.classes[k]}, the train split's most frequent) on dev: accuracy {maj['dev_accuracy']:.4f}" in printed
    assert f"on dev: accuracy {maj['dev_accuracy']:.4f}" in RunFolder(out).model_card.read_text()

    # a cache of its own for the probe's record beside it, so no other test sees one
    cache = tmp_path / "tiny.h5"
    cache.write_bytes(Path(cache_src).read_bytes())
    assert "probe" not in baselines(FeatureCache(cache), train_y, dev_y, fc.classes)
    assert main(["probe", "--cache", str(cache)]) == 0
    assert f"recorded beside the cache for `sppscl train`: {probe_record_path(cache)}" in capsys.readouterr().err
    record = json.loads(probe_record_path(cache).read_text())
    res["baselines"] = baselines(FeatureCache(cache), train_y, dev_y, fc.classes)
    assert res["baselines"]["probe"] == {"dev_accuracy": record["splits"]["dev"]["accuracy"], "C": record["C"], "path": str(probe_record_path(cache))}
    print_results(res)
    assert f"logistic-regression probe on the same cache ({probe_record_path(cache)}, C={record['C']}) on dev" in capsys.readouterr().out

    # a record of another cache at this path (another digest) is not this cache's probe
    probe_record_path(cache).write_text(json.dumps({**record, "cache_provenance_sha256": "0" * 64}))
    assert find_probe(FeatureCache(cache)) is None


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_card_of_a_run(run):
    cache, out = run
    r = RunFolder(out)
    card = r.model_card.read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "sppscl" and meta["datasets"] == ["tiny"]
    (index,) = meta["model-index"]
    by_split = {x["dataset"]["split"]: {m["name"]: m["value"] for m in x["metrics"]} for x in index["results"]}
    assert set(by_split) == {"train", "dev", "test"}
    for split, m in r.results["splits"].items():
        assert by_split[split][f"{split} accuracy"] == round(m["accuracy"], 4)
        assert by_split[split][f"{split} macro F1"] == round(m["macro_f1"], 4)
    for section in ("## What it predicts", "## Training data", "### Encoders", "## Configuration", "## Metrics", "## Intended use and limits", "## Citation"):
        assert section in card
    assert f"the checkpoint of epoch {r.results['best_epoch']} (`best.safetensors`)" in card
    assert "`tiny-cnn`" in card and "`tiny-bert`" in card and "@inproceedings{wu2026sppscl" in card
    assert f"| dev | {r.results['splits']['dev']['n']} | {r.results['splits']['dev']['accuracy']:.4f} |" in card


def test_model_card_of_an_ensemble(run, tmp_path):
    from sppscl.stage2.ensemble import ensemble

    cache, out = run
    res = ensemble([out, out / "last.safetensors"], cache, tmp_path / "ens", "cpu")
    card = (tmp_path / "ens" / "README.md").read_text()
    meta = _front_matter(card)
    dev = {m["name"]: m["value"] for x in meta["model-index"][0]["results"] if x["dataset"]["split"] == "dev" for m in x["metrics"]}
    assert dev["dev accuracy"] == round(res["splits"]["dev"]["accuracy"], 4)
    assert "an ensemble of 2 SPP-SCL runs" in card and f"--checkpoint {out / 'best.safetensors'} --checkpoint {out / 'last.safetensors'}" in card


def test_load_a_checkpoint_outside_its_run_folder(run, tmp_path):
    """A copied checkpoint file has no run folder: its metrics are the dev metrics it carries for its epoch."""
    _, out = run
    lone = tmp_path / "model.safetensors"
    lone.write_bytes((out / "best.safetensors").read_bytes())
    m = sppscl.load(lone, device="cpu")
    best = load_checkpoint(out / "best.safetensors")
    assert m.run is None and m.checkpoint == lone and m.which is None
    assert m.metrics == {"dev": best["best"]["dev"]} and m.epoch == best["epoch"]
    assert sppscl.load(out, device="cpu").metrics == RunFolder(out).results["splits"]
