"""Sweeps and paper tables from the tiny cache: rows and aggregates, resume, failures, Optuna, workers, reproduce."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml

from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import ConfigError, apply_overrides
from sppscl.stage2.reproduce import TABLES, minimal_overrides, plot_alpha, render_markdown
from sppscl.stage2.sweeps import Execution, SweepError, SweepResult, aggregate, config_slug, mean_std, parse_grid, parse_space, sweep


INLINE = Execution(workers=1)  # runs in the test process


@pytest.fixture
def base(tiny_cache):
    path, cfg = tiny_cache
    # a large step makes seeds differ after one epoch, so std is not trivially zero
    return path, apply_overrides(cfg, ["epochs=1", "lr=0.02"])


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_grid_times_seeds_rows_aggregates_and_one_cache_read(base, tmp_path, monkeypatch):
    path, cfg = base
    loads: list[str] = []
    real_load = FeatureCache.load

    def counting_load(self, split, *a, **k):
        loads.append(split)
        return real_load(self, split, *a, **k)

    monkeypatch.setattr(FeatureCache, "load", counting_load)
    res = sweep(path, cfg, tmp_path / "s", grid=["fusion=batch,concat"], seeds=[1, 2], execution=INLINE, progress=False)

    assert [(r["fusion"], r["seed"], r["status"]) for r in res.rows] == [("batch", 1, "ok"), ("batch", 2, "ok"), ("concat", 1, "ok"), ("concat", 2, "ok")]
    assert [r["run"] for r in res.rows] == ["fusion-batch-seed1", "fusion-batch-seed2", "fusion-concat-seed1", "fusion-concat-seed2"]
    assert all((tmp_path / "s" / "runs" / r["run"] / "results.json").exists() for r in res.rows)
    # the worker (here: this process) reads each split once for all four runs
    assert sorted(loads) == sorted(set(loads)) and {"train", "dev"} <= set(loads)

    on_disk = _csv(tmp_path / "s" / "runs.csv")
    assert len(on_disk) == 4
    assert {"fusion", "seed", "best_epoch", "dev_accuracy", "dev_weighted_f1", "dev_macro_f1", "test_accuracy", "wall_s", "status", "error"} <= set(on_disk[0])
    for row in res.rows:
        got = json.loads((tmp_path / "s" / "runs" / row["run"] / "results.json").read_text())
        assert row["dev_accuracy"] == got["splits"]["dev"]["accuracy"] and row["test_macro_f1"] == got["splits"]["test"]["macro_f1"]

    summary = {s["fusion"]: s for s in _csv(tmp_path / "s" / "summary.csv")}
    assert set(summary) == {"batch", "concat"}
    for fusion, s in summary.items():
        devs = np.array([r["dev_accuracy"] for r in res.rows if r["fusion"] == fusion])
        assert int(s["n"]) == 2
        assert float(s["dev_accuracy_mean"]) == pytest.approx(devs.mean())
        assert float(s["dev_accuracy_std"]) == pytest.approx(np.std(devs, ddof=1))
    # sorted on dev accuracy (test never selects)
    means = [s["dev_accuracy_mean"] for s in res.summary]
    assert means == sorted(means, reverse=True)
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "ddof=1" in md and md.count("±") >= 4 and f"**{res.summary[0]['fusion']}**" in md
    # test columns carry the paired bootstrap interval of the seed mean, read back from the runs' prediction files
    from sppscl.stage2.stats import bootstrap_interval

    for fusion, s in summary.items():
        files = [_csv(tmp_path / "s" / "runs" / f"fusion-{fusion}-seed{seed}" / "predictions-test.csv") for seed in (1, 2)]
        classes = sorted({r["label"] for r in files[0]} | {r["pred"] for f in files for r in f})
        cls = json.loads((tmp_path / "s" / "runs" / f"fusion-{fusion}-seed1" / "results.json").read_text())["classes"]
        y = np.array([cls.index(r["label"]) for r in files[0]])
        preds = np.array([[cls.index(r["pred"]) for r in f] for f in files])
        assert set(classes) <= set(cls)
        want = bootstrap_interval(y, preds, len(cls))
        assert (float(s["test_accuracy_ci95_low"]), float(s["test_accuracy_ci95_high"])) == pytest.approx(want["accuracy"])
        assert float(s["test_macro_f1_ci95_low"]) == pytest.approx(want["macro_f1"][0]) and s["test_ci95_note"] == ""
        assert f"[{want['accuracy'][0]:.4f}, {want['accuracy'][1]:.4f}]" in md
    assert "95% percentile bootstrap" in md and "Dev cells have no interval" in md


METRIC_COLUMNS = ["dev_accuracy", "dev_weighted_f1", "dev_macro_f1", "test_accuracy", "test_weighted_f1", "test_macro_f1"]


def test_aggregate_matches_numpy_and_sorts_on_dev():
    rng = np.random.default_rng(0)
    rows = []
    for name, n in (("a", 3), ("b", 1), ("c", 4)):
        for _ in range(n):
            rows.append({"config": name, "k": name, "status": "ok", **dict(zip(METRIC_COLUMNS, rng.uniform(0.3, 0.9, size=6)))})
    for name in ("c", "d"):
        rows.append({"config": name, "k": name, "status": "failed", **{c: None for c in METRIC_COLUMNS}})
    summary = aggregate(rows, ["k"])
    by = {s["k"]: s for s in summary}
    for name in "abc":
        ok = [r for r in rows if r["config"] == name and r["status"] == "ok"]
        for col in ("dev_accuracy", "test_macro_f1"):
            x = np.array([r[col] for r in ok])
            assert by[name][f"{col}_mean"] == pytest.approx(np.mean(x))
            assert by[name][f"{col}_std"] == pytest.approx(np.std(x, ddof=1) if len(x) > 1 else 0.0)
    assert by["b"]["dev_accuracy_std"] == 0.0 and by["b"]["n"] == 1
    assert (by["c"]["n"], by["c"]["n_failed"]) == (4, 1)
    assert summary[-1]["k"] == "d" and summary[-1]["n"] == 0 and summary[-1]["dev_accuracy_mean"] is None
    done = [s["dev_accuracy_mean"] for s in summary[:-1]]
    assert done == sorted(done, reverse=True)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_resume_reruns_only_unfinished_runs(base, tmp_path):
    path, cfg = base
    out = tmp_path / "s"
    first = sweep(path, cfg, out, grid=["ha_layers=2,4"], seeds=[0], execution=INLINE, progress=False)
    assert len(first.ran) == 2
    keep = out / "runs" / "ha_layers-4-seed0" / "results.json"
    stamp = keep.stat().st_mtime_ns
    # an interrupted run: its directory is there (checkpoints, log) but results.json is not
    (out / "runs" / "ha_layers-2-seed0" / "results.json").unlink()
    second = sweep(path, cfg, out, grid=["ha_layers=2,4"], seeds=[0], execution=INLINE, progress=False)
    assert second.ran == ["ha_layers-2-seed0"]
    assert keep.stat().st_mtime_ns == stamp
    assert [r["status"] for r in second.rows] == ["ok", "ok"]
    # the same command with nothing left to do trains nothing; another seed adds only its runs
    assert sweep(path, cfg, out, grid=["ha_layers=2,4"], seeds=[0], execution=INLINE, progress=False).ran == []
    assert sorted(sweep(path, cfg, out, grid=["ha_layers=4,2"], seeds=[0, 1], execution=INLINE, progress=False).ran) == ["ha_layers-2-seed1", "ha_layers-4-seed1"]
    # a changed base configuration is refused instead of mixing runs
    with pytest.raises(SweepError, match="another configuration"):
        sweep(path, apply_overrides(cfg, ["dim=16"]), out, grid=["ha_layers=2,4"], seeds=[0], execution=INLINE, progress=False)


def test_failed_run_is_reported_and_retried_while_others_finish(base, tmp_path, capsys):
    path, cfg = base
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": dict(cfg.train.__dict__)}))
    out = tmp_path / "s"
    argv = ["sweep", "--cache", str(path), "--config", str(preset), "--grid", "ha_layers=9,2", "--seeds", "0", "--jobs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 runs failed" in printed and "ha_layers-9-seed0" in printed
    rows = {r["run"]: r for r in _csv(out / "runs.csv")}
    assert rows["ha_layers-2-seed0"]["status"] == "ok" and rows["ha_layers-2-seed0"]["dev_accuracy"]
    bad = rows["ha_layers-9-seed0"]
    assert bad["status"] == "failed" and "ha_layers=9" in bad["error"] and bad["dev_accuracy"] == ""
    assert "Traceback" in (out / "runs" / "ha_layers-9-seed0" / "error.txt").read_text()
    summary = _csv(out / "summary.csv")
    assert summary[-1]["ha_layers"] == "9" and summary[-1]["n"] == "0" and summary[-1]["n_failed"] == "1"
    # the next invocation retries the failure, never the finished run
    stamp = (out / "runs" / "ha_layers-2-seed0" / "results.json").stat().st_mtime_ns
    assert main(argv) == 1
    assert (out / "runs" / "ha_layers-2-seed0" / "results.json").stat().st_mtime_ns == stamp
    assert "trained now: 1 runs; finished before: 1" in capsys.readouterr().out


def test_raising_run_is_caught(base, tmp_path, monkeypatch):
    from sppscl.stage2.sweeps import worker as sweep_mod

    path, cfg = base
    real = sweep_mod.train

    def flaky(cache, run_cfg, out_dir, **k):
        if run_cfg.train.seed == 2:
            raise RuntimeError("boom in seed 2")
        return real(cache, run_cfg, out_dir, **k)

    monkeypatch.setattr(sweep_mod, "train", flaky)
    res = sweep(path, cfg, tmp_path / "s", seeds=[1, 2, 3], execution=INLINE, progress=False)
    assert [r["status"] for r in res.rows] == ["ok", "failed", "ok"]
    assert res.failed == ["base-seed2"] and res.rows[1]["error"] == "RuntimeError: boom in seed 2"
    assert res.summary[0]["n"] == 2 and res.summary[0]["n_failed"] == 1


def test_optuna_random_search_writes_study_and_resumes(base, tmp_path):
    import optuna

    from sppscl.stage2.sweeps.study import open_storage

    path, cfg = base
    out = tmp_path / "s"
    args = dict(space=["lr=1e-3:1e-1:log", "fusion=batch,concat"], n_random=2, sampler="random", seeds=[0], execution=INLINE, progress=False)
    res = sweep(path, cfg, out, **args)
    assert (out / "study.log").exists()
    assert len(res.rows) == 2 and all(r["status"] == "ok" for r in res.rows) and len(res.ran) == 2
    assert all(1e-3 <= r["lr"] <= 1e-1 and r["fusion"] in ("batch", "concat") for r in res.rows)
    study = optuna.load_study(study_name="sppscl", storage=open_storage(None, out))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(t.value for t in trials) == sorted(r["dev_accuracy"] for r in res.rows)
    # a trial's results are one attribute (one write to a shared study's database), beside who ran it
    assert all(set(t.user_attrs) - {"config", "overrides", "seed", "draw", "run", "host", "pid", "invocation"} == {"result"} for t in trials)
    # rerunning draws nothing new and trains nothing; a different space is refused
    again = sweep(path, cfg, out, **args)
    assert again.ran == [] and len(again.rows) == 2
    assert len(optuna.load_study(study_name="sppscl", storage=open_storage(None, out)).trials) == 2
    with pytest.raises(SweepError, match="another space"):
        sweep(path, cfg, out, **{**args, "space": ["lr=1e-4:1e-1:log"]})


@pytest.mark.slow  # spawned workers training runs whose numbers equal in-process training: in the default suite, the PostgreSQL
# two-process sweep (its tables equal a local in-process sweep's) and the kill -9 of a local sweep (--jobs 2 workers)
def test_two_worker_processes(base, tmp_path):
    path, cfg = base
    res = sweep(path, cfg, tmp_path / "s", grid=["fusion=batch,concat"], seeds=[0], execution=Execution(workers=2), progress=False)
    assert [r["status"] for r in res.rows] == ["ok", "ok"], [r["error"] for r in res.rows]
    pids = {json.loads((tmp_path / "s" / "runs" / r["run"] / "sweep-run.json").read_text())["pid"] for r in res.rows}
    assert os.getpid() not in pids
    # the same configuration trained in this process gives the same numbers
    inline = sweep(path, cfg, tmp_path / "t", grid=["fusion=batch,concat"], seeds=[0], execution=INLINE, progress=False)
    assert [r["dev_accuracy"] for r in inline.rows] == [r["dev_accuracy"] for r in res.rows]


def test_reproduce_table7_on_tiny_cache(base, tmp_path, capsys):
    path, cfg = base
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": dict(cfg.train.__dict__)}))
    out = tmp_path / "paper"
    argv = ["reproduce", "table7", "--cache", str(path), "--config", str(preset), "--seeds", "1", "--jobs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed, errors = capsys.readouterr()
    header = next(line for line in printed.splitlines() if "Method" in line)
    assert "n=1" in printed and "paper" not in header.lower() and "No paper column" in printed
    md = (out / "table7" / "table.md").read_text()
    header = md.splitlines()[2]
    # the tiny cache's test split is labelled: the cells are test, selected on dev, and say so; no dev columns
    assert header.startswith("| Method") and "paper" not in header and "test ACC (selected on dev)" in header and "dev ACC" not in header
    assert md.count("(n=1)") >= 2 and "No paper column" in md
    # the tiny encoders are not the paper's: written beside the table, and said on stderr (a warning, not a result)
    assert "WARNING: this cache's encoders are tiny-cnn + tiny-bert" in md
    assert "warning:" in errors and "not the paper's" in errors and "not the paper's" not in printed
    # the full model is stored as the base configuration, shared with the other tables
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == ["base-seed1", "fusion-concat-seed1"]


def _fake_result(rows, primary="weighted", seeds=(1, 2, 3)):
    return SweepResult(None, None, [], rows, [], [], [], primary, list(seeds))


def test_paper_column_chosen_by_dataset():
    spec = TABLES["table4"]
    s = {"n": 3, "dev_accuracy_mean": 0.8, "dev_accuracy_std": 0.01, "dev_weighted_f1_mean": 0.79, "dev_weighted_f1_std": 0.02,
         "test_accuracy_mean": None, "test_accuracy_std": None}
    rows = [(v, s) for v in spec.variants]
    md = render_markdown("table4", spec, rows, "mvsa-single", "MVSA-S", _fake_result([]))
    assert "paper MVSA-S test ACC" in md and "| SPP-SCL (two-step) | 0.8133 | 0.8015 | 0.8000 ± 0.0100 (n=3) | 0.7900 ± 0.0200 (n=3) |" in md
    # no test labels: dev, labelled as the selection split
    assert "0.7956" in md and "ours test" not in md and "ours dev ACC (the selection split: optimistic)" in md and "has no labels" in md
    assert "WARNING" not in md
    hfm = render_markdown("table4", spec, rows, "hfm", "HFM", _fake_result([]))
    assert "0.9469 | 0.9450" in hfm and "0.8133" not in hfm


def test_variants_reduce_to_their_difference_from_the_base(tiny_cache):
    _, cfg = tiny_cache
    full = [minimal_overrides(v.overrides, cfg) for v in TABLES["table5"].variants]
    assert full == [{}, {"use_inter": False}, {"use_intra": False}]
    alphas = [config_slug(minimal_overrides(v.overrides, cfg)) for v in TABLES["fig5"].variants]
    assert alphas[2] == "base" and len(set(alphas)) == 5


def test_fig5_plot_is_written_with_the_tables_split_beside_dev(tmp_path):
    from PIL import Image

    dev = {"n": 2, "dev_accuracy_mean": 0.7, "dev_accuracy_std": 0.01, "dev_weighted_f1_mean": 0.6, "dev_weighted_f1_std": 0.02}
    test = {"test_accuracy_mean": 0.65, "test_accuracy_std": 0.01, "test_weighted_f1_mean": 0.55, "test_weighted_f1_std": 0.02}
    variants = TABLES["fig5"].variants
    dev_only = plot_alpha([(v, dev) for v in variants], tmp_path / "dev.png", "tiny", "weighted")
    assert dev_only.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs scored on test: table.md reports test, so the figure gets a test panel beside dev (it plotted dev alone)
    both = plot_alpha([(v, {**dev, **test}) for v in variants], tmp_path / "both.png", "tiny", "weighted")
    assert Image.open(both).width == 2 * Image.open(dev_only).width


def test_bad_sweep_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        parse_grid(["learning_rate=1,2"])
    with pytest.raises(ConfigError, match="--seeds"):
        parse_grid(["seed=1,2"])
    with pytest.raises(ConfigError, match="only train"):
        parse_grid(["encoders.layers=2,4"])
    with pytest.raises(ConfigError, match="not numeric"):
        parse_space(["fusion=0:1"])
    with pytest.raises(ConfigError, match="log range"):
        parse_space(["lr=0:1:log"])
    assert parse_grid(["alpha=1/3,0.5"]) == {"alpha": [1 / 3, 0.5]}
    dims = parse_space(["dim=16:64", "lr=1e-5:1e-3:log", "use_inter=true,false"])
    assert isinstance(dims["dim"].low, int) and dims["lr"].log and dims["use_inter"].choices == (True, False)


def test_search_runs_every_seed_of_every_draw(base, tmp_path):
    """A draw trains its first seed and queues the others; a queued seed is never taken for a draw beyond --random."""
    path, cfg = base
    res = sweep(path, cfg, tmp_path / "s", space=["lr=1e-3:1e-1:log"], n_random=2, sampler="tpe", seeds=[0, 1], execution=INLINE, progress=False)
    assert [r["status"] for r in res.rows] == ["ok"] * 4 and len(res.ran) == 4
    assert [r["seed"] for r in res.rows] == [0, 1, 0, 1] and len({r["config"] for r in res.rows}) == 2
    assert [s["n"] for s in res.summary] == [2, 2]


def test_trials_of_older_sweeps_with_one_attribute_per_result_field_still_read():
    """Sweeps before issue 20 stored each result field as its own user attribute: their studies still read."""
    import optuna
    from optuna.trial import TrialState

    from sppscl.stage2.sweeps.plans import ListPlan
    from sppscl.stage2.sweeps.study import attrs, has_result, outcome
    from sppscl.stage2.sweeps.tables import study_rows

    fields = {"status": "ok", "best_epoch": 2, "dev_accuracy": 0.5, "test_accuracy": 0.25, "wall_s": 1.5, "host": "h", "run_dir": "/x", "error": ""}
    old = optuna.trial.create_trial(
        state=TrialState.COMPLETE, value=0.5, user_attrs={"run": "fusion-batch-seed0", "config": "fusion-batch", "overrides": {"fusion": "batch"}, "seed": 0, **fields}
    )
    old.number = 0
    new = optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"run": "fusion-batch-seed0", "result": fields})
    for t in (old, new):
        assert attrs(t)["dev_accuracy"] == 0.5 and has_result(t)
    assert outcome([old], local=False) is old
    (row,) = study_rows([old], ListPlan([{"fusion": "batch"}], [0]), ["fusion"], {"fusion": "concat"}, local=False)
    assert (row["run"], row["status"], row["dev_accuracy"], row["test_accuracy"], row["best_epoch"]) == ("fusion-batch-seed0", "ok", 0.5, 0.25, 2)
