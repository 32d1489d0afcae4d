"""The experiment engine under faults: every run is one named trial from the start, one rerun retries every
failed or missing run, and one process at a time owns a run directory (sweeps, tables, cv and train alike)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import interrupt_on_call
from sppscl.config import apply_overrides
from sppscl.stage2.ownership import RunInUseError, lock_path, new_run_dir, own_run
from sppscl.stage2.sweeps import Execution, sweep
from sppscl.stage2.sweeps import worker as worker_mod
from sppscl.stage2.sweeps.study import attrs, open_storage

INLINE = Execution(workers=1)  # runs in the test process


@pytest.fixture
def base(tiny_cache):
    path, cfg = tiny_cache
    return path, apply_overrides(cfg, ["epochs=1"])


def _trained(out) -> dict[str, int]:
    """Run name -> how many trials of the sweep's study trained it (reused runs and steps aside not counted)."""
    storage = open_storage(None, out)
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    counts: dict[str, int] = {}
    for t in optuna.load_study(study_name=name, storage=storage).get_trials():
        if t.state == TrialState.COMPLETE and not attrs(t).get("reused"):
            counts[t.user_attrs["run"]] = counts.get(t.user_attrs["run"], 0) + 1
    return counts


def test_a_trial_interrupted_before_it_names_its_run_is_retried(base, tmp_path, monkeypatch):
    """The second trial of a 2-configuration grid is interrupted after it was handed its run, before it names it
    (the moment a GridSampler trial lost its point for good): the rerun trains exactly the runs left, each once."""
    path, cfg = base
    out = tmp_path / "s"
    args = dict(grid=["ha_layers=2,4"], seeds=[1], execution=INLINE, progress=False)
    real = interrupt_on_call(monkeypatch, worker_mod, "run_name", 2)
    with pytest.raises(KeyboardInterrupt):
        sweep(path, cfg, out, **args)
    monkeypatch.setattr(worker_mod, "run_name", real)
    done_before = {p.parent.name for p in (out / "runs").glob("*/results.json")}
    assert len(done_before) == 1
    again = sweep(path, cfg, out, **args)
    everything = {"ha_layers-2-seed1", "ha_layers-4-seed1"}
    assert set(again.ran) == everything - done_before
    assert [r["status"] for r in again.rows] == ["ok"] * 2 and {r["run"] for r in again.rows} == everything
    assert [s["n"] for s in again.summary] == [1, 1]
    assert _trained(out) == {r: 1 for r in everything}


@pytest.mark.slow
def test_a_draw_interrupted_before_it_names_its_run_is_drawn_again(base, tmp_path, monkeypatch):
    path, cfg = base
    out = tmp_path / "s"
    args = dict(space=["lr=1e-3:1e-1:log"], n_random=2, sampler="random", seeds=[1, 2], execution=INLINE, progress=False)
    # trial 0 draws and trains seed 1, trial 1 is its queued seed 2, trial 2 is the second draw
    real = interrupt_on_call(monkeypatch, worker_mod, "run_name", 3)
    with pytest.raises(KeyboardInterrupt):
        sweep(path, cfg, out, **args)
    monkeypatch.setattr(worker_mod, "run_name", real)
    again = sweep(path, cfg, out, **args)
    assert len(again.rows) == 4 and all(r["status"] == "ok" for r in again.rows), again.rows
    assert len({r["config"] for r in again.rows}) == 2 and len(again.ran) == 2
    assert set(_trained(out).values()) == {1}


def test_one_rerun_retries_every_failed_run(base, tmp_path, monkeypatch):
    """Three failed runs (one worker) are all retried by the next command, not one per command."""
    path, cfg = base
    out = tmp_path / "s"
    real = worker_mod.train

    def broken(*a, **k):
        raise RuntimeError("no space left (simulated)")

    monkeypatch.setattr(worker_mod, "train", broken)
    first = sweep(path, cfg, out, seeds=[1, 2, 3], execution=INLINE, progress=False)
    assert sorted(first.failed) == ["base-seed1", "base-seed2", "base-seed3"] and first.summary[0]["n_failed"] == 3
    monkeypatch.setattr(worker_mod, "train", real)
    second = sweep(path, cfg, out, seeds=[1, 2, 3], execution=INLINE, progress=False)
    assert second.failed == [] and sorted(second.ran) == ["base-seed1", "base-seed2", "base-seed3"]
    assert (second.summary[0]["n"], second.summary[0]["n_failed"]) == (3, 0)
    # the failures' tracebacks are gone with the retry: the folders hold the finished runs only
    assert not any((out / "runs" / f"base-seed{s}" / "error.txt").exists() for s in (1, 2, 3))


HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    folder, lock, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    os.makedirs(folder, exist_ok=True)
    fh = open(lock, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX)
    fh.write(f"pid {os.getpid()} (test holder)"); fh.flush()
    open(os.path.join(folder, "holder-was-here"), "w").close()
    open(os.path.join(folder, "config.json"), "w").close()  # a run in progress writes its configuration first
    print("holding", flush=True)
    time.sleep(seconds)
    print("released", os.path.exists(os.path.join(folder, "holder-was-here")), time.time(), flush=True)
    """
)


def _hold(folder, seconds: float) -> subprocess.Popen:
    """Another process owning ``folder`` for ``seconds`` (the lock protocol alone, no sppscl import)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(lock_path(folder)), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def test_train_into_a_folder_another_process_owns_exits_2_naming_it(tiny_cache, tmp_path, capsys):
    from sppscl.cli import main

    path, _ = tiny_cache
    run = tmp_path / "run"
    holder = _hold(run, 30)
    try:
        with pytest.raises(RunInUseError, match=f"is in use by pid {holder.pid} \\(test holder\\)"):
            with own_run(run):
                pass
        assert main(["train", "--cache", str(path), "--set", "epochs=1", "--set", "device=cpu", "--out", str(run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} (test holder)" in err and str(run) in err
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "holder-was-here"]  # nothing of the holder's touched
    finally:
        holder.kill()
        holder.wait()
    # in one process, a nested hold is not a second owner (train inside a sweep worker), and the lock goes with its holder
    with own_run(run), own_run(run):
        pass
    with own_run(run):
        pass


def test_default_run_folders_of_concurrent_starts_never_collide(tmp_path):
    made: list = []
    threads = [threading.Thread(target=lambda: made.append(new_run_dir(tmp_path / "runs", "tiny"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8 and len(set(made)) == 8 and all(p.is_dir() and not any(p.iterdir()) for p in made)


def test_a_sweep_waits_for_the_live_owner_of_a_run_and_never_clears_it(base, tmp_path):
    """A run folder held by another live process (another table, a cv, a train) is waited for, not cleared."""
    path, cfg = base
    out = tmp_path / "s"
    holder = _hold(out / "runs" / "base-seed1", 4)
    res = sweep(path, cfg, out, seeds=[1], execution=INLINE, progress=False)
    released = holder.stdout.readline().split()
    holder.wait()
    assert released[:2] == ["released", "True"], "the sweep cleared the folder while its owner was alive"
    folder = out / "runs" / "base-seed1"
    assert res.rows[0]["status"] == "ok" and (folder / "results.json").exists()
    # trained after the holder let go, into a folder it then cleared of the holder's leftovers
    assert (folder / "metrics.jsonl").stat().st_mtime >= float(released[2]) and not (folder / "holder-was-here").exists()


def test_cv_workers_is_refused_pointing_at_jobs(tmp_path, capsys):
    """--workers means image decoding everywhere; cv decodes none, so it is refused, not taken for --jobs."""
    from sppscl.cli import main

    assert main(["cv", "--cache", str(tmp_path / "c.h5"), "--workers", "3", "--out", str(tmp_path / "cv")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "image-decoding" in err and "--jobs 3" in err
    assert not (tmp_path / "cv").exists()


# ------------------------------------------------------------------------------------ concurrent commands (slow)


def _preset(tiny_cache, tmp_path, epochs: int = 2):
    import yaml

    path, cfg = tiny_cache
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump({"train": {**cfg.train.__dict__, "epochs": epochs, "threads": 1}}))
    return path, p


def _together(*argvs) -> list[subprocess.CompletedProcess]:
    """Start every command at once; wait for all."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sppscl", *a], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _trainings(*studies) -> dict[str, int]:
    """Run name -> trainings across the studies of several commands (a run one reused from another is not counted)."""
    counts: dict[str, int] = {}
    for folder in studies:
        for run, n in _trained(folder).items():
            counts[run] = counts.get(run, 0) + n
    return counts


def _clean_series(folder, epochs: int) -> None:
    got = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert got == list(range(1, epochs + 1)), f"{folder}: epochs {got}"


@pytest.mark.slow
def test_two_reproduce_tables_on_one_out_at_once_train_the_shared_runs_once(tiny_cache, tmp_path):
    cache, preset = _preset(tiny_cache, tmp_path)
    out = tmp_path / "paper"
    common = ["--cache", str(cache), "--config", str(preset), "--seeds", "1", "--jobs", "1", "--out", str(out), "--quiet"]
    results = _together(["reproduce", "table4", *common], ["reproduce", "table5", *common])
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    counts = _trainings(out / "table4", out / "table5")
    # the full model (table4's two-step = table5's SPP-SCL = the base) is shared: trained once, reused by the other
    assert counts == {"base-seed1": 1, "update-one-step-seed1": 1, "use_inter-false-seed1": 1, "use_intra-false-seed1": 1}, counts
    for run in counts:
        _clean_series(out / "runs" / run, 2)
    assert (out / "table4" / "table.md").exists() and (out / "table5" / "table.md").exists()


@pytest.mark.slow
def test_cv_and_reproduce_cv_on_one_out_at_once_train_each_fold_run_once(tiny_cache, tmp_path):
    cache, preset = _preset(tiny_cache, tmp_path)
    out = tmp_path / "x"
    common = ["--cache", str(cache), "--config", str(preset), "--seeds", "1", "--jobs", "1", "--out", str(out), "--quiet"]
    results = _together(["cv", "--folds", "2", *common], ["reproduce", "table4", "--cv", "2", *common])
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    counts = _trainings(out / "per-fold", out / "table4-cv2" / "per-fold")
    shared = [f"cv_fold-{k}__cv_folds-2-seed1" for k in (0, 1)]
    assert all(counts[r] == 1 for r in shared) and set(counts.values()) == {1}, counts
    for run in counts:
        _clean_series(out / "runs" / run, 2)


@pytest.mark.slow
def test_two_trains_on_one_out_one_trains_the_other_exits_2(tiny_cache, tmp_path):
    cache, preset = _preset(tiny_cache, tmp_path, epochs=6)
    run = tmp_path / "run"
    argv = ["train", "--cache", str(cache), "--config", str(preset), "--out", str(run), "--quiet"]
    results = _together(argv, argv)
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    refused = next(r for r in results if r.returncode == 2)
    # refused while the other trains (it names it), or after (the folder holds its finished run)
    assert "is in use by pid" in refused.stderr or "already holds a run" in refused.stderr, refused.stderr
    _clean_series(run, 6)
