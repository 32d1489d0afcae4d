"""Cross-validation folds, ensembles, early stopping and step 2's gradient option, on the tiny cache."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sppscl.cache import CacheError, FeatureCache
from sppscl.cli import main
from sppscl.config import ConfigError, apply_overrides
from sppscl.stage1.extract import extract
from sppscl.stage2 import train as train_mod
from sppscl.stage2.cv import cross_validate
from sppscl.stage2.data import SplitBatches
from sppscl.stage2.checkpoint import META_KEY
from sppscl.stage2.ensemble import cached_ensemble, ensemble
from sppscl.stage2.sweeps import Execution
from sppscl.stage2.folds import FoldView, StackedRows, fold_rows, pool_labels
from sppscl.stage2.gate import GateDecision
from sppscl.stage2.predict import Predictor, read_pairs
from sppscl.stage2.runs import build_model, cache_dims
from sppscl.stage2.train import train

from conftest import tiny_config


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------ folds


def test_stacked_rows_read_like_the_concatenation(tiny_cache):
    path, _ = tiny_cache
    cache = FeatureCache(path)
    for in_memory in (True, False):
        a, b = cache.load("train", in_memory=in_memory), cache.load("dev", in_memory=in_memory)
        for key in ("image", "tokens"):
            stacked = StackedRows([getattr(a, key), getattr(b, key)])
            whole = np.concatenate([np.asarray(getattr(a, key)[:]), np.asarray(getattr(b, key)[:])])
            idx = np.array([0, len(whole) - 1, 3, len(getattr(a, key)), len(getattr(a, key)) - 1])
            np.testing.assert_array_equal(stacked[idx], whole[idx])
            np.testing.assert_array_equal(stacked[int(idx[1])], whole[idx[1]])
        # ranges that each stay inside one part, in an order that alternates between the parts
        n_a = int(a.offsets[-1])
        starts, counts = np.array([n_a + 2, 1, n_a, 5]), np.array([3, 2, 1, 4])
        want = np.concatenate([np.asarray(np.concatenate([a.tokens[:], b.tokens[:]]))[s : s + c] for s, c in zip(starts, counts)])
        np.testing.assert_array_equal(StackedRows([a.tokens, b.tokens]).ranges(starts, counts), want)


def test_folds_partition_the_labelled_train_and_dev_rows(tiny_cache):
    path, _ = tiny_cache
    cache = FeatureCache(path)
    labels, rows = pool_labels(cache)
    k = 3
    parts = [fold_rows(labels, rows, k, i, seed=0, val_fraction=0.2) for i in range(k)]
    held = np.concatenate([p.test for p in parts])
    assert sorted(held.tolist()) == sorted(rows.tolist())  # every row held out exactly once
    for p in parts:
        assert not set(p.train) & set(p.dev) and not set(p.train) & set(p.test) and not set(p.dev) & set(p.test)
        assert sorted([*p.train, *p.dev, *p.test]) == sorted(rows.tolist())
        # stratified: every class of the pool is in each held-out fold and each validation part
        assert set(labels[p.test]) == set(labels[rows]) and set(labels[p.dev]) == set(labels[rows])
    again = fold_rows(labels, rows, k, 1, seed=0, val_fraction=0.2)
    assert np.array_equal(again.test, parts[1].test) and np.array_equal(again.dev, parts[1].dev)
    assert not np.array_equal(fold_rows(labels, rows, k, 1, seed=5, val_fraction=0.2).test, parts[1].test)
    with pytest.raises(CacheError, match="fewer than cv_folds"):
        fold_rows(labels, rows, 60, 0, seed=0, val_fraction=0.2)


def test_a_fold_run_never_sees_the_test_split(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    cache = FeatureCache(path)
    res = train(path, apply_overrides(cfg, ["epochs=1", "cv_folds=3", "cv_fold=2"]), tmp_path / "r", progress=False)
    view = FoldView(cache, 3, 2, 0, cfg.train.cv_val_fraction)
    fr = view.rows()
    assert res["cv"]["fold"] == 2 and res["splits"]["test"]["n"] == len(fr.test) and res["splits"]["dev"]["n"] == len(fr.dev)
    test_ids = set(cache.load("test").ids)
    pooled_ids = set(cache.load("train").ids) | set(cache.load("dev").ids)
    held = {r["id"] for r in _csv(tmp_path / "r" / "predictions-test.csv")}
    assert held <= pooled_ids and not held & test_ids
    assert held == set(view.pool().ids[fr.test])
    # the view's batches are the cache's own rows: a pooled dev row gives the cache's dev features
    dev = cache.load("dev")
    pool = view.pool()
    r = int(fr.test[-1])
    src, row = (dev, r - len(cache.load("train").labels)) if r >= len(cache.load("train").labels) else (cache.load("train"), r)
    a, b = SplitBatches(pool).batch(np.array([r])), SplitBatches(src).batch(np.array([row]))
    assert torch.equal(a.image, b.image) and torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)


def test_cv_settings_are_validated(tiny_cache):
    _, cfg = tiny_cache
    for bad in (["cv_folds=1"], ["cv_folds=3", "cv_fold=3"], ["cv_val_fraction=1"], ["patience=-1"], ["step2_grads=maybe"]):
        with pytest.raises(ConfigError):
            apply_overrides(cfg, bad)


# ------------------------------------------------------------------------------------ cross_validate


def test_cross_validate_rows_ensembles_probe_and_resume(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    base = apply_overrides(cfg, ["epochs=1", "lr=0.02"])
    # one variant (3 folds x 2 seeds = 6 runs): a second variant's rows are test_reproduce_with_cv's (two update modes)
    variants = [("full", {})]
    res = cross_validate(path, base, tmp_path / "cv", folds=3, seeds=[1, 2], variants=variants, execution=Execution(1), progress=False)
    kinds = [(r.label, r.kind, r.n) for r in res.rows]
    assert kinds == [
        ("full", "runs", 3),
        ("full: ensemble of its seeds", "ensemble", 3),
        ("logistic-regression probe (pooled image + [CLS])", "probe", 3),
    ]
    # the runs' row: each fold's two seeds averaged, then mean, std and t interval over the 3 folds; seed sd apart
    runs_dir = tmp_path / "cv" / "runs"
    acc = {(r["cv_fold"], r["seed"]): json.loads((runs_dir / r["run"] / "results.json").read_text())["splits"]["test"]["accuracy"]
           for r in res.sweep.rows}
    assert len(acc) == 6
    fold_means = [(acc[(k, 1)] + acc[(k, 2)]) / 2 for k in range(3)]
    e = res.rows[0].stats["accuracy"]
    assert (e.mean, e.std) == pytest.approx((np.mean(fold_means), np.std(fold_means, ddof=1))) and (e.n_folds, e.seeds) == (3, (2, 2, 2))
    half = 4.302652729911275 * np.std(fold_means, ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert e.ci95 == pytest.approx((np.mean(fold_means) - half, np.mean(fold_means) + half))
    assert e.seed_sd == pytest.approx(np.sqrt(np.mean([(acc[(k, 1)] - acc[(k, 2)]) ** 2 / 2 for k in range(3)])))
    assert res.rows[0].stats["val_accuracy"].ci95 is None  # the selection split: no interval claimed
    assert res.rows[-1].stats["accuracy"].seed_sd is None  # the probe has no seeds
    table = _csv(tmp_path / "cv" / "cv.csv")
    assert float(table[0]["accuracy_ci95_low"]) == pytest.approx(e.ci95[0]) and float(table[0]["accuracy_seed_sd"]) == pytest.approx(e.seed_sd)
    assert table[0]["seeds_per_fold"] == "2" and table[0]["folds"] == "3" and table[0]["val_accuracy_ci95_low"] == ""
    assert table[-1]["accuracy_seed_sd"] == ""
    md = (tmp_path / "cv" / "cv.md").read_text()
    assert f"{e.mean:.4f} ± {e.std:.4f} [{e.ci95[0]:.4f}, {e.ci95[1]:.4f}]" in md and "t interval over the folds" in md
    # each fold's ensemble is scored on the same held-out rows as its members
    ens = json.loads((tmp_path / "cv" / "ensembles" / "cv_fold-0__cv_folds-3" / "results.json").read_text())
    member = json.loads((runs_dir / "cv_fold-0__cv_folds-3-seed1" / "results.json").read_text())
    assert ens["splits"]["test"]["n"] == member["splits"]["test"]["n"] and len(ens["members"]) == 2
    assert "F1 neutral" in (tmp_path / "cv" / "cv.md").read_text()
    assert {r["kind"] for r in _csv(tmp_path / "cv" / "cv.csv")} == {"runs", "ensemble", "probe"}
    again = cross_validate(path, base, tmp_path / "cv", folds=3, seeds=[1, 2], variants=variants, execution=Execution(1), progress=False)
    assert again.sweep.ran == [] and [r.stats for r in again.rows] == [r.stats for r in res.rows]


def test_cv_cli(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    cfg_file = tmp_path / "tiny.yaml"
    import yaml

    d = apply_overrides(cfg, ["epochs=1"]).to_dict()
    d.pop("source")
    cfg_file.write_text(yaml.safe_dump(d))
    assert main(["cv", "--cache", str(path), "--config", str(cfg_file), "--folds", "2", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "probe" in out
    assert main(["cv", "--cache", str(path), "--config", str(cfg_file), "--folds", "1", "--out", str(tmp_path / "c2")]) == 2
    assert "--folds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ ensembles


@pytest.fixture(scope="module")
def two_runs(tiny_cache, tmp_path_factory):
    path, cfg = tiny_cache
    root = tmp_path_factory.mktemp("ens")
    for seed in (1, 2):
        train(path, apply_overrides(cfg, ["epochs=1", "lr=0.02", f"seed={seed}"]), root / f"s{seed}", progress=False)
    return path, cfg, root


def test_ensemble_averages_the_members_probabilities(two_runs, tmp_path):
    path, _, root = two_runs
    res = ensemble([root / "s1", root / "s2"], path, tmp_path / "e", "cpu")
    for split in FeatureCache(path).splits:
        got = _csv(tmp_path / "e" / f"predictions-{split}.csv")
        a, b = _csv(root / "s1" / f"predictions-{split}.csv"), _csv(root / "s2" / f"predictions-{split}.csv")
        assert list(got[0]) == list(a[0])  # the columns of a single run
        cols = [c for c in got[0] if c.startswith("p_")]
        for g, x, y in zip(got, a, b):
            assert g["id"] == x["id"] == y["id"]
            mean = [(float(x[c]) + float(y[c])) / 2 for c in cols]
            assert [float(g[c]) for c in cols] == pytest.approx(mean, abs=2e-6)
            assert g["pred"] == cols[int(np.argmax([float(g[c]) for c in cols]))][2:]
        assert res["splits"][split]["n"] == len(got)
    singles = [json.loads((root / s / "results.json").read_text())["splits"]["dev"]["accuracy"] for s in ("s1", "s2")]
    assert res["members_mean"]["dev"]["accuracy"]["mean"] == pytest.approx(np.mean(singles))
    # the pictures a single run gets: a confusion matrix per labelled split
    labelled = [s for s, m in res["splits"].items() if "confusion_matrix" in m]
    assert labelled and sorted(p.name for p in (tmp_path / "e").glob("confusion-*.png")) == sorted(f"confusion-{s}.png" for s in labelled)
    # the held-out split gets 95% intervals: the ensemble's own bootstrap, the members' mean a paired one; dev none
    from sppscl.stage2.stats import bootstrap_interval

    classes = res["classes"]
    idx = lambda rows, key: np.array([classes.index(r[key]) for r in rows])  # noqa: E731
    got, a, b = (_csv(d / "predictions-test.csv") for d in (tmp_path / "e", root / "s1", root / "s2"))
    want = bootstrap_interval(idx(got, "label"), idx(got, "pred"), len(classes))
    assert res["splits"]["test"]["ci95"]["accuracy"] == pytest.approx(list(want["accuracy"]))
    paired = bootstrap_interval(idx(a, "label"), np.stack([idx(a, "pred"), idx(b, "pred")]), len(classes))
    assert res["members_mean"]["test"]["macro_f1"]["ci95"] == pytest.approx(list(paired["macro_f1"]))
    assert "ci95" not in res["splits"]["dev"] and "ci95" not in res["members_mean"]["dev"]["accuracy"]


def test_ensemble_refuses_other_encoders_and_other_folds(two_runs, tmp_path, capsys):
    path, cfg, root = two_runs
    other = tiny_config(tmp_path / "data2", size=30)
    other.encoders.max_length = 16
    extract(other, tmp_path / "other.h5", progress=False)
    train(tmp_path / "other.h5", apply_overrides(other, ["epochs=1"]), tmp_path / "o", progress=False)
    assert main(["ensemble", str(root / "s1"), str(tmp_path / "o"), "--cache", str(path)]) == 2
    err = capsys.readouterr().err
    assert "max_length" in err and "s1" in err
    train(path, apply_overrides(cfg, ["epochs=1", "cv_folds=2", "cv_fold=0"]), tmp_path / "f0", progress=False)
    train(path, apply_overrides(cfg, ["epochs=1", "cv_folds=2", "cv_fold=1"]), tmp_path / "f1", progress=False)
    assert main(["ensemble", str(tmp_path / "f0"), str(tmp_path / "f1"), "--cache", str(path)]) == 2
    assert "cv_fold" in capsys.readouterr().err
    assert main(["ensemble", str(root / "s1"), str(root / "s2"), "--cache", str(path), "--out", str(tmp_path / "e")]) == 0
    assert "members alone" in capsys.readouterr().out


def _rewrite_checkpoint(weights, edit_meta=None, edit_tensors=None):
    """Rewrite a checkpoint's weights file (metadata and tensors) in place, as a retrain or a hand edit would."""
    with safe_open(weights, framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    if edit_meta:
        doc = json.loads(meta[META_KEY])
        edit_meta(doc)
        meta[META_KEY] = json.dumps(doc)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, weights, metadata=meta)


