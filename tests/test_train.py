"""Stage two end to end from a tiny cache: the CLI, run directory, determinism, resume, edge cases."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import interrupt_on_call, tiny_config
from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.stage1.extract import extract
from sppscl.stage2.data import SplitBatches
from sppscl.stage2.runs import RunError, load_checkpoint
from sppscl.stage2.train import train


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_one_epoch_through_the_cli(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    run = tmp_path / "run"
    preset = tmp_path / "p.yaml"
    import yaml

    preset.write_text(yaml.safe_dump({"train": {k: v for k, v in cfg.train.__dict__.items()}}))
    code = main(["train", "--cache", str(path), "--config", str(preset), "--set", "epochs=1", "--out", str(run), "--quiet"])
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "results.json", "predictions-test.csv"):
        assert (run / name).exists(), name
    (line,) = _lines(run / "metrics.jsonl")
    for key in ("loss_lambda_ce", "loss_intra_image", "loss_intra_text", "loss_inter", "step2_fired", "dev_accuracy", "lr", "epoch_seconds"):
        assert key in line
    assert 0.0 <= line["step2_fired"] <= 1.0
    res = json.loads((run / "results.json").read_text())
    assert {"train", "dev", "test"} <= set(res["splits"])
    assert set(res["splits"]["dev"]) >= {"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix"}
    ckpt = load_checkpoint(run / "best.safetensors")
    assert ckpt["config"]["train"]["epochs"] == 1 and ckpt["cache_provenance"] == FeatureCache(path).provenance
    # a second run into the same directory is refused
    assert main(["train", "--cache", str(path), "--config", str(preset), "--out", str(run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_unknown_set_key_is_an_error(tiny_cache, tmp_path, capsys):
    path, _ = tiny_cache
    assert main(["train", "--cache", str(path), "--set", "learning_rate=1", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err


def test_same_seed_same_numbers(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    a = train(path, cfg, tmp_path / "a", progress=False)
    b = train(path, cfg, tmp_path / "b", progress=False)
    ma, mb = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(tmp_path / "b" / "metrics.jsonl")
    for x, y in zip(ma, mb):
        x.pop("epoch_seconds"), y.pop("epoch_seconds")
        assert x == y
    assert a == b
    c = train(path, apply_overrides(cfg, ["seed=1"]), tmp_path / "c", progress=False)
    assert _lines(tmp_path / "c" / "metrics.jsonl")[0]["loss_total"] != ma[0]["loss_total"]


def test_resume_equals_uninterrupted(tiny_cache, tmp_path, monkeypatch):
    path, cfg = tiny_cache
    cfg = apply_overrides(cfg, ["epochs=4"])
    full = train(path, cfg, tmp_path / "full", progress=False)

    from sppscl.stage2 import train as train_mod

    real = interrupt_on_call(monkeypatch, train_mod, "evaluate_split", 3)  # a crash in epoch three
    with pytest.raises(KeyboardInterrupt):
        train(path, cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_mod, "evaluate_split", real)
    assert len(_lines(tmp_path / "resumed" / "metrics.jsonl")) == 2
    resumed = train(path, cfg, tmp_path / "resumed", resume=True, progress=False)
    a, b = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "resumed" / "metrics.jsonl")
    assert len(b) == 4
    for x, y in zip(a, b):
        x.pop("epoch_seconds"), y.pop("epoch_seconds")
        assert x == y
    assert full == resumed
    sa = load_checkpoint(tmp_path / "full" / "last.safetensors")["model"]
    sb = load_checkpoint(tmp_path / "resumed" / "last.safetensors")["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "overrides",
    [
        ["update=one-step"],
        ["use_inter=false"],
        ["use_intra=false"],
        ["fusion=sample"],
        ["fusion=concat"],
        ["ha_layers=1"],
        ["gate=cosine", "alpha=1"],
        ["supcon_self_term=true", "inter_symmetric=true"],
        ["modalities=text"],
        ["modalities=image"],
    ],
)
def test_every_variant_trains_without_nan(tiny_cache, tmp_path, overrides):
    path, cfg = tiny_cache
    train(path, apply_overrides(cfg, ["epochs=1", *overrides]), tmp_path / "r", progress=False)
    (line,) = _lines(tmp_path / "r" / "metrics.jsonl")
    assert all(np.isfinite(v) for k, v in line.items() if isinstance(v, float)), line
    if "use_inter=false" in overrides or "modalities=text" in overrides or "update=one-step" in overrides:
        assert line["step2_fired"] == 0.0
    if "use_intra=false" in overrides:
        assert line["loss_intra_image"] == 0.0 and line["loss_intra_text"] == 0.0


def test_last_batch_of_one_joins_the_previous(tiny_cache):
    path, _ = tiny_cache
    split = FeatureCache(path).load("train")
    n = len(split.rows)
    bs = n - 1  # leaves exactly one sample over
    sizes = [len(b.rows) for b in SplitBatches(split).train_batches(bs, np.random.default_rng(0))]
    assert sizes == [n]
    sizes = [len(b.rows) for b in SplitBatches(split).train_batches(8, np.random.default_rng(0))]
    assert sum(sizes) == n and min(sizes) >= 2


def test_batches_have_no_positive_anchors_and_single_class(tmp_path):
    """Batches of 2 with distinct labels (no anchor has a positive) and a dev split of one class must not produce NaN."""
    from sppscl.stage1.synthetic import generate

    data = tmp_path / "data"
    generate(data, 40, seed=3)
    # keep one class only in dev
    lines = [ln for ln in (data / "dev.jsonl").read_text().splitlines() if json.loads(ln).get("label") == 0]
    (data / "dev.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(data, size=40, batch_size=2, epochs=1)
    cfg.dataset.format = "manifest"
    extract(cfg, tmp_path / "c.h5", progress=False)
    res = train(tmp_path / "c.h5", cfg, tmp_path / "r", progress=False)
    (line,) = _lines(tmp_path / "r" / "metrics.jsonl")
    assert all(np.isfinite(v) for v in line.values() if isinstance(v, float))
    assert res["splits"]["dev"]["n"] == len(lines)


def test_cache_from_another_encoder_pair_trains(tmp_path):
    """Head dimensions come from the cache: a cache of other widths and layer counts just works."""
    cfg = tiny_config(tmp_path / "data", size=40, epochs=1)
    cfg.encoders.layers = 2
    cfg = apply_overrides(cfg, ["ha_layers=2"])
    extract(cfg, tmp_path / "c.h5", progress=False)
    assert FeatureCache(tmp_path / "c.h5").layers == 2
    train(tmp_path / "c.h5", cfg, tmp_path / "r", progress=False)
    with pytest.raises(Exception, match="ha_layers"):
        train(tmp_path / "c.h5", apply_overrides(cfg, ["encoders.layers=4", "ha_layers=4"]), tmp_path / "r2", progress=False)


def test_evaluate_matches_results_and_refuses_other_encoders(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    res = train(path, cfg, tmp_path / "r", progress=False)
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.safetensors"), "--cache", str(path), "--split", "dev", "--out", str(ev)]) == 0
    out = capsys.readouterr().out
    assert f"{res['splits']['dev']['accuracy']:.4f}" in out
    # the saved results hold every metric of train's results.json for that split, per class and the confusion matrix
    saved = json.loads((ev / "results.json").read_text())
    ci = saved["splits"]["dev"].pop("ci95")
    method = saved["splits"]["dev"].pop("ci95_method")
    assert saved["splits"]["dev"] == res["splits"]["dev"] and saved["classes"] == res["classes"]
    assert (ev / "confusion-dev.png").stat().st_size > 0
    with open(ev / "predictions-dev.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == res["splits"]["dev"]["n"]
    # label is the true class and pred the predicted one, both by name, as in predict's output
    split = FeatureCache(path).load("dev")
    assert [r["label"] for r in rows] == [res["classes"][k] for k in split.labels[split.rows]]
    assert {r["pred"] for r in rows} <= set(res["classes"])
    acc = np.mean([r["label"] == r["pred"] for r in rows])
    assert acc == pytest.approx(res["splits"]["dev"]["accuracy"])
    # with its 95% interval: the bootstrap over the rows it scored, recipe named in results.json and the caption
    from sppscl.stage2.stats import bootstrap_interval

    want = bootstrap_interval(np.array([res["classes"].index(r["label"]) for r in rows]), np.array([res["classes"].index(r["pred"]) for r in rows]), len(res["classes"]))
    assert ci == {m: pytest.approx(list(want[m])) for m in want} and "2000 resamples" in method
    assert f"{res['splits']['dev']['accuracy']:.4f} [{want['accuracy'][0]:.4f}, {want['accuracy'][1]:.4f}]" in out
    saved["splits"]["dev"].update(ci95=ci, ci95_method=method)

    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.safetensors"), "--cache", str(path), "--split", "dev", "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text()) == saved
    capsys.readouterr()
    # --json: stdout is one JSON document and nothing else
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.safetensors"), "--cache", str(path), "--split", "dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == saved

    other = tiny_config(tmp_path / "data2", size=30)
    other.encoders.max_length = 16
    extract(other, tmp_path / "other.h5", progress=False)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "r" / "best.safetensors"), "--cache", str(tmp_path / "other.h5")]) == 2
    assert "max_length" in capsys.readouterr().err


def test_streamed_and_in_memory_splits_give_identical_batches(tiny_cache):
    path, _ = tiny_cache
    cache = FeatureCache(path)
    ram, streamed = cache.load("train", in_memory=True), cache.load("train", in_memory=False)
    assert not streamed.in_memory and not isinstance(streamed.image, np.ndarray)
    rows = np.array([0, 3, 4, 10, 11, 40])
    a, b = SplitBatches(ram).batch(rows), SplitBatches(streamed).batch(rows)
    for key in ("image", "tokens", "mask", "labels"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    # padding is zero and the mask marks exactly each row's tokens
    lens = np.diff(ram.offsets)[rows]
    assert a.mask.sum(1).tolist() == lens.tolist()
    assert torch.all(a.tokens[~a.mask] == 0)


def test_memory_budget_decides_streaming(tiny_cache, monkeypatch):
    path, _ = tiny_cache
    cache = FeatureCache(path)
    monkeypatch.setenv("SPPSCL_MEMORY_BUDGET", "1")
    assert not cache.load("train").in_memory
    monkeypatch.setenv("SPPSCL_MEMORY_BUDGET", str(10**12))
    assert cache.load("train").in_memory


def test_probe_matches_a_direct_sklearn_fit(tiny_cache):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from sppscl.stage2.probe import run_probe

    path, _ = tiny_cache
    res = run_probe(path, c_grid=(1.0,))
    cache = FeatureCache(path)
    tr, dv = cache.load("train"), cache.load("dev")

    def feats(s):  # written out directly: per-row spatial mean and last-layer [CLS]
        rows = []
        for r in s.rows:
            img = s.image[r].astype(np.float32).reshape(s.image.shape[1], -1).mean(1)
            cls = s.tokens[s.offsets[r], -1].astype(np.float32)
            rows.append(np.concatenate([img, cls]))
        return np.stack(rows)

    sc = StandardScaler().fit(feats(tr))
    clf = LogisticRegression(C=1.0, max_iter=3000, random_state=0).fit(sc.transform(feats(tr)), tr.labels[tr.rows])
    acc = float((clf.predict(sc.transform(feats(dv))) == dv.labels[dv.rows]).mean())
    assert res["splits"]["dev"]["accuracy"] == pytest.approx(acc)
    assert res["C"] == 1.0


def test_resume_with_more_epochs_applies_them_and_says_so(tiny_cache, tmp_path, capsys):
    """--resume --set epochs=N continues to N (and equals a run started with N); other changed keys are refused."""
    from safetensors.torch import load_file

    path, _ = tiny_cache
    cmd = ["train", "--cache", str(path), "--set", "threads=1", "--quiet"]
    assert main([*cmd, "--set", "epochs=2", "--out", str(tmp_path / "r")]) == 0
    assert main([*cmd, "--set", "epochs=3", "--out", str(tmp_path / "r"), "--resume"]) == 0
    assert "resuming with train.epochs=3 (the run was started with 2)" in " ".join(capsys.readouterr().err.split())
    assert main([*cmd, "--set", "epochs=3", "--out", str(tmp_path / "clean")]) == 0
    strip = lambda p: [{k: v for k, v in x.items() if k != "epoch_seconds"} for x in _lines(p / "metrics.jsonl")]  # noqa: E731
    assert len(strip(tmp_path / "r")) == 3 and strip(tmp_path / "r") == strip(tmp_path / "clean")
    a, b = load_file(tmp_path / "r" / "last.safetensors"), load_file(tmp_path / "clean" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model"))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["epochs"] == 3
    # fewer epochs than already trained, and keys that would make it another run, are refused
    assert main([*cmd, "--set", "epochs=1", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "already trained 3 epochs" in capsys.readouterr().err
    assert main([*cmd, "--set", "fusion=concat", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "train.fusion" in capsys.readouterr().err


def test_resume_refuses_a_config_that_differs_from_the_run(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    import yaml

    same, other = tmp_path / "same.yaml", tmp_path / "other.yaml"
    train_keys = {k: v for k, v in cfg.train.__dict__.items()}
    same.write_text(yaml.safe_dump({"train": {**train_keys, "epochs": 1}}))
    other.write_text(yaml.safe_dump({"train": {**train_keys, "epochs": 1, "lr": 0.5}}))
    cmd = ["train", "--cache", str(path), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*cmd, "--config", str(same)]) == 0
    assert main([*cmd, "--config", str(other), "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "lr: the run has 0.001, --config" in err and "other.yaml has 0.5" in err
    # the same command with --resume (nothing left to train) and --resume without --config both continue it
    assert main([*cmd, "--config", str(same), "--resume"]) == 0
    assert main([*cmd, "--resume"]) == 0


def test_a_kill_between_checkpoint_and_log_line_loses_no_line(tiny_cache, tmp_path):
    """The epoch's metrics line travels in its checkpoint: losing the line (a kill right after the checkpoint)
    and resuming gives the log an uninterrupted run writes."""
    path, cfg = tiny_cache
    cfg = apply_overrides(cfg, ["epochs=3"])
    train(path, cfg, tmp_path / "full", progress=False)
    train(path, apply_overrides(cfg, ["epochs=2"]), tmp_path / "cut", progress=False)
    # as if killed after epoch 2's checkpoint, before its line: drop the line, keep the checkpoint
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text(lines[0] + "\n")
    train(path, cfg, tmp_path / "cut", resume=True, progress=False, resume_overrides=["epochs=3"])
    strip = lambda p: [{k: v for k, v in x.items() if k != "epoch_seconds"} for x in _lines(p / "metrics.jsonl")]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(tmp_path / "full")


def test_checkpoints_from_before_the_precision_option_count_as_fp32(tiny_cache):
    from sppscl.stage2.runs import compatible

    prov = FeatureCache(tiny_cache[0]).provenance
    old = {k: v for k, v in prov.items() if k != "precision"}
    assert compatible(prov, old) == []
    assert compatible({**prov, "precision": "bf16"}, old) == ["precision: this cache has 'bf16', the checkpoint's cache has 'fp32'"]
