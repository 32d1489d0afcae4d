"""The wheel, installed into a fresh virtual environment outside the source tree, carries and uses the presets.

No network: the wheel is built with the test environment's setuptools (--no-build-isolation), installed with
--no-deps, and the fresh environment borrows the test environment's packages (torch & co.) through a .pth
line. That line adds a plain path, so the test environment's editable sppscl (a .pth import hook) is not
active there: ``import sppscl`` finds the installed wheel, which the test checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# what the wheel is built from: the packaging metadata, the package, and the presets
SOURCES = ("pyproject.toml", "README.md", "pipeline", "configs")


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(wheel, the fresh environment's bin folder, an environment for running it) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")} if (REPO / name).is_dir() else {}
        copy(REPO / name, src / name, **kwargs)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("sppscl-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    Path(purelib, "_test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return wheel, venv / "bin", env


def test_wheel_carries_every_module_the_presets_and_py_typed(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "sppscl/py.typed" in names
        # every module of the source tree (a sub-package missing from pyproject's list would be left out silently)
        modules = {f"sppscl/{p.relative_to(REPO / 'pipeline').as_posix()}" for p in (REPO / "pipeline").rglob("*.py")}
        assert modules <= names, sorted(modules - names)
        # the report's page template, style and script travel with it
        assert {"sppscl/report/template.html.j2", "sppscl/report/style.css", "sppscl/report/sort.js"} <= names
        for preset in sorted((REPO / "configs").glob("*.yaml")):
            # byte for byte the files users see in configs/
            assert z.read(f"sppscl/configs/{preset.name}") == preset.read_bytes()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = {}
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            name = re.match(r"[A-Za-z0-9_.-]+", line.split(": ", 1)[1]).group(0)
            requires[name] = line.split(": ", 1)[1]
    # a range for torch and torchvision (another torch is kept; constraints.txt pins them for make install),
    # click because it is imported, no pytest-timeout because nothing uses it
    for name in ("torch", "torchvision"):
        assert ">=" in requires[name] and "==" not in requires[name], requires[name]
    assert "click" in requires and "pytest-timeout" not in requires


def test_installed_copy_lists_shows_and_uses_the_presets(installed, tmp_path):
    _, bin_dir, env = installed
    where = run([bin_dir / "python", "-c", "import sppscl; print(sppscl.__file__)"], tmp_path, env).stdout
    assert Path(where.strip()).is_relative_to(bin_dir.parent), where

    listed = run([bin_dir / "sppscl", "presets"], tmp_path, env).stdout
    assert [line.split()[0] for line in listed.splitlines()[:-1]] == ["demo", "hfm", "mvsa-multiple", "mvsa-single"]
    assert str(bin_dir.parent) in listed.splitlines()[-1]
    shown = yaml.safe_load(run([bin_dir / "sppscl", "presets", "show", "hfm"], tmp_path, env).stdout)
    assert shown["dataset"]["name"] == "hfm" and shown["train"]["lr"] == 5e-5 and shown["train"]["tau"] == 0.07
    assert "--data-dir" in run([bin_dir / "sppscl", "extract", "--help"], tmp_path, env).stdout

    # a CLMLF-style tree beside the working directory, extracted with a relative --data-dir
    folder = tmp_path / "downloads" / "HFM"
    (folder / "dataset_image").mkdir(parents=True)
    rows = {"train": [("1", 0), ("2", 1), ("3", 0)], "valid": [("4", 1)], "test": [("5", 0)]}
    for split, items in rows.items():
        (folder / f"{split}.json").write_text(json.dumps([{"id": i, "text": f"post {i}", "emotion_label": y} for i, y in items]))
        for i, _ in items:
            Image.new("RGB", (10, 10), (int(i) * 40, 0, 0)).save(folder / "dataset_image" / f"{i}.jpg")
    work = tmp_path / "work"
    work.mkdir()
    done = run([bin_dir / "sppscl", "extract", "--config", "hfm", "--data-dir", "../downloads/HFM", "--out", "hfm.h5",
                "--device", "cpu", "--workers", "0", "--quiet", "--image-encoder", "tiny-cnn", "--text-encoder", "tiny-bert",
                "--set", "encoders.max_length=16"], work, env)
    assert (work / "hfm.h5").is_file(), done.stdout
    assert "CLMLF split files" in done.stderr  # notes go to stderr, results to stdout
