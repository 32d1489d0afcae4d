"""`sppscl analyze`: IID/TTD/ITD against direct computation, the report, and the PNGs."""

from __future__ import annotations

import json
import shutil
from itertools import product

import numpy as np
import pytest
from PIL import Image

from sppscl.cache import CacheError, FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.stage2.analyze import (
    HIST_EDGES,
    analyze,
    collect_embeddings,
    l2_normalise,
    pair_distances,
    same_label_distances,
)
from sppscl.stage2.runs import load_checkpoint, model_from_checkpoint
from sppscl.stage2.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _loop_distances(image, text, labels, classes):
    """The definitions, one pair at a time: IID/TTD over i < j, ITD over all (i, j) incl. i = j; overall pooled."""
    per_class, pooled = {}, {m: [] for m in ("IID", "TTD", "ITD")}
    for k, name in enumerate(classes):
        rows = [i for i in range(len(labels)) if labels[i] == k]
        d = {"IID": [], "TTD": [], "ITD": []}
        for i, j in product(rows, rows):
            if i < j:
                d["IID"].append(np.linalg.norm(image[i] - image[j]))
                d["TTD"].append(np.linalg.norm(text[i] - text[j]))
            d["ITD"].append(np.linalg.norm(image[i] - text[j]))
        per_class[name] = {m: (np.mean(v) if v else None) for m, v in d.items()}
        for m in d:
            pooled[m] += d[m]
    return per_class, {m: np.mean(v) for m, v in pooled.items()}


def test_hand_computed_example():
    image = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    text = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    stats, _ = same_label_distances(image, text, np.array([0, 0, 1]), ["a", "b"])
    a, b, overall = stats["per_class"]["a"], stats["per_class"]["b"], stats["overall"]
    assert a["IID"] == pytest.approx(5.0) and a["TTD"] == pytest.approx(0.0)
    # ITD of class a: |I0-T0|, |I0-T1|, |I1-T0|, |I1-T1| = 0, 0, 5, 5
    assert a["ITD"] == pytest.approx(2.5) and a["pairs"] == {"IID": 1, "TTD": 1, "ITD": 4}
    # a class of one sample has no IID/TTD pair, but its image and own text are an ITD pair
    assert b["IID"] is None and b["TTD"] is None and b["ITD"] == pytest.approx(1.0)
    # pooled over pairs, not a mean of class means: (0 + 0 + 5 + 5 + 1) / 5
    assert overall["ITD"] == pytest.approx(2.2) and overall["IID"] == pytest.approx(5.0)


@pytest.mark.parametrize("normalise", [False, True])
def test_vectorised_distances_match_a_direct_loop(normalise):
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 0, 2, 1, 1, 0, 2, 1, 3])
    classes = ["w", "x", "y", "z"]
    image, text = rng.normal(size=(10, 5)) * 3, rng.normal(size=(10, 5))
    if normalise:
        image, text = l2_normalise(image), l2_normalise(text)
    stats, hists = same_label_distances(image, text, labels, classes, HIST_EDGES)
    per_class, pooled = _loop_distances(image, text, labels, classes)
    for name in classes:
        for m in ("IID", "TTD", "ITD"):
            want, got = per_class[name][m], stats["per_class"][name][m]
            assert (got is None) == (want is None), (name, m)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (name, m)
            assert sum(hists[m][name]) == stats["per_class"][name]["pairs"][m]
    for m in ("IID", "TTD", "ITD"):
        assert stats["overall"][m] == pytest.approx(pooled[m], rel=1e-9)
    # the blocked path gives the same sums as one block
    for distinct in (True, False):
        one = pair_distances(image, text, distinct, HIST_EDGES)
        blocked = pair_distances(image, text, distinct, HIST_EDGES, block=3)
        assert blocked[0] == pytest.approx(one[0], rel=1e-12) and blocked[1] == one[1]
        np.testing.assert_array_equal(blocked[2], one[2])


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """A one-epoch run and an ablation without the inter-modal loss (the --compare case)."""
    path, cfg = tiny_cache
    root = tmp_path_factory.mktemp("analyze-runs")
    train(path, apply_overrides(cfg, ["epochs=2"]), root / "spp", progress=False)
    train(path, apply_overrides(cfg, ["epochs=1", "use_inter=false"]), root / "no-inter", progress=False)
    return path, root


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


