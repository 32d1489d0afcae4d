"""Stage one: run the frozen encoders once over a dataset and write the feature cache (SPEC §2).

The run is planned before any encoder runs: samples are validated, texts tokenized, and the cache laid out
in full (see ``sppscl.cache``). Batches are fixed index ranges of each split, so a resumed run recomputes
exactly the batches an uninterrupted run would have, and the finished file is byte-identical to it.
Images are decoded in DataLoader worker processes while the encoders run in the main process.
Under ``torchrun`` the ranks share the batches of one file, and ``--shard I/N`` writes a share of them to a
file of its own (``sppscl.stage1.distributed``, ``sppscl.stage1.batching``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..cache import (
    PENDING,
    SKIPPED,
    DATA_DIR_ATTR,
    CacheError,
    CacheFiller,
    FeatureShapes,
    SplitPlan,
    create_cache,
    diff_provenance,
    finalize_cache,
    read_provenance,
    read_skipped,
    WRITTEN,
    cache_bytes,
)
from ..config import Config, ConfigError
from ..errors import OutputError, SppsclError, disk_full, free_bytes, is_disk_full, printable, safe
from ..outputs import check_output_file, check_writable_dir, output_error, what_is_at
from ..progress import make_progress
from .adapters import load_samples
from .batching import deal, fixed_batches
from .distributed import Ranks, Shard
from .encoders import ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from .layouts import resolve_dataset
from .lock import CacheLock
from .records import NO_LABEL, Sample
from .verify import ImageProblem, check_sample_image, empty_splits, max_image_pixels, open_image, sample_problem

ON_ERROR = ("stop", "skip")
# --precision: the autocast dtype each choice runs the encoders in (fp32: no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Decoding workers on CUDA when not asked for: JPEG decoding on the CPU is what a GPU waits for, so every core
# but the one feeding the GPU decodes; capped because each worker holds two decoded batches (~40 MB at 32).
MAX_AUTO_WORKERS = 8


class ExtractionError(SppsclError, RuntimeError):
    """Bad input stopped the extraction; the message names the file and the sample id."""


@dataclass
class ExtractSummary:
    path: Path
    rows: dict[str, int]
    skipped: list[tuple[str, str, str]]
    dropped_by_adapter: dict[str, int]
    seconds: float = 0.0
    samples_encoded: int = 0
    file_bytes: int = 0
    status: str = "written"  # written | resumed | up-to-date
    notes: list[str] = field(default_factory=list)
    # what makes the cache a trap to train on (a labelled split of one class), said before any work
    warnings: list[str] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.samples_encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_sample(self) -> float:
        n = sum(self.rows.values())
        return self.file_bytes / n if n else 0.0


# --limit draws the same rows on every run (a resumed cache must continue with the rows it started with)
LIMIT_SEED = 0


def limit_per_split(samples: list[Sample], limit: int, seed: int = LIMIT_SEED) -> list[Sample]:
    """At most ``limit`` rows of each split, drawn stratified by label with a fixed seed, in their file order.

    The public split files are sorted by label, so the first N rows of a split are one class. Each class gets its
    share of ``limit`` (largest remainder), and at least one row while ``limit`` allows, so a small class is not
    lost; rows without a label (an unlabelled split) form one group. A split of at most ``limit`` rows is kept whole.
    """
    by_split: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_split.setdefault(s.split, []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for split in sorted(by_split):
        rows = by_split[split]
        if len(rows) <= limit:
            keep.extend(rows)
            continue
        groups: dict[object, list[int]] = {}
        for i in rows:
            groups.setdefault(samples[i].label, []).append(i)
        keys = sorted(groups, key=lambda k: (k is None, k if k is not None else 0))
        sizes = np.array([len(groups[k]) for k in keys], dtype=float)
        quota = np.floor(sizes * limit / sizes.sum()).astype(int)
        if limit >= len(keys):
            quota = np.maximum(quota, 1)
        # hand out what is left by largest remainder, then take back from the largest groups if the floor of 1 overshot
        remainder = sizes * limit / sizes.sum() - np.floor(sizes * limit / sizes.sum())
        for j in np.argsort(-remainder, kind="stable"):
            if quota.sum() >= limit:
                break
            if quota[j] < sizes[j]:
                quota[j] += 1
        while quota.sum() > limit:
            quota[int(np.argmax(quota))] -= 1
        for k, q in zip(keys, quota):
            members = groups[k]
            keep.extend(members[j] for j in rng.choice(len(members), size=int(q), replace=False))
    return [samples[i] for i in sorted(keep)]


def one_class_splits(by_split: dict[str, list[Sample]], classes: list[str]) -> list[str]:
    """Labelled splits whose rows all carry one class: a model scored there looks perfect (warned by extract)."""
    found = []
    for split, rows in by_split.items():
        labels = {s.label for s in rows if s.label is not None}
        if len(labels) == 1 and len(rows) > 1:
            found.append(f"split {split!r} holds one class only ({classes[labels.pop()]}, {len(rows)} rows)")
    return found


def banner_lines(cfg, ddir, by_split: dict[str, list[Sample]], skipped: list, dev, precision: str, batch_size: int, workers: int,
                 limit: int | None, shard, out: Path) -> list[str]:
    """extract's start banner (on stderr, before the encoders load): dataset and folder, encoders, device, precision,
    batch size and decoding workers, rows per split with each class's share, what --limit, --shard and --on-error
    skip take out, and the cache file; the layout of the train/sweep banner (``cli/banner.py``)."""
    classes = list(cfg.dataset.classes)
    lines = [
        f"extract: dataset {cfg.dataset.name} (format {cfg.dataset.format}) from {ddir}",
        f"encoders: image {cfg.encoders.image}, text {cfg.encoders.text} (max_length {cfg.encoders.max_length}, layers {cfg.encoders.layers})",
        f"device {dev}, precision {precision}, batch size {batch_size}, {workers} image-decoding worker(s)",
    ]
    for split, rows in by_split.items():
        labels = [s.label for s in rows if s.label is not None]
        if not labels:
            lines.append(f"  {split}: {len(rows)} rows, unlabelled")
            continue
        counts = Counter(labels)
        lines.append(f"  {split}: {len(rows)} rows (" + ", ".join(f"{c} {counts[i] / len(labels):.0%}" for i, c in enumerate(classes)) + ")")
    if limit is not None:
        lines.append(f"--limit {limit}: a stratified sample of at most {limit} rows per split (seed 0)")
    if skipped:
        lines.append(f"skipped by --on-error skip: {len(skipped)} rows (listed at the end, recorded in the cache)")
    if shard is not None:
        lines.append(f"--shard {shard}: this process writes only its shard's rows")
    lines.append(f"output: {out}")
    return [printable(line) for line in lines]


def plan_samples(
    samples: list[Sample], num_classes: int, on_error: str
) -> tuple[dict[str, list[Sample]], list[tuple[str, str, str]]]:
    """Group samples by split (order kept) and apply the text/label/id checks that need no image.

    With ``on_error='stop'`` the first problem raises; with ``'skip'`` every problem row is left out and
    returned as (split, id, reason).
    """
    skipped: list[tuple[str, str, str]] = []
    seen: dict[str, str] = {}
    by_split: dict[str, list[Sample]] = {}
    for s in samples:
        # the checks `data verify` applies (one shared function), then duplicates in file order
        problem = sample_problem(s, num_classes)
        reason = f"{problem[0]}: {problem[1]}" if problem else None
        if reason is None and s.id in seen:
            reason = f"duplicate id (also in split {seen[s.id]})"
        if reason is not None:
            if on_error == "stop":
                raise ExtractionError(
                    f"sample id {s.id!r} (split {s.split}, image {s.image}): {reason}. "
                    "Fix the data, or rerun with --on-error skip to leave such samples out (they are counted and recorded in the cache)."
                )
            skipped.append((s.split, s.id, reason))
            continue
        seen[s.id] = s.split
        by_split.setdefault(s.split, []).append(s)
    return by_split, skipped


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _samples_digest(by_split: dict[str, list[Sample]]) -> str:
    h = hashlib.sha256()
    for split in sorted(by_split):
        for s in by_split[split]:
            h.update(f"{split}\x1f{s.id}\x1f{s.text}\x1f{s.label}\x1e".encode())
    return h.hexdigest()


def build_provenance(
    cfg: Config,
    data_dir: Path,
    by_split: dict[str, list[Sample]],
    image_enc: ImageEncoder,
    text_enc: TextEncoder,
    dtype: str,
    limit: int | None,
    precision: str = "fp32",
) -> dict:
    split_files = {}
    for split, name in sorted(cfg.dataset.splits.items()):
        p = data_dir / name
        if p.is_file():
            split_files[split] = _sha256_file(p)
    return {
        "schema_version": 1,
        "code_version": __version__,
        "dataset": {
            "name": cfg.dataset.name,
            "format": cfg.dataset.format,
            "classes": list(cfg.dataset.classes),
            "primary_f1": cfg.dataset.primary_f1,
            "split_files_sha256": split_files,
            "samples_sha256": _samples_digest(by_split),
            "limit_per_split": limit,
            # how --limit chose its rows: the split files are often sorted by label, so the first N would be one class
            **({"limit_sampling": {"method": "stratified by label, order kept", "seed": LIMIT_SEED}} if limit is not None else {}),
        },
        "encoders": {"image": image_enc.provenance(), "text": text_enc.provenance()},
        "dtype": dtype,
        # features computed under autocast differ from fp32 ones: a cache never mixes or resumes across them
        "precision": precision,
    }


class _ImageRows(Dataset):
    """Decodes and preprocesses one image per row; a failure is returned as a reason, not raised, so the
    main process can name the file and id (or skip the row) without losing the worker."""

    def __init__(self, paths: list[Path], transform, shape: tuple[int, int, int]):
        self.paths, self.transform, self.shape = paths, transform, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_image(self.paths[i])), ""
        except ImageProblem as e:
            reason = str(e)
        except Exception as e:  # preprocessing a decoded but degenerate image (e.g. 0 pixels wide)
            reason = f"undecodable image: {self.paths[i]} ({type(e).__name__}: {e})"
        return i, torch.zeros(self.shape), reason


def _collate(items):
    idx = [it[0] for it in items]
    return idx, torch.stack([it[1] for it in items]), [it[2] for it in items]


def _worker_init(_):
    # Decoding workers must not fight the encoders for the cores.
    torch.set_num_threads(1)


def decoding_workers(requested: int, dev: torch.device) -> int:
    """Image-decoding worker processes: ``requested``, or for -1 (auto) on CUDA every usable core but one, up to
    ``MAX_AUTO_WORKERS``; on CPU, where the encoders need the cores, 2, or none on a machine of 2 cores or fewer:
    there workers only take cores from the encoders and pay for shipping every batch through shared memory
    (measured on 2 idle cores, 384 MVSA-Single samples: 34.9 samples/s and 5% kernel time decoding in the main
    process, against 30.4 samples/s and 19% with 2 workers)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0))
    if dev.type != "cuda":
        return 0 if cores <= 2 else 2
    return max(1, min(MAX_AUTO_WORKERS, cores - 1))


