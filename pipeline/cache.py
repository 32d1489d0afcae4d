"""The feature cache: the contract between stage one (writer) and stage two (reader).

One HDF5 file per dataset. Layout (``n`` rows in a split, ``T`` tokens in all its rows)::

    /                      attrs: schema_version, provenance (JSON), complete (written last)
    /splits/<split>/ids          (n,)          str
    /splits/<split>/texts        (n,)          str
    /splits/<split>/labels       (n,)          int16, -1 = no label
    /splits/<split>/offsets      (n+1,)        int64, tokens of row i are tokens[offsets[i]:offsets[i+1]]
    /splits/<split>/image        (n, C, h, w)  float16, the image encoder's last feature map
    /splits/<split>/tokens       (T, L, H)     float16, last L layers at every real position ([CLS] first, [SEP] last)
    /splits/<split>/status       (n,)          uint8, 0 pending / 1 written / 2 skipped (bad input, --on-error skip)
    /skipped/{split,id,reason}                 rows left out, before extraction (plan) or during it (image errors)

Why this shape: everything a row needs is known before any encoder runs (token counts come from the
tokenizer), so the file is laid out in full first and then filled *by row index*. The big arrays are
contiguous and allocated up front, so filling them never touches HDF5 metadata: rows are written with
positioned writes at the dataset's byte offset. A ``kill -9`` mid-fill therefore cannot corrupt the file, a rerun
fills the rows whose status is still 0, and several processes can fill disjoint rows of one file at once.
The ``complete`` attribute is written last; a reader refuses a file without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .errors import SppsclError, check_input_file, shown
from .outputs import fresh_temp

SCHEMA_VERSION = 1
PENDING, WRITTEN, SKIPPED = 0, 1, 2
_STR = h5py.string_dtype(encoding="utf-8")


# root attribute: the dataset folder the cache was extracted from (resolved), as the run records name it. Kept out of
# the provenance, which must match between shards and resumed runs that read one dataset from different mount points.
DATA_DIR_ATTR = "data_dir"


class CacheError(SppsclError, RuntimeError):
    """A cache cannot be used as asked: missing, incomplete, or from a different configuration."""


@dataclass
class SplitPlan:
    """What one split of the cache will hold, known before extraction starts."""

    name: str
    ids: list[str]
    texts: list[str]
    labels: np.ndarray  # int16, -1 = no label
    n_tokens: np.ndarray  # int64 per row

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_tokens, dtype=np.int64)]).astype(np.int64)


@dataclass(frozen=True)
class FeatureShapes:
    image: tuple[int, int, int]  # (C, h, w)
    layers: int
    hidden: int
    dtype: str = "float16"


def diff_provenance(a: Any, b: Any, prefix: str = "", names: tuple[str, str] = ("cache", "request")) -> list[str]:
    """Dotted paths where two records differ, with both values, each labelled by its side's name in ``names``
    (``a`` first): for refusal messages that say which side has which value."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += diff_provenance(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.", names)
        return out
    if a != b:
        return [f"{prefix.rstrip('.')}: {names[0]} has {a!r}, {names[1]} has {b!r}"]
    return []


