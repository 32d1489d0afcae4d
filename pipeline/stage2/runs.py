"""A run folder and what every command that uses a trained model shares: loading, rebuilding and applying it.

A run folder (written by ``sppscl train``; its files are listed in docs/run-folder.md) is one :class:`RunFolder`:
its configuration, ``best``/``last`` checkpoints, per-epoch metrics, results, predictions and model card.
``evaluate``, ``predict``, ``ensemble``, ``analyze`` and the Python API (``sppscl.load``) accept a run folder wherever
they accept a checkpoint (``resolve_checkpoint``: its ``best`` checkpoint, or ``last``). The training loop is ``train.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, SplitData, diff_provenance
from ..config import Config, ConfigError
from ..errors import SppsclError, check_input_file, shown
from ..outputs import atomic_write, csv_text
from .checkpoint import WEIGHTS_SUFFIX, CheckpointError, checkpoint_files, load_checkpoint_file
from .data import SplitBatches
from .folds import POOLED
from .heads import SPPSCLModel
from .metrics import classification_report

# which checkpoint of a run folder: the one selected on dev, or the one of the last epoch
WHICH = ("best", "last")


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint a path names: a run folder's ``best`` (or ``last``) checkpoint, else the path itself."""
    if which not in WHICH:
        raise RunError(f"which checkpoint: {which!r} is not one of {', '.join(WHICH)}")
    p = Path(path)
    return RunFolder(p).checkpoint(which) if p.is_dir() else p


class RunError(SppsclError, RuntimeError):
    """A run cannot start or continue as asked (existing directory, mismatched cache, bad checkpoint)."""


# the files of a run folder, by role (docs/run-folder.md)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
MODEL_CARD_FILE = "README.md"


