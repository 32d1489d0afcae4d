"""``data verify``: every problem in a loaded dataset at once, by kind and id, before hours of extraction.

The checks are the ones extraction applies, through the same functions (``sample_problem`` for a row,
``open_image`` for its image, ``empty_splits`` for the splits), so verify reports exactly what extract
would refuse: a missing, undecodable or oversized image; an image path that an id leads outside the
image folder; an empty or unencodable text or id; a duplicate id; a label that is not a class index;
a split with no rows.
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from sppscl.config import ConfigError
from sppscl.errors import InputError, check_input_file, printable, safe
from sppscl.stage1.adapters import inside
from sppscl.stage1.encoders import RESIZE, to_rgb
from sppscl.stage1.records import LoadReport, Sample

MISSING_IMAGE = "missing image"
UNDECODABLE_IMAGE = "undecodable image"
OVERSIZED_IMAGE = "oversized image"
OUTSIDE_IMAGE = "image outside the dataset"
EMPTY_TEXT = "empty text"
UNENCODABLE_TEXT = "unencodable text or id"
DUPLICATE_ID = "duplicate id"
UNKNOWN_LABEL = "unknown label"
EMPTY_SPLIT = "empty split"
PROBLEM_KINDS = (
    MISSING_IMAGE, UNDECODABLE_IMAGE, OVERSIZED_IMAGE, OUTSIDE_IMAGE, EMPTY_TEXT, UNENCODABLE_TEXT, DUPLICATE_ID, UNKNOWN_LABEL, EMPTY_SPLIT
)
IMAGE_KINDS = (MISSING_IMAGE, UNDECODABLE_IMAGE, OVERSIZED_IMAGE)
SHOW_IDS = 20

# Images above this many pixels are refused, not decoded: a small file can claim a huge size (a
# "decompression bomb") and decoding it would take gigabytes. 64 MP is 8000 x 8000, four times the largest
# photos in the supported datasets; decoding one takes 192 MB. SPPSCL_MAX_IMAGE_PIXELS overrides it.
MAX_IMAGE_PIXELS = 64_000_000
# open_image applies this limit itself, from the header, naming the file and the limit; PIL's own check would
# instead warn anonymously (above 89 MP) or raise with its own numbers (above 179 MP)
Image.MAX_IMAGE_PIXELS = None


class ImageProblem(Exception):
    """An image extraction cannot use; ``kind`` is one of IMAGE_KINDS, ``detail`` names the file and why."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def max_image_pixels() -> int:
    """The pixel limit: SPPSCL_MAX_IMAGE_PIXELS if set, else MAX_IMAGE_PIXELS (checked when a run starts)."""
    env = os.environ.get("SPPSCL_MAX_IMAGE_PIXELS", "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 1):
            raise ConfigError(f"SPPSCL_MAX_IMAGE_PIXELS={env!r} is not a positive number of pixels")
        return int(value)
    return MAX_IMAGE_PIXELS


def not_a_file(path: Path) -> None:
    """Raise :class:`ImageProblem` unless ``path`` is (a link that leads to) a regular file: a FIFO, a device, a
    folder or a link loop is named as what it is, and never opened (a FIFO would block the read for ever)."""
    try:
        present = check_input_file(path, "an image file")
    except InputError as e:
        raise ImageProblem(UNDECODABLE_IMAGE, str(e)) from None
    if not present:
        raise ImageProblem(MISSING_IMAGE, str(path))


def resized_size(w: int, h: int, short: int = RESIZE) -> tuple[int, int]:
    """(width, height) after the encoders' resize, which scales the short side to ``short`` (torchvision's rule:
    the long side is ``int(short * long / short_side)``); a side of 0 stays 0 (the image is refused when decoded)."""
    if min(w, h) <= 0:
        return w, h
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def open_image(image: str | Path | bytes | Image.Image) -> Image.Image:
    """An image decoded and converted to RGB (``to_rgb``), as extraction and prediction use it.

    ``image`` is a file path (``str`` or ``Path``), the bytes of an image file, or a PIL image (the Python API
    takes all of them). Raises :class:`ImageProblem` for a missing file (or a FIFO, device or folder in its place,
    never opened), one PIL cannot decode, and one above the pixel limit, as stored or as resized for the encoders
    (both checked from the header, before any pixel is decoded).
    """
    limit = max_image_pixels()

    def check_size(size: tuple[int, int], what: str) -> None:
        w, h = size
        if w * h > limit:
            raise ImageProblem(
                OVERSIZED_IMAGE,
                f"{what}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of {limit / 1e6:.1f} "
                "(refused, not decoded: a possible decompression bomb). Downscale the image, or raise SPPSCL_MAX_IMAGE_PIXELS.",
            )
        rw, rh = resized_size(w, h)
        if rw * rh > limit:
            # a thin strip (1 x 20000: 20 kilopixels stored) grows to gigapixels when its short side is scaled up
            raise ImageProblem(
                OVERSIZED_IMAGE,
                f"{what}: {w}x{h}, whose short side scaled to {RESIZE} (as the encoders need) is {rw}x{rh} = "
                f"{rw * rh / 1e6:.1f} megapixels, above the limit of {limit / 1e6:.1f} (refused, not decoded: an aspect "
                "ratio no photo has). Crop the image, or raise SPPSCL_MAX_IMAGE_PIXELS.",
            )

    if isinstance(image, Image.Image):
        check_size(image.size, "the PIL image")
        return to_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        what, source = f"image bytes ({len(image)} bytes)", io.BytesIO(bytes(image))
    else:
        path = Path(image)
        not_a_file(path)
        what, source = str(path), path
    try:
        with Image.open(source) as im:
            check_size(im.size, what)
            im.load()
            return to_rgb(im)
    except ImageProblem:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...: all mean "cannot decode"
        raise ImageProblem(UNDECODABLE_IMAGE, f"{what}: {type(e).__name__}: {e}") from None


def _image_problem(path: Path, decode: bool = True) -> tuple[str, str] | None:
    """(problem kind, detail) for an image extraction could not use, else ``None``."""
    try:
        if not decode:
            not_a_file(Path(path))
            return None
        open_image(path)
    except ImageProblem as e:
        return e.kind, e.detail
    return None


def check_sample_image(path: Path) -> str | None:
    """``None`` if the image at ``path`` opens, loads and converts to RGB, else the reason (kind: detail)."""
    problem = _image_problem(path)
    return None if problem is None else f"{problem[0]}: {problem[1]}"


def unencodable_at(value: str) -> int | None:
    """Position of the first character UTF-8 cannot encode (a lone surrogate from JSON's \\ud800), else None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def sample_problem(s: Sample, num_classes: int) -> tuple[str, str] | None:
    """(kind, detail) of the first problem of a row that needs no image decoding, else ``None``.

    Shared by ``verify_samples`` and extraction's planning, so the two never disagree. Duplicate ids and
    image decoding are checked separately (they need every row, or the file's bytes).
    """
    for what, value in (("id", s.id), ("text", s.text)):
        at = unencodable_at(value)
        if at is not None:
            return UNENCODABLE_TEXT, f"{what} has a character UTF-8 cannot store at position {at} ({value[at]!r}: a lone surrogate)"
    if s.image_root is not None and not inside(s.image, s.image_root):
        return OUTSIDE_IMAGE, f"the image path the id leads to, {os.path.normpath(s.image)}, is outside the image folder {s.image_root}; refused"
    if not s.text or not s.text.strip():
        return EMPTY_TEXT, f"split {s.split}"
    if s.label is not None and not 0 <= s.label < num_classes:
        return UNKNOWN_LABEL, f"label {s.label} not in 0..{num_classes - 1} (split {s.split})"
    return None


def empty_splits(report: LoadReport, samples: list[Sample] | None = None) -> list[tuple[str, str]]:
    """(split, detail) for every split the dataset defines that has no rows in ``samples`` (default: all)."""
    counts = Counter(s.split for s in (report.samples if samples is None else samples))
    return [(split, f"{path} has no rows") for split, path in report.split_files.items() if counts[split] == 0]


@dataclass
class VerifyReport:
    """Problems by kind (each a list of (id, detail)), in sample order; every kind is present, maybe empty."""

    n_samples: int
    per_split: dict[str, int]
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {k: [] for k in PROBLEM_KINDS})
    # False: image files were checked for existence only, not decoded
    images_decoded: bool = True
    # folder -> number of images read from it, and whether it is inside the dataset folder
    image_folders: dict[str, tuple[int, bool]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def render(self, console: Console) -> None:
        splits = Table(title="samples per split")
        splits.add_column("split")
        splits.add_column("samples", justify="right")
        for name, n in self.per_split.items():
            splits.add_row(safe(name), str(n))
        splits.add_row("all", str(self.n_samples), style="bold")
        console.print(splits)

        outside = {f: n for f, (n, ok) in self.image_folders.items() if not ok}
        console.print(
            f"images are read from {len(self.image_folders)} folder(s)"
            + (f"; {sum(outside.values())} images resolve (through symbolic links) to {len(outside)} folder(s) outside the dataset folder:" if outside else "")
        )
        for folder, n in list(outside.items())[:SHOW_IDS]:
            console.print(printable(f"  {folder} ({n} images)"), markup=False, highlight=False, soft_wrap=True)

        kinds = Table(title="problems")
        kinds.add_column("kind")
        kinds.add_column("count", justify="right")
        for kind in PROBLEM_KINDS:
            unchecked = not self.images_decoded and kind == UNDECODABLE_IMAGE
            n = len(self.problems.get(kind, []))
            kinds.add_row(kind, "not checked" if unchecked else str(n), style="red" if n else None)
        console.print(kinds)

        for kind in PROBLEM_KINDS:
            items = self.problems.get(kind, [])
            if not items:
                continue
            console.print(f"[bold red]{kind}[/] ({len(items)}):")
            for sid, detail in items[:SHOW_IDS]:
                # not wrapped: paths stay whole, to copy and to search for
                console.print(printable(f"  {sid}: {detail}"), markup=False, highlight=False, soft_wrap=True)
            if len(items) > SHOW_IDS:
                console.print(f"  ... and {len(items) - SHOW_IDS} more")
        console.print("[green]OK: no problems found[/]" if self.ok else "[red]problems found[/]")


def verify_samples(
    samples: list[Sample],
    num_classes: int,
    check_images: bool = True,
    workers: int = 2,
    progress: bool = False,
    load_report: LoadReport | None = None,
    data_dir: Path | None = None,
) -> VerifyReport:
    """Check every sample (see module docstring); images are decoded in a thread pool of ``workers``.

    With ``check_images=False`` image files are only checked to exist, which takes seconds, not minutes.
    ``load_report`` (the adapter's) adds the splits that have no rows; ``data_dir`` marks image folders outside it.
    """
    report = VerifyReport(
        n_samples=len(samples), per_split=dict(Counter(s.split for s in samples)), images_decoded=check_images
    )
    max_image_pixels()  # a bad SPPSCL_MAX_IMAGE_PIXELS is one error now, not one per image
    row_problems = [sample_problem(s, num_classes) for s in samples]
    # an image outside the dataset, or of a row whose id cannot even be stored, is never opened
    unsafe = {s.image for s, p in zip(samples, row_problems) if p is not None and p[0] in (OUTSIDE_IMAGE, UNENCODABLE_TEXT)}
    # each file is checked once even when ids share an image
    paths = [p for p in dict.fromkeys(s.image for s in samples) if p not in unsafe]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: _image_problem(p, decode=check_images), paths)
        if progress:
            # progress is not a result: stderr, so `data verify > report.txt` holds the report alone
            results = track(results, total=len(paths), description="checking images", console=Console(stderr=True))
        by_path = dict(zip(paths, results))
    for s in samples:
        problem = by_path.get(s.image)
        if problem is not None:
            report.problems[problem[0]].append((s.id, problem[1]))
    for s, problem in zip(samples, row_problems):
        if problem is not None:
            report.problems[problem[0]].append((s.id, problem[1]))

    where: dict[str, list[str]] = {}
    for s in samples:
        where.setdefault(s.id, []).append(s.split)
    for sid, splits in where.items():
        if len(splits) > 1:
            report.problems[DUPLICATE_ID].append((sid, f"{len(splits)} rows, in {', '.join(splits)}"))
    if load_report is not None:
        report.problems[EMPTY_SPLIT] = empty_splits(load_report, samples)
    # where each image really is: dataset folders are often farms of symbolic links, which are followed, so an image
    # counts as outside when the file its links lead to is outside (the dataset folder's own links resolved too)
    real_root = os.path.realpath(data_dir) if data_dir is not None else None
    folders = Counter(os.path.dirname(os.path.realpath(s.image)) for s in samples if s.image not in unsafe)
    report.image_folders = {f: (n, real_root is None or inside(Path(f), Path(real_root))) for f, n in folders.items()}
    return report