def create_cache(
    path: Path,
    plans: list[SplitPlan],
    shapes: FeatureShapes,
    provenance: dict,
    skipped: list[tuple[str, str, str]],
    attrs: dict[str, Any] | None = None,
) -> None:
    """Lay the whole file out (every dataset allocated, nothing filled) and atomically move it into place.

    ``skipped`` lists (split, id, reason) rows left out when planning; they are kept in the file so the
    reader can report them. ``attrs`` are further root attributes (in the file from its first appearance).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_temp(path.with_name(path.name + ".partial"), "the cache being laid out")
    with h5py.File(tmp, "w-", libver="earliest") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        f.attrs["complete"] = False
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        dtype = np.dtype(shapes.dtype)
        for plan in plans:
            g = f.create_group(f"splits/{plan.name}")
            g.create_dataset("ids", data=np.array(plan.ids, dtype=object), dtype=_STR)
            g.create_dataset("texts", data=np.array(plan.texts, dtype=object), dtype=_STR)
            g.create_dataset("labels", data=plan.labels.astype(np.int16))
            g.create_dataset("offsets", data=plan.offsets)
            n, total = len(plan.ids), int(plan.n_tokens.sum())
            _allocate(g, "image", (n, *shapes.image), dtype)
            _allocate(g, "tokens", (total, shapes.layers, shapes.hidden), dtype)
            _allocate(g, "status", (n,), np.dtype(np.uint8))
        _write_skipped(f, skipped)
        f.flush()
    os.replace(tmp, path)


def cache_bytes(plans: list[SplitPlan], shapes: FeatureShapes) -> int:
    """Bytes ``create_cache`` lays out for ``plans`` (the feature arrays, plus ids, texts and a margin for metadata)."""
    item = np.dtype(shapes.dtype).itemsize
    total = 1 << 20
    for plan in plans:
        n, tokens = len(plan.ids), int(plan.n_tokens.sum())
        total += n * int(np.prod(shapes.image)) * item + tokens * shapes.layers * shapes.hidden * item
        total += n * (1 + 2 + 8 + 16) + sum(len(t.encode("utf-8")) + len(i.encode("utf-8")) for t, i in zip(plan.texts, plan.ids))
    return total


def _allocate(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """A contiguous dataset whose bytes exist on disk from the start (so memory-mapped writes need no metadata)."""
    space = h5py.h5s.create_simple(shape)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    tid = h5py.h5t.py_create(dtype)
    h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)


def _write_skipped(f: h5py.File, skipped: list[tuple[str, str, str]]) -> None:
    if "skipped" in f:
        del f["skipped"]
    g = f.create_group("skipped")
    for i, key in enumerate(("split", "id", "reason")):
        g.create_dataset(key, data=np.array([row[i] for row in skipped], dtype=object), dtype=_STR)


# JSON headers nest a few levels; a deeper one is hostile (100,000 levels overflow the parser's recursion)
MAX_JSON_DEPTH = 64
MAX_HEADER_CHARS = 16 << 20
FEATURE_DTYPES = ("float16", "float32")
SPLIT_KEYS = ("ids", "texts", "labels", "offsets", "image", "tokens", "status")


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests at most ``limit`` containers deep (counted outside strings, before parsing)."""
    depth, in_str, escaped = 0, False, False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_header(text, path: Path, field: str, error: type[SppsclError] | None = None) -> Any:
    """A JSON header (a cache's provenance, a checkpoint's metadata) parsed with its nesting bounded; every failure
    is one error (``error``, default CacheError) naming the file and the field."""
    error = error or CacheError
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise error(f"{path}: field {field} is a {type(text).__name__}, not JSON text; the file was not written by sppscl or was altered")
    if len(text) > MAX_HEADER_CHARS:
        raise error(f"{path}: field {field} holds {len(text)} characters, more than a header ever needs; the file was altered")
    if not json_depth_ok(text):
        raise error(f"{path}: field {field} nests deeper than {MAX_JSON_DEPTH} levels; the file was altered")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: field {field} is not valid JSON ({shown(str(e))}); the file was altered or damaged") from None


def read_provenance(path: Path) -> tuple[dict, bool]:
    """(provenance, complete) of an existing cache file."""
    check_input_file(path, "a feature cache")
    try:
        with h5py.File(path, "r") as f:
            raw, complete = f.attrs["provenance"], f.attrs.get("complete", False)
    except (OSError, KeyError) as e:
        raise CacheError(f"{path}: not a readable sppscl cache ({e}); delete it or rerun extraction with --force") from None
    provenance = parse_header(raw, path, "provenance")
    if not isinstance(provenance, dict):
        raise CacheError(f"{path}: field provenance is a JSON {type(provenance).__name__}, not an object; the file was altered")
    try:
        return provenance, bool(complete)
    except (TypeError, ValueError):
        raise CacheError(f"{path}: field complete is {shown(complete)}, not true or false; the file was altered") from None