class RunFolder:
    """A run folder as one object: what ``sppscl train`` (or ``sppscl ensemble --out``) wrote there.

    Nothing is read until asked for; each accessor names the file it needs when that file is missing or damaged.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run folder")

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def checkpoint(self, which: str = "best") -> Path:
        """The path of the ``best`` checkpoint (selected on dev) or the ``last`` one (a legacy ``.pt`` too)."""
        if which not in WHICH:
            raise RunError(f"which checkpoint: {which!r} is not one of {', '.join(WHICH)}")
        for name in (which + WEIGHTS_SUFFIX, which + ".pt"):
            if (self.path / name).is_file():
                return self.path / name
        raise RunError(
            f"{self.path} is a folder without a {which} checkpoint ({which}{WEIGHTS_SUFFIX}): give a run folder written by "
            "`sppscl train` (it may still be training, or have failed before its first epoch) or a checkpoint file"
        )

    def load_checkpoint(self, which: str = "best") -> dict:
        return load_checkpoint(self.checkpoint(which))

    @property
    def config(self) -> Config:
        """The run's resolved configuration (``config.json``)."""
        return Config.from_dict(self._json(CONFIG_FILE, "the run's configuration"))

    @property
    def metrics(self) -> list[dict]:
        """One row per finished epoch (``metrics.jsonl``): losses, learning rate, dev metrics, best epoch so far."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"{path}: line {n} is not JSON ({e.msg})") from None
                except RecursionError:
                    raise RunError(f"{path}: line {n} is JSON nested too deeply to be an epoch's metrics") from None
        return rows

    @property
    def results(self) -> dict | None:
        """The best checkpoint evaluated on every split (``results.json``), or None while the run is unfinished."""
        return self._json(RESULTS_FILE, "the results") if (self.path / RESULTS_FILE).is_file() else None

    def predictions_path(self, split: str) -> Path:
        return self.path / f"predictions-{split}.csv"

    def predictions(self, split: str) -> list[dict[str, str]]:
        """The rows of ``predictions-<split>.csv``: id, label (true class, empty when unlabelled), pred, p_<class>."""
        path = self.predictions_path(split)
        if not path.is_file():
            have = sorted(p.name[len("predictions-") : -len(".csv")] for p in self.path.glob("predictions-*.csv"))
            raise RunError(f"{path}: no predictions for split {split!r} in this run (it has: {', '.join(have) or 'none'})")
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    @property
    def model_card(self) -> Path:
        """The run's model card (``README.md``, the Hugging Face layout)."""
        return self.path / MODEL_CARD_FILE

    def _json(self, name: str, what: str) -> dict:
        path = self.path / name
        try:
            if not check_input_file(path, what):  # a FIFO would block the read: refused from stat, never opened
                raise FileNotFoundError(path)
            return json.loads(path.read_text())
        except SppsclError as e:
            raise RunError(str(e)) from None
        except FileNotFoundError:
            raise RunError(f"{path}: missing ({what}); is {self.path} a run folder written by `sppscl train`?") from None
        except json.JSONDecodeError as e:
            raise RunError(f"{path}: damaged {what} (not JSON: {e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise RunError(f"{path}: damaged {what} (not UTF-8 text, byte {e.start})") from None
        except RecursionError:
            raise RunError(f"{path}: damaged {what} (JSON nested too deeply)") from None


def build_model(dims: dict, cfg: Config) -> SPPSCLModel:
    return SPPSCLModel(dims["image_channels"], dims["text_hidden"], dims["cached_layers"], dims["num_classes"], cfg.train)


def cache_dims(cache: FeatureCache) -> dict:
    return {
        "image_channels": int(cache.image_shape[0]),
        "text_hidden": int(cache.hidden),
        "cached_layers": int(cache.layers),
        "num_classes": len(cache.classes),
    }


def compatible(cache_prov: dict, ckpt_prov: dict) -> list[str]:
    """What makes a cache's features differ from those a checkpoint was trained on (empty: compatible).

    The encoders, their preprocessing, the stored dtype, the compute precision and the class list must match;
    the dataset may differ (a checkpoint can be evaluated on a new dataset extracted with the same encoders).
    Checkpoints from before ``--precision`` existed were trained on float32 features."""
    keys = lambda p: {  # noqa: E731
        "encoders": p["encoders"],
        "dtype": p["dtype"],
        "precision": p.get("precision", "fp32"),
        "classes": p["dataset"]["classes"],
    }
    return diff_provenance(keys(cache_prov), keys(ckpt_prov), names=("this cache", "the checkpoint's cache"))


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint's weights file (which holds its metadata too): what it is, wherever it lies, so a
    run retrained in place is a new checkpoint to anything keyed by it."""
    weights = path if path.suffix == ".pt" else checkpoint_files(path)[0]
    h = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_fold_split(ckpt: dict, cache: FeatureCache, split: str, checkpoint: Path) -> None:
    """Refuse to score a cross-validation fold's checkpoint on the train or dev split of the cache it was trained on.

    Its fold's training and validation parts are drawn from that cache's train+dev rows, so about (K-1)/K of either
    split trained or selected it and its figures there would be inflated; its test split (never pooled) is fair, and
    so is its held-out fold, which ``ensemble`` scores through the fold view."""
    tc = ckpt["config"].get("train", {})
    folds = int(tc.get("cv_folds", 0) or 0)
    if not folds or split not in POOLED:
        return
    if diff_provenance(cache.provenance["dataset"], ckpt["cache_provenance"]["dataset"]):
        return  # another dataset's rows: none of them trained it
    raise RunError(
        f"{checkpoint} was trained on cross-validation fold {tc.get('cv_fold', 0)} of {folds} of this cache's train+dev "
        f"rows, so about {(folds - 1) / folds:.0%} of {cache.path}:{split} trained or selected it; refusing to score it "
        f"there. Use --split test, or score its held-out fold: sppscl ensemble {checkpoint} --cache {cache.path}"
    )


# ------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def predict_split(model, split: SplitData, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Logits, probabilities and fused features of every usable row, in file order."""
    model.eval()
    logits, fused = [], []
    for batch in SplitBatches(split).eval_batches(batch_size):
        out = model(batch.image.to(device), batch.tokens.to(device), batch.mask.to(device))
        logits.append(out.logits.float().cpu())
        fused.append(out.fused.float().cpu())
    lg = torch.cat(logits) if logits else torch.zeros(0)
    return {
        "rows": split.rows,
        "logits": lg.numpy(),
        "probs": torch.softmax(lg, -1).numpy() if len(lg) else lg.numpy(),
        "pred": lg.argmax(-1).numpy() if len(lg) else np.zeros(0, np.int64),
        "fused": (torch.cat(fused) if fused else torch.zeros(0)).numpy(),
    }


def evaluate_split(model, split: SplitData, batch_size: int, device, classes: list[str]) -> tuple[dict | None, dict]:
    pred = predict_split(model, split, batch_size, device)
    if not split.has_labels:
        return None, pred
    return classification_report(split.labels[split.rows], pred["pred"], classes), pred


# Column names shared with `sppscl predict`'s CSV: ``label`` is always the true class, ``pred`` the predicted one,
# both by name; ``p_<class>`` the predicted probabilities.
def write_predictions(path: Path, split: SplitData, pred: dict, classes: list[str]) -> None:
    """One row per usable sample: id, true label (empty when the split has none), predicted label, probabilities.

    Written all or nothing; an unwritable path is one error naming it."""
    body = []
    for j, r in enumerate(pred["rows"]):
        lab = int(split.labels[r])
        body.append([split.ids[r], "" if lab < 0 else classes[lab], classes[int(pred["pred"][j])], *[f"{x:.6f}" for x in pred["probs"][j]]])
    atomic_write(path, csv_text(["id", "label", "pred", *[f"p_{c}" for c in classes]], body), "the predictions file")


def load_checkpoint(path: str | Path, which: str = "best") -> dict:
    """A checkpoint as a dict: a run folder's ``which`` checkpoint, RUN/best.safetensors (or RUN/best.json), or a
    legacy RUN/best.pt."""
    try:
        file = resolve_checkpoint(path, which)
        ckpt = load_checkpoint_file(file)
        check_checkpoint(ckpt, file)
        return ckpt
    except CheckpointError as e:
        raise RunError(str(e)) from None


DIM_KEYS = ("image_channels", "text_hidden", "cached_layers", "num_classes")


def check_checkpoint(ckpt: dict, path: Path) -> None:
    """A checkpoint checked once, on open, against its own header: the keys every command reads are there with their
    types; the stored config is valid; ``classes`` are distinct names, as many as ``dims.num_classes`` and the same as
    its cache's; every weight the heads have is there with the shape ``dims`` and the config give it. The first
    violation is one CheckpointError naming the file and the field (exit 2)."""

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field}: {what}; the checkpoint was altered or damaged, or not written by sppscl")

    def need(field: str, value, kind: type | tuple, what: str):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise bad(field, f"{shown(value)}, expected {what}")
        return value

    for key, kind, what in (("config", dict, "an object"), ("dims", dict, "an object"), ("classes", list, "a list of class names"),
                            ("cache_provenance", dict, "an object"), ("model", dict, "the heads' tensors"), ("best", dict, "an object")):
        if key not in ckpt:
            raise bad(key, "missing")
        need(key, ckpt[key], kind, what)
    need("epoch", ckpt.get("epoch"), int, "an epoch number")
    dims = ckpt["dims"]
    for key in DIM_KEYS:
        value = need(f"dims.{key}", dims.get(key), int, "a positive integer")
        if value < 1:
            raise bad(f"dims.{key}", f"{value}, expected a positive integer")
    classes = ckpt["classes"]
    if not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise bad("classes", f"{shown(classes)}, expected distinct class names")
    if len(classes) != dims["num_classes"]:
        raise bad("classes", f"{len(classes)} names, but dims.num_classes is {dims['num_classes']}")
    prov = ckpt["cache_provenance"]
    for key, kind in (("encoders", dict), ("dtype", str), ("dataset", dict)):
        need(f"cache_provenance.{key}", prov.get(key), kind, f"a {kind.__name__}")
    if prov["dataset"].get("classes") != classes:
        raise bad("cache_provenance.dataset.classes", f"{shown(prov['dataset'].get('classes'))}, but the checkpoint's classes are {shown(classes)}")
    try:
        cfg = Config.from_dict(ckpt["config"])
        cfg.validate()
    except ConfigError as e:
        raise bad("config", str(e).replace("stored config: ", "")) from None
    for key, value in ckpt["model"].items():
        if not isinstance(value, torch.Tensor):
            raise bad(f"model.{key}", f"{shown(value)}, expected a tensor")
    try:
        with torch.device("meta"):
            expected = build_model(dims, cfg).state_dict()
    except (ValueError, RuntimeError, TypeError) as e:
        raise bad("dims", f"the heads cannot be built from them ({shown(str(e), 200)})") from None
    got = ckpt["model"]
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            raise bad(f"model.{key}", "missing")
        if key not in expected:
            raise bad(f"model.{key}", "not a weight of the heads this config and dims build")
        if tuple(got[key].shape) != tuple(expected[key].shape):
            raise bad(f"model.{key}", f"shape {tuple(got[key].shape)}, but dims and config give {tuple(expected[key].shape)}")
        if got[key].is_floating_point() != expected[key].is_floating_point():
            raise bad(f"model.{key}", f"dtype {got[key].dtype}, expected {expected[key].dtype}")


def model_from_checkpoint(ckpt: dict, device: torch.device) -> tuple[SPPSCLModel, Config]:
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(ckpt["dims"], cfg).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


