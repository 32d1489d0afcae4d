"""Data adapters: every supported on-disk format -> one normalised ``Sample`` per row (SPEC §1).

``load_samples`` dispatches on ``cfg.dataset.format``. Adapters read structure only: they raise
``DataError`` (naming the file and the row or id) on broken files, but they do not open images,
and they keep labels outside ``range(len(classes))`` as they are, so that ``verify`` and extraction
can report every such id at once instead of stopping at the first.
"""

from __future__ import annotations

import ast
import copy
import csv
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sppscl.config import Config
from sppscl.errors import check_input_file, check_input_folder
from sppscl.stage1.records import DataError, LoadReport, Sample  # DataError is raised from here too (and imported from here)

# Dropping posts with these words turns HFM's 29,040 raw train rows into the standard 19,816 (SPEC §1).
HFM_KEYWORDS = ("sarcasm", "sarcastic", "reposting", "<url>", "joke", "humor", "humour", "irony", "ironic", "exgag")

MVSA_LABELS = {"positive": 0, "neutral": 1, "negative": 2}
MVSA_NEUTRAL = MVSA_LABELS["neutral"]
MVSA_SPLIT_SEED = 42

LABEL_KEYS_CLMLF = ("emotion_label",)
LABEL_KEYS_MMSD2 = ("emotion_label", "label")
# MMSD2.0's released JSON names the id "image_id"
ID_KEYS_MMSD2 = ("id", "image_id")
INT_RE = re.compile(r"-?\d+")


def load_samples(cfg: Config, data_dir: Path | None = None) -> LoadReport:
    """Read the dataset ``cfg`` describes (folder: ``cfg.data_dir(data_dir)``) into normalised samples.

    ``format: auto`` is first resolved to the layout found on disk (``layouts.resolve_dataset``, noted in the report).
    """
    if cfg.dataset.format == "auto":
        from sppscl.stage1.layouts import resolve_dataset

        cfg, root, note = resolve_dataset(cfg, data_dir)
        report = load_samples(cfg, root)
        report.notes.insert(0, note)
        return report
    root = _abs(cfg.data_dir(data_dir))
    loaders: dict[str, Callable[[Config, Path], LoadReport]] = {
        "clmlf": _load_clmlf,
        "hfm-raw": _load_hfm_raw,
        "mmsd2": _load_mmsd2,
        "mvsa-raw": _load_mvsa_raw,
        "manifest": _load_manifest,
        "synthetic": _load_synthetic,
    }
    fmt = cfg.dataset.format
    if fmt not in loaders:
        raise DataError(f"dataset.format={fmt!r} is not one of {', '.join(loaders)}")
    # the synthetic set is drawn into its folder on first use
    if fmt != "synthetic" and not check_input_folder(root, f"a data folder (dataset {cfg.dataset.name!r}, format {fmt})"):
        raise DataError(f"data folder {root} does not exist (dataset {cfg.dataset.name!r}, format {fmt})")
    return loaders[fmt](cfg, root)


def _abs(p: Path) -> Path:
    # abspath, not resolve(): keep the user's symlinks in reported paths
    return Path(os.path.abspath(p))


def _user_path(text: str, where: str) -> Path:
    """``~`` and ``~user`` expanded; a user this machine does not know is the data's error, not a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError as e:  # pathlib raises it for ~name with no such user (or no home directory)
        raise DataError(f"{where}: path {text!r} cannot be expanded ({e}); write it as an absolute or relative path") from None


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` stays inside ``folder`` once ``..`` and absolute components are applied (lexically:
    symlinks the dataset's owner made are honoured, an id such as ``../../x`` is not)."""
    p, f = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _split_files(cfg: Config, base: Path) -> dict[str, Path]:
    if not cfg.dataset.splits:
        raise DataError(f"dataset.splits is empty: format {cfg.dataset.format} needs split name -> file entries")
    out = {}
    for split, name in cfg.dataset.splits.items():
        path = _abs(base / _user_path(name, f"dataset.splits.{split}"))
        # a FIFO, device or folder is named as what it is, never opened (a FIFO would block the command)
        if not check_input_file(path, f"the {split!r} split file"):
            raise DataError(f"split {split!r}: file {path} does not exist")
        out[split] = path
    return out


