"""The Python API: what ``import sppscl`` offers a script or a notebook (docs/api.md).

``sppscl.load`` turns a run folder or a checkpoint into a :class:`Model` that predicts plain (image, text) pairs;
``extract``, ``train``, ``evaluate``, ``probe``, ``sweep`` and ``cv`` are the stages the ``sppscl`` command runs, with
the same defaults: each command is a thin layer over the function of its name here.

Functions are quiet by default (``progress=False``); pass ``progress=True`` (and a ``rich`` console) for the
command line's progress bars. Errors are :class:`sppscl.errors.SppsclError` subclasses whose message names the file,
row or key and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_DIR, STAGE_SECTIONS, Config, apply_overrides, load_config
from .outputs import atomic_write, check_output_file, check_output_folder, check_writable_dir

if TYPE_CHECKING:  # the heavy modules load on first use, so `import sppscl` stays cheap
    from PIL import Image

    from .stage1.extract import ExtractSummary
    from .stage2.cv import CVResult
    from .stage2.predict import Prediction, Predictor
    from .stage2.runs import RunFolder
    from .stage2.sweeps import Execution, SweepResult

# ------------------------------------------------------------------------------------ configurations


def stage1_config(config: str | Path | Config | None, overrides: Sequence[str] = (), command: str = "extract", **section_overrides: Any) -> Config:
    """A stage-one configuration: a preset name or YAML file (default ``demo``), then ``--set``-style overrides among
    the dataset, encoders and extract sections (``"max_length=128"``), then dotted keys (``encoders.image``)."""
    if isinstance(config, Config):
        cfg = apply_overrides(config, list(overrides), STAGE_SECTIONS["extract"], command)
    else:
        cfg = load_config(str(config) if config is not None else "demo", list(overrides), STAGE_SECTIONS["extract"], command)
    extra = {k: v for k, v in section_overrides.items() if v is not None}
    return apply_overrides(cfg, extra) if extra else cfg


def train_config(
    cache: str | Path,
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    seed: int | None = None,
    device: str | None = None,
    command: str = "train",
) -> Config:
    """A stage-two configuration: ``config`` (a preset name, a YAML file or a Config), else the preset named after
    the cache's dataset, else the defaults; then ``--set``-style overrides among the train keys."""
    from .cache import FeatureCache

    if isinstance(config, Config):
        cfg = config
    else:
        if config is None:
            name = FeatureCache(Path(cache)).provenance["dataset"]["name"]
            config = name if (CONFIG_DIR / f"{name}.yaml").exists() else None
        cfg = load_config(str(config)) if config else Config()
    sets = list(overrides)
    if seed is not None:
        sets.append(f"seed={seed}")
    if device is not None:
        sets.append(f"device={device}")
    return apply_overrides(cfg, sets, STAGE_SECTIONS["train"], command)


# ------------------------------------------------------------------------------------ a trained model


class Model:
    """A trained model with the encoders that built its cache: predicts (image, text) pairs from files, bytes or PIL
    images. Made by :func:`load`.

    Attributes: ``classes`` (class names, in the order of ``probs``), ``provenance`` (the training cache's dataset,
    encoders, dtype and precision), ``metrics`` (per split: accuracy, weighted and macro F1, per class, confusion
    matrix), ``config`` (the resolved configuration), ``checkpoint`` (the file loaded), ``run`` (its
    :class:`~sppscl.stage2.runs.RunFolder`, or None for a checkpoint outside one), ``which`` (``best`` or ``last`` when a
    run folder was loaded, None for a checkpoint file), ``epoch``, ``fusion``.
    """

    def __init__(self, predictor: "Predictor", checkpoint: Path, ckpt: dict, run: "RunFolder | None", which: str | None):
        self._predictor = predictor
        self.checkpoint = checkpoint
        self.run = run
        self.which = which
        self.classes: list[str] = list(predictor.classes)
        self.provenance: dict = ckpt["cache_provenance"]
        self.config: Config = predictor.cfg
        self.epoch: int = int(ckpt["epoch"])
        self.metrics: dict[str, dict] = _model_metrics(ckpt, run, checkpoint)

    @property
    def fusion(self) -> str:
        """``batch`` when a prediction depends on the other pairs predicted with it (Eq. 3), else ``sample`` (or
        ``none`` for a one-modality model). ``predict`` batches a list as ``sppscl predict --input`` batches a file."""
        return self._predictor.fusion

    def __repr__(self) -> str:
        return f"Model({str(self.checkpoint)!r}, classes={self.classes}, epoch={self.epoch})"

    def predict(
        self,
        pairs: Iterable[tuple["str | Path | bytes | Image.Image", str]],
        *,
        on_error: str = "stop",
        batch_size: int | None = None,
    ) -> list["Prediction"]:
        """One :class:`~sppscl.stage2.predict.Prediction` per (image, text) pair, in order: ``pred`` (class name),
        ``probs`` (class name -> probability), ``index``, ``id`` (the pair's 1-based position).

        An image is a path (``str`` or ``Path``), the bytes of an image file or a PIL image. ``on_error="stop"``
        raises a :class:`~sppscl.stage2.predict.PredictError` naming the first bad pair; ``"skip"`` returns it with
        ``error`` set (``pred`` None) and predicts the rest. ``batch_size`` is the encoders' batch (default: the
        checkpoint's); the heads run in the checkpoint's ``eval_batch_size``, as ``sppscl predict`` does.
        """
        from .stage2.predict import Pair

        items = []
        for n, item in enumerate(pairs, start=1):
            if isinstance(item, Pair):
                items.append(item)
                continue
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(f"pair {n}: expected an (image, text) tuple, got {type(item).__name__}")
            items.append(Pair(str(n), item[1], item[0]))
        if not items:
            return []
        return self._predictor.predict(items, on_error=on_error, batch_size=batch_size)

    def predict_one(self, image: "str | Path | bytes | Image.Image", text: str) -> "Prediction":
        """One pair, alone: a batch of one (with batch fusion it attends only to itself; see ``fusion``)."""
        return self.predict([(image, text)])[0]