def check_layout(f: h5py.File, path: Path, complete: bool, classes: int | None = None) -> None:
    """Every split of an open cache checked against its own header, once, before any row is used: the datasets are
    all there with the lengths, dtypes and shapes the layout gives them (module docstring), offsets start at 0, never
    decrease and end at the token count, labels are -1 or a class index, status holds only 0/1/2 and (``complete``)
    no pending row. The first violation is a CacheError naming the file and the field (exit 2)."""

    def bad(field: str, what: str) -> CacheError:
        return CacheError(f"{path}: {field}: {what}; the cache was altered or damaged. Rebuild it: sppscl extract ... --out {path} --force")

    if "splits" not in f or not isinstance(f["splits"], h5py.Group) or not len(f["splits"]):
        raise bad("splits", "missing or empty")
    shapes: dict[str, tuple] = {}
    for split in f["splits"]:
        g = f["splits"][split]
        where = f"splits/{split}"
        if not isinstance(g, h5py.Group):
            raise bad(where, "not a group")
        for key in SPLIT_KEYS:
            if key not in g or not isinstance(g[key], h5py.Dataset):
                raise bad(f"{where}/{key}", "missing")
        n = g["ids"].shape[0] if g["ids"].ndim == 1 else -1
        if n < 0:
            raise bad(f"{where}/ids", f"shape {g['ids'].shape}, expected one dimension")
        expect = {"texts": (n,), "labels": (n,), "status": (n,), "offsets": (n + 1,)}
        for key, shape in expect.items():
            if g[key].shape != shape:
                raise bad(f"{where}/{key}", f"shape {g[key].shape}, expected {shape} for {n} rows")
        for key in ("ids", "texts"):
            if g[key].dtype.kind not in "OSU":
                raise bad(f"{where}/{key}", f"dtype {g[key].dtype}, expected strings")
        for key in ("labels", "offsets", "status"):
            if g[key].dtype.kind not in "iu":
                raise bad(f"{where}/{key}", f"dtype {g[key].dtype}, expected integers")
        image, tokens = g["image"], g["tokens"]
        for key, d, ndim in (("image", image, 4), ("tokens", tokens, 3)):
            if d.dtype.name not in FEATURE_DTYPES:
                raise bad(f"{where}/{key}", f"dtype {d.dtype}, expected one of {', '.join(FEATURE_DTYPES)}")
            if d.ndim != ndim:
                raise bad(f"{where}/{key}", f"shape {d.shape}, expected {ndim} dimensions")
        if image.shape[0] != n:
            raise bad(f"{where}/image", f"{image.shape[0]} rows, expected {n}")
        if image.dtype != tokens.dtype:
            raise bad(f"{where}/tokens", f"dtype {tokens.dtype}, but image is {image.dtype}")
        for key, shape in (("image", image.shape[1:]), ("tokens", tokens.shape[1:])):
            first = shapes.setdefault(key, shape)
            if shape != first:
                raise bad(f"{where}/{key}", f"feature shape {shape}, other splits have {first}")
        offsets = g["offsets"][()].astype(np.int64)
        if offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise bad(f"{where}/offsets", "not starting at 0 and non-decreasing")
        if offsets[-1] != tokens.shape[0]:
            raise bad(f"{where}/offsets", f"end at token {offsets[-1]}, but tokens holds {tokens.shape[0]}")
        labels = g["labels"][()].astype(np.int64)
        top = classes if classes is not None else np.iinfo(np.int64).max
        out = np.flatnonzero((labels < -1) | (labels >= top))
        if len(out):
            allowed = f"-1 (no label) or 0..{classes - 1}" if classes is not None else "-1 (no label) or a class index"
            raise bad(f"{where}/labels", f"row {int(out[0])} has label {int(labels[out[0]])}, expected {allowed}")
        status = g["status"][()]
        odd = np.flatnonzero(status > SKIPPED)
        if len(odd):
            raise bad(f"{where}/status", f"row {int(odd[0])} has status {int(status[odd[0]])}, expected 0, 1 or 2")
        if complete and (status == PENDING).any():
            raise bad(f"{where}/status", f"marked complete, but {int((status == PENDING).sum())} rows were never written")