def _parse_label(value: Any, where: str) -> int | None:
    """An integer class index from JSON/literal data; ``None`` stays ``None`` (no label)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer class index")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INT_RE.fullmatch(value.strip()):
        return int(value.strip())
    raise DataError(f"{where}: label {value!r} is not an integer class index")


def _parse_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"{where}: id {value!r} is missing or not a string/integer")
    return str(value).strip()


def _check_labels_all_or_none(samples: list[Sample], split: str, path: Path) -> None:
    """A split is either labeled or unlabeled; a partly labeled file is an error naming the ids without one."""
    missing = [s.id for s in samples if s.label is None]
    if missing and len(missing) < len(samples):
        shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(
            f"{path}: split {split!r} has labels on some rows but not on {len(missing)} of {len(samples)}; "
            f"ids without a label: {shown}"
        )


def _note_unlabeled(report: LoadReport, split: str, samples: list[Sample], path: Path) -> None:
    if samples and samples[0].label is None:
        report.notes.append(f"split {split} ({path.name}) has no labels: prediction only")


# --- CLMLF and MMSD2.0: one JSON list per split ---------------------------------------------------


def _read_json_list(path: Path) -> list[Any]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:  # [[[[... a hundred thousand deep: the parser's recursion, not a dataset
        raise DataError(f"{path}: JSON nested too deeply to be a dataset (a list of rows)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    return rows


def _json_split_samples(
    path: Path,
    split: str,
    image_dir: Path,
    id_keys: tuple[str, ...],
    label_keys: tuple[str, ...],
) -> list[Sample]:
    samples = []
    for i, row in enumerate(_read_json_list(path)):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        id_key = next((k for k in id_keys if k in row), None)
        if id_key is None:
            raise DataError(f"{where}: missing key {' or '.join(repr(k) for k in id_keys)}")
        sid = _parse_id(row[id_key], where)
        where = f"{path}: row {i} (id {sid})"
        if not isinstance(row.get("text"), str):
            raise DataError(f"{where}: missing or non-string 'text'")
        label_key = next((k for k in label_keys if k in row), None)
        label = _parse_label(row[label_key], where) if label_key else None
        samples.append(Sample(sid, row["text"], image_dir / f"{sid}.jpg", label, split, image_dir))
    _check_labels_all_or_none(samples, split, path)
    return samples


def _load_json_splits(
    files: dict[str, Path], image_dir: Path, id_keys: tuple[str, ...], label_keys: tuple[str, ...]
) -> LoadReport:
    report = LoadReport()
    for split, path in files.items():
        report.split_files[split] = path
        samples = _json_split_samples(path, split, image_dir, id_keys, label_keys)
        _note_unlabeled(report, split, samples, path)
        report.samples.extend(samples)
    return report


def _load_clmlf(cfg: Config, root: Path) -> LoadReport:
    """CLMLF: ``[{"id", "text", "emotion_label"?}, ...]`` per split, images at ``<image_dir>/<id>.jpg``."""
    image_dir = _abs(root / cfg.dataset.image_dir)
    return _load_json_splits(_split_files(cfg, root), image_dir, ("id",), LABEL_KEYS_CLMLF)


def _load_mmsd2(cfg: Config, root: Path) -> LoadReport:
    """MMSD2.0: HFM's images with re-annotated label files (CLMLF layout) from ``dataset.label_dir``."""
    if not cfg.dataset.label_dir:
        raise DataError("format mmsd2 needs dataset.label_dir: the folder holding the MMSD2.0 label files")
    label_dir = _abs(root / _user_path(cfg.dataset.label_dir, "dataset.label_dir"))
    if not check_input_folder(label_dir, "the MMSD2.0 label folder"):
        raise DataError(f"MMSD2.0 label folder {label_dir} does not exist")
    image_dir = _abs(root / cfg.dataset.image_dir)
    report = _load_json_splits(_split_files(cfg, label_dir), image_dir, ID_KEYS_MMSD2, LABEL_KEYS_MMSD2)
    report.notes.append(f"labels from MMSD2.0 folder {label_dir}")
    return report