def use_channels_last(dev: torch.device, channels_last: bool | None = None) -> bool:
    """Whether the CNN runs channels_last (NHWC): by default on CUDA, the layout cuDNN's tensor-core convolutions
    use natively; on CPU the layout stays, so fp32 CPU features are computed exactly as before. ``channels_last``
    True/False forces it either way (the GPU benchmark measures both)."""
    return dev.type == "cuda" if channels_last is None else channels_last


def prepare_encoders(image_enc: ImageEncoder, dev: torch.device, channels_last: bool | None = None) -> None:
    """Put the CNN's weights in the layout :func:`use_channels_last` picks (both ways: an encoder object reused
    by a later extraction is converted back)."""
    if use_channels_last(dev, channels_last):
        image_enc.to(memory_format=torch.channels_last)
    elif channels_last is not None:
        image_enc.to(memory_format=torch.contiguous_format)


def extract(
    cfg: Config,
    out: Path,
    data_dir: Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    on_error: str = "stop",
    force: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    console=None,
    shard: Shard | None = None,
    precision: str | None = None,
    channels_last: bool | None = None,
) -> ExtractSummary:
    """Write (or continue) the cache at ``out``; under torchrun, this rank's share of it (see module doc).

    ``channels_last``: None runs the CNN channels_last on CUDA only (:func:`use_channels_last`)."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    for flag, value, low in (("--batch-size", batch_size, 1), ("--limit", limit, 1), ("--workers", num_workers, -1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    precision = precision or cfg.extract.precision
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    out = Path(out)
    ranks = Ranks.from_env()
    dev = ranks.device(device or cfg.extract.device)
    if precision == "fp16" and dev.type == "cpu":
        raise ExtractionError(
            "--precision fp16 on the CPU: autocast emulates float16 there (5x slower than fp32 in our measurement); "
            "use fp32, or bf16 (docs/performance.md), or fp16 with --device cuda"
        )

    def claim() -> CacheLock:
        # an unusable output location is found before the dataset is read and the encoders are loaded
        if what_is_at(out) == "a folder":
            raise OutputError(f"--out {out} is a folder; give the cache file to write, e.g. {out / (cfg.dataset.name + '.h5')}")
        check_output_file(out, "the cache")
        for sibling in (".partial", ".lock"):
            check_output_file(out.with_name(out.name + sibling), "the cache's working file", flag="")
        check_writable_dir(out.parent, "the cache")
        max_image_pixels()  # a bad SPPSCL_MAX_IMAGE_PIXELS is one error now, not one per image
        return CacheLock.acquire(out)

    ranks.start(dev)
    try:
        # Rank 0 holds the lock for the whole job, taken before anything is opened for writing; the other ranks
        # write only after rank 0 has shared the pending batches, and rank 0 waits for them in all_done.
        with ranks.on_zero(claim, share=False) or nullcontext():
            return _extract(
                cfg, out, data_dir, dev, batch_size, limit, on_error, force, num_workers, progress, console, shard, ranks, precision,
                use_channels_last(dev, channels_last),
            )
    finally:
        ranks.stop()


def _extract(
    cfg, out, data_dir, dev, batch_size, limit, on_error, force, num_workers, progress, console, shard, ranks, precision, channels_last
) -> ExtractSummary:
    # the concrete layout (format: auto) is what the cache's provenance records
    cfg, ddir, layout = resolve_dataset(cfg, data_dir)
    report = load_samples(cfg, ddir)
    if layout:
        report.notes.insert(0, layout)
    empty = empty_splits(report)
    if empty:
        raise ExtractionError(
            "; ".join(f"split {split!r}: {detail}" for split, detail in empty)
            + ". Every split needs rows: fix the file, or remove the split from dataset.splits."
        )
    samples = report.samples
    if limit is not None:
        samples = limit_per_split(samples, limit)
    by_split, skipped = plan_samples(samples, len(cfg.dataset.classes), on_error)
    all_skipped = sorted({split for split, _, _ in skipped} - set(by_split))
    if all_skipped:
        raise ExtractionError(
            f"{ddir}: every row of split(s) {', '.join(all_skipped)} was skipped ({len(skipped)} rows skipped in all, e.g. "
            f"id {skipped[0][1]!r}: {skipped[0][2]}); run `sppscl data verify` to list them, then fix the data."
        )

    dtype = cfg.extract.dtype
    requested_bs = cfg.extract.batch_size if batch_size is None else batch_size
    # an unfinished cache continues with the batches it was started with, whatever --batch-size says now
    bs = ranks.on_zero(lambda: None if force else _started_batch_size(out)) or requested_bs
    if progress and console is not None and ranks.is_zero:
        # said before the encoders load (the slow part of starting), as train, sweep, cv and reproduce do
        workers = decoding_workers(cfg.extract.num_workers if num_workers is None else num_workers, dev)
        for line in banner_lines(cfg, ddir, by_split, skipped, dev, precision, bs, workers, limit, shard, out):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    image_enc = load_image_encoder(cfg.encoders.image, device=str(dev))
    text_enc = load_text_encoder(cfg.encoders.text, max_length=cfg.encoders.max_length, layers=cfg.encoders.layers, device=str(dev))
    prepare_encoders(image_enc, dev, channels_last)
    provenance = build_provenance(cfg, ddir, by_split, image_enc, text_enc, dtype, limit, precision)
    if shard is not None:
        # whole fixed batches of the full run, order kept: fixed_batches over the shard's rows forms the same
        # batches again (only a split's last batch can be short, and it stays last)
        provenance["shard"] = shard.record({split: len(rows) for split, rows in by_split.items()}, bs)
        mine = Shard.rows(provenance["shard"])
        by_split = {split: [rows[i] for i in mine[split]] for split, rows in by_split.items()}
    summary = ExtractSummary(
        out, {k: len(v) for k, v in by_split.items()}, list(skipped), {k: len(v) for k, v in report.dropped.items()}, notes=list(report.notes)
    )
    summary.warnings.extend(
        f"{w}: its accuracy says nothing about a model"
        + (" (--limit drew a stratified sample; the split has one class in all)" if limit is not None else "")
        for w in one_class_splits(by_split, list(cfg.dataset.classes))
    )
    if console is not None and ranks.is_zero:
        for w in summary.warnings:
            console.print(f"[yellow]warning:[/] {safe(w)}", highlight=False)
    if shard is not None:
        summary.notes.append(f"{out} is shard {shard} (its rows only); when every shard is done, join them: sppscl cache merge SHARD_FILES... --out WHOLE.h5")
    # (a shard can hold no rows of a small split)
    texts_ids = {split: text_enc.tokenize([s.text for s in rows]) if rows else [] for split, rows in by_split.items()}

    def prepare() -> str:
        """Rank 0, before any rank writes: check an existing file against the request, or lay a new one out."""
        if out.exists() and force:
            # --force rebuilds without reading the old file: it may be the unreadable one --force was advised for
            out.unlink()
        if out.exists():
            old, complete = read_provenance(out)
            old.setdefault("precision", "fp32")  # caches from before --precision were all computed in float32
            diffs = diff_provenance(old, provenance, names=("the cache on disk", "this command"))
            if diffs:
                raise CacheError(
                    f"{out} was built from a different request; refusing to touch it. What differs:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse another --out, or --force to rebuild it."
                )
            return "up-to-date" if complete else "resumed"
        plans = [
            SplitPlan(
                split,
                [s.id for s in rows],
                [s.text for s in rows],
                np.array([NO_LABEL if s.label is None else s.label for s in rows], dtype=np.int16),
                np.array([len(t) for t in texts_ids[split]], dtype=np.int64),
            )
            for split, rows in by_split.items()
        ]
        shapes = FeatureShapes(
            (image_enc.out_channels, *image_enc.map_size), text_enc.layers, text_enc.hidden_size, dtype
        )
        needed = cache_bytes(plans, shapes)
        free = free_bytes(out.parent)
        if free is not None and free < needed:
            raise disk_full(out, needed, "rerun the same command", free)
        try:
            create_cache(
                out, plans, shapes, provenance, skipped, attrs={"extract_batch_size": bs, DATA_DIR_ATTR: str(Path(ddir).resolve())}
            )
        except OSError as e:
            # nothing was extracted yet: leave no half-made file behind, so the next run starts clean
            for p in (out, out.with_name(out.name + ".partial")):
                p.unlink(missing_ok=True)
            raise (disk_full(out, needed, "rerun the same command") if is_disk_full(e) else output_error(out, e, "the cache")) from None
        return "written"

    summary.status = ranks.on_zero(prepare)
    if summary.status == "up-to-date":
        if ranks.is_zero:
            summary.skipped = read_skipped(out)
            summary.file_bytes = out.stat().st_size
        return summary
    if not out.exists():
        raise ExtractionError(
            f"{out}: rank 0 has laid this cache out, but this rank cannot see it. Ranks on several nodes need --out (and the "
            "data) on a filesystem every node shares; without one, extract with --shard I/N on each node and join the "
            "files with `sppscl cache merge`."
        )
    if summary.status == "resumed" and bs != requested_bs:
        summary.notes.append(f"resuming with the batch size the cache was started with ({bs}), not {requested_bs}")

    filler = CacheFiller(out)
    workers = decoding_workers(cfg.extract.num_workers if num_workers is None else num_workers, dev)
    transform = image_enc.preprocess()
    shape = (3, 224, 224)
    np_dtype = np.dtype(dtype)
    # Rank 0 reads the row statuses, before any rank writes, and hands every rank the same pending batches: a rank
    # that read them itself could read them after a faster rank had begun writing, and deal itself other batches.
    pending = ranks.on_zero(lambda: pending_batches(filler, by_split, bs))
    todo = deal(pending, ranks.rank, ranks.world_size)
    total = sum(len(b) for bs_ in todo.values() for b in bs_)
    start = time.perf_counter()
    try:
        with make_progress(enabled=progress and ranks.is_zero, console=console) as prog:
            task = prog.add_task("extract", total=total)
            for split, batches in todo.items():
                if not batches:
                    continue
                rows = by_split[split]
                prog.update(task, description=f"extract {safe(split)}")  # a split name from the preset: markup and control characters escaped
                ds = _ImageRows([s.image for s in rows], transform, shape)
                loader = DataLoader(
                    ds,
                    batch_sampler=batches,
                    num_workers=workers,
                    collate_fn=_collate,
                    worker_init_fn=_worker_init if workers else None,
                    pin_memory=dev.type == "cuda",
                    persistent_workers=False,
                )
                for idx, images, reasons in loader:
                    ok = np.array([not r for r in reasons])
                    for j, r in enumerate(reasons):
                        if r and on_error == "stop":
                            s = rows[idx[j]]
                            raise ExtractionError(
                                f"sample id {s.id!r} (split {split}): {r}. Rows already written are kept; fix the file and rerun "
                                "the same command to continue, or rerun with --on-error skip."
                            )
                    img_feats, tok_feats = encode_batch(
                        image_enc, text_enc, images, [texts_ids[split][i] for i in idx], dev, np_dtype, precision, channels_last
                    )
                    try:
                        filler.write(split, np.array(idx), img_feats, tok_feats, ok)
                    except OSError as e:
                        raise _fill_failed(out, e) from None
                    summary.samples_encoded += len(idx)
                    prog.advance(task, len(idx))
    finally:
        filler.close()
    summary.samples_encoded, summary.seconds = ranks.all_done(summary.samples_encoded, time.perf_counter() - start)

    def finish():
        """Rank 0, after every rank has written its batches: the skipped rows' reasons, then the complete flag."""
        image_skips, rows = _image_skips(out, by_split)
        try:
            finalize_cache(out, list(skipped) + image_skips)
        except OSError as e:
            raise _fill_failed(out, e) from None
        return rows, list(skipped) + image_skips, out.stat().st_size

    summary.rows, summary.skipped, summary.file_bytes = ranks.on_zero(finish)
    return summary