class CacheFiller:
    """Writes rows into a laid-out cache with positioned writes; safe to kill at any point.

    Order per batch: features, fdatasync, then status, fdatasync; a row marked written therefore has its bytes
    on disk. Not memory maps: every page written through a map stays in the writer's resident memory until the
    kernel reclaims it, so the extraction process would grow by the whole file (~10 GB for HFM).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: dict[str, dict[str, RowFile | None]] = {}
        self.offsets: dict[str, np.ndarray] = {}
        with h5py.File(self.path, "r") as f:
            check_layout(f, self.path, complete=False)
            for split, g in f["splits"].items():
                self.offsets[split] = g["offsets"][()]
                self._rows[split] = {
                    k: _row_file(self.path, g[k], writable=True) if g[k].size else None for k in ("image", "tokens", "status")
                }

    def status(self, split: str) -> np.ndarray:
        st = self._rows[split]["status"]
        return np.zeros(0, np.uint8) if st is None else st[0 : len(st)].copy()

    def write(self, split: str, rows: np.ndarray, image: np.ndarray, tokens: list[np.ndarray], ok: np.ndarray) -> None:
        """Write ``rows`` (sorted indices). ``tokens[i]`` is [n_tokens, L, H]; rows with ``ok`` False are marked skipped."""
        m = self._rows[split]
        off = self.offsets[split]
        for j, r in enumerate(rows):
            if ok[j]:
                m["image"].write(int(r), image[j : j + 1])
                if m["tokens"] is not None and off[r + 1] > off[r]:
                    m["tokens"].write(int(off[r]), tokens[j])
        for key in ("image", "tokens"):
            if m[key] is not None:
                m[key].sync()
        status = np.where(ok, WRITTEN, SKIPPED).astype(np.uint8)
        for j, r in enumerate(rows):
            m["status"].write(int(r), status[j : j + 1])
        m["status"].sync()

    def close(self) -> None:
        for rows in self._rows.values():
            for rf in rows.values():
                if rf is not None:
                    rf.sync()
        self._rows.clear()


def finalize_cache(path: Path, skipped: list[tuple[str, str, str]], attrs: dict[str, Any] | None = None) -> None:
    """Record every skipped row, then set ``complete``: the last write, so a crash before it leaves an incomplete file."""
    with h5py.File(path, "r+") as f:
        for split, g in f["splits"].items():
            st = g["status"][()]
            if (st == PENDING).any():
                raise CacheError(f"{path}: split {split} still has {int((st == PENDING).sum())} unwritten rows")
        _write_skipped(f, skipped)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        f.flush()
        f.attrs["complete"] = True
        f.flush()


def read_skipped(path: Path) -> list[tuple[str, str, str]]:
    with h5py.File(path, "r") as f:
        if "skipped" not in f:
            return []
        g = f["skipped"]
        cols = [g[k].asstr()[()] for k in ("split", "id", "reason")]
        return list(zip(*[list(c) for c in cols]))


def file_contents(path: Path) -> dict[str, Any]:
    """Every dataset (by its HDF5 path) and root attribute (``@name``) of a cache file, read whole: two caches are
    identical array by array when these are equal (how single-process, torchrun, resumed and merged caches are compared)."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        out.update({f"@{k}": f.attrs[k] for k in f.attrs})
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def differing_contents(a: Path, b: Path) -> list[str]:
    """Datasets and root attributes in which two cache files differ (empty: identical array by array)."""
    x, y = file_contents(a), file_contents(b)
    return sorted(set(x) ^ set(y)) + [k for k in x if k in y and not np.array_equal(x[k], y[k])]


