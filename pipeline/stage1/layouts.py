"""``dataset.format: auto``: recognise the public releases' folder layouts, so a download works with one command.

The presets of the paper's datasets use ``auto``. Given the dataset folder, :func:`resolve_dataset` picks the
concrete format, split files and image folder from what is on disk, in this order:

1. CLMLF's split files (the standard splits): ``train.json``, ``dev.json`` or ``valid.json`` (HFM) and
   ``test.json``, either in the folder itself or in ``10-flod-1/`` (how the CLMLF repository ships MVSA).
2. HFM's own release: ``text/train.txt``, ``text/valid2.txt``, ``text/test2.txt`` (keyword filter applied).
3. The raw MVSA release: ``labelResultAll.txt`` and ``data/`` (cleaned, then a seeded 8:1:1 split).

Images are read from the first of ``image_dir`` (default ``images``), ``dataset_image`` (where CLMLF and HFM put
them) and ``data`` (the raw MVSA release, which keeps ``<id>.jpg`` beside ``<id>.txt``) that exists. A folder that
holds none of these may hold the dataset one level down: the CLMLF repository's root (``dataset/data/<NAME>/``)
or a parent with a folder named like the dataset (``MVSA-single``, ``MVSA_Single``, ``HFM``) is searched too.
The choice is reported as a note, and the resolved config is what extraction records in the cache.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from sppscl.config import Config
from sppscl.errors import check_input_folder
from sppscl.stage1.records import DataError

CLMLF_FOLD_DIR = "10-flod-1"  # sic: the CLMLF repository's spelling
IMAGE_DIRS = ("dataset_image", "images", "data")
CLMLF_DEV_FILES = ("dev.json", "valid.json")
HFM_RAW_FILES = {"train": ("train.txt",), "dev": ("valid2.txt", "valid.txt"), "test": ("test2.txt", "test.txt")}

LAYOUTS_HELP = (
    "  - CLMLF split files: train.json, dev.json (HFM: valid.json), test.json, in the folder or in 10-flod-1/, "
    "images <id>.jpg in dataset_image/ or images/\n"
    "  - HFM's release: text/train.txt, text/valid2.txt, text/test2.txt, images in dataset_image/\n"
    "  - the raw MVSA release: labelResultAll.txt and data/<id>.jpg|txt\n"
    "  or the CLMLF repository's root (dataset/data/<NAME>/ is used). Another layout: set dataset.format and "
    "dataset.splits in your own YAML file (docs/datasets.md)."
)


def resolve_dataset(cfg: Config, data_dir: str | Path | None = None) -> tuple[Config, Path, str | None]:
    """``(config with a concrete format, absolute dataset folder, note saying what was recognised or None)``.

    A config whose format is not ``auto`` comes back unchanged.
    """
    root = cfg.data_dir(data_dir)
    if cfg.dataset.format != "auto":
        return cfg, root, None
    if not check_input_folder(root, f"a data folder (dataset {cfg.dataset.name!r})"):
        raise DataError(
            f"data folder {root} does not exist (dataset {cfg.dataset.name!r}); pass --data-dir with the folder "
            f"holding one of:\n{LAYOUTS_HELP}"
        )
    if cfg.dataset.splits:
        raise DataError(
            f"dataset.splits is set but dataset.format is auto (dataset {cfg.dataset.name!r}): set dataset.format "
            "too (clmlf, hfm-raw, mvsa-raw, mmsd2 or manifest), or drop dataset.splits to have the layout recognised"
        )
    for folder in [root, *_nested_candidates(root, cfg.dataset.name)]:
        found = _recognise(cfg, folder)
        if found is not None:
            resolved, note = found
            return resolved, folder, note
    raise DataError(f"{root}: no known layout of dataset {cfg.dataset.name!r} here. Expected one of:\n{LAYOUTS_HELP}")


def _recognise(cfg: Config, folder: Path) -> tuple[Config, str] | None:
    for detect in (_clmlf, _hfm_raw, _mvsa_raw):
        found = detect(cfg, folder)
        if found is not None:
            return found
    return None


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _nested_candidates(root: Path, dataset: str) -> list[Path]:
    """Folders named like the dataset in the CLMLF repository's ``dataset/data/`` or directly under ``root``."""
    out = []
    for parent in (root / "dataset" / "data", root):
        if parent.is_dir():
            out += sorted(c for c in parent.iterdir() if c.is_dir() and _norm(c.name) == _norm(dataset))
    return out


def _image_dir(cfg: Config, folder: Path) -> str | None:
    for name in dict.fromkeys((cfg.dataset.image_dir, *IMAGE_DIRS)):
        if (folder / name).is_dir():
            return name
    return None


def _no_images(folder: Path, what: str) -> DataError:
    if folder.name == CLMLF_FOLD_DIR:
        return DataError(f"{folder}: this is CLMLF's split folder; pass the dataset folder above it, which holds dataset_image/")
    return DataError(
        f"{folder}: found {what} but no image folder; put the images (<id>.jpg) in {folder / 'dataset_image'} "
        f"(as CLMLF and HFM instruct) or {folder / 'images'}"
    )


def _with(cfg: Config, fmt: str, splits: dict[str, str], image_dir: str) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.dataset.format, cfg.dataset.splits, cfg.dataset.image_dir = fmt, splits, image_dir
    return cfg


def _first_file(base: Path, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if (base / n).is_file()), None)


def _clmlf(cfg: Config, folder: Path) -> tuple[Config, str] | None:
    for sub in (CLMLF_FOLD_DIR, ""):
        base = folder / sub
        if not (base / "train.json").is_file():
            continue
        files = {"train": "train.json", "dev": _first_file(base, CLMLF_DEV_FILES), "test": _first_file(base, ("test.json",))}
        splits = {split: os.path.join(sub, name) if sub else name for split, name in files.items() if name}
        image_dir = _image_dir(cfg, folder)
        if image_dir is None:
            raise _no_images(folder, f"CLMLF split files in {base}")
        listed = ", ".join(f"{s}={f}" for s, f in splits.items())
        return _with(cfg, "clmlf", splits, image_dir), f"layout: CLMLF split files in {base} ({listed}), images in {folder / image_dir}"
    return None


def _hfm_raw(cfg: Config, folder: Path) -> tuple[Config, str] | None:
    text = folder / "text"
    if not (text / "train.txt").is_file():
        return None
    splits = {}
    for split, names in HFM_RAW_FILES.items():
        name = _first_file(text, names)
        if name:
            splits[split] = f"text/{name}"
    image_dir = _image_dir(cfg, folder)
    if image_dir is None:
        raise _no_images(folder, f"HFM's text files in {text}")
    listed = ", ".join(f"{s}={f}" for s, f in splits.items())
    return _with(cfg, "hfm-raw", splits, image_dir), f"layout: HFM's own release in {folder} ({listed}), images in {folder / image_dir}"


def _mvsa_raw(cfg: Config, folder: Path) -> tuple[Config, str] | None:
    if not (folder / "labelResultAll.txt").is_file():
        return None
    if not (folder / "data").is_dir():
        raise DataError(f"{folder}: found labelResultAll.txt but no data/ folder (the raw MVSA release has data/<id>.jpg and data/<id>.txt)")
    return _with(cfg, "mvsa-raw", {}, "data"), f"layout: the raw MVSA release in {folder} (labelResultAll.txt, data/)"