# --- HFM raw release --------------------------------------------------------------------------------


def hfm_keyword(text: str) -> str | None:
    """The first HFM filter keyword ``text`` contains (case-insensitive), or ``None``."""
    low = text.lower()
    return next((k for k in HFM_KEYWORDS if k in low), None)


def _load_hfm_raw(cfg: Config, root: Path) -> LoadReport:
    """HFM raw text files: one Python-literal list per line.

    Train lines are ``[id, text, label]``, valid2/test2 lines ``[id, text, hashtag_label, label]``: the label is last.
    """
    report = LoadReport()
    image_dir = _abs(root / cfg.dataset.image_dir)
    for split, path in _split_files(cfg, root).items():
        report.split_files[split] = path
        kept = 0
        total = 0
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}: line {lineno}"
                try:
                    row = ast.literal_eval(line.strip())
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise DataError(f"{where}: not a Python literal list") from None
                if not isinstance(row, (list, tuple)) or len(row) not in (3, 4):
                    raise DataError(f"{where}: expected a list of 3 or 4 elements [id, text, (hashtag label,) label]")
                sid = _parse_id(row[0], where)
                if not isinstance(row[1], str):
                    raise DataError(f"{where} (id {sid}): text is not a string")
                label = _parse_label(row[-1], f"{where} (id {sid})")
                if label is None:
                    raise DataError(f"{where} (id {sid}): label is missing")
                total += 1
                keyword = hfm_keyword(row[1]) if cfg.dataset.hfm_keyword_filter else None
                if keyword is not None:
                    report.drop(f"hfm keyword filter: {keyword}", sid)
                    continue
                kept += 1
                report.samples.append(Sample(sid, row[1], image_dir / f"{sid}.jpg", label, split, image_dir))
        if cfg.dataset.hfm_keyword_filter:
            report.notes.append(f"HFM keyword filter dropped {total - kept} of {total} rows in {split}")
    return report


# --- raw MVSA release -------------------------------------------------------------------------------


def _mvsa_label(token: str, where: str) -> int:
    label = MVSA_LABELS.get(token.strip().lower())
    if label is None:
        raise DataError(f"{where}: label {token.strip()!r} is not one of {', '.join(MVSA_LABELS)}")
    return label


def mvsa_pair_label(text_label: int, image_label: int) -> int | None:
    """One annotator's ``text,image`` pair -> one label (SPEC §1): equal -> it; neutral + polar -> the polar one;
    positive vs negative -> ``None`` (dropped)."""
    if text_label == image_label:
        return text_label
    if text_label == MVSA_NEUTRAL:
        return image_label
    if image_label == MVSA_NEUTRAL:
        return text_label
    return None


def mvsa_majority(votes: list[int | None]) -> int | None:
    """MVSA-Multiple: the label more than half of the annotators give after the pair rule, else ``None``.

    An annotator whose own pair conflicts casts no vote but still counts in the total.
    """
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None
    label, n = counts.most_common(1)[0]
    return label if 2 * n > len(votes) else None


def _read_mvsa_labels(path: Path, report: LoadReport) -> dict[str, int]:
    """``labelResultAll.txt`` -> id -> cleaned label; drops are recorded in ``report``."""
    labels: dict[str, int] = {}
    seen: set[str] = set()
    n_annot = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = list(enumerate(f, start=1))
    for lineno, line in lines[1:]:  # the first line is the header
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        cols = [c.strip() for c in line.rstrip("\r\n").split("\t")]
        if n_annot == 0:
            n_annot = len(cols) - 1
            if n_annot < 1:
                raise DataError(f"{where}: expected 'id<TAB>text,image' columns")
        if len(cols) - 1 != n_annot:
            raise DataError(f"{where}: {len(cols) - 1} annotator columns, earlier lines have {n_annot}")
        sid = _parse_id(cols[0], where)
        if sid in seen:
            raise DataError(f"{where}: id {sid} appears twice")
        seen.add(sid)
        votes = []
        for col in cols[1:]:
            pair = col.split(",")
            if len(pair) != 2:
                raise DataError(f"{where} (id {sid}): annotation {col!r} is not 'text_label,image_label'")
            votes.append(mvsa_pair_label(_mvsa_label(pair[0], where), _mvsa_label(pair[1], where)))
        label = votes[0] if n_annot == 1 else mvsa_majority(votes)
        if label is None:
            report.drop(_mvsa_drop_reason(n_annot), sid)
        else:
            labels[sid] = label
    if n_annot == 0:
        raise DataError(f"{path}: no label rows after the header")
    n_dropped = len(seen) - len(labels)
    if n_annot == 1:
        kind, why = "MVSA-Single (1 annotator)", "positive-vs-negative text/image conflicts"
    else:
        kind, why = f"MVSA-Multiple ({n_annot} annotators)", "without a majority label"
    report.notes.append(f"{kind}: kept {len(labels)} of {len(seen)} rows, dropped {n_dropped} {why}")
    return labels


