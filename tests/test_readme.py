"""README's commands, run as written on a tiny stand-in of each dataset, with the tiny random encoders.

Every line of every ``bash`` block in README.md is either run here (``sppscl ...`` through ``main`` in the
block's folder, shell lines through bash) or listed in ``LEFT_OUT`` with the reason; a new README command that is
neither fails the test. The only changes to a command are the ones in ``SUBSTITUTE``: tiny encoders instead of
real ones (no weights here) and one epoch instead of the preset's schedule.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from sppscl.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = "--image-encoder tiny-cnn --text-encoder tiny-bert --set encoders.max_length=32"

LEFT_OUT = {
    'pip install "dist/sppscl-0.1.0-py3-none-any.whl[offline]"': "needs the network; tests/test_packaging.py installs the wheel",
    'pip install ".[offline]"': "needs the network; tests/test_packaging.py installs the package",
    "make demo": "the demo itself: tests/test_demo.py runs its pipeline",
    "make test": "this suite",
    "git clone https://github.com/Link-Li/CLMLF": "needs the network; the test builds CLMLF's split folder in its place",
}
# (pattern, replacement) on README's command lines: tiny encoders for the real ones, one epoch
SUBSTITUTE = [
    (r" --allow-download", ""),
    (r" --image-encoder efficientnet-lite0 --text-encoder minilm-l6", ""),
    (r"^(sppscl extract .*)$", r"\1 " + TINY),
    (r"--set epochs=\d+", "--set epochs=1"),
    (r"^(sppscl train (?!.*--set epochs).*)$", r"\1 --set epochs=1"),
]


def readme_blocks(lang: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    return [block.strip().splitlines() for block in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def command(line: str) -> str:
    line = line.split("  #", 1)[0].strip()
    for pattern, repl in SUBSTITUTE:
        line = re.sub(pattern, repl, line)
    return line


def run_block(lines: list[str], cwd: Path, monkeypatch) -> list[str]:
    """Run a README block's lines in ``cwd``; returns the lines run."""
    monkeypatch.chdir(cwd)
    ran = []
    for raw in lines:
        line = raw.split("  #", 1)[0].strip()
        if not line or line.startswith("#") or line in LEFT_OUT:
            continue
        cmd = command(line)
        if cmd.startswith("sppscl "):
            code = main(shlex.split(cmd)[1:])
            assert code == 0, f"README command failed ({code}): {cmd}"
        else:
            proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
            assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stderr}"
        ran.append(raw)
    return ran


def test_every_readme_command_is_run_or_left_out_with_a_reason():
    lines = [line.split("  #", 1)[0].strip() for block in readme_blocks("bash") for line in block]
    known = [b for b in (QUICK_START, OWN_DATA)]
    for line in filter(None, lines):
        if line.startswith("#") or line in LEFT_OUT:
            continue
        assert any(line in block for block in known), f"README command neither run by a test nor in LEFT_OUT: {line}"


def _images(folder: Path, ids) -> None:
    from sppscl.stage1.synthetic import make_image

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ids):
        make_image(["positive", "neutral", "negative"][i % 3], rng, size=32).save(folder / f"{sid}.jpg")


QUICK_START = "\n".join(next(b for b in readme_blocks("bash") if any("--config mvsa-single" in x for x in b)))
OWN_DATA = "\n".join(next(b for b in readme_blocks("bash") if any("mine.yaml" in x for x in b)))


def test_quick_start_on_mvsa_single(tmp_path, monkeypatch):
    # what the clone and MCRLab's archive hold: CLMLF's split files, MVSA_Single/data/<id>.jpg
    split_dir = tmp_path / "CLMLF" / "dataset" / "data" / "MVSA-single" / "10-flod-1"
    split_dir.mkdir(parents=True)
    rows = {"train": range(1, 13), "dev": range(13, 19), "test": range(19, 25)}
    for split, ids in rows.items():
        (split_dir / f"{split}.json").write_text(json.dumps([{"id": str(i), "text": f"tweet {i}", "emotion_label": i % 3} for i in ids]))
    _images(tmp_path / "MVSA_Single" / "data", range(1, 25))
    ran = run_block(QUICK_START.splitlines(), tmp_path, monkeypatch)
    assert any(line.startswith("sppscl evaluate") for line in ran)
    assert (tmp_path / "runs" / "mvsa-single" / "best.safetensors").is_file()


def test_own_data_in_six_commands_and_the_python_api(tmp_path, monkeypatch):
    from sppscl.stage1.synthetic import generate

    rows = generate(tmp_path, 36, splits={"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"})
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for split, rs in rows.items():
            for r in rs:
                f.write(json.dumps({**r, "split": split}) + "\n")
    with open(tmp_path / "new-pairs.jsonl", "w") as f:
        for r in rows["test"][:3]:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "image": r["image"]}) + "\n")
    ran = run_block(OWN_DATA.splitlines(), tmp_path, monkeypatch)
    assert len([line for line in ran if line.startswith("sppscl ")]) == 5 and len(ran) == 6
    assert (tmp_path / "eval" / "mine-test" / "results.json").is_file()
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 4

    # the output tree README draws
    for name in ("config.json", "metrics.jsonl", "best.safetensors", "best.json", "last.safetensors", "results.json", "predictions-test.csv", "curves.png"):
        assert (tmp_path / "runs" / "mine" / name).is_file(), name

    # the Python block, with the image path it names
    (python,) = readme_blocks("python")
    (tmp_path / "images" / "7.jpg").write_bytes((tmp_path / rows["test"][0]["image"]).read_bytes())
    namespace: dict = {}
    exec(compile("\n".join(python), "README.md (python)", "exec"), namespace)
    assert namespace["model"].classes == ["positive", "neutral", "negative"]
    assert namespace["p"].pred in namespace["model"].classes
