"""CLI conventions (issue 10): --set goes to the stage that uses it, safe checkpoints, saved and machine-readable
results, 1-based epochs everywhere, trackers and plots in every run folder, help texts that render."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sppscl import cli
import sppscl.cli.console  # noqa: F401  (cli.console, cli.options below)
import sppscl.cli.options  # noqa: F401
from sppscl.cache import FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.stage2.runs import RunError, load_checkpoint
from sppscl.stage2.train import train


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    """A two-epoch run with the TensorBoard tracker on."""
    path, cfg = tiny_cache
    out = tmp_path_factory.mktemp("cli") / "run"
    results = train(path, apply_overrides(cfg, ["epochs=2", "logger=tensorboard"]), out, progress=False)
    return path, out, results


# ------------------------------------------------------------------------------------ --set goes where it is used


def _yaml(tmp_path, cfg):
    import yaml

    preset = tmp_path / "p.yaml"
    d = cfg.to_dict()
    d.pop("source")
    preset.write_text(yaml.safe_dump(d))
    return preset


def test_extract_set_batch_size_changes_extraction_not_training(tiny_cache, tmp_path, monkeypatch, capsys):
    import sppscl.stage1.extract as extract_mod

    seen = {}

    def fake_extract(cfg, out, *a, **k):
        seen["cfg"] = cfg
        raise RunError("stop here")

    monkeypatch.setattr(extract_mod, "extract", fake_extract)
    _, cfg = tiny_cache
    preset = _yaml(tmp_path, cfg)
    assert main(["extract", "--config", str(preset), "--set", "batch_size=5", "--set", "device=cpu", "--out", str(tmp_path / "c.h5")]) == 2
    assert seen["cfg"].extract.batch_size == 5 and seen["cfg"].train.batch_size == cfg.train.batch_size
    assert seen["cfg"].extract.device == "cpu"
    # a training key on extract is an error naming the key, before anything runs
    seen.clear()
    assert main(["extract", "--config", str(preset), "--set", "lr=0.1", "--out", str(tmp_path / "c.h5")]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "sppscl extract" in err and "does not use" in err and not seen


def test_train_set_rejects_stage_one_keys_and_takes_bare_keys_as_train(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    preset = _yaml(tmp_path, cfg)
    base = ["train", "--cache", str(path), "--config", str(preset), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*base, "--set", "extract.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "extract.batch_size" in err and "sppscl train" in err
    assert main([*base, "--set", "max_length=16"]) == 2
    assert "encoders.max_length" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli.options.train_config(path, str(preset), ["batch_size=7"], None, "cpu").train.batch_size == 7


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_safetensors_plus_json(run):
    path, out, _ = run
    for name in ("best", "last"):
        assert (out / f"{name}.safetensors").exists() and (out / f"{name}.json").exists()
        assert not (out / f"{name}.pt").exists()
        meta = json.loads((out / f"{name}.json").read_text())
        assert meta["format"] == "sppscl-checkpoint" and meta["cache_provenance"] == FeatureCache(path).provenance
        assert meta["config"]["train"]["epochs"] == 2 and meta["epoch"] == (2 if name == "last" else meta["best"]["epoch"])
        # shared like any file the run writes (not owner-only)
        assert (out / f"{name}.safetensors").stat().st_mode & 0o777 == (out / "results.json").stat().st_mode & 0o777
    # the safetensors file alone is a complete checkpoint: no pickle anywhere
    assert (out / "best.safetensors").read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # torch.save's pickle magic
    ckpt = load_checkpoint(out / "best.json")
    assert set(ckpt["model"]) == set(load_checkpoint(out / "best.safetensors")["model"])


def test_a_run_folder_is_accepted_wherever_a_checkpoint_is(run, tmp_path, capsys):
    """evaluate and analyze take RUN (its best checkpoint); a folder without one is one clear error."""
    path, out, _ = run
    assert main(["evaluate", "--checkpoint", str(out), "--cache", str(path), "--split", "dev", "--json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--checkpoint", str(out / "best.safetensors"), "--cache", str(path), "--split", "dev", "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)
    assert by_folder["splits"] == by_file["splits"] and by_folder["epoch"] == by_file["epoch"]
    assert load_checkpoint(out, "last")["epoch"] == 2
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["evaluate", "--checkpoint", str(empty), "--cache", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not-a-run is a folder without a best checkpoint" in err and "Traceback" not in err
    assert main(["analyze", "--checkpoint", str(out), "--cache", str(path), "--split", "dev", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "analysis.json").exists()


def _payload(marker):
    """An object whose unpickling calls ``Path(marker).touch()``: the classic arbitrary-call payload."""
    import pathlib

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (pathlib.Path(marker),))

    return {"format": "sppscl-checkpoint", "version": 1, "model": Payload()}


def test_a_malicious_pickle_is_never_executed(run, tmp_path, capsys):
    import pickle

    path, _, _ = run
    marker = tmp_path / "pwned"
    # the payload is live: plain unpickling runs it
    pickle.loads(pickle.dumps(_payload(marker)))
    assert marker.exists()
    marker.unlink()
    evil_pt = tmp_path / "best.pt"
    torch.save(_payload(marker), evil_pt)  # what a shared, tampered .pt checkpoint looks like
    evil_st = tmp_path / "best.safetensors"
    evil_st.write_bytes(pickle.dumps(_payload(marker)))  # a pickle under the new name
    for evil, says in ((evil_pt, "could run code"), (evil_st, "not a readable safetensors")):
        with pytest.raises(RunError, match=says):
            load_checkpoint(evil)
        assert main(["evaluate", "--checkpoint", str(evil), "--cache", str(path), "--split", "dev"]) == 2
        assert says in capsys.readouterr().err
        assert not marker.exists()


def test_old_pt_checkpoints_load_safely_and_convert(run, tiny_cache, tmp_path, capsys):
    path, out, results = run
    # a checkpoint as sppscl wrote them before: one torch pickle, epochs counted from 0
    ckpt = load_checkpoint(out / "best.safetensors")
    old = {**ckpt, "version": 1, "epoch": ckpt["epoch"] - 1, "best": {**ckpt["best"], "epoch": ckpt["best"]["epoch"] - 1}}
    legacy = tmp_path / "old" / "best.pt"
    legacy.parent.mkdir()
    torch.save(old, legacy)
    loaded = load_checkpoint(legacy)
    assert loaded["epoch"] == ckpt["epoch"] and loaded["best"]["epoch"] == ckpt["best"]["epoch"]
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
    assert main(["evaluate", "--checkpoint", str(legacy), "--cache", str(path), "--split", "dev", "--json"]) == 0
    dev = json.loads(capsys.readouterr().out)["splits"]["dev"]
    # evaluate adds its bootstrap interval (ci95, ci95_method); every metric train reported is the same
    assert {k: v for k, v in dev.items() if not k.startswith("ci95")} == results["splits"]["dev"]
    assert main(["checkpoint", "convert", str(legacy)]) == 0
    converted = load_checkpoint(tmp_path / "old" / "best.safetensors")
    assert converted["epoch"] == ckpt["epoch"] and all(torch.equal(converted["model"][k], v) for k, v in ckpt["model"].items())
    # a run started by an older sppscl cannot be resumed, converted or not, and says so
    torch.save(old, tmp_path / "old" / "last.pt")
    with pytest.raises(RunError, match="older sppscl"):
        train(path, tiny_cache[1], tmp_path / "old", resume=True, progress=False)
    assert main(["checkpoint", "convert", str(tmp_path / "old" / "last.pt")]) == 0
    with pytest.raises(RunError, match="older sppscl"):
        train(path, tiny_cache[1], tmp_path / "old", resume=True, progress=False)


# ------------------------------------------------------------------------------------ epochs, plots, trackers


def test_epochs_are_numbered_from_one_everywhere(run):
    _, out, results = run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    best = max(lines, key=lambda r: (r["dev_accuracy"], r["dev_weighted_f1"]))
    assert results["best_epoch"] == lines[-1]["best_epoch"] == load_checkpoint(out / "best.safetensors")["best"]["epoch"]
    assert results["best_epoch"] in (1, 2) and lines[results["best_epoch"] - 1]["dev_accuracy"] == best["dev_accuracy"]


def test_every_run_folder_gets_curves_and_confusion_plots(run):
    _, out, results = run
    labelled = [s for s, m in results["splits"].items() if "confusion_matrix" in m]
    assert labelled
    for name in ["curves.png", *[f"confusion-{s}.png" for s in labelled]]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_tensorboard_event_files_hold_every_epoch_number(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ("loss/total", "loss/lambda_ce", "loss/intra_image", "loss/intra_text", "loss/inter", "train/step2_fired", "train/lr", "dev/accuracy", "dev/macro_f1"):
        assert t in tags, t
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("dev/accuracy")] == [(r["epoch"], r["dev_accuracy"]) for r in lines]


def test_missing_tracker_package_is_a_clear_error_before_anything_is_written(tiny_cache, tmp_path, monkeypatch):
    path, cfg = tiny_cache
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(Exception, match=r"pip install 'sppscl\[mlflow\]'"):
        train(path, apply_overrides(cfg, ["epochs=1", "logger=mlflow"]), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_mlflow_tracker_gets_params_and_every_epoch(tiny_cache, tmp_path, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda run_name=None: calls.append(("start", run_name))
    fake.log_params = lambda p: calls.append(("params", p))
    fake.log_metrics = lambda m, step=None: calls.append(("metrics", step, m))
    fake.end_run = lambda status: calls.append(("end", status))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    path, cfg = tiny_cache
    train(path, apply_overrides(cfg, ["epochs=2", "logger=mlflow"]), tmp_path / "r", progress=False)
    assert calls[0] == ("start", "r") and calls[-1] == ("end", "FINISHED")
    params = calls[1][1]
    assert params["train.epochs"] == 2 and params["train.logger"] == "mlflow" and json.loads(params["dataset.classes"]) == cfg.dataset.classes
    per_epoch = [c for c in calls if c[0] == "metrics" and c[1] is not None]
    assert [c[1] for c in per_epoch] == [1, 2]
    assert {"loss/total", "loss/inter", "train/step2_fired", "train/lr", "dev/accuracy", "dev/weighted_f1"} <= set(per_epoch[0][2])
    # a run that crashes leaves its MLflow run marked failed, not open (an open run would swallow the next one)
    import sppscl.stage2.train as train_mod

    def crash(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "evaluate_split", crash)
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        train(path, apply_overrides(cfg, ["epochs=2", "logger=mlflow"]), tmp_path / "crash", progress=False)
    assert calls[-1] == ("end", "FAILED")


# ------------------------------------------------------------------------------------ outputs and help


def test_probe_saves_and_prints_json(tiny_cache, tmp_path, capsys):
    path, _ = tiny_cache
    assert main(["probe", "--cache", str(path), "--out", str(tmp_path / "p"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert printed == saved
    dev = saved["splits"]["dev"]
    assert {"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix"} <= set(dev)
    assert (tmp_path / "p" / "confusion-dev.png").exists()
    # test, which neither fitted the probe nor chose C, gets its 95% interval; dev, which chose C, none
    lo, hi = saved["splits"]["test"]["ci95"]["accuracy"]
    assert lo <= saved["splits"]["test"]["accuracy"] <= hi and "bootstrap" in saved["splits"]["test"]["ci95_method"]
    assert "ci95" not in dev
    # a name ending in .json is the results file itself
    assert main(["probe", "--cache", str(path), "--out", str(tmp_path / "probe.json")]) == 0
    assert json.loads((tmp_path / "probe.json").read_text()) == saved


def test_progress_goes_to_stderr_and_results_to_stdout(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    preset = _yaml(tmp_path, cfg)
    assert main(["train", "--cache", str(path), "--config", str(preset), "--set", "epochs=1", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "epoch   1/1" in captured.err and "epoch   1/1" not in captured.out
    assert "best checkpoint (epoch 1" in captured.out


def test_sweep_and_reproduce_share_one_default_seed_list():
    import typer

    group = typer.main.get_command(cli.app)
    defaults = {name: next(p.default for p in group.commands[name].params if p.name == "seeds") for name in ("sweep", "reproduce")}
    assert defaults["sweep"] == defaults["reproduce"] == cli.console.DEFAULT_SEEDS


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_help_text_renders_whole(capsys, monkeypatch):
    import re

    import typer

    monkeypatch.setenv("COLUMNS", "400")
    for path, cmd in _commands(typer.main.get_command(cli.app)):
        assert main([*path, "--help"]) == 0
        shown = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out))
        for p in cmd.params:
            if p.help:
                # bracketed text is what rich markup would swallow
                for bracketed in re.findall(r"\[[^\]]*\]", p.help):
                    assert bracketed in shown, (path, p.name, bracketed)
                assert p.help.split("(")[0].strip()[:40] in shown, (path, p.name)


def test_every_computing_command_takes_device():
    import typer

    for path, cmd in _commands(typer.main.get_command(cli.app)):
        if path[-1] in ("extract", "train", "evaluate", "sweep", "reproduce", "predict", "analyze"):
            assert "device" in {p.name for p in cmd.params}, path
