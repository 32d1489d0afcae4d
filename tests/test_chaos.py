"""Chaos: a grid x seeds sweep killed with ``kill -9`` at random moments, round after round, then finished.

Whatever instant the kills land on (starting up, queuing, training, writing checkpoints or results, recording
the outcome), the finished sweep must hold every run exactly once in its tables, none missing, and each run's
metrics.jsonl must be one clean series (epochs 1..N, no repeats). Local (journal file) and on PostgreSQL.
The short variant runs in the default suite; the long ones are ``slow``. Each round's moment and outcome is
printed (``pytest -s``) and written to ``chaos.json`` beside the sweep.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sppscl.stage2.sweeps.study import attrs, open_storage

EPOCHS = 3


@pytest.fixture
def preset(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump({"train": {**cfg.train.__dict__, "epochs": EPOCHS, "lr": 0.02, "threads": 1}}))
    return path, p


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _training_since(out: Path, t0: float) -> bool:
    """Whether a run has written anything (its configuration, a metrics line) since ``t0``."""
    return any(f.stat().st_mtime >= t0 for pattern in ("runs/*/config.json", "runs/*/metrics.jsonl") for f in out.glob(pattern))


def chaos(cache, preset, out: Path, grid: list[str], runs: set[str], rounds: int, window: tuple[float, float], seed: int, jobs: int = 1, storage: tuple[str, str] | None = None) -> list[dict]:
    """``rounds`` sweeps each killed by SIGKILL, then one left to finish; checks the tables and every run folder.

    The moment: odd rounds at a blind random delay in ``window`` (seconds from the start: starting up, opening
    the study, queuing, training), even rounds a random 0-2 s after 1-2 more runs have finished and one has
    started writing (checkpoints, metrics, results). A round that finishes before its moment is let be."""
    cmd = [sys.executable, "-m", "sppscl", "sweep", "--cache", str(cache), "--config", str(preset), *grid, "--out", str(out), "--quiet", "--jobs", str(jobs)]
    if storage is not None:
        cmd += ["--storage", storage[0], "--study", storage[1], "--heartbeat", "1"]
    rng = random.Random(seed)
    log = []
    for r in range(rounds):
        # half the rounds kill only the sweep process (its workers follow it), half its whole process group at once
        group = r % 4 >= 2
        t0 = time.time()
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if r % 2 == 0:
            # a random point of the sweep: after 1-2 more runs have finished, while another one is training
            target = min(len(list(out.glob("runs/*/results.json"))) + rng.randint(1, 2), len(runs) - 1)
            while p.poll() is None and time.time() - t0 < 300 and not (
                len(list(out.glob("runs/*/results.json"))) >= target and _training_since(out, t0)
            ):
                time.sleep(0.05)
            moment = f"training, {target} runs finished"
            delay = rng.uniform(0.0, 2.0)
        else:
            moment = "blind"
            delay = rng.uniform(*window)
        try:
            rc = p.wait(delay)
            outcome = f"finished first (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL) if group else p.send_signal(signal.SIGKILL)
            p.wait(30)
            outcome = "killed" + (" with its process group" if group else "")
        done = sorted(x.parent.name for x in out.glob("runs/*/results.json"))
        log.append({"round": r + 1, "moment": moment, "kill_at_s": round(time.time() - t0, 2), "outcome": outcome, "runs_finished": len(done)})
    t0 = time.monotonic()
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    log.append({"round": "final", "outcome": f"exit {final.returncode}", "seconds": round(time.monotonic() - t0, 1)})
    (out / "chaos.json").write_text(json.dumps(log, indent=2))
    print("\nchaos rounds:", json.dumps(log))
    assert final.returncode == 0, final.stdout + final.stderr

    rows = _csv(out / "runs.csv")
    assert sorted(r["run"] for r in rows) == sorted(runs), "every run exactly once in runs.csv"
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for s in _csv(out / "summary.csv"):
        assert (s["n"], s["n_failed"]) == (str(len(runs) // len(_csv(out / "summary.csv"))), "0")
    for run in runs:
        folder = out / "runs" / run
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, EPOCHS + 1)), f"{run}: metrics.jsonl epochs {epochs}"
        assert json.loads((folder / "results.json").read_text())["epochs_trained"] == EPOCHS
        assert not (folder / "error.txt").exists()
    # the study agrees: every run has one finished training (a run finished just before a kill is reused, never retrained)
    store = open_storage(storage[0] if storage else None, out, 1)
    name = storage[1] if storage else optuna.get_all_study_summaries(store)[0].study_name
    trials = optuna.load_study(study_name=name, storage=store).get_trials()
    for run in runs:
        complete = [t for t in trials if t.user_attrs.get("run") == run and t.state == TrialState.COMPLETE]
        assert complete and sum(not attrs(t).get("reused") for t in complete) <= 1, run
    return log


def test_chaos_short(preset, tmp_path):
    """The default suite's variant: two runs, one kill a random moment into training, then finished."""
    cache, p = preset
    chaos(cache, p, tmp_path / "s", ["--seeds", "1,2"], {"base-seed1", "base-seed2"}, rounds=1, window=(2.0, 9.0), seed=int(time.time()))


GRID = ["--grid", "fusion=batch,concat", "--seeds", "1,2,3"]
GRID_RUNS = {f"fusion-{f}-seed{s}" for f in ("batch", "concat") for s in (1, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_chaos_local(preset, tmp_path, jobs):
    cache, p = preset
    chaos(cache, p, tmp_path / "s", GRID, GRID_RUNS, rounds=6, window=(1.0, 14.0), seed=1000 + jobs, jobs=jobs)


@pytest.mark.slow
def test_chaos_postgres(postgres, preset, tmp_path):
    cache, p = preset
    chaos(cache, p, tmp_path / "s", GRID, GRID_RUNS, rounds=6, window=(1.0, 14.0), seed=2000, jobs=2, storage=(postgres, "chaos"))
