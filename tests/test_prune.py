"""Searches that stop bad runs early (``sweep --random N --prune median|hyperband``): the pruner's decisions on a
controlled dev curve, the pruned status in every table and the report, reruns, skipped seeds, and what never prunes."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from optuna.trial import TrialState

from sppscl.cli import main
from sppscl.config import ConfigError, apply_overrides
from sppscl.stage2.sweeps import Execution, sweep
from sppscl.stage2.sweeps import summary as sweep_summary
from sppscl.stage2.sweeps import worker as worker_mod
from sppscl.stage2.sweeps.study import attrs, is_pruned, open_storage

INLINE = Execution(workers=1)
GOOD, BAD = 0.9, 0.1


@pytest.fixture
def base(tiny_cache):
    path, cfg = tiny_cache
    return path, apply_overrides(cfg, ["epochs=2"])


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _verdicts(good_first: int):
    """configuration slug -> "good"/"bad" on first sight: the first ``good_first`` good, then alternately bad and good."""
    verdict: dict[str, str] = {}

    def of(run_dir) -> str:
        slug = run_dir.name.rsplit("-seed", 1)[0]
        if slug not in verdict:
            n = len(verdict)
            verdict[slug] = "good" if n < good_first or (n - good_first) % 2 else "bad"
        return verdict[slug]

    return verdict, of


def bad_curves(monkeypatch, good_first: int = 3) -> dict[str, str]:
    """The real ``train``, but the dev accuracy its epochs report to the pruner is GOOD for the first ``good_first``
    configurations and then alternately BAD and GOOD (a configuration keeps its curve for every seed). Returns
    configuration slug -> "good"/"bad", as decided."""
    real = worker_mod.train
    verdict, of = _verdicts(good_first)

    def stub(cache, cfg, out_dir, on_epoch=None, **k):
        value = GOOD if of(out_dir) == "good" else BAD
        if on_epoch is None:
            return real(cache, cfg, out_dir, **k)
        return real(cache, cfg, out_dir, on_epoch=lambda epoch, record: on_epoch(epoch, {**record, "dev_accuracy": value}), **k)

    monkeypatch.setattr(worker_mod, "train", stub)
    return verdict


def stub_train(monkeypatch, good_first: int = 3) -> dict[str, str]:
    """A stand-in for ``train`` that trains nothing (the default suite's speed): it logs ``epochs`` epochs of a GOOD or
    BAD dev curve (as ``bad_curves`` decides), asks ``on_epoch`` after each, and writes the results.json that ``train``
    writes for a finished run, or for a stopped one (``train.stopped_run``'s fields)."""
    verdict, of = _verdicts(good_first)

    def stub(cache, cfg, out_dir, on_epoch=None, **k):
        value = GOOD if of(out_dir) == "good" else BAD
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
        dev = {"accuracy": value, "weighted_f1": value, "macro_f1": value, "n": 10, "per_class": {c: {"f1": value} for c in ("a", "b")}}
        lines = []
        for epoch in range(1, cfg.train.epochs + 1):
            record = {"epoch": epoch, "dev_accuracy": value, "dev_weighted_f1": value, "dev_macro_f1": value}
            lines.append(json.dumps(record))
            (out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            if on_epoch is not None and on_epoch(epoch, record):
                results = {"status": "pruned", "pruned_at_epoch": epoch, "best_epoch": 1, "epochs_trained": epoch, "classes": ["a", "b"], "splits": {"dev": dev}}
                break
        else:
            results = {"best_epoch": 1, "epochs_trained": cfg.train.epochs, "classes": ["a", "b"], "splits": {"dev": dev}}
        (out_dir / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(worker_mod, "train", stub)
    return verdict


def _study(out):
    return optuna.load_study(study_name="sppscl", storage=open_storage(None, out))


@pytest.mark.parametrize("training", ["stub", pytest.param("real", marks=pytest.mark.slow)])
def test_median_pruner_stops_bad_first_seeds_and_their_other_seeds_never_start(base, tmp_path, monkeypatch, training):
    path, cfg = base
    verdict = (stub_train if training == "stub" else bad_curves)(monkeypatch)
    out = tmp_path / "s"
    args = dict(space=["lr=1e-3:1e-1:log"], n_random=6, sampler="random", seeds=[0, 1], execution=INLINE, progress=False, prune="median")
    res = sweep(path, cfg, out, **args)

    bad = [slug for slug, v in verdict.items() if v == "bad"]
    assert len(verdict) == 6 and len(bad) == 2  # configurations 4 and 6 (3 good ones + 2 seeds each = 6 complete trials first)
    by_run = {r["run"]: r for r in res.rows}
    for slug in bad:
        first, second = by_run[f"{slug}-seed0"], by_run[f"{slug}-seed1"]
        # MedianPruner: epoch 1's BAD is below the median of the finished trials' GOOD: stopped after one epoch
        assert (first["status"], first["pruned_epoch"], first["dev_accuracy"], first["best_epoch"]) == ("pruned", 1, None, None)
        assert second["status"] == "skipped" and second["trial"] is None and "pruned at epoch 1" in second["error"]
        run_dir = out / "runs" / f"{slug}-seed0"
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "pruned" and results["pruned_at_epoch"] == 1 and results["epochs_trained"] == 1
        assert set(results["splits"]) == {"dev"} and not list(run_dir.glob("predictions-*.csv"))
        if training == "real":
            assert (run_dir / "best.safetensors").exists() and (run_dir / "last.safetensors").exists()
        assert not (out / "runs" / f"{slug}-seed1").exists()
    assert sorted(res.pruned) == sorted(f"{s}-seed0" for s in bad) and sorted(res.skipped) == sorted(f"{s}-seed1" for s in bad)
    assert res.failed == []
    # the good configurations trained every epoch of both seeds
    good = [r for r in res.rows if r["config"] not in bad]
    assert len(good) == 8 and all(r["status"] == "ok" and r["dev_accuracy"] is not None for r in good)

    # pruned runs are in no mean and never ranked: the pruned configurations come last with n=0 and no score
    summ = {s["config"]: s for s in res.summary}
    for slug in bad:
        assert (summ[slug]["n"], summ[slug]["n_failed"], summ[slug]["n_pruned"], summ[slug]["n_skipped"], summ[slug]["pruned_at_epoch"]) == (0, 0, 1, 1, 1)
        assert summ[slug]["dev_accuracy_mean"] is None
    assert {s["config"] for s in res.summary[-2:]} == set(bad)
    assert all(s["n"] == 2 and s["n_pruned"] == 0 for s in res.summary[:4])
    md = (out / "summary.md").read_text()
    assert "| pruned |" in md and md.count("at epoch 1, 1 seed not started") == 2
    on_disk = {r["run"]: r for r in _csv(out / "runs.csv")}
    assert on_disk[f"{bad[0]}-seed0"]["status"] == "pruned" and on_disk[f"{bad[0]}-seed0"]["pruned_epoch"] == "1"
    assert on_disk[f"{bad[0]}-seed1"]["status"] == "skipped"

    # the study tells pruned runs from duplicates that stepped aside: state PRUNED, a result saying pruned
    trials = _study(out).get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert sorted(t.user_attrs["run"] for t in pruned) == sorted(res.pruned)
    assert all(is_pruned(t) and attrs(t)["pruned_epoch"] == 1 and "duplicate_of" not in t.user_attrs for t in pruned)
    assert all(t.intermediate_values == {1: BAD} for t in pruned)
    # only first seeds report to the pruner; the other seeds train whole runs
    assert all(t.intermediate_values == {} for t in trials if t.user_attrs["seed"] == 1)

    # a rerun retries nothing: the pruned runs are finished, their other seeds stay unstarted
    stamp = (out / "runs" / f"{bad[0]}-seed0" / "results.json").stat().st_mtime_ns
    again = sweep(path, cfg, out, **args)
    assert again.ran == [] and sorted(again.pruned) == sorted(res.pruned) and sorted(again.skipped) == sorted(res.skipped)
    assert len(_study(out).get_trials()) == len(trials)
    assert (out / "runs" / f"{bad[0]}-seed0" / "results.json").stat().st_mtime_ns == stamp

    # sweep summary reads the same from the study alone
    read = sweep_summary(out)
    assert sorted(read.pruned) == sorted(res.pruned) and sorted(read.skipped) == sorted(res.skipped) and read.failed == []
    assert "at epoch 1, 1 seed not started" in (out / "summary.md").read_text()

    # the report shows them, with the epoch each stopped at
    from sppscl.report import write_report

    html = write_report([out], tmp_path / "r.html").read_text()
    assert "runs stopped early by the search&#39;s pruner" in html or "runs stopped early by the search's pruner" in html
    assert f"{bad[0]}-seed0" in html and "not started" in html and "at epoch 1, 1 seed not started" in html


def test_hyperband_prunes_and_the_cli_prints_pruned_runs(base, tmp_path, monkeypatch, capsys):
    path, cfg = base
    verdict = stub_train(monkeypatch, good_first=2)
    import yaml

    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": dict(cfg.train.__dict__)}))
    out = tmp_path / "s"
    argv = ["sweep", "--cache", str(path), "--config", str(preset), "--random", "8", "--space", "lr=1e-3:1e-1:log", "--sampler", "tpe",
            "--prune", "hyperband", "--seeds", "0", "--jobs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0  # pruned runs are no failure
    printed = capsys.readouterr().out
    rows = _csv(out / "runs.csv")
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(verdict[r["config"]] == "bad" for r in pruned)
    assert all(int(r["pruned_epoch"]) == 1 for r in pruned)  # hyperband's rung at epoch 1; the last epoch (2) is never pruned
    # hyperband may let a bad run through (a bracket without an early rung, or first at its rung), never prunes a good one
    assert len(rows) == 8 and all(r["status"] in ("ok", "pruned") for r in rows)
    assert f"pruned (stopped early, finished, never retried): {len(pruned)} runs" in printed
    meta = _study(out).user_attrs["sppscl"]
    assert meta["prune"] == "hyperband"
    # another pruner is another sweep: the stored study refuses it, naming what differs
    other = [("median" if a == "hyperband" else a) for a in argv]
    assert main(other) == 2 and "prune" in capsys.readouterr().err


def test_train_stops_where_its_epoch_callback_says(base, tmp_path):
    """``train``'s per-epoch callback: each epoch's record (dev accuracy: the selection's score) after its log line;
    True stops the run there: results.json says pruned at that epoch and holds dev only; no split is evaluated."""
    from sppscl.stage2.train import train

    path, cfg = base
    cfg = apply_overrides(cfg, ["epochs=3"])
    seen = []
    results = train(path, cfg, tmp_path / "run", progress=False, on_epoch=lambda epoch, record: seen.append((epoch, record["dev_accuracy"])) or epoch == 2)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e, _ in seen] == [1, 2] and [r["epoch"] for r in logged] == [1, 2] and [a for _, a in seen] == [r["dev_accuracy"] for r in logged]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results and results["status"] == "pruned" and results["pruned_at_epoch"] == 2 and results["epochs_trained"] == 2
    best = max(logged, key=lambda r: r["dev_accuracy"])
    assert set(results["splits"]) == {"dev"} and results["splits"]["dev"]["accuracy"] == best["dev_accuracy"]
    assert not list((tmp_path / "run").glob("predictions-*.csv")) and (tmp_path / "run" / "last.safetensors").exists()
    # the run folder's own report says it was pruned, and where
    from sppscl.report import write_report

    assert "stopped this run at epoch 2" in write_report([tmp_path / "run"], tmp_path / "r.html").read_text()


def test_search_without_prune_keeps_its_definition_and_tables(base, tmp_path):
    path, cfg = base
    out = tmp_path / "s"
    res = sweep(path, cfg, out, space=["lr=1e-3:1e-1:log"], n_random=1, sampler="random", seeds=[0], execution=INLINE, progress=False)
    assert "prune" not in _study(out).user_attrs["sppscl"] and "pruned_epoch" not in res.rows[0] and "n_pruned" not in res.summary[0]
    assert "pruned" not in (out / "summary.md").read_text()


def test_grid_cv_and_reproduce_refuse_prune(base, tmp_path, capsys):
    path, cfg = base
    with pytest.raises(ConfigError, match="only a search prunes"):
        sweep(path, cfg, tmp_path / "g", grid=["fusion=batch,concat"], seeds=[0], execution=INLINE, progress=False, prune="median")
    with pytest.raises(ConfigError, match="is not one of median, hyperband"):
        sweep(path, cfg, tmp_path / "h", space=["lr=1e-3:1e-1:log"], n_random=1, seeds=[0], execution=INLINE, progress=False, prune="asha")
    for argv, what in (
        (["sweep", "--cache", str(path), "--grid", "fusion=batch,concat", "--prune", "median", "--out", str(tmp_path / "g")], "only a search prunes"),
        (["cv", "--cache", str(path), "--prune", "median", "--out", str(tmp_path / "c")], "cv never prunes"),
        (["reproduce", "table7", "--cache", str(path), "--prune", "median", "--out", str(tmp_path / "r")], "reproduce never prunes"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert what in err and len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert not any((tmp_path / d).exists() for d in "gcr")  # refused before any folder is made


@pytest.mark.slow
def test_pruning_on_a_postgresql_study(base, tmp_path, monkeypatch, postgres):
    """The pruner reads the other trials' per-epoch values from the shared study: the same decisions on PostgreSQL,
    the same pruned and skipped runs, nothing retried by a rerun, and ``sweep summary`` from the database alone."""
    path, cfg = base
    verdict = stub_train(monkeypatch)
    execution = Execution(workers=1, storage=postgres, study="prune-pg", heartbeat=1)
    args = dict(space=["lr=1e-3:1e-1:log"], n_random=6, sampler="tpe", seeds=[0, 1], execution=execution, progress=False, prune="median")
    res = sweep(path, cfg, tmp_path / "s", **args)
    bad = sorted(slug for slug, v in verdict.items() if v == "bad")
    assert len(bad) == 2 and sorted(res.pruned) == [f"{s}-seed0" for s in bad] and sorted(res.skipped) == [f"{s}-seed1" for s in bad]
    assert res.failed == [] and sum(r["status"] == "ok" for r in res.rows) == 8
    study = optuna.load_study(study_name="prune-pg", storage=postgres)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert sorted(t.user_attrs["run"] for t in pruned) == sorted(res.pruned) and all(t.intermediate_values == {1: BAD} for t in pruned)
    n_trials = len(study.get_trials())
    again = sweep(path, cfg, tmp_path / "s2", **args)  # another machine's folder, the same study
    assert again.ran == [] and sorted(again.pruned) == sorted(res.pruned) and len(optuna.load_study(study_name="prune-pg", storage=postgres).get_trials()) == n_trials
    read = sweep_summary(tmp_path / "summary", postgres, "prune-pg")
    assert sorted(read.pruned) == sorted(res.pruned) and sorted(read.skipped) == sorted(res.skipped)
    assert "at epoch 1, 1 seed not started" in (tmp_path / "summary" / "summary.md").read_text()
