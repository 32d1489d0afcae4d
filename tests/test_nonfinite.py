"""Non-finite is a failure: a diverged run stops with exit 1 and one line, a sweep records it as failed and never ranks
it, and NaN/inf cache features or checkpoint weights are refused naming the file and the row or tensor."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from sppscl.cache import CacheError, FeatureCache
from sppscl.cli import main
from sppscl.config import apply_overrides
from sppscl.stage2.checkpoint import META_KEY
from sppscl.stage2.data import SplitBatches
from sppscl.stage2.sweeps import Execution, sweep


def _preset(cfg, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": dict(cfg.train.__dict__)}))
    return preset


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_lr_1e30_stops_the_run_with_exit_1_and_one_line(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    run = tmp_path / "run"
    argv = ["train", "--cache", str(path), "--config", str(_preset(cfg, tmp_path)), "--set", "lr=1e30", "--set", "epochs=3"]
    assert main([*argv, "--out", str(run), "--quiet"]) == 1
    err = _err(capsys)
    assert "\n" not in err and "Traceback" not in err, err
    assert re.search(r"^error: non-finite loss at epoch 1, step \d+ of \d+: total (nan|-?inf) \(", err), err
    for part in ("λ·CE", "intra image", "intra text", "inter", "train.lr=1e+30", "--set lr=1e+29"):
        assert part in err, (part, err)
    assert not (run / "results.json").exists()  # no result was reported
    assert not (run / "metrics.jsonl").exists()  # and no epoch of it logged as if it were one


@pytest.fixture(scope="module")
def lr_sweep(tiny_cache, tmp_path_factory):
    """One epoch at lr=1e30 and at lr=1e-3 (a finished run the checkpoint test below reuses)."""
    path, cfg = tiny_cache
    out = tmp_path_factory.mktemp("lr") / "s"
    return sweep(path, apply_overrides(cfg, ["epochs=1"]), out, grid=["lr=1e30,1e-3"], seeds=[1], execution=Execution(workers=1), progress=False)


def test_a_sweep_records_a_diverged_run_as_failed_and_never_ranks_it(lr_sweep):
    res = lr_sweep
    rows = {r["lr"]: r for r in res.rows}
    assert rows[1e30]["status"] == "failed" and rows[1e30]["error"].startswith("non-finite loss at epoch 1"), rows[1e30]
    assert rows[1e30]["dev_accuracy"] is None and rows[1e-3]["status"] == "ok"
    assert res.failed == [rows[1e30]["run"]]
    ranked = [s for s in res.summary if s["n"] > 0]
    assert [s["lr"] for s in ranked] == [1e-3]  # the diverged configuration has no mean to rank by
    assert res.summary[-1]["lr"] == 1e30 and res.summary[-1]["n"] == 0 and res.summary[-1]["n_failed"] == 1


def _poison(src, dst, split, row, what):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        g = f[f"splits/{split}"]
        if what == "image":
            g["image"][row, 0, 0, 0] = np.nan
        else:
            g["tokens"][int(g["offsets"][row]) + 1, 0, 0] = np.inf
        return g["ids"].asstr()[row]


@pytest.mark.parametrize("what", ["image", "tokens"])
def test_non_finite_cache_features_are_refused_as_rows_are_read(tiny_cache, tmp_path, what):
    path, _ = tiny_cache
    bad = tmp_path / "bad.h5"
    sample_id = _poison(path, bad, "dev", 5, what)
    split = FeatureCache(bad).load("dev")  # opening and loading scan nothing ...
    batches = SplitBatches(split)
    batches.batch(np.array([0, 1, 2, 3, 4]))  # ... and rows without the NaN read fine
    kind = "image feature map" if what == "image" else "text token states"
    with pytest.raises(CacheError, match=rf"bad.h5: split dev, row 5 \(id '{sample_id}'\): its {kind} hold NaN or infinite"):
        batches.batch(np.array([3, 5, 7]))


def test_training_on_a_cache_with_a_nan_row_fails_naming_it(tiny_cache, tmp_path, capsys):
    path, cfg = tiny_cache
    bad = tmp_path / "bad.h5"
    sample_id = _poison(path, bad, "train", 7, "image")
    argv = ["train", "--cache", str(bad), "--config", str(_preset(cfg, tmp_path)), "--set", "epochs=1", "--out", str(tmp_path / "r")]
    assert main([*argv, "--quiet"]) == 2
    err = _err(capsys)
    assert f"bad.h5: split train, row 7 (id '{sample_id}'): its image feature map hold NaN" in err and "--force" in err, err
    assert main(["probe", "--cache", str(bad)]) == 2
    assert f"split train, row 7 (id '{sample_id}')" in _err(capsys)


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file_and_tensor(tiny_cache, lr_sweep, tmp_path, capsys):
    path, _ = tiny_cache
    (ok,) = [r for r in lr_sweep.rows if r["status"] == "ok"]
    run = tmp_path / "run"
    shutil.copytree(lr_sweep.runs_dir / ok["run"], run)
    weights = run / "best.safetensors"
    with safe_open(weights, framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    name = sorted(k for k in tensors if k.startswith("model/") and tensors[k].is_floating_point())[0]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, weights, metadata=meta)
    assert META_KEY in meta
    assert main(["evaluate", "--checkpoint", str(run), "--cache", str(path), "--split", "dev"]) == 2
    err = _err(capsys)
    assert f"{weights}: model tensor {name[len('model/'):]!r} holds" in err and "NaN or infinite" in err, err
    assert json.loads((run / "results.json").read_text())  # the run's own record is untouched


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_finite_check_agrees_with_isfinite_on_every_bit_pattern_kind(dtype):
    """The per-batch check reads float16 from its bits; the slow, obvious reference is np.isfinite(a).all(). Every
    float16 bit pattern (all 65,536: NaNs, ±inf, subnormals, ±65504, ±0) is checked one at a time inside an array,
    and random arrays with one bad value dropped anywhere, of both dtypes and non-contiguous views."""
    from sppscl.cache import _all_finite

    rng = np.random.default_rng(0)
    if dtype == np.float16:
        every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        base = rng.standard_normal((3, 5), dtype=np.float32).astype(np.float16)
        for i in range(len(every)):
            a = base.copy()
            a[1, 2] = every[i]
            assert _all_finite(a) == bool(np.isfinite(a).all()), hex(i)
        for v in (np.nan, np.inf, -np.inf, 65504.0, -65504.0, 6e-8, -0.0):
            a = base.copy()
            a[2, 4] = v
            assert _all_finite(a) == bool(np.isfinite(a).all()), v
    for _ in range(50):
        a = rng.standard_normal((4, 6, 3, 3)).astype(dtype)
        assert _all_finite(a) and _all_finite(a[:, ::2]) and _all_finite(a[:0])
        idx = tuple(int(rng.integers(n)) for n in a.shape)
        a[idx] = rng.choice([np.nan, np.inf, -np.inf])
        assert not _all_finite(a)
        assert _all_finite(a[:, ::2]) == bool(np.isfinite(a[:, ::2]).all())