def _model_metrics(ckpt: dict, run: "RunFolder | None", checkpoint: Path) -> dict[str, dict]:
    """The run's results when they describe this checkpoint (its best, evaluated on every split), else the dev
    metrics the checkpoint carries for its own epoch."""
    if run is not None and checkpoint.stem == "best":
        results = run.results
        if results is not None and results.get("best_epoch") == ckpt["epoch"]:
            return results["splits"]
    if ckpt.get("best", {}).get("epoch") == ckpt["epoch"] and ckpt["best"].get("dev"):
        return {"dev": ckpt["best"]["dev"]}
    rec = ckpt.get("record") or {}
    dev = {k: rec[f"dev_{k}"] for k in ("accuracy", "weighted_f1", "macro_f1") if f"dev_{k}" in rec}
    return {"dev": dev} if dev else {}


def load(path: str | Path, which: str = "best", device: str = "auto", allow_download: bool = False) -> Model:
    """A trained model from a run folder (its ``best`` checkpoint, or ``which="last"``) or a checkpoint file, with the
    encoders that built its training cache (refused if the encoders found here differ from those).

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. ``allow_download`` lets missing encoder weights download
    (the same as ``--allow-download``); otherwise only local weights load.
    """
    from .stage1.encoders import allow_downloads
    from .stage2.predict import Predictor
    from .stage2.runs import RunFolder, load_checkpoint, resolve_checkpoint

    path = Path(path)
    checkpoint = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(checkpoint)
    with allow_downloads(allow_download):
        predictor = Predictor(checkpoint, device)
    parent = checkpoint.parent
    run = RunFolder(parent) if (parent / "config.json").is_file() else None
    return Model(predictor, checkpoint, ckpt, run, which if path.is_dir() else None)


# ------------------------------------------------------------------------------------ the stages


def extract(
    config: str | Path | Config,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    on_error: str = "stop",
    force: bool = False,
    workers: int | None = None,
    precision: str | None = None,
    image_encoder: str | None = None,
    text_encoder: str | None = None,
    allow_download: bool = False,
    progress: bool = False,
    console: Any = None,
    shard: str | None = None,
) -> "ExtractSummary":
    """Stage one (``sppscl extract``): run the frozen encoders once over a dataset and write the feature cache.

    ``config`` is a preset name (``mvsa-single``, ``demo``), a YAML file or a Config; ``overrides`` are ``--set``
    items among the dataset/encoders/extract keys. ``out`` defaults to ``cache/<dataset>.h5``. Resumable: rerunning
    continues an interrupted cache, and a complete one that matches is left as it is. ``shard="I/N"`` writes shard I
    of N (join them with ``sppscl cache merge``). Returns the rows per split, skipped samples and timing.
    """
    from .stage1.distributed import Shard
    from .stage1.encoders import allow_downloads
    from .stage1.extract import extract as run_extract

    cfg = stage1_config(config, overrides, **{"encoders.image": image_encoder, "encoders.text": text_encoder, "extract.precision": precision})
    out = Path(out) if out is not None else Path("cache") / f"{cfg.dataset.name}.h5"
    with allow_downloads(allow_download):
        return run_extract(
            cfg, out, Path(data_dir) if data_dir is not None else None, device, batch_size, limit, on_error, force, workers,
            progress=progress, console=console, shard=Shard.parse(shard) if shard is not None else None,
        )


