"""Join the shard files of ``sppscl extract --shard I/N`` into one cache, identical to a single-process run's.

A shard holds whole fixed batches of the full run and its provenance records which (``Shard.record``), so
the merge knows every row's place without trusting file names. It refuses shards that were extracted
differently, shards that did not finish, rows held twice, and rows no shard holds, naming each.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..cache import DATA_DIR_ATTR, SKIPPED, WRITTEN, CacheError, CacheFiller, FeatureShapes, SplitPlan, create_cache, diff_provenance, finalize_cache, read_provenance
from ..errors import SppsclError, check_input_file
from ..outputs import check_output_file, check_writable_dir, fresh_temp
from ..progress import make_progress
from .distributed import Shard
from .lock import CacheLock


@dataclass
class ShardFile:
    path: Path
    provenance: dict  # without the shard record: equal across the shards of one cache
    record: dict  # the shard record: index, count, batch_size, split_rows
    rows: dict[str, list[int]]  # split -> rows of the whole split this shard holds, in file order

    @property
    def name(self) -> str:
        return f"{self.record['index']}/{self.record['count']}"


@dataclass
class MergeSummary:
    path: Path
    shards: list[tuple[Path, str]]
    rows: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    file_bytes: int = 0


def read_shard(path: Path) -> ShardFile:
    path = Path(path)
    try:  # a FIFO, device or folder is named as what it is, never opened
        present = check_input_file(path, "a shard file")
    except SppsclError as e:
        raise CacheError(str(e)) from None
    if not present:
        raise CacheError(f"{path}: no such shard file")
    provenance, complete = read_provenance(path)
    if "shard" not in provenance:
        raise CacheError(f"{path} is not a shard (it was extracted without --shard); merge joins the files of `sppscl extract --shard I/N`")
    record = provenance.pop("shard")
    if not complete:
        raise CacheError(
            f"{path} is shard {record['index']}/{record['count']} but its extraction did not finish: rerun the same "
            f"`sppscl extract ... --shard {record['index']}/{record['count']} --out {path}` to continue it, then merge"
        )
    rows = Shard.rows(record)
    with h5py.File(path, "r") as f:
        for split, idx in rows.items():
            n = f[f"splits/{split}/ids"].shape[0] if f"splits/{split}" in f else -1
            if n != len(idx):
                raise CacheError(f"{path}: split {split} holds {n} rows where its shard record says {len(idx)}; the file is damaged, extract this shard again")
    return ShardFile(path, provenance, record, rows)


def _ranges(rows: np.ndarray, most: int = 6) -> str:
    """Sorted row numbers as 'a-b, c, ...' (the first few runs, then how many rows in all)."""
    runs, start = [], None
    for k, r in enumerate(rows.tolist()):
        if start is None:
            start = prev = r
        elif r != prev + 1:
            runs.append((start, prev))
            start = r
        prev = r
        if k == len(rows) - 1:
            runs.append((start, prev))
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:most])
    return text + (f", ... ({len(rows)} rows in all)" if len(runs) > most else "")


def check_shards(shards: list[ShardFile]) -> None:
    """Refuse shards of different runs, rows held twice and rows held by none."""
    base = shards[0]
    layout = lambda s: {**s.provenance, "shard": {"batch_size": s.record["batch_size"], "split_rows": s.record["split_rows"]}}  # noqa: E731
    for s in shards[1:]:
        diffs = diff_provenance(layout(base), layout(s), names=(base.path.name, s.path.name))
        if diffs:
            raise CacheError(
                f"{s.path} and {base.path} are not shards of one extraction; refusing to merge. What differs:\n  "
                + "\n  ".join(diffs)
                + "\nExtract every shard with the same command, changing only --shard."
            )
    missing = []
    for split, n in base.record["split_rows"]:
        own = np.full(n, -1)
        for k, s in enumerate(shards):
            rows = np.asarray(s.rows[split], dtype=np.int64)
            twice = rows[own[rows] >= 0]
            if twice.size:
                other = shards[int(own[twice[0]])]
                raise CacheError(
                    f"split {split}: rows {_ranges(twice)} are in both {other.path} (shard {other.name}) and {s.path} "
                    f"(shard {s.name}); every row must come from exactly one shard. Leave one of them out."
                )
            own[rows] = k
        if (own < 0).any():
            missing.append(f"split {split}: rows {_ranges(np.flatnonzero(own < 0))}")
    if missing:
        counts = {s.record["count"] for s in shards}
        hint = ""
        if len(counts) == 1:
            (n,) = counts
            absent = sorted(set(range(n)) - {s.record["index"] for s in shards})
            hint = f"\nShards given: {', '.join(sorted(s.name for s in shards))}; not given: {', '.join(f'{i}/{n}' for i in absent)}."
        raise CacheError("no shard holds these rows; refusing to merge an incomplete cache:\n  " + "\n  ".join(missing) + hint)


def _plan_skips(f: h5py.File, shard: ShardFile) -> tuple[list[tuple[str, str, str]], dict[tuple[str, str], str]]:
    """A shard's /skipped split into the planning ones (the same in every shard) and its own image failures."""
    g = f["skipped"]
    listed = list(zip(*[g[k].asstr()[()].tolist() for k in ("split", "id", "reason")]))
    own = set()
    for split in shard.rows:
        sg = f[f"splits/{split}"]
        own |= {(split, i) for i in sg["ids"].asstr()[sg["status"][()] == SKIPPED].tolist()}
    return [x for x in listed if (x[0], x[1]) not in own], {(x[0], x[1]): x[2] for x in listed if (x[0], x[1]) in own}