def _mvsa_drop_reason(n_annot: int) -> str:
    if n_annot == 1:
        return "mvsa: text and image labels conflict (positive vs negative)"
    return f"mvsa: no majority over {n_annot} annotators"


def _id_sort_key(sid: str) -> tuple[int, int, str]:
    return (0, int(sid), "") if sid.isdigit() else (1, 0, sid)


def _mvsa_splits(cfg: Config, root: Path, ids: Iterable[str], report: LoadReport) -> dict[str, list[str]]:
    """Split ids from id-list files when the preset names them, else a seeded 8:1:1 shuffle."""
    kept = set(ids)
    if cfg.dataset.splits:
        out: dict[str, list[str]] = {}
        dropped = {sid for sids in report.dropped.values() for sid in sids}
        for split, path in _split_files(cfg, root).items():
            out[split] = []
            skipped = 0
            for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
                sid = line.strip()
                if not sid:
                    continue
                if sid in kept:
                    out[split].append(sid)
                elif sid in dropped:
                    skipped += 1
                else:
                    raise DataError(f"{path}: line {lineno}: id {sid} is not in labelResultAll.txt")
            if skipped:
                report.notes.append(f"split {split}: {skipped} listed ids were dropped by the MVSA cleaning rule")
        unused = len(kept - {sid for sids in out.values() for sid in sids})
        if unused:
            report.notes.append(f"{unused} cleaned ids are in none of the split files and were left out")
        return out
    order = sorted(kept, key=_id_sort_key)
    random.Random(MVSA_SPLIT_SEED).shuffle(order)
    n_train, n_dev = int(0.8 * len(order)), int(0.1 * len(order))
    out = {
        "train": order[:n_train],
        "dev": order[n_train : n_train + n_dev],
        "test": order[n_train + n_dev :],
    }
    report.notes.append(
        f"raw MVSA has no split: made a deterministic 8:1:1 split (seed {MVSA_SPLIT_SEED}) "
        f"train/dev/test = {len(out['train'])}/{len(out['dev'])}/{len(out['test'])}"
    )
    return out


def _load_mvsa_raw(cfg: Config, root: Path) -> LoadReport:
    """Raw MVSA: ``data/<id>.jpg``, ``data/<id>.txt`` and ``labelResultAll.txt``, cleaned per SPEC §1.

    Single vs Multiple is read from the number of annotator columns. A missing ``.txt`` gives an
    empty text (``verify`` reports it) rather than an error, so one run lists every such id.
    """
    label_file = root / "labelResultAll.txt"
    if not check_input_file(label_file, "MVSA's label file"):
        raise DataError(f"{label_file} does not exist (raw MVSA needs labelResultAll.txt and data/)")
    report = LoadReport()
    labels = _read_mvsa_labels(label_file, report)
    data = root / "data"
    missing_text = []
    for split, ids in _mvsa_splits(cfg, root, labels, report).items():
        report.split_files.setdefault(split, label_file)
        for sid in ids:
            txt = data / f"{sid}.txt"
            if not inside(txt, data):
                # never read a file an id points outside data/; verify and extract report the id
                text = ""
            elif txt.is_file():
                # real MVSA text files mix encodings; a replaced byte is better than a lost tweet
                text = txt.read_bytes().decode("utf-8", errors="replace").strip()
            else:
                missing_text.append(sid)
                text = ""
            report.samples.append(Sample(sid, text, data / f"{sid}.jpg", labels[sid], split, data))
    if missing_text:
        shown = ", ".join(missing_text[:10])
        report.notes.append(f"{len(missing_text)} ids have no data/<id>.txt (empty text): {shown}")
    return report