# ----------------------------------------------------------------------------------------- reader

# Splits larger than this are streamed rather than held in RAM: 25k HFM-sized samples are ~9 GB, and
# stage two should stay within 4 GB whatever the dataset. Its peak is ~0.6 GB of runtime (torch), the
# in-RAM splits (train and dev, each checked against this budget) and ~0.5 GB of batch working set: with
# 3 GiB a train split just under the budget peaked at 4.7 GB. Override with SPPSCL_MEMORY_BUDGET (bytes).
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


class RowFile:
    """Rows of a contiguous dataset read with ``os.pread`` (and, to fill a cache, written with ``os.pwrite``):
    streamed access whose memory use is one batch.

    A memory map would do the same reads, but every page it touches counts toward the process's resident
    memory until the kernel reclaims it; page-cache reads do not. Supports what stage two needs: an int,
    a slice, an index array, and ``ranges`` for ragged token rows.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, writable: bool = False):
        self.path, self.offset, self.shape, self.dtype = Path(path), offset, tuple(shape), np.dtype(dtype)
        self.writable = writable
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY)

    def _read(self, start: int, count: int) -> np.ndarray:
        nbytes = count * self.row_bytes
        buf = os.pread(self._fd, nbytes, self.offset + start * self.row_bytes)
        if len(buf) != nbytes:
            raise CacheError(f"{self.path}: short read at row {start} (file truncated?)")
        return np.frombuffer(buf, self.dtype).reshape(count, *self.row_shape)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write consecutive rows from row ``start`` (positioned writes; ``sync`` makes them durable)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.row_shape or start < 0 or start + len(data) > len(self):
            raise CacheError(f"{self.path}: cannot write {data.shape} at row {start} of a {self.shape} dataset")
        view = memoryview(data).cast("B")
        pos = self.offset + start * self.row_bytes
        while len(view):
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def ranges(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Rows ``starts[i] : starts[i] + counts[i]`` for every i, concatenated (one read per range)."""
        out = np.empty((int(counts.sum()), *self.row_shape), self.dtype)
        at = 0
        for st, n in zip(starts.tolist(), counts.tolist()):
            out[at : at + n] = self._read(st, n)
            at += n
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(int(key), 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("RowFile slices must have step 1")
            return self._read(start, max(0, stop - start))
        idx = np.asarray(key, dtype=np.int64)
        return self.ranges(idx, np.ones_like(idx))


def gather_ranges(array, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated row ranges of an in-RAM array, a RowFile or anything else with ``ranges`` (ragged token rows of a batch)."""
    if hasattr(array, "ranges"):
        return array.ranges(starts, counts)
    flat = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    return np.asarray(array[flat])


@dataclass
class SplitData:
    """One split's arrays. ``rows`` are the usable rows (skipped ones excluded); arrays are indexed by file row."""

    name: str
    ids: np.ndarray
    texts: np.ndarray
    labels: np.ndarray  # int64, -1 = no label
    offsets: np.ndarray  # int64 (n+1,)
    image: np.ndarray | RowFile  # (n, C, h, w) float16, in RAM or streamed from the file
    tokens: np.ndarray | RowFile  # (T, L, H) float16, in RAM or streamed from the file
    rows: np.ndarray  # int64 indices of usable rows
    in_memory: bool
    path: str = ""  # the cache file the features come from (named when a row is refused)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.rows)) and bool((self.labels[self.rows] >= 0).all())

    def cls_states(self, rows: np.ndarray | None = None) -> np.ndarray:
        """[CLS] states of the cached layers, (len(rows), L, H)."""
        rows = self.rows if rows is None else rows
        return np.asarray(self.tokens[self.offsets[rows]])


def check_finite_rows(split: SplitData, rows: np.ndarray, image: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> None:
    """Refuse rows whose features hold NaN or infinity, as stage two reads them: ``image`` is the rows' maps,
    ``tokens`` their token states concatenated (``counts`` per row). The error names the file, the split, the row
    and its id. Called on every batch read (``stage2.data``), so a large cache is never scanned up front and a bad
    row is found before it reaches a model: a NaN feature would otherwise make every loss and prediction NaN."""
    if _all_finite(image) and _all_finite(tokens):
        return
    bad_image = _non_finite_rows(image)
    bad_tokens = np.zeros(len(rows), dtype=bool)
    bad_tokens[np.repeat(np.arange(len(rows)), counts)[_non_finite_rows(tokens)]] = True
    bad = np.flatnonzero(bad_image | bad_tokens)
    j = int(bad[0])
    what = "image feature map" if bad_image[j] else "text token states"
    more = f" ({len(bad) - 1} more such row(s) in the same batch)" if len(bad) > 1 else ""
    raise CacheError(
        f"{split.path or 'features'}: split {split.name}, row {int(rows[j])} (id {str(split.ids[rows[j]])!r}): its {what} "
        f"hold NaN or infinite values{more}. The cache is damaged; rebuild it: sppscl extract --config <preset> --out "
        f"{split.path or 'CACHE'} --force"
    )


def _all_finite(a: np.ndarray) -> bool:
    """Does ``a`` hold only finite values. For float16 (what caches store) from the bits: a half is NaN or infinite
    exactly when its five exponent bits are all set, so the largest magnitude bit pattern tells, about ten times
    faster than ``np.isfinite``, which numpy runs element by element for float16 (20 ms of every batch of 64)."""
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        magnitude = np.ascontiguousarray(a).view(np.uint16) & np.uint16(0x7FFF)
        return int(magnitude.max()) < 0x7C00
    return bool(np.isfinite(a).all())


def _non_finite_rows(a: np.ndarray) -> np.ndarray:
    """Per row of ``a``: does it hold a NaN or an infinity."""
    if a.size == 0:
        return np.zeros(len(a), dtype=bool)
    return ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)


class FeatureCache:
    """Read access to a complete cache: provenance, splits, skipped rows.

    ``load(split)`` reads a whole split into RAM with large contiguous reads when it fits in the memory budget
    (default: the smaller of 2 GiB and half the available RAM), and streams it otherwise (``RowFile``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not check_input_file(self.path, "a feature cache"):
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" (a half-created {partial.name} exists: rerun the extraction)" if partial.exists() else ""
            raise CacheError(f"{self.path}: no such cache{hint}. Build it with: sppscl extract --config <preset> --out {self.path}")
        self.provenance, complete = read_provenance(self.path)
        if "shard" in self.provenance:
            shard = self.provenance["shard"]
            if not isinstance(shard, dict) or not {"index", "count"} <= set(shard):
                raise CacheError(f"{self.path}: field provenance.shard is {shown(shard)}, not a shard record; the cache was altered")
            raise CacheError(
                f"{self.path} is shard {shard['index']}/{shard['count']} of a cache, only part of its rows. Join all "
                f"{shard['count']} shards with: sppscl cache merge SHARD_FILES... --out WHOLE.h5"
            )
        if not complete:
            raise CacheError(
                f"{self.path}: extraction did not finish (no completeness flag). Rerun the same `sppscl extract` command to resume it."
            )
        try:
            with h5py.File(self.path, "r") as f:
                self.schema_version = int(f.attrs["schema_version"])
                if self.schema_version != SCHEMA_VERSION:
                    raise CacheError(f"{self.path}: field schema_version is {self.schema_version}; this sppscl reads version {SCHEMA_VERSION}. Rebuild it with --force")
                classes = self._classes() if "dataset" in self.provenance else None
                check_layout(f, self.path, complete=True, classes=None if classes is None else len(classes))
                self.splits = list(f["splits"].keys())
                stored = f[f"splits/{self.splits[0]}/image"].dtype.name
                if "dtype" in self.provenance and self.provenance["dtype"] != stored:
                    raise CacheError(f"{self.path}: field provenance.dtype is {shown(self.provenance['dtype'])}, but the features are stored as {stored}; the cache was altered")
                self.attrs = {k: f.attrs[k] for k in f.attrs.keys()}
                self._shapes = {s: f[f"splits/{s}/image"].shape for s in self.splits}
                tok = {s: f[f"splits/{s}/tokens"].shape for s in self.splits}
            self.skipped = read_skipped(self.path)
            first = self.splits[0]
            self.image_shape = tuple(self._shapes[first][1:])
            self.layers, self.hidden = tok[first][1], tok[first][2]
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, OSError) as e:
            raise CacheError(
                f"{self.path}: not a complete sppscl cache ({type(e).__name__}: {e}). Rebuild it: sppscl extract --config <preset> --out {self.path} --force"
            ) from None

    @property
    def classes(self) -> list[str]:
        return self._classes()

    def _classes(self) -> list[str]:
        """The dataset's class names from the provenance: two or more distinct strings."""
        try:
            classes = self.provenance["dataset"]["classes"]
        except (KeyError, TypeError):
            raise CacheError(f"{self.path}: not a complete sppscl cache (its provenance names no dataset classes); rebuild it with --force") from None
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise CacheError(f"{self.path}: field provenance.dataset.classes is {shown(classes)}, not a list of two or more distinct class names; the cache was altered")
        return list(classes)

    def split_bytes(self, split: str) -> int:
        with h5py.File(self.path, "r") as f:
            g = f[f"splits/{split}"]
            return int(g["image"].nbytes + g["tokens"].nbytes)

    def load(self, split: str, in_memory: bool | None = None, memory_budget: int | None = None) -> SplitData:
        if split not in self.splits:
            raise CacheError(f"{self.path}: no split {split!r} (splits: {', '.join(self.splits)})")
        if in_memory is None:
            budget = memory_budget if memory_budget is not None else default_memory_budget()
            in_memory = self.split_bytes(split) <= budget
        with h5py.File(self.path, "r") as f:
            g = f[f"splits/{split}"]
            ids = g["ids"].asstr()[()]
            texts = g["texts"].asstr()[()]
            labels = g["labels"][()].astype(np.int64)
            offsets = g["offsets"][()]
            status = g["status"][()]
            arrays = {}
            for key in ("image", "tokens"):
                d = g[key]
                if in_memory or d.size == 0:
                    arr = np.empty(d.shape, d.dtype)
                    if d.size:
                        d.read_direct(arr)
                else:
                    arr = _row_file(self.path, d)
                arrays[key] = arr
        rows = np.flatnonzero(status == WRITTEN).astype(np.int64)
        return SplitData(split, ids, texts, labels, offsets, arrays["image"], arrays["tokens"], rows, in_memory, str(self.path))

    def iter_splits(self) -> Iterator[str]:
        yield from self.splits


def _row_file(path: Path, dset: h5py.Dataset, writable: bool = False) -> RowFile:
    offset = dset.id.get_offset()
    if offset is None or dset.chunks is not None or dset.compression is not None:
        raise CacheError(f"{path}:{dset.name} is not a contiguous uncompressed dataset; it cannot be streamed or filled")
    return RowFile(path, offset, dset.shape, dset.dtype, writable)


def default_memory_budget() -> int:
    env = os.environ.get("SPPSCL_MEMORY_BUDGET")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise CacheError(f"SPPSCL_MEMORY_BUDGET={env!r} is not a number of bytes") from None
    return min(DEFAULT_MEMORY_BUDGET, available_memory() // 2)


def available_memory() -> int:
    """Bytes of RAM available now (Linux /proc/meminfo; falls back to total physical pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
