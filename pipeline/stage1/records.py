"""The normalised sample record every data adapter produces, the report of what an adapter dropped, and the error
a broken dataset file raises (shared by the adapters and the layout detection, which imports no adapter)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sppscl.errors import SppsclError

NO_LABEL = -1  # how "no label" is stored in the cache and in tensors


class DataError(SppsclError, ValueError):
    """A dataset file is missing or structurally broken; the message names the file and the row or id."""


@dataclass(frozen=True)
class Sample:
    id: str
    text: str
    image: Path  # absolute path to the image file
    label: int | None  # class index, or None for an unlabeled split
    split: str
    # the folder an image path derived from the id must stay inside (None: the path was given explicitly,
    # as in a manifest); an id such as "../../x" must not make extraction read outside the dataset
    image_root: Path | None = None


@dataclass
class LoadReport:
    """What an adapter read and what it dropped on purpose (e.g. HFM's keyword filter), with counts and ids."""

    samples: list[Sample] = field(default_factory=list)
    # reason -> ids dropped for that reason
    dropped: dict[str, list[str]] = field(default_factory=dict)
    # human-readable notes ("HFM keyword filter dropped 9224 of 29040 train rows")
    notes: list[str] = field(default_factory=list)
    # every split the dataset defines -> the file it came from, including splits with no rows (reported)
    split_files: dict[str, Path] = field(default_factory=dict)

    def drop(self, reason: str, sample_id: str) -> None:
        self.dropped.setdefault(reason, []).append(sample_id)

    def split_counts(self) -> dict[str, int]:
        return dict(Counter(s.split for s in self.samples))

    def label_counts(self) -> dict[str, dict[int | None, int]]:
        out: dict[str, Counter] = {}
        for s in self.samples:
            out.setdefault(s.split, Counter())[s.label] += 1
        return {k: dict(v) for k, v in out.items()}