# --- own data: JSONL / CSV manifests ----------------------------------------------------------------

MANIFEST_REQUIRED = ("id", "text", "image")


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (a leading BOM, as spreadsheets write, is dropped); bad bytes name their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {lineno}: not UTF-8 text") from None


def _manifest_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a ``.jsonl`` or ``.csv`` manifest."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {lineno}: JSON nested too deeply to be a row") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
        missing = [c for c in MANIFEST_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: line 1 (header): missing column(s) {', '.join(missing)}")
        for row in reader:
            yield reader.line_num, row
    else:
        raise DataError(f"{path}: manifest must be .jsonl or .csv")


def _manifest_label(value: Any, classes: list[str], where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, str) and not INT_RE.fullmatch(value.strip()):
        by_name = {c.lower(): i for i, c in enumerate(classes)}
        label = by_name.get(value.strip().lower())
        if label is None:
            raise DataError(f"{where}: label {value!r} is neither an index nor one of the classes {classes}")
        return label
    return _parse_label(value, where)


def _load_manifest(cfg: Config, root: Path) -> LoadReport:
    """Own data: ``id, text, image[, label][, split]`` rows; images relative to the manifest's folder.

    With one manifest file, a ``split`` column (when present and non-empty) chooses the split; otherwise
    the split is the mapping's name, and a ``split`` value that disagrees with it is an error.
    """
    report = LoadReport()
    files = _split_files(cfg, root)
    single = len(files) == 1
    by_split: dict[str, list[Sample]] = {}
    split_file: dict[str, Path] = {}
    for mapped, path in files.items():
        report.split_files[mapped] = path
        for lineno, row in _manifest_rows(path):
            where = f"{path}: line {lineno}"
            for key in MANIFEST_REQUIRED:
                if row.get(key) is None:
                    raise DataError(f"{where}: missing {key!r}")
            sid = _parse_id(row["id"], where)
            where = f"{where} (id {sid})"
            if not isinstance(row["text"], str):
                raise DataError(f"{where}: 'text' is not a string")
            if not isinstance(row["image"], str) or not row["image"].strip():
                raise DataError(f"{where}: 'image' is empty or not a path")
            row_split = str(row.get("split") or "").strip()
            if single and row_split:
                split = row_split
            else:
                if row_split and row_split != mapped:
                    raise DataError(f"{where}: split {row_split!r} disagrees with the file's split {mapped!r}")
                split = mapped
            image = _abs(path.parent / _user_path(row["image"].strip(), f"{where}: 'image'"))
            label = _manifest_label(row.get("label"), cfg.dataset.classes, where)
            by_split.setdefault(split, []).append(Sample(sid, row["text"], image, label, split))
            split_file[split] = path
    if single and by_split and list(files) != list(by_split):
        # a split column distributed the rows: the splits are the ones it names
        report.split_files = dict(split_file)
    for split, samples in by_split.items():
        _check_labels_all_or_none(samples, split, split_file[split])
        _note_unlabeled(report, split, samples, split_file[split])
        report.samples.extend(samples)
    return report


def _load_synthetic(cfg: Config, root: Path) -> LoadReport:
    """The generated demo set: drawn on first use (see ``synthetic.ensure_dataset``), then read as a manifest."""
    from sppscl.stage1 import synthetic

    try:
        synthetic.ensure_dataset(root, cfg)
    except ValueError as e:
        raise DataError(f"cannot generate the synthetic set in {root}: {e}") from None
    if not cfg.dataset.splits:
        cfg = copy.deepcopy(cfg)
        cfg.dataset.splits = dict(synthetic.DEFAULT_SPLITS)
    return _load_manifest(cfg, root)
