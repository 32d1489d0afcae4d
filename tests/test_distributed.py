"""Extraction spread over processes: torchrun ranks on one file, shards joined by `cache merge`, and the lock
that keeps two uncoordinated extractions off one file. Tiny random encoders, gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from conftest import REPO, interrupt_on_call, tiny_config
from sppscl.cache import PENDING, WRITTEN, CacheError, FeatureCache, file_contents
from sppscl.cli import main
from sppscl.stage1 import extract as extract_mod
from sppscl.stage1.batching import deal, fixed_batches
from sppscl.stage1.distributed import Shard
from sppscl.stage1.extract import extract
from sppscl.stage1.lock import CacheLock, CacheLocked

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _assert_identical(a, b):
    a, b = file_contents(a), file_contents(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _preset(tmp_path, size, batch_size):
    cfg = tiny_config(tmp_path / "data", size=size)
    cfg.extract.batch_size = batch_size
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "source"}))
    return cfg, preset


def _torchrun(nproc, preset, out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "sppscl", "extract", "--config", str(preset), "--workers", "0", "--out", str(out)]  # fmt: skip


def _written(path):
    try:
        with h5py.File(path, "r") as f:
            return sum(int((g["status"][()] == WRITTEN).sum()) for g in f["splits"].values())
    except (OSError, KeyError):  # not laid out yet
        return 0


def _wait_for_rows(proc, path, rows, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and _written(path) >= rows:
            return
        time.sleep(0.01)


def _rank_pid(torchrun_pid, rank):
    """The worker process torchrun started for ``rank`` (read from its environment)."""
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
    raise AssertionError(f"no rank {rank} under torchrun pid {torchrun_pid}")


def test_deal_gives_each_worker_whole_batches_once():
    batches = {"train": fixed_batches(42, 8), "dev": fixed_batches(9, 8), "test": fixed_batches(9, 8)}
    shares = [deal(batches, r, 3) for r in range(3)]
    for split, bs in batches.items():
        got = sorted((b for s in shares for b in s[split]), key=lambda b: b[0])
        assert got == bs  # every batch exactly once, unchanged
    rows = [sum(len(b) for k in s for b in s[k]) for s in shares]
    assert max(rows) - min(rows) <= 8  # balanced to within a batch, short last batches included


# torchrun runs this instead of `-m sppscl`: rank 1 goes on seconds late after rank 0 has laid the cache out (by
# then rank 0 is writing), which is what a slower node or a late process start does.
DELAYED_RANK = """
import sys, time
from sppscl.stage1 import distributed
real = distributed.Ranks.on_zero
def late(self, fn, share=True):
    out = real(self, fn, share)
    if self.rank == 1 and out in ("written", "resumed"):
        time.sleep(4.0)
    return out
distributed.Ranks.on_zero = late
from sppscl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_two_ranks_one_late_equal_a_single_process(tmp_path):
    """Rank 1 reaches each step seconds after rank 0 has gone on and written: the ranks still encode the batches rank
    0 found pending, each once, and the cache equals a single process's (before the fix rank 1 read the statuses
    itself, after rank 0's first writes, dealt itself other batches, and the job failed with unwritten rows)."""
    cfg, preset = _preset(tmp_path, size=60, batch_size=2)
    single, ranked = tmp_path / "single.h5", tmp_path / "ranked.h5"
    extract(cfg, single, progress=False)
    driver = tmp_path / "late_rank.py"
    driver.write_text(DELAYED_RANK)
    cmd = _torchrun(2, preset, ranked)
    at = cmd.index("sppscl")
    cmd[at - 1 : at + 1] = [str(driver)]  # `-m sppscl` -> the driver script
    done = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_identical(single, ranked)
    assert done.stdout.count("(written)") == 1, done.stdout  # only rank 0 reports
    assert "encoded 60 samples" in done.stdout  # ...for the whole job: every row once, over both ranks
    assert not Path(str(ranked) + ".lock").exists()