def test_analyze_against_the_untrained_heads(runs, tmp_path, capsys):
    cache, root = runs
    out = tmp_path / "an"
    ckpt = root / "spp" / "best.safetensors"
    code = main(["analyze", "--checkpoint", str(ckpt), "--cache", str(cache), "--split", "dev", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "L2-normalised embeddings" in printed and "raw embeddings" in printed and "untrained" in printed
    for name in ("tsne.png", "distances.png", "step2_fired.png"):
        _assert_png(out / name)
    report = json.loads((out / "analysis.json").read_text())
    assert report["reference"]["kind"] == "untrained" and report["split"] == "dev"
    assert len(report["step2_fired"]["spp"]) == 2

    ckpt = load_checkpoint(root / "spp" / "best.safetensors")
    model, cfg = model_from_checkpoint(ckpt, "cpu")
    data = FeatureCache(cache).load("dev")
    emb = collect_embeddings(model, data, cfg.train.eval_batch_size, "cpu")
    want, _ = same_label_distances(l2_normalise(emb.image), l2_normalise(emb.text), emb.labels, ckpt["classes"])
    got = report["model"]["distances"]["l2"]
    for m in ("IID", "TTD", "ITD"):
        assert got["overall"][m] == pytest.approx(want["overall"][m], rel=1e-9)
        assert got["overall"][m] != pytest.approx(report["reference"]["distances"]["l2"]["overall"][m], rel=1e-6)
        assert 0.0 <= got["overall"][m] <= 2.0


def test_analyze_compare_and_a_checkpoint_without_its_log(runs, tmp_path, capsys):
    cache, root = runs
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(root / "spp" / "best.safetensors", lone / "best.safetensors")
    out = tmp_path / "cmp"
    code = main(["analyze", "--checkpoint", str(lone / "best.safetensors"), "--cache", str(cache), "--out", str(out),
                 "--compare", str(root / "no-inter" / "best.safetensors"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["reference"]["kind"] == "checkpoint" and report["reference"]["name"] == "no-inter"
    notes = report["notes"]
    assert any(n.startswith(f"no {lone / 'metrics.jsonl'}") for n in notes)
    assert any(n.startswith("no-inter: step 2 never runs") for n in notes)
    assert "note:" in captured.err and "note:" not in captured.out  # notes on stderr, results on stdout
    # only the ablation has a log, so the firing-rate plot holds that one line
    assert list(report["step2_fired"]) == ["no-inter"]
    _assert_png(out / "step2_fired.png")


def test_analyze_refuses_a_split_it_cannot_use(runs, tmp_path):
    cache, root = runs
    with pytest.raises(CacheError, match="no split 'nope'"):
        analyze(root / "spp" / "best.safetensors", cache, "nope", tmp_path / "x", device="cpu", tsne=False)


def test_untrained_reference_is_the_runs_initial_weights(tiny_cache, tmp_path):
    import torch

    from sppscl.stage2.analyze import untrained_model

    path, cfg = tiny_cache
    # lr 1e-30: every update is below float32 resolution except on zero-initialised biases, which move by ~1e-30
    train(path, apply_overrides(cfg, ["epochs=1", "lr=1e-30", "seed=7"]), tmp_path / "frozen", progress=False)
    ckpt = load_checkpoint(tmp_path / "frozen" / "best.safetensors")
    trained, _ = model_from_checkpoint(ckpt, "cpu")
    initial = untrained_model(ckpt, "cpu")
    assert not initial.training
    for (name, p), (_, q) in zip(trained.named_parameters(), initial.named_parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-20), name


def test_step2_fired_plots_the_epochs_as_logged(tmp_path):
    """metrics.jsonl counts epochs from 1: a 5-epoch run is drawn at epochs 1-5 (it was drawn at 2-6)."""
    from sppscl.stage2.analyze import plot_step2_fired

    drawn = plot_step2_fired([("run", [(e, 0.5) for e in range(1, 6)])], tmp_path / "fired.png")
    assert drawn == [[1, 2, 3, 4, 5]] and (tmp_path / "fired.png").stat().st_size > 0
