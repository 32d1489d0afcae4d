"""Sweeps on a shared study (a real PostgreSQL server started here) and sweeps that lose processes to kill -9.

Each (configuration, seed) must be trained exactly once across every process sharing the study; a killed
process's run is trained again elsewhere; the tables from the study equal a local sweep's; and a killed local
sweep leaves no worker behind and reruns at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sppscl.cli import main
from sppscl.config import ConfigError
from sppscl.stage2.sweeps import Execution, parse_devices, sweep
from sppscl.stage2.sweeps.plans import ListPlan
from sppscl.stage2.sweeps.spec import run_name
from sppscl.stage2.sweeps.study import all_trials, attrs, claim, open_storage, requeue

REPO = Path(__file__).resolve().parents[1]
# two configurations x two seeds: enough for two processes to share and for the summary's seed statistics
GRID = ["--grid", "fusion=batch,concat", "--seeds", "1,2"]
RUNS = {f"fusion-{f}-seed{s}" for f in ("batch", "concat") for s in (1, 2)}
# the kill tests need runs long enough to be caught mid-way
SMALL = [*GRID, "--set", "epochs=4"]
SMALL_RUNS = RUNS
# a local sweep's two workers, each caught in its run: two runs are enough
TWO = ["--seeds", "1,2", "--set", "epochs=4"]
TWO_RUNS = {"base-seed1", "base-seed2"}


@pytest.fixture
def preset(tiny_cache, tmp_path):
    path, cfg = tiny_cache
    p = tmp_path / "preset.yaml"
    # threads=1 in every process, so the numbers do not depend on which process trained a run
    p.write_text(yaml.safe_dump({"train": {**cfg.train.__dict__, "epochs": 1, "lr": 0.02, "threads": 1}}))
    return path, p


def _sweep_cmd(cache, preset, out, *extra, grid=GRID) -> list[str]:
    return [sys.executable, "-m", "sppscl", "sweep", "--cache", str(cache), "--config", str(preset), *grid, "--out", str(out), "--quiet", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _trained(study: optuna.Study) -> dict[str, list]:
    """Run name -> trials that trained it to the end (not reused from disk, not stepped aside)."""
    out: dict[str, list] = {}
    for t in study.get_trials():
        if t.state == TrialState.COMPLETE and not attrs(t).get("reused"):
            out.setdefault(t.user_attrs["run"], []).append(t)
    return out


def test_grid_sampler_hands_one_point_twice_and_claim_keeps_one(postgres):
    """Two trials holding one run (two machines queued it, or a search drew it twice): only the first trains it."""
    storage = open_storage(postgres, Path("."), heartbeat=1)
    study = optuna.create_study(storage=storage, study_name="claim-rule", sampler=optuna.samplers.GridSampler({"seed": [7]}))
    first, second = study.ask(), study.ask()
    assert first.suggest_categorical("seed", [7]) == second.suggest_categorical("seed", [7]) == 7  # the same point, twice
    first.set_user_attr("run", "base-seed7")
    second.set_user_attr("run", "base-seed7")
    assert claim(study, second.number, "base-seed7", local=False) == first.number
    assert claim(study, first.number, "base-seed7", local=False) is None
    study.sampler = optuna.samplers.RandomSampler()  # GridSampler may only stop a study from inside optimize()
    # a lower trial still choosing its run is waited for, not overlooked
    third = study.ask()
    fourth = study.ask()
    fourth.set_user_attr("run", "x")
    threading.Timer(0.5, lambda: third.set_user_attr("run", "x")).start()
    t0 = time.monotonic()
    assert claim(study, fourth.number, "x", local=False) == third.number
    assert time.monotonic() - t0 >= 0.4
    # a failed holder gives the run up (a retry may train it); a finished one keeps it for every later trial
    study.tell(third, state=TrialState.FAIL)
    assert claim(study, fourth.number, "x", local=False) is None
    study.tell(first, 0.5)
    late = study.ask()
    late.set_user_attr("run", "base-seed7")
    assert claim(study, late.number, "base-seed7", local=False) == first.number


def test_runs_are_queued_once_by_processes_that_saw_the_study_empty(postgres):
    """Two machines starting at once both find the study empty; on PostgreSQL the second reads it again under the
    queue lock before queueing, so each run gets one trial."""
    plan = ListPlan([{"fusion": "batch"}, {"fusion": "concat"}], [1, 2])
    a = optuna.create_study(storage=open_storage(postgres, Path("."), heartbeat=1), study_name="queue-once")
    b = optuna.load_study(study_name="queue-once", storage=open_storage(postgres, Path("."), heartbeat=1))
    seen_empty = all_trials(b)
    assert seen_empty == []
    assert len(requeue(a, plan, local=False, include_failed=True)) == 4
    assert requeue(b, plan, local=False, include_failed=True, trials=seen_empty) == []
    assert sorted(t.user_attrs["run"] for t in all_trials(b)) == sorted(run_name(c, s) for c, s in plan.runs)


def test_two_processes_share_a_grid_each_run_once_and_summary_equals_local(postgres, preset, tmp_path):
    cache, cfg_file = preset
    shared = ["--storage", postgres, "--study", "two-procs", "--heartbeat", "1", "--jobs", "1"]
    # two "machines": separate folders, nothing shared but the study
    procs = [subprocess.Popen(_sweep_cmd(cache, cfg_file, tmp_path / f"m{i}", *shared), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="two-procs", storage=postgres)
    trained = _trained(study)
    assert set(trained) == RUNS
    assert all(len(ts) == 1 for ts in trained.values()), {r: [t.number for t in ts] for r, ts in trained.items()}
    # started at once, the two queued each run once between them (queue_lock): no trial was set aside as a duplicate
    assert not [t.number for t in study.get_trials() if "duplicate_of" in t.user_attrs]
    # each run directory exists on exactly one machine, and the trial says which
    for run, (t,) in trained.items():
        homes = [m for m in ("m0", "m1") if (tmp_path / m / "runs" / run / "results.json").exists()]
        assert len(homes) == 1 and Path(attrs(t)["run_dir"]) == (tmp_path / homes[0] / "runs" / run).resolve()
        assert {"dev_accuracy", "test_accuracy", "best_epoch", "host", "wall_s", "error"} <= set(attrs(t))
    print("runs per process:", {m: len(list((tmp_path / m / "runs").glob("*/results.json"))) for m in ("m0", "m1")})

    # the tables from the study, on a third "machine", equal a local sweep's of the same grid
    assert main(["sweep", "summary", "--storage", postgres, "--study", "two-procs", "--out", str(tmp_path / "summary")]) == 0
    assert main(["sweep", "--cache", str(cache), "--config", str(cfg_file), *GRID, "--jobs", "1", "--out", str(tmp_path / "local"), "--quiet"]) == 0
    for name in ("summary.csv", "summary.md"):
        assert (tmp_path / "summary" / name).read_text() == (tmp_path / "local" / name).read_text()
    # and each process printed the complete table too
    assert all("trained now:" in o and "tables:" in o for o in outs)


def test_killed_process_run_is_trained_again_by_the_other(postgres, preset, tmp_path):
    cache, cfg_file = preset
    shared = ["--storage", postgres, "--study", "kill-one", "--heartbeat", "1", "--jobs", "1"]
    victim = subprocess.Popen(_sweep_cmd(cache, cfg_file, tmp_path / "a", *shared, grid=SMALL), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivor = subprocess.Popen(_sweep_cmd(cache, cfg_file, tmp_path / "b", *shared, grid=SMALL), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = open_storage(postgres, tmp_path, heartbeat=1)
    deadline = time.monotonic() + 300
    killed_run = None
    while killed_run is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            trials = optuna.load_study(study_name="kill-one", storage=storage).get_trials(deepcopy=False)
        except KeyError:
            continue  # not created yet
        # training for real (not a duplicate trial about to step aside): its run folder has its configuration
        mine = [
            t for t in trials
            if t.state == TrialState.RUNNING and t.user_attrs.get("pid") == victim.pid and (tmp_path / "a" / "runs" / t.user_attrs["run"] / "config.json").exists()
        ]
        if mine:
            killed_run = mine[0].user_attrs["run"]
            victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert killed_run is not None, "the victim never started a run"
    out = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, out
    study = optuna.load_study(study_name="kill-one", storage=storage)
    trained = _trained(study)
    assert set(trained) == SMALL_RUNS and all(len(ts) == 1 for ts in trained.values())
    # the killed trial was failed by the heartbeat check (not by a timer) and its run queued again as a new named trial
    trials = study.get_trials()
    (killed,) = [t for t in trials if t.user_attrs.get("pid") == victim.pid and t.user_attrs.get("run") == killed_run]
    assert killed.state == TrialState.FAIL and "status" not in attrs(killed)
    assert any(t.user_attrs["run"] == killed_run and t.number > killed.number and "fixed_params" in t.system_attrs for t in trials), [
        (t.number, t.state.name, t.user_attrs.get("run"), t.user_attrs.get("pid"), t.user_attrs.get("duplicate_of")) for t in trials
    ]
    assert trained[killed_run][0].user_attrs["pid"] == survivor.pid


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find the worker processes")
def test_kill_9_of_a_local_sweep_leaves_no_workers_and_reruns(preset, tmp_path):
    cache, cfg_file = preset
    out = tmp_path / "s"
    cmd = _sweep_cmd(cache, cfg_file, out, "--jobs", "2", grid=TWO)
    parent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    workers: list[int] = []
    while time.monotonic() < deadline:
        time.sleep(0.2)
        workers = _children(parent.pid)  # the two workers (and multiprocessing's resource tracker)
        started = list((out / "runs").glob("*/")) if (out / "runs").exists() else []
        if len(workers) >= 2 and started:
            break
    assert len(workers) >= 2, "the sweep never started its workers"
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    gone_by = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), f"workers outlived their sweep: {[w for w in workers if _alive(w)]}"
    # a rerun starts at once (no lock left behind) and finishes every run (in its own process: --jobs 1 starts no workers)
    rerun = subprocess.run(_sweep_cmd(cache, cfg_file, out, "--jobs", "1", grid=TWO), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {p.parent.name for p in (out / "runs").glob("*/results.json")} == TWO_RUNS
    assert "trained now:" in rerun.stdout


def test_a_second_local_sweep_on_the_same_folder_is_refused(preset, tmp_path):
    from sppscl.stage2.sweeps.engine import folder_lock
    from sppscl.stage2.sweeps.spec import SweepError

    cache, _ = preset
    with folder_lock(tmp_path / "s"):
        with pytest.raises(SweepError, match=f"in use by another sweep \\(pid {os.getpid()}\\)"):
            with folder_lock(tmp_path / "s"):
                pass
    with folder_lock(tmp_path / "s"):  # released with its holder
        pass


def test_devices_and_execution_options():
    torch = __import__("torch")
    if torch.cuda.device_count() >= 2:
        assert parse_devices("cuda:0, cuda:1,cuda:0") == ("cuda:0", "cuda:1")
    else:  # a device this machine lacks is a usage error up front (issue 17), not a failure of every run
        with pytest.raises(ConfigError, match="CUDA is not available|cuda:"):
            parse_devices("cuda:0, cuda:1,cuda:0")
    assert parse_devices("cpu, cpu") == ("cpu",)
    assert parse_devices(None) == ()
    with pytest.raises(ConfigError, match="expected all"):
        parse_devices("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            parse_devices("all")
    assert Execution(devices=("cuda:0", "cuda:1"), runs_per_device=3).worker_count(100) == 6
    assert Execution(devices=("cuda:0", "cuda:1"), runs_per_device=3).worker_count(4) == 4
    with pytest.raises(ConfigError, match="go together"):
        Execution(storage="postgresql://x@y/z")
    with pytest.raises(ConfigError, match="runs-per-device"):
        Execution(runs_per_device=0)


def test_workers_are_placed_round_robin_and_runs_use_their_device(tiny_cache, tmp_path):
    import json

    from sppscl.stage2.sweeps.engine import placements

    assert placements(5, ("cuda:0", "cuda:1")) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert placements(2, ()) == [None, None]
    path, cfg = tiny_cache
    res = sweep(path, cfg, tmp_path / "s", seeds=[0], execution=Execution(devices=("cpu",)), progress=False)
    assert res.rows[0]["status"] == "ok"
    assert json.loads((tmp_path / "s" / "runs" / "base-seed0" / "config.json").read_text())["train"]["device"] == "cpu"


# ------------------------------------------------------------------------------------ issue 17: secrets and outages

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def pg_with_password():
    """A server that asks for a password; its URL carries none."""
    sys.path.insert(0, str(REPO))
    from bench.postgres import PostgresUnavailable, TempPostgres

    pg = TempPostgres(password=PASSWORD)
    try:
        pg.start()
    except PostgresUnavailable as e:
        pg.stop()
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    yield pg
    pg.stop()


@pytest.mark.slow
def test_password_comes_from_pgpassword_or_pgpass_and_is_never_shown(pg_with_password, preset, tmp_path, monkeypatch, capsys):
    """libpq reads PGPASSWORD and the password file when the URL has none; a URL's own password is masked."""
    cache, cfg_file = preset
    url = pg_with_password.url
    port = url.rsplit(":", 1)[1].split("/")[0]

    def sweep_with(storage: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(["sweep", "--cache", str(cache), "--config", str(cfg_file), "--grid", "fusion=batch", "--seeds", "1",
                     "--storage", storage, "--study", "pw", "--out", str(tmp_path / "s"), "--quiet"])
        out, err = capsys.readouterr()
        return code, out + err

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-file"))
    code, text = sweep_with(url)
    assert code == 2 and "cannot open the study storage" in text and "PGPASSWORD" in text and "Traceback" not in text, text

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    code, text = sweep_with(url)
    assert code == 0, text

    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{port}:*:sppscl:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    code, text = sweep_with(url)
    assert code == 0, text

    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-file"))
    with_pw = url.replace("sppscl@", f"sppscl:{PASSWORD}@")
    code, text = sweep_with(with_pw)
    assert code == 0 and PASSWORD not in text and "sppscl:***@" in text, text
    code, text = sweep_with(url.replace("sppscl@", "sppscl:wrong-pw@"))
    assert code == 2 and "wrong-pw" not in text and "sppscl:***@" in text, text


@pytest.mark.slow
def test_lost_database_is_one_line_workers_exit_and_the_rerun_continues(preset, tmp_path):
    from conftest import start_postgres  # its own server: the test stops it mid-sweep

    cache, cfg_file = preset
    pg = start_postgres()
    try:
        url = pg.url.replace("sppscl@", "sppscl:hidden-pw@")  # trust auth ignores it; it must never be shown
        shared = ["--storage", url, "--study", "outage", "--heartbeat", "1", "--jobs", "2"]
        cmd = _sweep_cmd(cache, cfg_file, tmp_path / "m", *shared, grid=SMALL)
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if any(t.state == TrialState.COMPLETE for t in optuna.load_study(study_name="outage", storage=pg.url).get_trials()):
                    break
            except KeyError:
                pass
            time.sleep(0.5)
        pg.pause()
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 1, out
        assert "Traceback" not in out and "hidden-pw" not in out, out
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "lost the study database postgresql://sppscl:***@" in errors[0] and "rerun the same command" in errors[0], out
        pg.resume()
        again = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        assert again.returncode == 0, again.stdout
        study = optuna.load_study(study_name="outage", storage=pg.url)
        # every run finished: trained once, or (finished on disk just before the outage) reused by the rerun
        assert {t.user_attrs["run"] for t in study.get_trials() if t.state == TrialState.COMPLETE} == SMALL_RUNS
        trained = _trained(study)
        assert all(len(ts) == 1 for ts in trained.values()), trained
    finally:
        pg.stop()