@pytest.mark.slow  # three fresh interpreters; the default suite's kill -9 mid-fill + rerun is test_kill9's extract case, its torchrun job the late-rank test
def test_torchrun_rank_killed_then_rerun_equals_a_single_process(tmp_path):
    cfg, preset = _preset(tmp_path, size=120, batch_size=2)
    single, killed = tmp_path / "single.h5", tmp_path / "killed.h5"
    extract(cfg, single, progress=False)
    proc = subprocess.Popen(_torchrun(2, preset, killed), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(proc, killed, 8)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the surviving rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
    with h5py.File(killed, "r") as f:
        assert not f.attrs["complete"]
        pending = sum(int((g["status"][()] == PENDING).sum()) for g in f["splits"].values())
    assert 0 < pending < 120, "the job was not killed mid-fill; the test proved nothing"
    # any number of ranks continues it; here one process
    s = extract(cfg, killed, progress=False)
    assert s.status == "resumed" and s.samples_encoded == pending
    _assert_identical(single, killed)


def test_shards_merged_equal_a_single_process(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "data", size=60)
    single = tmp_path / "single.h5"
    extract(cfg, single, progress=False)
    shards = [tmp_path / f"part{i}.h5" for i in range(3)]
    rows = [extract(cfg, p, progress=False, shard=Shard(i, 3)).rows for i, p in enumerate(shards)]
    assert sum(sum(r.values()) for r in rows) == 60 and all(sum(r.values()) for r in rows)
    with pytest.raises(CacheError, match=r"part1.h5 is shard 1/3 of a cache.*sppscl cache merge"):
        FeatureCache(shards[1])  # a shard alone must not pass for a whole cache
    merged = tmp_path / "merged.h5"
    assert main(["cache", "merge", *map(str, reversed(shards)), "--out", str(merged), "--quiet"]) == 0
    assert f"merged 3 shards into {merged}" in " ".join(capsys.readouterr().out.split())
    _assert_identical(single, merged)
    assert FeatureCache(merged).classes == ["positive", "neutral", "negative"]


def _refusal(capsys, *argv):
    assert main(["cache", "merge", *map(str, argv), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return err


def test_merge_refuses_mismatched_missing_duplicate_and_unfinished_shards(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path / "data", size=60)
    s0, s1 = tmp_path / "s0.h5", tmp_path / "s1.h5"
    extract(cfg, s0, progress=False, shard=Shard(0, 2))
    extract(cfg, s1, progress=False, shard=Shard(1, 2))
    out = tmp_path / "whole.h5"

    err = _refusal(capsys, s0, "--out", out)
    assert "no shard holds these rows" in err and "split train: rows 8-15" in err and "not given: 1/2" in err
    err = _refusal(capsys, s0, s1, s0, "--out", out)
    assert "split train: rows 0-7" in err and "are in both" in err and "s0.h5 (shard 0/2)" in err

    other = tiny_config(tmp_path / "data", size=60)
    other.encoders.max_length = 16
    s1_other = tmp_path / "s1-other.h5"
    extract(other, s1_other, progress=False, shard=Shard(1, 2))
    err = _refusal(capsys, s0, s1_other, "--out", out)
    assert "not shards of one extraction" in err
    assert "encoders.text.tokenizer.max_length: s0.h5 has 32, s1-other.h5 has 16" in err

    err = _refusal(capsys, tmp_path / "s0.h5", tmp_path / "nope.h5", "--out", out)
    assert "nope.h5: no such shard file" in err

    whole = tmp_path / "single.h5"
    extract(cfg, whole, progress=False)
    err = _refusal(capsys, s0, whole, "--out", out)
    assert "single.h5 is not a shard" in err

    real = interrupt_on_call(monkeypatch, extract_mod, "encode_batch", 2)
    unfinished = tmp_path / "s1-unfinished.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, unfinished, progress=False, shard=Shard(1, 2))
    monkeypatch.setattr(extract_mod, "encode_batch", real)
    err = _refusal(capsys, s0, unfinished, "--out", out)
    assert "shard 1/2 but its extraction did not finish" in err and "--shard 1/2" in err
    assert not out.exists()

    # rerunning the shard's command finishes it; then the merge goes through
    assert extract(cfg, unfinished, progress=False, shard=Shard(1, 2)).status == "resumed"
    assert main(["cache", "merge", str(s0), str(unfinished), "--out", str(out), "--quiet"]) == 0
    _assert_identical(whole, out)


def test_resuming_a_shard_as_another_shard_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "data", size=30)
    part = tmp_path / "part.h5"
    extract(cfg, part, progress=False, shard=Shard(0, 2))
    with pytest.raises(CacheError, match=r"shard.index: the cache on disk has 0, this command has 1"):
        extract(cfg, part, progress=False, shard=Shard(1, 2))


@pytest.mark.parametrize("text", ["2/2", "x", "1/0", "-1/3", "1/2/3"])
def test_bad_shard_spec_is_a_clear_error(tmp_path, capsys, text):
    assert main(["extract", "--config", "demo", "--out", str(tmp_path / "c.h5"), "--shard", text]) == 2
    assert f"--shard {text!r}: expected I/N" in capsys.readouterr().err


def test_second_uncoordinated_extract_is_refused_and_the_first_finishes_intact(tmp_path, capsys):
    cfg, preset = _preset(tmp_path, size=120, batch_size=2)
    single, shared = tmp_path / "single.h5", tmp_path / "shared.h5"
    extract(cfg, single, progress=False)
    cmd = [sys.executable, "-m", "sppscl", "extract", "--config", str(preset), "--workers", "0", "--quiet", "--out", str(shared)]
    first = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(first, shared, 4)
        assert first.poll() is None, "the first extraction finished before the second started; the test proved nothing"
        before = shared.stat().st_size
        # the second one, in every flavour that would write: resume, and --force (which would delete the file)
        with pytest.raises(CacheLocked, match=rf"{shared} is being written by another process \(pid {first.pid} on host "):
            extract(cfg, shared, progress=False)
        assert main(["extract", "--config", str(preset), "--workers", "0", "--out", str(shared), "--force"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"pid {first.pid}" in err and "Traceback" not in err
        assert shared.exists() and shared.stat().st_size == before
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    _assert_identical(single, shared)
    # the lock went with the first process: a rerun is the ordinary no-op
    assert extract(cfg, shared, progress=False).status == "up-to-date"


def test_lock_left_by_a_killed_process_blocks_nobody(tmp_path):
    """flock dies with its holder: a lock file left by kill -9 (with its holder's pid in it) is taken over."""
    target = tmp_path / "c.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sppscl.stage1.lock import CacheLock; "
         f"CacheLock.acquire({str(target)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLocked, match=rf"pid {holder.pid}"):
            CacheLock.acquire(target)
    finally:
        holder.kill()
        holder.wait()
    assert Path(str(target) + ".lock").exists()  # kill -9 left the file behind ...
    with CacheLock.acquire(target):  # ... and it does not matter
        pass
    assert not Path(str(target) + ".lock").exists()


@pytest.mark.slow
def test_bad_sample_on_one_rank_is_named_once_and_rows_are_kept(tmp_path):
    """A rank that meets bad input says which sample; its peers add one line, never a traceback."""
    from PIL import Image

    rows = []
    (tmp_path / "imgs").mkdir()
    for i in range(16):
        if i != 3:  # batch 1 (rows 2-3) belongs to rank 1
            Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "imgs" / f"r{i}.jpg")
        rows.append({"id": f"r{i}", "text": "hello there", "image": f"imgs/r{i}.jpg", "label": 0})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path)
    cfg.dataset.format, cfg.dataset.splits, cfg.extract.batch_size = "manifest", {"train": "train.jsonl"}, 2
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k != "source"}))
    out = tmp_path / "c.h5"
    done = subprocess.run(_torchrun(2, preset, out), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:") or line.startswith("[rank")]
    assert any("rank 1 of 2: sample id 'r3' (split train): missing image" in line for line in ours), done.stderr
    assert not any(line.startswith("[rank") for line in ours), done.stderr  # no rank printed a traceback
    with h5py.File(out, "r") as f:  # laid out, kept, not marked complete: a rerun continues it
        assert not f.attrs["complete"]
