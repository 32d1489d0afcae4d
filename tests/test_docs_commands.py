"""The commands in docs/ (every ``bash`` block), run on tiny stand-ins of the datasets with the tiny encoders (slow).

Each page's blocks run in order in one folder, through bash with this environment's ``sppscl`` first on PATH.
A line is either run (after the substitutions below: tiny encoders, one epoch, no GPU, stand-in paths) or listed
in ``LEFT_OUT`` with the reason; a docs command that is neither fails the test, so a new one is accounted for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--image-encoder tiny-cnn --text-encoder tiny-bert --set encoders.max_length=32"

# a line starting with one of these is left out, for the reason given
LEFT_OUT = {
    "pip ": "installs from the network or a wheel: tests/test_packaging.py builds and installs the wheel",
    "make ": "the set-up commands themselves: make test is this suite, make demo is tests/test_demo.py",
    "git clone ": "needs the network: the test builds the cloned folder's layout in its place",
    "torchrun ": "many processes or nodes: tests/test_distributed.py runs extraction under torchrun on the CPU",
    "-m sppscl extract --config hfm --data-dir /shared/hfm": "the continuation of a multi-node torchrun line",
    "initdb ": "starts a PostgreSQL server: tests/test_sweep_distributed.py runs sweeps against a real server",
    "pg_ctl ": "starts a PostgreSQL server: tests/test_sweep_distributed.py",
    "sppscl sweep --cache cache/hfm.h5 --grid lr=1e-4,5e-5 --grid fusion=batch,concat --seeds 1,2,3 --storage": "needs a PostgreSQL server and GPUs (--devices all): tests/test_sweep_distributed.py",
    "sppscl sweep summary --storage": "needs a PostgreSQL server: tests/test_sweep_distributed.py",
    "srun ": "a SLURM job array",
    "sppscl report --storage": "needs a PostgreSQL server",
    "curl ": "needs a running server: tests/test_serve.py talks HTTP to one",
    "sppscl reproduce table4 ...": "an abbreviation of the line above it",
    "sppscl reproduce table6 ...": "an abbreviation of the line above it",
    "sppscl reproduce table7 ...": "an abbreviation of the line above it",
    "sppscl extract --config mvsa-single --data-dir ../shared/data/mvsa-single": "the real MVSA-Single copy (test_realdata.py reads it); the stand-in cache is built instead",
    "sppscl serve": "starts a server: tests/test_serve.py",
}

# per page: (pattern, replacement) applied to each line before it runs
COMMON = [
    (r" --device cuda\b", ""),
    (r" --allow-download", ""),
    (r" --image-encoder efficientnet-lite0 --text-encoder minilm-l6", ""),
    (r"^(sppscl extract .*)$", r"\1 " + TINY),
    (r"--set epochs=\d+", "--set epochs=1"),
    (r"^(sppscl train (?!.*--set epochs).*)$", r"\1 --set epochs=1"),
]
PAGES = {
    "cli.md": [(r"runs/hfm-\.\.\./best\.safetensors", "$(ls -d runs/hfm-* | head -1)")],
    "datasets.md": [(r"--data-dir MVSA_Single --out cache/mvsa-single\.h5", "--data-dir MVSA_Single --out cache/mvsa-single-release.h5")],
    "install.md": [],
    "results.md": [(r"--folds 5", "--folds 2"), (r"--cv 5", "--cv 2")],
    "scaling-out.md": [
        (r"/data/hfm", "hfm-data"),
        (r"^(sppscl extract .* --shard \$i/4 .*)$", r"for i in 0 1 2 3; do \1; done"),
    ],
}


def bash_lines(page: Path) -> list[str]:
    """The page's bash lines, continuations joined, comments and blanks dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
            line = re.sub(r"\s+", " ", line)
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def left_out(line: str) -> str | None:
    return next((why for prefix, why in LEFT_OUT.items() if line.startswith(prefix)), None)