def merge_shards(paths: list[Path], out: Path, force: bool = False, progress: bool = True, console=None) -> MergeSummary:
    if not paths:
        raise CacheError("no shard files given: sppscl cache merge SHARD_FILES... --out WHOLE.h5")
    out = Path(out)
    start = time.perf_counter()
    # before any shard is read, --force included: only a regular file (a damaged cache too) is ever replaced
    check_output_file(out, "the merged cache")
    check_writable_dir(out.parent, "the merged cache")
    with CacheLock.acquire(out):
        if out.exists() and not force:
            raise CacheError(f"{out} already exists; refusing to overwrite it. Use another --out, or --force to replace it.")
        shards = [read_shard(p) for p in paths]
        check_shards(shards)
        base = shards[0]
        split_rows = dict(base.record["split_rows"])
        summary = MergeSummary(out, [(s.path, s.name) for s in shards])

        meta = {split: {"ids": [None] * n, "texts": [None] * n, "labels": np.zeros(n, np.int16), "n_tokens": np.zeros(n, np.int64)} for split, n in split_rows.items()}
        planned, image_reasons, data_dirs = None, {}, set()
        for s in shards:
            with h5py.File(s.path, "r") as f:
                plan_skips, reasons = _plan_skips(f, s)
                if planned is None:
                    planned = plan_skips
                elif plan_skips != planned:
                    raise CacheError(f"{s.path} and {base.path} left different samples out before extraction (/skipped); extract both with the same --on-error")
                image_reasons.update(reasons)
                for split, rows in s.rows.items():
                    g, m = f[f"splits/{split}"], meta[split]
                    for key in ("ids", "texts"):
                        for r, v in zip(rows, g[key].asstr()[()].tolist()):
                            m[key][r] = v
                    m["labels"][rows] = g["labels"][()]
                    m["n_tokens"][rows] = np.diff(g["offsets"][()])
                data_dirs.add(str(f.attrs.get(DATA_DIR_ATTR, "")))
                if s is base:
                    g = f[f"splits/{next(iter(split_rows))}"]
                    shapes = FeatureShapes(tuple(g["image"].shape[1:]), g["tokens"].shape[1], g["tokens"].shape[2], g["image"].dtype.name)

        plans = [SplitPlan(split, m["ids"], m["texts"], m["labels"], m["n_tokens"]) for split, m in meta.items()]
        # built beside the target and moved into place when complete: a crash leaves no half-merged cache at --out
        tmp = fresh_temp(out.with_name(out.name + ".merging"), "the cache being merged")
        # shards read on machines that mount the data elsewhere: every folder is named
        attrs = {"extract_batch_size": base.record["batch_size"], DATA_DIR_ATTR: "; ".join(sorted(data_dirs - {""}))}
        create_cache(tmp, plans, shapes, base.provenance, planned, attrs=attrs)
        filler = CacheFiller(tmp)
        bs = base.record["batch_size"]
        try:
            with make_progress(enabled=progress, console=console, unit="rows/s") as prog:
                task = prog.add_task("merge", total=sum(split_rows.values()))
                for s in shards:
                    with h5py.File(s.path, "r") as f:
                        for split, rows in s.rows.items():
                            g = f[f"splits/{split}"]
                            off = g["offsets"][()]
                            for a in range(0, len(rows), bs):  # one shard batch = consecutive rows of the split
                                b = min(a + bs, len(rows))
                                flat = g["tokens"][off[a] : off[b]]
                                tokens = [flat[off[i] - off[a] : off[i + 1] - off[a]] for i in range(a, b)]
                                ok = g["status"][a:b] == WRITTEN
                                filler.write(split, np.asarray(rows[a:b]), g["image"][a:b], tokens, ok)
                                prog.advance(task, b - a)
        finally:
            filler.close()
        image_skips = []  # in the order a single process lists them: by split, then row
        with h5py.File(tmp, "r") as f:
            for split in split_rows:
                status, ids = f[f"splits/{split}/status"][()], f[f"splits/{split}/ids"].asstr()[()]
                summary.rows[split] = int((status == WRITTEN).sum())
                image_skips += [(split, ids[r], image_reasons[(split, ids[r])]) for r in np.flatnonzero(status == SKIPPED)]
        summary.skipped = planned + image_skips
        finalize_cache(tmp, summary.skipped)
        os.replace(tmp, out)
    summary.seconds = time.perf_counter() - start
    summary.file_bytes = out.stat().st_size
    return summary
