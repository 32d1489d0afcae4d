"""Shared fixtures: tiny configurations and caches built with the tiny random encoders (no weights needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch

from sppscl.config import Config, apply_overrides

# Tests run on 2 cores next to other work; one intra-op thread keeps them predictable.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MVSA_DIR = (REPO / ".." / "shared" / "data" / "mvsa-single").resolve()


def tiny_config(data_dir: Path, size: int = 60, **train) -> Config:
    """A synthetic dataset of ``size`` samples, the tiny encoders, and a short schedule."""
    cfg = Config()
    cfg.dataset.name = "tiny"
    cfg.dataset.format = "synthetic"
    cfg.dataset.data_dir = str(data_dir)
    cfg.dataset.splits = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
    cfg.dataset.synthetic_size = size
    cfg.encoders.image = "tiny-cnn"
    cfg.encoders.text = "tiny-bert"
    cfg.encoders.max_length = 32
    cfg.extract.batch_size = 8
    cfg.extract.num_workers = 0
    overrides = {"epochs": 2, "batch_size": 16, "eval_batch_size": 16, "lr": 1e-3, "seed": 0, "device": "cpu"}
    overrides.update(train)
    return apply_overrides(cfg, overrides)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> tuple[Path, Config]:
    """One small cache shared by the stage-two tests (built once per session)."""
    from sppscl.stage1.extract import extract

    root = tmp_path_factory.mktemp("tinycache")
    cfg = tiny_config(root / "data", size=80)
    extract(cfg, root / "tiny.h5", progress=False)
    return root / "tiny.h5", cfg


@pytest.fixture(scope="session")
def swept(tiny_cache, tmp_path_factory):
    """A 2 x 2 sweep (two learning rates, two seeds, one epoch) run through the CLI, which writes report.html; its
    study is in a database (SQLite here, PostgreSQL in a team: the same storage URL), so a report can be made from it.
    Shared by the report tests and the sweep's seed-ensemble test (a test that moves its files puts them back)."""
    path, cfg = tiny_cache
    root = tmp_path_factory.mktemp("report")
    config = root / "tiny.yaml"
    import yaml

    d = cfg.to_dict()
    d.pop("source", None)
    config.write_text(yaml.safe_dump(d))
    out = root / "sweep"
    storage = f"sqlite:///{root / 'study.db'}"
    argv = ["sweep", "--cache", str(path), "--config", str(config), "--set", "epochs=1", "--grid", "lr=1e-3,2e-2", "--seeds", "0,1", "--jobs", "1"]
    argv += ["--out", str(out), "--storage", storage, "--study", "r19", "--quiet"]
    import contextlib
    import io

    from sppscl.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    (root / "printed.txt").write_text(printed.getvalue())  # what the sweep printed, beside (not in) its folder
    return out, argv, storage


def start_postgres():
    """A started PostgreSQL server in a temporary folder (``.url``; the caller stops it), or the test is skipped
    with the reason when PostgreSQL is not installed."""
    import sys

    sys.path.insert(0, str(REPO))  # bench/ is not installed with the package
    from bench.postgres import PostgresUnavailable, TempPostgres

    pg = TempPostgres()
    try:
        pg.start()
    except PostgresUnavailable as e:
        pg.stop()
        pytest.skip(f"PostgreSQL tests skipped: {e}")
    return pg


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the shared-study tests, stopped at the end of the session."""
    pg = start_postgres()
    yield pg.url
    pg.stop()


def interrupt_on_call(monkeypatch, module, name: str, n: int):
    """Make ``module.name`` raise KeyboardInterrupt on its ``n``-th call (a crash at a chosen point of a run);
    returns the real function, to put back with ``monkeypatch.setattr(module, name, real)``."""
    real = getattr(module, name)
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, interrupted)
    return real


def craft_checkpoint(source: Path, target: Path, change: Callable[[dict, dict], str | None]) -> Path:
    """``source`` (NAME.safetensors) rewritten to ``target`` after ``change(meta, tensors)``; a string returned by
    ``change`` replaces the metadata text itself."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(source, framework="pt") as fh:
        meta = json.loads(fh.metadata()["sppscl"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    text = change(meta, tensors)
    save_file(tensors, target, metadata={"sppscl": text if isinstance(text, str) else json.dumps(meta)})
    return target