def train(
    cache: str | Path,
    out: str | Path | None = None,
    *,
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    seed: int | None = None,
    device: str | None = None,
    resume: bool = False,
    progress: bool = False,
    console: Any = None,
) -> "RunFolder":
    """Stage two (``sppscl train``): train the SPP-SCL heads on a cache, select the epoch on dev, evaluate the best
    checkpoint on every split, write the model card. Returns the run folder (``.results`` holds the numbers).

    ``config``: a preset, YAML file or Config (default: the preset named after the cache's dataset);
    ``overrides``: ``--set`` items such as ``"lr=5e-5"``. ``out`` defaults to ``runs/<cache name>-<time>``;
    ``resume=True`` continues the run in ``out`` from its last checkpoint, with its own configuration.
    """
    from .config import ConfigError
    from .stage2.runs import RunFolder
    from .stage2.train import train as run_train

    if resume and out is None:
        raise ConfigError("--resume needs --out naming the run directory to continue")
    from .stage2.ownership import lock_path, new_run_dir

    cfg = train_config(cache, config, overrides, seed, device)
    made = out is None
    # created exclusively: two trains started in the same second get two folders, never one
    out = Path(out) if out is not None else new_run_dir(Path("runs"), Path(cache).stem)
    # on resume these may only change what keeps it one run (more epochs, threads, device); the rest is refused
    sets = [*overrides, *([f"seed={seed}"] if seed is not None else []), *([f"device={device}"] if device is not None else [])]
    preset = None if config is None or isinstance(config, Config) else str(config)
    try:
        run_train(Path(cache), cfg, out, resume=resume, progress=progress, console=console, resume_overrides=sets, resume_preset=preset)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            # the folder (and its lock) this call made under a name no other process can have, and wrote nothing into
            out.rmdir()
            lock_path(out).unlink(missing_ok=True)
        raise
    return RunFolder(out)


