"""verify_samples finds every problem kind, with the right ids, whatever the worker count."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from sppscl.stage1.records import Sample
from sppscl.stage1.verify import (
    DUPLICATE_ID,
    EMPTY_SPLIT,
    EMPTY_TEXT,
    MISSING_IMAGE,
    OUTSIDE_IMAGE,
    OVERSIZED_IMAGE,
    PROBLEM_KINDS,
    UNDECODABLE_IMAGE,
    UNENCODABLE_TEXT,
    UNKNOWN_LABEL,
    check_sample_image,
    verify_samples,
)


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    # noise, so the entropy-coded data is long and a cut lands inside it
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes())
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes()[: len(jpeg_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    modes = {}
    for mode in ("P", "RGBA", "L", "CMYK"):
        path = tmp_path / f"mode-{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        Image.new(mode, (16, 16)).save(path)
        modes[mode] = path
    return {"good": good, "truncated": truncated, "garbage": garbage, "missing": tmp_path / "missing.jpg",
            "folder": tmp_path, **modes}


def sample(sid: str, image: Path, text: str = "some text", label: int | None = 0, split: str = "train") -> Sample:
    return Sample(sid, text, image, label, split)


def test_check_sample_image(images):
    for key in ("good", "P", "RGBA", "L", "CMYK"):
        assert check_sample_image(images[key]) is None, key
    assert check_sample_image(images["missing"]) == f"missing image: {images['missing']}"
    assert check_sample_image(images["folder"]).endswith("is a folder, not an image file; refused, not opened")
    assert check_sample_image(images["truncated"]).startswith(f"undecodable image: {images['truncated']}: OSError")
    assert check_sample_image(images["garbage"]).startswith("undecodable image:")


@pytest.fixture
def problem_samples(images) -> list[Sample]:
    return [
        sample("ok1", images["good"]),
        sample("ok2", images["good"], label=None, split="test"),
        sample("miss", images["missing"]),
        sample("trunc", images["truncated"], split="dev"),
        sample("junk", images["garbage"]),
        sample("blank", images["good"], text="  \n\t"),
        sample("dup", images["good"], split="train"),
        sample("dup", images["good"], split="test"),
        sample("dup2", images["good"], split="dev"),
        sample("dup2", images["good"], split="dev"),
        sample("seven", images["good"], label=7),
        sample("minus", images["good"], label=-1),
        sample("edge", images["good"], label=2),
        # an id that leads out of the image folder is reported and its file never opened
        Sample("../../evil", "text", images["folder"] / "imgs" / "../../evil.jpg", 0, "train", images["folder"] / "imgs"),
        sample("surrogate", images["good"], text="bad \ud800 text"),
    ]


@pytest.mark.parametrize("workers", [1, 4])
def test_every_problem_kind_with_its_ids(problem_samples, images, workers):
    report = verify_samples(problem_samples, num_classes=3, workers=workers)

    ids = {kind: [sid for sid, _ in report.problems[kind]] for kind in PROBLEM_KINDS}
    assert ids == {
        MISSING_IMAGE: ["miss"],
        UNDECODABLE_IMAGE: ["trunc", "junk"],
        EMPTY_TEXT: ["blank"],
        DUPLICATE_ID: ["dup", "dup2"],
        UNKNOWN_LABEL: ["seven", "minus"],
        OVERSIZED_IMAGE: [],
        OUTSIDE_IMAGE: ["../../evil"],
        UNENCODABLE_TEXT: ["surrogate"],
        EMPTY_SPLIT: [],
    }
    assert report.problems[MISSING_IMAGE] == [("miss", str(images["missing"]))]
    assert dict(report.problems[DUPLICATE_ID]) == {"dup": "2 rows, in train, test", "dup2": "2 rows, in dev, dev"}
    assert "label 7 not in 0..2" in dict(report.problems[UNKNOWN_LABEL])["seven"]
    assert not report.ok
    assert report.n_samples == 15
    assert report.per_split == {"train": 10, "test": 2, "dev": 3}
    assert str(images["folder"].parent / "evil.jpg") in dict(report.problems[OUTSIDE_IMAGE])["../../evil"]


def test_clean_samples_are_ok(images):
    report = verify_samples([sample("a", images["good"]), sample("b", images["P"], label=None)], num_classes=3)
    assert report.ok
    assert all(v == [] for v in report.problems.values())


def test_without_decoding_only_existence_is_checked(problem_samples):
    report = verify_samples(problem_samples, num_classes=3, check_images=False)
    assert [sid for sid, _ in report.problems[MISSING_IMAGE]] == ["miss"]
    assert report.problems[UNDECODABLE_IMAGE] == []
    assert [sid for sid, _ in report.problems[EMPTY_TEXT]] == ["blank"]
    assert re.search(r"undecodable image\s*│\s*not checked", render(report))


def render(report) -> str:
    console = Console(record=True, width=200, force_terminal=False)
    report.render(console)
    return console.export_text()


def test_render_lists_counts_and_first_20_ids(images, problem_samples):
    many = [sample(f"m{i:02d}", images["missing"]) for i in range(25)]
    out = render(verify_samples(many + problem_samples, num_classes=3, progress=True))

    assert "m19" in out and "m20" not in out
    assert "... and 6 more" in out  # 25 + "miss"
    assert "trunc" in out and "dup2" in out
    assert re.search(r"missing image\s*│\s*26\s*│", out) and re.search(r"empty text\s*│\s*1\s*│", out)
    assert "OK: no problems found" not in out
    assert "OK: no problems found" in render(verify_samples([sample("a", images["good"])], num_classes=3))
