"""Resource bombs in a subprocess (issue 17): a 1 x 20000 PNG (20 kilopixels stored, 1.3 gigapixels once resized for
the encoders) and a YAML anchor bomb must cost no more memory than the same command on a normal photo.

Peak memory is the child's own ``ru_maxrss``, read with ``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper process (so
no earlier child of the test run counts); ``RLIMIT_AS`` is only a safety net against a bomb taking the machine down.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sppscl.cli import main

pytestmark = pytest.mark.slow

# the safety net only: far above what any of these commands needs, far below what the bombs would take
ADDRESS_SPACE = 24 * 1024**3
WRAPPER = """
import resource, subprocess, sys
limit = int(sys.argv[1])
run = subprocess.run(sys.argv[2:], capture_output=True, text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
sys.stderr.write(run.stdout + run.stderr)
print(run.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak(*args: str) -> tuple[int, int, str]:
    """(exit code, peak RSS in KiB, output) of ``sppscl args`` run in a child of a fresh wrapper process."""
    r = subprocess.run([sys.executable, "-c", WRAPPER, str(ADDRESS_SPACE), sys.executable, "-m", "sppscl", *args], capture_output=True, text=True, timeout=900)
    code, kib = r.stdout.split()[-2:]
    return int(code), int(kib), r.stderr


def photo(path: Path) -> None:
    """A 480 x 360 JPEG with a photo's detail (noise over gradients)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:360, 0:480]
    px = np.stack([x * 255 // 480, y * 255 // 360, (x + y) * 255 // 840], -1) + rng.integers(-30, 30, (360, 480, 3))
    Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(path, quality=90)


def thin_png(path: Path) -> None:
    Image.new("RGB", (1, 20000), (120, 30, 200)).save(path)


BOMB = (
    "  lr: &a [&b [&c [&d [&e [&f [&g [&h [x, x, x, x, x, x, x, x, x], *h, *h, *h, *h, *h, *h, *h, *h], *g, *g, *g, *g, *g, *g, *g, *g], "
    "*f, *f, *f, *f, *f, *f, *f, *f], *e, *e, *e, *e, *e, *e, *e, *e], *d, *d, *d, *d, *d, *d, *d, *d], *c, *c, *c, *c, *c, *c, *c, *c], "
    "*b, *b, *b, *b, *b, *b, *b, *b]\n"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A one-photo dataset per split and its preset; the same preset with an anchor bomb in train.lr."""
    root = tmp_path_factory.mktemp("bombs")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    photo(data / "images" / "photo.jpg")
    for split in ("train", "dev", "test"):
        rows = [{"id": f"{split}{i}", "text": f"a {split} post {i}", "image": "images/photo.jpg", "label": i % 3} for i in range(3)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = {
        "dataset": {"name": "bombs", "format": "manifest", "data_dir": str(data), "image_dir": "images",
                    "splits": {s: f"{s}.jsonl" for s in ("train", "dev", "test")}},
        "encoders": {"image": "tiny-cnn", "text": "tiny-bert", "max_length": 32},
        "extract": {"batch_size": 4, "num_workers": 0, "device": "cpu"},
    }
    good = root / "good.yaml"
    good.write_text(yaml.safe_dump(preset))
    bomb = root / "bomb.yaml"
    bomb.write_text(yaml.safe_dump(preset) + "train:\n" + BOMB)
    return root, good, bomb


def test_thin_png_costs_no_more_than_a_photo_in_verify_and_predict(dataset, tmp_path):
    root, good, _ = dataset
    cache, run = tmp_path / "c.h5", tmp_path / "run"
    assert main(["extract", "--config", str(good), "--out", str(cache), "--quiet"]) == 0
    assert main(["train", "--cache", str(cache), "--out", str(run), "--set", "epochs=1", "--quiet"]) == 0
    thin_png(tmp_path / "thin.png")
    normal = root / "data" / "images" / "photo.jpg"

    code, base, out = peak("predict", "--checkpoint", str(run), "--image", str(normal), "--text", "hello", "--device", "cpu")
    assert code == 0, out
    code, bomb, out = peak("predict", "--checkpoint", str(run), "--image", str(tmp_path / "thin.png"), "--text", "hello", "--device", "cpu")
    assert "1x20000" in out and "256x5120000" in out and "Traceback" not in out, out
    assert bomb <= 2 * base, f"predict: thin PNG peak {bomb} KiB, photo {base} KiB"

    thin_set = tmp_path / "thin"
    (thin_set / "images").mkdir(parents=True)
    thin_png(thin_set / "images" / "photo.jpg")
    for split in ("train", "dev", "test"):
        (thin_set / f"{split}.jsonl").write_text((root / "data" / f"{split}.jsonl").read_text())
    code, base, out = peak("data", "verify", "--config", str(good), "--workers", "1")
    assert code == 0, out
    code, bomb, out = peak("data", "verify", "--config", str(good), "--data-dir", str(thin_set), "--workers", "1")
    assert code == 1 and "oversized image" in out and "Traceback" not in out, out
    assert bomb <= 2 * base, f"verify: thin PNG peak {bomb} KiB, photo {base} KiB"


def test_yaml_anchor_bomb_costs_no_more_than_a_normal_preset(dataset):
    _, good, bomb = dataset
    code, base, out = peak("data", "verify", "--config", str(good), "--workers", "1")
    assert code == 0, out
    code, peak_bomb, out = peak("data", "verify", "--config", str(bomb), "--workers", "1")
    assert code == 2 and "aliases" in out and "Traceback" not in out, out
    assert peak_bomb <= 2 * base, f"YAML bomb peak {peak_bomb} KiB, normal preset {base} KiB"