def evaluate(
    checkpoint: str | Path,
    cache: str | Path,
    split: str = "test",
    *,
    which: str = "best",
    out: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """``sppscl evaluate``: a run folder's ``which`` checkpoint (or a checkpoint file) on one split of a cache built
    with its encoders. Returns the results (``splits[split]``: accuracy, F1s, per class, confusion matrix; a split
    without labels gets ``n`` only). With ``out`` (a folder): results.json, predictions-<split>.csv and
    confusion-<split>.png there; a name ending in ``.json`` gets the results alone."""
    from .cache import FeatureCache
    from .devices import resolve_device
    from .stage2.intervals import report_interval
    from .stage2.runs import RunError, check_fold_split, compatible, evaluate_split, load_checkpoint, model_from_checkpoint, resolve_checkpoint, write_predictions

    out, json_out = _results_target(out)
    path = resolve_checkpoint(checkpoint, which)
    ckpt = load_checkpoint(path)
    fc = FeatureCache(Path(cache))
    diffs = compatible(fc.provenance, ckpt["cache_provenance"])
    if diffs:
        raise RunError(f"{cache} was not extracted like the checkpoint's cache; refusing. What differs:\n  " + "\n  ".join(diffs))
    check_fold_split(ckpt, fc, split, path)
    dev = resolve_device(device)
    model, cfg = model_from_checkpoint(ckpt, dev)
    data = fc.load(split)
    metrics, pred = evaluate_split(model, data, cfg.train.eval_batch_size, dev, ckpt["classes"])
    if metrics is not None:
        metrics.update(report_interval(data.labels[data.rows], pred["pred"], len(ckpt["classes"])))
    results = {
        "checkpoint": str(path),
        "cache": str(cache),
        "epoch": ckpt["epoch"],
        "classes": list(ckpt["classes"]),
        "splits": {split: metrics if metrics is not None else {"n": int(len(data.rows)), "labels": "none: predictions only"}},
    }
    if out is not None:
        _save_results(out, results, f"evaluate {path}")
        if not json_out:
            write_predictions(out / f"predictions-{split}.csv", data, pred, ckpt["classes"])
    return results


def _results_target(out: str | Path | None) -> tuple[Path | None, bool]:
    """(``out`` as a path, whether it names a JSON file rather than a folder), checked before any work: --out names a
    JSON file or a folder, and nothing else (a FIFO, device, link) is there."""
    if out is None:
        return None, False
    out = Path(out)
    json_out = out.suffix.lower() == ".json"
    check_output_file(out, "the results") if json_out else check_output_folder(out, "the results")
    check_writable_dir(out.parent if json_out else out, "the results")
    return out, json_out


def _save_results(out: Path, results: dict, what: str) -> None:
    """``out`` ending in .json: the results there, alone; else a folder with results.json and confusion-<split>.png."""
    from .stage2.plots import plot_confusions

    if out.suffix.lower() == ".json":
        atomic_write(out, json.dumps(results, indent=2), "the results")
    else:
        atomic_write(out / "results.json", json.dumps(results, indent=2), "the results")
        plot_confusions(results["splits"], results["classes"], out, what)


def probe(cache: str | Path, *, modalities: str = "both", seed: int = 0, out: str | Path | None = None) -> dict:
    """``sppscl probe``: the logistic-regression baseline on pooled cached features (C chosen on dev accuracy).

    The result is also recorded beside the cache as ``<cache stem>.probe.json`` (see ``probe_record_path``), where
    ``train`` finds it and prints the probe's dev accuracy beside its own. With ``out`` (a folder): results.json and
    confusion-<split>.png there; a name ending in ``.json`` gets the results alone."""
    from .stage2.baselines import record_probe
    from .stage2.probe import run_probe

    out, json_out = _results_target(out)
    res = run_probe(Path(cache), seed=seed, modalities=modalities)
    results = {"cache": str(cache), **res, "probe_record": record_probe(Path(cache), res, seed)}
    if out is not None:
        _save_results(out, results, f"probe C={res['C']}")
    return results


def sweep(
    cache: str | Path,
    out: str | Path,
    *,
    grid: Sequence[str] = (),
    space: Sequence[str] = (),
    n_random: int | None = None,
    sampler: str = "tpe",
    seeds: Sequence[int] = (1, 2, 3),
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    execution: "Execution | None" = None,
    progress: bool = False,
    console: Any = None,
    prune: str | None = None,
) -> "SweepResult":
    """``sppscl sweep``: a grid (``grid=["lr=1e-4,5e-5"]``) or ``n_random`` draws of an Optuna search over ``space``
    (``"lr=1e-5:1e-3:log"``), times ``seeds``, on one cache; resumable. Writes runs.csv, summary.csv and summary.md to
    ``out`` and returns them (``.rows``, ``.summary``), with the ensemble of each configuration's seeds (``.ensembles``,
    ensembles.md). ``execution`` sets parallel jobs, devices and a shared study. ``prune`` (``"median"`` or
    ``"hyperband"``, a search only): Optuna's pruner stops configurations whose first seed's dev curve is behind
    (``.pruned``; their other seeds are not started: ``.skipped``)."""
    from .stage2.ensemble import seed_ensembles, write_ensemble_summary
    from .stage2.sweeps import Execution
    from .stage2.sweeps import sweep as run_sweep

    cfg = train_config(cache, config, overrides, None, device, "sweep")
    out = Path(out)
    result = run_sweep(
        Path(cache), cfg, out, list(grid), list(space), n_random, sampler, list(seeds), execution or Execution(), progress=progress, console=console,
        prune=prune,
    )
    result.ensembles = seed_ensembles(result, Path(cache), out / "ensembles")
    write_ensemble_summary(out, result, result.ensembles)
    return result


def cv(
    cache: str | Path,
    out: str | Path,
    *,
    folds: int = 5,
    seeds: Sequence[int] = (1, 2, 3),
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    execution: "Execution | None" = None,
    progress: bool = False,
    console: Any = None,
) -> "CVResult":
    """``sppscl cv``: a K-fold cross-validated estimate over the cache's labelled train+dev rows (its test split is
    never read): every fold x seed trained and selected on a validation part of its training folds, scored on the
    held-out fold; mean ± std, seed ensembles and the probe on the same folds. Writes cv.md, cv.csv and cv.json to
    ``out``; resumable."""
    from .stage2.cv import cross_validate
    from .stage2.sweeps import Execution

    cfg = train_config(cache, config, overrides, None, device, "cv")
    return cross_validate(Path(cache), cfg, Path(out), folds, list(seeds), execution=execution or Execution(), progress=progress, console=console)
