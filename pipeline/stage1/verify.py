"""``data verify``: every problem in a loaded dataset at once, by kind and id, before hours of extraction.

Checks: the image exists and decodes (as extraction will open it: PIL open, load, convert to RGB),
the text is non-empty, ids are unique across all splits, and labels are ``None`` or a class index.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from sppscl.stage1.records import Sample

MISSING_IMAGE = "missing image"
UNDECODABLE_IMAGE = "undecodable image"
EMPTY_TEXT = "empty text"
DUPLICATE_ID = "duplicate id"
UNKNOWN_LABEL = "unknown label"
PROBLEM_KINDS = (MISSING_IMAGE, UNDECODABLE_IMAGE, EMPTY_TEXT, DUPLICATE_ID, UNKNOWN_LABEL)
SHOW_IDS = 20


def _image_problem(path: Path, decode: bool = True) -> tuple[str, str] | None:
    """(problem kind, detail) for an image extraction could not use, else ``None``."""
    path = Path(path)
    if not path.is_file():
        return MISSING_IMAGE, str(path)
    if not decode:
        return None
    try:
        with Image.open(path) as im:
            im.load()
            im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return UNDECODABLE_IMAGE, f"{path}: {type(e).__name__}: {e}"
    return None


def check_sample_image(path: Path) -> str | None:
    """``None`` if the image at ``path`` opens, loads and converts to RGB, else the reason (kind: detail)."""
    problem = _image_problem(path)
    return None if problem is None else f"{problem[0]}: {problem[1]}"


@dataclass
class VerifyReport:
    """Problems by kind (each a list of (id, detail)), in sample order; every kind is present, maybe empty."""

    n_samples: int
    per_split: dict[str, int]
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {k: [] for k in PROBLEM_KINDS})
    # False: image files were checked for existence only, not decoded
    images_decoded: bool = True

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def render(self, console: Console) -> None:
        splits = Table(title="samples per split")
        splits.add_column("split")
        splits.add_column("samples", justify="right")
        for name, n in self.per_split.items():
            splits.add_row(name, str(n))
        splits.add_row("all", str(self.n_samples), style="bold")
        console.print(splits)

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
                console.print(f"  {sid}: {detail}", markup=False, highlight=False)
            if len(items) > SHOW_IDS:
                console.print(f"  ... and {len(items) - SHOW_IDS} more")
        console.print("[green]OK: no problems found[/]" if self.ok else "[red]problems found[/]")


def verify_samples(
    samples: list[Sample],
    num_classes: int,
    check_images: bool = True,
    workers: int = 2,
    progress: bool = False,
) -> VerifyReport:
    """Check every sample (see module docstring); images are decoded in a thread pool of ``workers``.

    With ``check_images=False`` image files are only checked to exist, which takes seconds, not minutes.
    """
    report = VerifyReport(
        n_samples=len(samples), per_split=dict(Counter(s.split for s in samples)), images_decoded=check_images
    )
    # each file is checked once even when ids share an image
    paths = list(dict.fromkeys(s.image for s in samples))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(partial(_image_problem, decode=check_images), paths)
        if progress:
            results = track(results, total=len(paths), description="checking images")
        by_path = dict(zip(paths, results))
    for s in samples:
        problem = by_path[s.image]
        if problem is not None:
            report.problems[problem[0]].append((s.id, problem[1]))

    for s in samples:
        if not s.text.strip():
            report.problems[EMPTY_TEXT].append((s.id, f"split {s.split}"))
        if s.label is not None and not 0 <= s.label < num_classes:
            detail = f"label {s.label} not in 0..{num_classes - 1} (split {s.split})"
            report.problems[UNKNOWN_LABEL].append((s.id, detail))

    where: dict[str, list[str]] = {}
    for s in samples:
        where.setdefault(s.id, []).append(s.split)
    for sid, splits in where.items():
        if len(splits) > 1:
            report.problems[DUPLICATE_ID].append((sid, f"{len(splits)} rows, in {', '.join(splits)}"))
    return report