@pytest.mark.slow
def test_every_docs_command_is_run_or_left_out():
    for page in sorted((REPO / "docs").glob("*.md")):
        for line in bash_lines(page):
            if left_out(line) is None:
                assert page.name in PAGES, f"docs/{page.name}: {line!r} is neither run by {__name__} nor in LEFT_OUT"


def _write_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


def _images(folder: Path, ids) -> None:
    import numpy as np

    from sppscl.stage1.synthetic import make_image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ids):
        make_image(["positive", "neutral", "negative"][i % 3], rng, size=32).save(folder / f"{sid}.jpg")


def _clmlf(folder: Path, splits: dict[str, str], classes: int, first: int = 1, rows_per_split: dict[str, int] | None = None) -> None:
    sid = first
    sizes = {"train": 12, **(rows_per_split or {})}
    for split, name in splits.items():
        rows = [{"id": str(sid + i), "text": f"post {sid + i}", "emotion_label": i % classes} for i in range(sizes.get(split, 6))]
        _write_json(folder / name, rows)
        sid += len(rows)


def stand_ins(root: Path, page: str) -> None:
    """What each page expects to find: the cloned split files, the releases' images, a cache."""
    if page in ("cli.md", "datasets.md", "scaling-out.md"):
        hfm = root / "CLMLF" / "dataset" / "data" / "HFM"
        _clmlf(hfm, {"train": "train.json", "dev": "valid.json", "test": "test.json"}, 2, first=100)
        _images(hfm / "dataset_image", range(100, 124))
    if page == "scaling-out.md":
        os.symlink(root / "CLMLF" / "dataset" / "data" / "HFM", root / "hfm-data")
    if page == "datasets.md":
        _clmlf(root / "CLMLF" / "dataset" / "data" / "MVSA-single" / "10-flod-1", {s: f"{s}.json" for s in ("train", "dev", "test")}, 3)
        _images(root / "MVSA_Single" / "data", range(1, 25))
        release = root / "hfm"  # HFM's own release, in place of its clone
        (release / "text").mkdir(parents=True)
        (release / "text" / "train.txt").write_text("".join(f"['{200 + i}', 'a post {i}', {i % 2}]\n" for i in range(8)))
        (release / "text" / "valid2.txt").write_text("".join(f"['{210 + i}', 'a post {i}', 0, {i % 2}]\n" for i in range(4)))
        (release / "text" / "test2.txt").write_text("".join(f"['{220 + i}', 'a post {i}', 0, {i % 2}]\n" for i in range(4)))
        _images(release / "dataset_image", [*range(200, 208), *range(210, 214), *range(220, 224)])
    if page == "results.md":
        from sppscl.config import load_config
        from sppscl.stage1.extract import extract

        data = root / "mvsa"
        # enough rows for 2 folds with a stratified validation part of 1/8 holding every class
        _clmlf(data / "10-flod-1", {s: f"{s}.json" for s in ("train", "dev")}, 3, rows_per_split={"train": 48, "dev": 24})
        _clmlf(data / "10-flod-1", {"test": "test.json"}, 3, first=500)
        _images(data / "images", [*range(1, 73), *range(500, 506)])
        cfg = load_config("mvsa-single", ["encoders.image=tiny-cnn", "encoders.text=tiny-bert", "encoders.max_length=32"])
        extract(cfg, root / "cache" / "mvsa-single-offline.h5", data, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_docs_commands_run(page, tmp_path):
    stand_ins(tmp_path, page)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    script = []
    for line in bash_lines(REPO / "docs" / page):
        if left_out(line) is not None:
            continue
        for pattern, repl in COMMON + PAGES[page]:
            line = re.sub(pattern, repl, line)
        script.append(line)
    assert script, f"docs/{page}: nothing ran"
    # one shell per page, as a reader types the lines (variables set on one line are used on the next)
    proc = subprocess.run(["bash", "-exc", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"docs/{page}:\n{proc.stderr[-3000:]}"
