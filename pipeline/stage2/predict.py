"""Prediction on new image-text pairs with a trained checkpoint.

A pair goes through the encoders that built the checkpoint's cache (loaded by the names stored in
``ckpt["cache_provenance"]`` and refused unless their provenance matches it), through stage one's own
batch encoder and the cache's dtype, into an in-memory :class:`~sppscl.cache.SplitData`, and through
stage two's ``predict_split``: the path ``evaluate`` takes on a cache, so both give the same numbers.

Batch fusion (Eq. 3, the paper's) makes a prediction depend on the other pairs of its batch. A file is
therefore predicted in its own order, in batches of the checkpoint's ``eval_batch_size`` over its usable
rows, exactly as ``evaluate`` batches a cache split. A single pair is a batch of one: in eval mode
``A = softmax`` of a 1×1 matrix = 1, so the pair attends only to itself (``I_m = V_I(I_p)``,
``T_m = V_T(T_p)``). ``sample`` fusion has no such dependence and is the one to use for single pairs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cache import SplitData, diff_provenance
from ..progress import make_progress
from ..stage1.encoders import load_image_encoder, load_text_encoder
from ..devices import resolve_device
from ..errors import SppsclError, check_input_file
from ..outputs import STDOUT, atomic_write, csv_text
from ..stage1.batching import fixed_batches
from ..stage1.extract import encode_batch, prepare_encoders
from ..stage1.verify import ImageProblem, open_image, unencodable_at
from .ensemble import load_members
from .runs import predict_split

ON_ERROR = ("stop", "skip")
OUTPUT_SUFFIXES = (".jsonl", ".csv")
# Rows decoded and encoded per round; rounded up to whole head batches so the head batches are the file's.
CHUNK_ROWS = 256


class PredictError(SppsclError, RuntimeError):
    """Prediction cannot run as asked, or an input row is bad; the message names the file, line and id."""


@dataclass
class Pair:
    """One input row. ``image`` is a path (a ``str`` becomes a ``Path``), the bytes of an image file or a PIL image;
    ``line`` is its line in the input file (0 for a pair given on the command line or through the Python API);
    ``error`` is set when the row could not even be parsed."""

    id: str
    text: str
    image: Path | bytes | Image.Image | None
    line: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image, str):
            self.image = Path(self.image)


@dataclass
class Prediction:
    """The outcome for one pair, in the words of the CLI's output: ``pred`` is the predicted class name, ``probs``
    the probability of each class by name (in the checkpoint's class order), ``index`` the predicted class's
    position in that order. A pair that could not be predicted has ``error`` set and ``pred`` None."""

    id: str
    line: int
    pred: str | None
    index: int | None
    probs: dict[str, float] | None
    error: str | None = None


# ------------------------------------------------------------------------------------ input rows


def _where(source: str, pair: Pair) -> str:
    if pair.line:
        return f"{source}: line {pair.line} (id {pair.id!r})"
    return f"pair {pair.id!r}"


def _cheap_problem(pair: Pair) -> str | None:
    """What makes a parsed row unusable without decoding its image."""
    for what, value in (("id", pair.id), ("text", pair.text)):
        at = unencodable_at(value) if isinstance(value, str) else None
        if at is not None:
            return f"{what} has a character UTF-8 cannot store at position {at} ({value[at]!r}: a lone surrogate)"
    if not isinstance(pair.text, str):
        return f"text must be a string, got {type(pair.text).__name__}"
    if not pair.text.strip():
        return "empty text"
    if not isinstance(pair.image, (Path, bytes, bytearray, memoryview, Image.Image)):
        return f"image must be a path, the bytes of an image file or a PIL image, got {type(pair.image).__name__}"
    if isinstance(pair.image, Path):
        try:  # a FIFO, device or folder is named as what it is (never opened), as data verify names it
            if not check_input_file(pair.image, "an image file"):
                return f"missing image: {pair.image}"
        except SppsclError as e:
            return str(e)
    return None


def _row_error(source: str, pair: Pair, reason: str) -> PredictError:
    return PredictError(f"{_where(source, pair)}: {reason}. Fix the row, or rerun with --on-error skip to report it and predict the rest.")


def _row_pair(row: dict, line: int, number: int, base: Path) -> Pair:
    """A parsed row -> Pair; ``id`` defaults to the data row's number (1-based), image paths are relative to ``base``."""
    raw_id = row.get("id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        sid = str(number)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        sid = str(raw_id).strip()
    else:
        return Pair(str(number), "", None, line, f"'id' must be a string or an integer, got {type(raw_id).__name__}")
    for key in ("text", "image"):
        if row.get(key) is None:
            return Pair(sid, "", None, line, f"missing {key!r}")
    if not isinstance(row["text"], str):
        return Pair(sid, "", None, line, f"'text' is not a string ({type(row['text']).__name__})")
    if not isinstance(row["image"], str) or not row["image"].strip():
        return Pair(sid, row["text"], None, line, "'image' is empty or not a path")
    try:
        image = Path(row["image"].strip()).expanduser()
    except RuntimeError as e:  # ~name with no such user on this machine
        return Pair(sid, row["text"], None, line, f"'image' {row['image'].strip()!r} cannot be expanded ({e})")
    return Pair(sid, row["text"], image if image.is_absolute() else base / image, line)


def read_pairs(path: Path) -> list[Pair]:
    """Rows of a ``.jsonl`` or ``.csv`` file with ``text``, ``image`` and optionally ``id``.

    A malformed row (bad JSON, not an object, wrong CSV field count, missing key) becomes a Pair with
    ``error`` set, so ``--on-error skip`` can report it and go on; a file that cannot be read at all
    (missing, not UTF-8, CSV header without ``text``/``image``) raises :class:`PredictError`.
    """
    path = Path(path)
    if not check_input_file(path, "a .jsonl or .csv file of pairs"):  # a FIFO or device is named, never opened
        raise PredictError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise PredictError(f"{path}: input must be a .jsonl or .csv file")
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PredictError(f"{path}: not UTF-8 text (byte {e.start})") from None
    base = path.parent
    pairs: list[Pair] = []
    if suffix == ".jsonl":
        for line, text in enumerate(content.splitlines(), start=1):
            if not text.strip():
                continue
            number = len(pairs) + 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                pairs.append(Pair(str(number), "", None, line, f"not valid JSON ({e.msg})"))
                continue
            except RecursionError:
                pairs.append(Pair(str(number), "", None, line, "JSON nested too deeply to be a row"))
                continue
            if not isinstance(row, dict):
                pairs.append(Pair(str(number), "", None, line, f"expected a JSON object, got {type(row).__name__}"))
                continue
            pairs.append(_row_pair(row, line, number, base))
        return _nonempty(pairs, path)
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("text", "image") if c not in header]
    if missing:
        raise PredictError(f"{path}: line 1 (header): missing column(s) {', '.join(missing)}")
    try:
        for row in reader:
            number = len(pairs) + 1
            # DictReader files surplus fields under the key None and fills absent ones with None
            extra = row.pop(None, None) or []
            found = sum(v is not None for v in row.values()) + len(extra)
            pair = _row_pair(row, reader.line_num, number, base)
            if found != len(header):
                pair = Pair(pair.id, "", None, reader.line_num, f"expected {len(header)} fields, found {found}")
            pairs.append(pair)
    except csv.Error as e:
        raise PredictError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return _nonempty(pairs, path)


def _nonempty(pairs: list[Pair], path: Path) -> list[Pair]:
    if not pairs:
        raise PredictError(f"{path}: no rows to predict")
    return pairs


# ------------------------------------------------------------------------------------ the predictor


def check_encoders(stored: dict, loaded: dict, checkpoint: Path) -> None:
    """Refuse encoders whose provenance differs from the one the checkpoint's cache recorded."""
    diffs = diff_provenance(stored, loaded, names=("the checkpoint's cache", "the loaded encoder"))
    if diffs:
        raise PredictError(
            f"the encoders available here differ from those that built the cache {checkpoint} was trained on; "
            "refusing to predict (the heads would see features they were not trained on). What differs:\n  "
            + "\n  ".join(diffs)
        )


class Predictor:
    """A checkpoint's heads (or several checkpoints', whose class probabilities are averaged) plus the encoders and
    preprocessing that built its cache."""

    def __init__(self, checkpoint: Path | list[Path], device: str = "auto", which: str = "best"):
        paths = [Path(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else [Path(checkpoint)]
        self.checkpoint = paths[0]  # as given (a run folder or a checkpoint); members[i].path is the file loaded
        self.device = resolve_device(device)
        # every member must read the same features (same encoders, dtype, classes): refused otherwise, saying what differs
        self.members = load_members(paths, self.device, same_fold=False, which=which)
        prov = self.members[0].provenance
        enc = prov["encoders"]
        tok = enc["text"]["tokenizer"]
        self.image_enc = load_image_encoder(enc["image"]["name"], device=str(self.device))
        self.text_enc = load_text_encoder(
            enc["text"]["name"], max_length=tok["max_length"], layers=len(enc["text"]["layers"]), device=str(self.device)
        )
        check_encoders(enc, {"image": self.image_enc.provenance(), "text": self.text_enc.provenance()}, self.checkpoint)
        self.model, self.cfg = self.members[0].model, self.members[0].cfg
        self.classes: list[str] = self.members[0].classes
        # features pass through the cache's dtype, as extraction stores them, so predict and evaluate agree
        self.np_dtype = np.dtype(prov["dtype"])
        # ... and through the precision the cache was computed in (caches before --precision: fp32)
        self.precision = prov.get("precision", "fp32")
        prepare_encoders(self.image_enc, self.device)
        self.transform = self.image_enc.preprocess()

    @property
    def fusion(self) -> str:
        """"batch" when any member's predictions depend on their batch."""
        kinds = [m.cfg.train.fusion if m.cfg.train.modalities == "both" else "none" for m in self.members]
        return "batch" if "batch" in kinds else kinds[0]

    @property
    def eval_batch_size(self) -> int:
        """The heads' batch: every member's eval_batch_size divides it, so each member's batches are the file's."""
        return math.lcm(*[m.cfg.train.eval_batch_size for m in self.members])

    def fusion_note(self, single: bool) -> str | None:
        """What the user must know about batch dependence, or None for a batch-independent checkpoint."""
        if self.fusion != "batch":
            return None
        if single:
            return (
                "this checkpoint uses batch fusion (Eq. 3): a single pair is a batch of one and attends only to itself, "
                "so its probabilities can differ from those it gets inside a batch. For single pairs, train with --set fusion=sample."
            )
        return (
            f"this checkpoint uses batch fusion (Eq. 3): each prediction depends on the other pairs in its batch. Rows are "
            f"predicted in file order in batches of {self.eval_batch_size} (the checkpoint's eval_batch_size), as `evaluate` "
            "does on a cache; reordering the file changes the numbers. --set fusion=sample trains batch-independent heads."
        )

    def predict(
        self,
        pairs: list[Pair],
        on_error: str = "stop",
        batch_size: int | None = None,
        source: str = "",
        progress: bool = False,
        console=None,
    ) -> list[Prediction]:
        """One Prediction per pair, in order. ``batch_size`` is the encoders' batch (default: the checkpoint's
        ``extract.batch_size``); the heads always run in ``eval_batch_size`` batches of the usable rows."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        enc_bs = self.cfg.extract.batch_size if batch_size is None else batch_size
        if enc_bs < 1:
            raise PredictError(f"--batch-size must be at least 1, got {enc_bs}")
        # unparsable rows, empty texts and missing files are found before any encoder runs, so 'stop' fails early
        errors = [p.error or _cheap_problem(p) for p in pairs]
        for p, err in zip(pairs, errors):
            if err is not None and on_error == "stop":
                raise _row_error(source, p, err)
        chunk = self.eval_batch_size * math.ceil(max(CHUNK_ROWS, enc_bs) / self.eval_batch_size)
        results: list[Prediction | None] = [None] * len(pairs)
        pending: list[tuple[int, torch.Tensor]] = []
        with make_progress(enabled=progress, console=console) as prog:
            task = prog.add_task("predict", total=len(pairs))
            for i, p in enumerate(pairs):
                if errors[i] is None:
                    image, errors[i] = self._load_image(p.image)
                    if errors[i] is None:
                        pending.append((i, image))
                    elif on_error == "stop":
                        raise _row_error(source, p, errors[i])
                if errors[i] is not None:
                    results[i] = Prediction(p.id, p.line, None, None, None, errors[i])
                    prog.advance(task)
                if len(pending) == chunk:
                    self._predict_chunk(pairs, pending, enc_bs, results)
                    prog.advance(task, len(pending))
                    pending = []
            if pending:
                self._predict_chunk(pairs, pending, enc_bs, results)
                prog.advance(task, len(pending))
        return results  # type: ignore[return-value]

    def _load_image(self, image: Path | bytes | Image.Image) -> tuple[torch.Tensor | None, str | None]:
        """The preprocessed image as extraction makes it, or the reason it cannot be used."""
        try:
            return self.transform(open_image(image)), None
        except ImageProblem as e:
            return None, str(e)

    def encode(self, pairs: list[Pair], batch_size: int | None = None) -> SplitData:
        """The features extraction would cache for ``pairs`` (all usable), as an in-memory split."""
        images = []
        for p in pairs:
            image, reason = self._load_image(p.image)
            if reason is not None:
                raise _row_error("", p, reason)
            images.append(image)
        return self._encode(pairs, torch.stack(images), batch_size or self.cfg.extract.batch_size)

    def _encode(self, pairs: list[Pair], images: torch.Tensor, enc_bs: int) -> SplitData:
        token_ids = self.text_enc.tokenize([p.text for p in pairs])
        maps, tokens = [], []
        for b in fixed_batches(len(pairs), enc_bs):
            m, t = encode_batch(
                self.image_enc, self.text_enc, images[b], [token_ids[j] for j in b], self.device, self.np_dtype, self.precision
            )
            maps.append(m)
            tokens += t
        return in_memory_split(pairs, np.concatenate(maps), tokens)

    def _predict_chunk(self, pairs: list[Pair], pending: list[tuple[int, torch.Tensor]], enc_bs: int, results: list) -> None:
        idx = [i for i, _ in pending]
        split = self._encode([pairs[i] for i in idx], torch.stack([x for _, x in pending]), enc_bs)
        probs = np.mean([predict_split(m.model, split, m.cfg.train.eval_batch_size, self.device)["probs"] for m in self.members], axis=0)
        for j, i in enumerate(idx):
            k = int(probs[j].argmax())
            results[i] = Prediction(pairs[i].id, pairs[i].line, self.classes[k], k, dict(zip(self.classes, map(float, probs[j]))))


def in_memory_split(pairs: list[Pair], image: np.ndarray, tokens: list[np.ndarray]) -> SplitData:
    """A SplitData holding freshly encoded pairs (no labels), laid out as the cache lays out a split."""
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
    return SplitData(
        name="predict",
        ids=np.array([p.id for p in pairs], dtype=object),
        texts=np.array([p.text for p in pairs], dtype=object),
        labels=np.full(len(pairs), -1, dtype=np.int64),
        offsets=offsets,
        image=image,
        tokens=np.concatenate(tokens),
        rows=np.arange(len(pairs), dtype=np.int64),
        in_memory=True,
    )


# ------------------------------------------------------------------------------------ output


def write_output(path: Path, preds: list[Prediction], classes: list[str]) -> None:
    """JSONL (``id, pred, probabilities`` or ``id, line, error``) or CSV, chosen by the extension (``-``: CSV on
    standard output). ``pred`` is the
    predicted class name, as in evaluate's and train's predictions CSV (where ``label`` is the true class)."""
    path = Path(path)
    # standard output (``--out -``) gets CSV, for pipelines
    suffix = ".csv" if str(path) == STDOUT else path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise PredictError(f"--out {path}: must end in .jsonl or .csv")
    # built in memory and written all or nothing: an unwritable or full location leaves no half file
    buf = io.StringIO(newline="")
    if suffix == ".jsonl":
        for p in preds:
            if p.error is not None:
                row = {"id": p.id, "line": p.line, "error": p.error}
            else:
                row = {"id": p.id, "pred": p.pred, "probabilities": {c: p.probs[c] for c in classes}}
            buf.write(json.dumps(row) + "\n")
    else:
        body = [
            [p.id, "", *[""] * len(classes), f"line {p.line}: {p.error}" if p.line else p.error]
            if p.error is not None
            else [p.id, p.pred, *[f"{p.probs[c]:.6f}" for c in classes], ""]
            for p in preds
        ]
        buf.write(csv_text(["id", "pred", *[f"p_{c}" for c in classes], "error"], body))
    if str(path) == STDOUT:
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
        return
    atomic_write(path, buf.getvalue(), "the predictions")