def test_ensemble_refuses_duplicates_and_another_class_order_in_one_line(two_runs, tmp_path, capsys):
    path, _, root = two_runs

    def refused(*members):
        assert main(["ensemble", *map(str, members), "--cache", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        return err

    err = refused(root / "s1", root / "s2", root / "s1")
    assert f"is the same checkpoint as {root / 's1' / 'best.safetensors'}" in err and "appear once" in err
    shutil.copytree(root / "s2", tmp_path / "copy")
    assert "has the same weights as" in refused(root / "s2", tmp_path / "copy")

    shutil.copytree(root / "s2", tmp_path / "reordered")
    # a consistent checkpoint of another class order: its classes and its cache's both reversed (a checkpoint whose
    # classes disagree with its own cache is refused at open, as altered)
    _rewrite_checkpoint(
        tmp_path / "reordered" / "best.safetensors",
        edit_meta=lambda d: (d["classes"].reverse(), d["cache_provenance"]["dataset"]["classes"].reverse()),
    )
    err = refused(tmp_path / "reordered")
    assert "predicts the classes ['negative', 'neutral', 'positive']" in err and "['positive', 'neutral', 'negative']" in err
    assert "the order differs" in refused(root / "s1", tmp_path / "reordered")


def test_a_stored_ensemble_result_is_reused_only_for_the_same_checkpoint_contents(two_runs, tmp_path):
    path, _, root = two_runs
    for s in ("s1", "s2"):
        shutil.copytree(root / s, tmp_path / s)
    members, out = [tmp_path / "s1", tmp_path / "s2"], tmp_path / "e"
    first = cached_ensemble(members, path, out)
    assert cached_ensemble(members, path, out) == first  # unchanged members: the stored result

    def retrained(tensors):  # s2 retrained in place: same folder, other weights
        for k, t in tensors.items():
            if k.startswith("model/") and t.is_floating_point():
                tensors[k] = t * 3.0 + 0.5

    _rewrite_checkpoint(tmp_path / "s2" / "best.safetensors", edit_tensors=retrained)
    again = cached_ensemble(members, path, out)
    assert again["members_sha256"][1] != first["members_sha256"][1] and again["members_sha256"][0] == first["members_sha256"][0]
    assert again == ensemble(members, path)  # evaluated afresh, not the stored result
    assert again["members_mean"] != first["members_mean"]


def test_predict_with_two_checkpoints_averages_them(two_runs):
    path, cfg, root = two_runs
    pairs = read_pairs(cfg.data_dir() / "dev.jsonl")
    both = Predictor([root / "s1" / "best", root / "s2" / "best"], "cpu").predict(pairs)
    one = Predictor(root / "s1" / "best", "cpu").predict(pairs)
    two = Predictor(root / "s2" / "best", "cpu").predict(pairs)
    for b, x, y in zip(both, one, two):
        assert list(b.probs) == list(x.probs) == list(y.probs)
        np.testing.assert_allclose(list(b.probs.values()), [(x.probs[c] + y.probs[c]) / 2 for c in b.probs], atol=1e-6)
        assert b.pred == max(b.probs, key=b.probs.get)


# ------------------------------------------------------------------------------------ training options


def test_patience_stops_when_dev_stops_improving(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    # a learning rate this small leaves dev unchanged after the first epoch, so it never improves again
    res = train(path, apply_overrides(cfg, ["epochs=6", "lr=1e-12", "patience=2"]), tmp_path / "r", progress=False)
    assert res["best_epoch"] == 1 and res["epochs_trained"] == 3
    assert train(path, apply_overrides(cfg, ["epochs=3", "lr=1e-12"]), tmp_path / "r2", progress=False)["epochs_trained"] == 3


@pytest.mark.parametrize("mode,moves", [("none", False), ("zero", True)])
def test_step2_grads_option_moves_fusion_and_classifier_only_when_zero_filled(tiny_cache, monkeypatch, mode, moves):
    """A fired step 2 backpropagates L_cl_m, which reaches the projections only. With zero-filled gradients (the
    official code) AdamW's momentum and weight decay still move every other parameter; with None they stay put."""
    path, cfg = tiny_cache
    cache = FeatureCache(path)
    tc = apply_overrides(cfg, [f"step2_grads={mode}", "weight_decay=0.01"]).train
    batch = SplitBatches(cache.load("train")).batch(np.arange(16))
    monkeypatch.setattr(train_mod, "two_step_gate", lambda *a, **k: GateDecision(fire=True, c=0, c_mask=0, d=0.0))
    torch.manual_seed(0)
    model = build_model(cache_dims(cache), apply_overrides(cfg, []))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    train_mod.two_step_update(model, opt, batch, tc)  # a first update gives AdamW momentum everywhere
    real_step = opt.step
    snapshots = []

    def step(*a, **k):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real_step(*a, **k)

    monkeypatch.setattr(opt, "step", step)
    log = train_mod.two_step_update(model, opt, batch, tc)
    assert log.fired and len(snapshots) == 2
    before_step2 = snapshots[1]
    after = dict(model.named_parameters())
    unreached = [n for n in after if n.startswith("fusion.")]  # cross-modal fusion and classifier
    assert unreached
    changed = {n: not torch.equal(before_step2[n], after[n].detach()) for n in after}
    assert all(changed[n] == moves for n in unreached), changed
    assert any(changed[n] for n in after if n not in unreached)  # step 2 did update what L_cl_m reaches


def test_reproduce_with_cv_fills_the_table_with_held_out_scores(tiny_cache, tmp_path, capsys):
    from sppscl.stage2.reproduce import reproduce

    path, cfg = tiny_cache
    rep = reproduce("table4", path, apply_overrides(cfg, ["epochs=1"]), tmp_path / "p", [1, 2], Execution(1), progress=False, cv=2)
    md = (tmp_path / "p" / "table4-cv2" / "table.md").read_text()
    labels = [r.label for r in rep.cv.rows]
    assert labels[:4] == ["SPP-SCL (two-step)", "SPP-SCL (two-step): ensemble of its seeds", "SPP-SCL (one-step)", "SPP-SCL (one-step): ensemble of its seeds"]
    assert "held-out ACC" in md and "2-fold" in md and "WARNING: this cache's encoders are tiny-cnn" in md
    # the runs live beside the non-CV runs of the same --out, named by their fold
    assert (tmp_path / "p" / "runs" / "cv_fold-1__cv_folds-2__update-one-step-seed2" / "results.json").exists()


def test_sweep_adds_an_ensemble_of_each_configurations_seeds(swept, tiny_cache):
    """The shared 2 learning rates x 2 seeds sweep (conftest.swept, through the CLI): one seed ensemble per configuration,
    equal to ``ensemble`` of its two runs."""
    path, _ = tiny_cache
    out, _, _ = swept
    printed = (out.parent / "printed.txt").read_text()
    assert "ensemble of each configuration's seeds" in printed
    md = (out / "ensembles.md").read_text()
    runs = _csv(out / "runs.csv")
    summary = _csv(out / "summary.csv")
    assert len(summary) == 2
    for config in summary:
        members = sorted(r["run"] for r in runs if r["lr"] == config["lr"])
        assert len(members) == 2
        direct = ensemble([out / "runs" / m for m in members], path)
        row = next(line for line in md.splitlines() if line.startswith(f"| {config['lr']} | 2 (ensemble"))
        assert f"{direct['splits']['dev']['accuracy']:.4f}" in row and f"{direct['splits']['test']['macro_f1']:.4f}" in row