def pending_batches(filler: CacheFiller, by_split: dict[str, list[Sample]], batch_size: int) -> dict[str, list[list[int]]]:
    """The fixed batches of each split that still hold a row not yet written (a resumed run encodes only these)."""
    return {
        split: [b for b in fixed_batches(len(rows), batch_size) if (filler.status(split)[b] == PENDING).any()]
        for split, rows in by_split.items()
    }


def _fill_failed(out: Path, e: OSError) -> SppsclError:
    """A write into the laid-out cache failed: rows already marked written are on disk, so the run resumes."""
    resume = "rerun the same command: rows already written are kept and extraction resumes"
    if is_disk_full(e):
        st = out.stat()
        # the file is laid out in full; on filesystems that allocate lazily the unallocated part is what is missing
        return disk_full(out, max(0, st.st_size - st.st_blocks * 512), resume)
    err = output_error(out, e, "the cache")
    return type(err)(f"{err} Then {resume}.")


def _started_batch_size(out: Path) -> int | None:
    """The batch size an existing cache was laid out with (None: no file, or not one of ours)."""
    try:
        with h5py.File(out, "r") as f:
            return int(f.attrs["extract_batch_size"])
    except (OSError, KeyError):
        return None


def pad_token_ids(token_ids: list[list[int]], pad_id: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both ``(B, longest)``: each text padded to the batch's longest. ``pin`` puts
    them in page-locked memory, so the copy to a GPU can overlap the work already queued there."""
    n = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), n), dtype=torch.long)
    for j, t in enumerate(token_ids):
        ids[j, : len(t)] = torch.tensor(t)
        mask[j, : len(t)] = 1
    return (ids.pin_memory(), mask.pin_memory()) if pin else (ids, mask)


def precision_context(dev: torch.device, precision: str):
    """Autocast to ``precision``'s dtype on ``dev``; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=AUTOCAST_DTYPES[precision])


def encode_batch(image_enc, text_enc, images, token_ids, dev, np_dtype, precision: str = "fp32", channels_last: bool | None = None):
    """Image maps ``(B, C, h, w)`` and one ``(tokens, layers, H)`` array per text, as ``np_dtype`` arrays.

    ``precision`` other than fp32 runs both encoders under autocast. Outputs are widened to float32 before the
    cast to the storage dtype, so fp32 features take exactly the path they always took. The images go in as
    channels_last where :func:`use_channels_last` says so (on CUDA by default), as the image encoder was
    converted by :func:`prepare_encoders`.
    """
    cuda = dev.type == "cuda"
    ids, mask = pad_token_ids(token_ids, text_enc.pad_id, pin=cuda)
    with torch.inference_mode():
        with precision_context(dev, precision):
            x = images.to(dev, non_blocking=True)
            if use_channels_last(dev, channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            img = image_enc(x)
            hs = text_enc(ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True))  # (B, N, L, H)
        img = img.float().cpu().numpy().astype(np_dtype)
        hs = hs.float().cpu().numpy().astype(np_dtype)
    return img, [hs[j, : len(t)] for j, t in enumerate(token_ids)]


def _image_skips(out: Path, by_split: dict[str, list[Sample]]) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """Rows skipped while filling, with reasons recomputed from the files (cheap: only the bad rows, and a
    crash between skipping a row and finishing loses no reason), and the written-row count per split."""
    filler = CacheFiller(out)
    try:
        found, written = [], {}
        for split, rows in by_split.items():
            status = filler.status(split)
            written[split] = int((status == WRITTEN).sum())
            for i in np.flatnonzero(status == SKIPPED):
                s = rows[int(i)]
                found.append((split, s.id, check_sample_image(s.image) or "image failed to load during extraction"))
        return found, written
    finally:
        filler.close()
