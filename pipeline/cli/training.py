"""``sppscl train``, ``evaluate`` and ``probe``: stage two on one cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import ConfigError
from ..errors import check_writable_dir
from .console import DEVICE_HELP, OUT_JSON_HELP, console, emit_json, err_console, json_file, print_metrics, print_results, save_results, split_table
from .options import train_config


def train(
    cache: Path = typer.Option(..., help="Feature cache written by `sppscl extract`."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter, e.g. --set lr=5e-5 --set fusion=sample. Unknown keys are an error."),
    seed: Optional[int] = typer.Option(None, min=0, help="Random seed (preset: train.seed)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (preset: train.device)"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: a new runs/<cache name>-<time>; one process trains into a folder at a time)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, help="No live view."),
) -> None:
    """Stage two: train the SPP-SCL heads from the cache, select on dev, evaluate the best checkpoint."""
    from ..stage2.ownership import lock_path, new_run_dir
    from ..stage2.train import train as run_train

    if resume and out is None:
        raise ConfigError("--resume needs --out naming the run directory to continue")
    cfg = train_config(cache, config, set_, seed, device)
    made = out is None
    # created exclusively: two trains started in the same second get two folders, never one
    out = out or new_run_dir(Path("runs"), cache.stem)
    # on --resume these may only change what keeps it one run (more epochs, threads, device); the rest is refused
    overrides = [*set_, *([f"seed={seed}"] if seed is not None else []), *([f"device={device}"] if device is not None else [])]
    try:
        results = run_train(
            cache, cfg, out, resume=resume, progress=not quiet, console=err_console, resume_overrides=overrides, resume_preset=config
        )
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            # the folder (and its lock) this command made under a name no other process can have, and wrote nothing into
            out.rmdir()
            lock_path(out).unlink(missing_ok=True)
        raise
    console.print(f"run directory: {out}")
    print_results(results)



def evaluate(
    checkpoint: Path = typer.Option(..., help="A run folder (its best checkpoint) or a checkpoint (RUN/best.safetensors, RUN/last.safetensors; a legacy RUN/best.pt loads too)."),
    cache: Path = typer.Option(..., help="A cache built with the checkpoint's encoders."),
    split: str = typer.Option("test", help="Split to evaluate."),
    out: Optional[Path] = typer.Option(
        None,
        help="Folder for results.json (every metric, per class, confusion matrix), predictions-<split>.csv and confusion-<split>.png; "
        "a name ending in .json gets the results alone.",
    ),
    json_: bool = typer.Option(False, "--json", help=OUT_JSON_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate a checkpoint on one split of a matching cache (metrics if labelled, predictions always)."""
    from ..cache import FeatureCache
    from ..devices import resolve_device
    from ..stage2.runs import RunError, compatible, resolve_checkpoint, evaluate_split, load_checkpoint, model_from_checkpoint, write_predictions

    if out is not None:
        check_writable_dir(out.parent if json_file(out) else out, "the results")
    checkpoint = resolve_checkpoint(checkpoint)  # a run folder means its best checkpoint
    ckpt = load_checkpoint(checkpoint)
    fc = FeatureCache(cache)
    diffs = compatible(fc.provenance, ckpt["cache_provenance"])
    if diffs:
        raise RunError(f"{cache} was not extracted like the checkpoint's cache; refusing. What differs:\n  " + "\n  ".join(diffs))
    dev = resolve_device(device)
    model, cfg = model_from_checkpoint(ckpt, dev)
    data = fc.load(split)
    metrics, pred = evaluate_split(model, data, cfg.train.eval_batch_size, dev, ckpt["classes"])
    results = {
        "checkpoint": str(checkpoint),
        "cache": str(cache),
        "epoch": ckpt["epoch"],
        "classes": list(ckpt["classes"]),
        "splits": {split: metrics if metrics is not None else {"n": int(len(data.rows)), "labels": "none: predictions only"}},
    }
    if out is not None:
        path = save_results(out, results, f"{checkpoint} on {split}")
        err_console.print(f"results: {path}", highlight=False)
        if not json_file(out):
            write_predictions(out / f"predictions-{split}.csv", data, pred, ckpt["classes"])
            err_console.print(f"predictions: {out / f'predictions-{split}.csv'}", highlight=False)
    if json_:
        emit_json(results)
    elif metrics is None:
        console.print(f"split {split} has no labels: {len(data.rows)} predictions, no metrics")
    else:
        print_metrics(metrics, f"{checkpoint} on {cache}:{split} (n={metrics['n']})")


def probe(
    cache: Path = typer.Option(..., help="Feature cache."),
    modalities: str = typer.Option("both", help="both, image or text."),
    seed: int = typer.Option(0, min=0, help="Random seed of the solver."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for results.json (every metric, per class, confusion matrix) and confusion-<split>.png; a name ending in .json gets the results alone."
    ),
    json_: bool = typer.Option(False, "--json", help=OUT_JSON_HELP),
) -> None:
    """Baseline: logistic regression on pooled image features + last-layer [CLS], C chosen on dev (scikit-learn, CPU)."""
    from ..stage2.probe import run_probe

    if out is not None:
        check_writable_dir(out.parent if json_file(out) else out, "the results")
    res = run_probe(cache, seed=seed, modalities=modalities)
    results = {"cache": str(cache), **res}
    if out is not None:
        path = save_results(out, results, f"probe C={res['C']}")
        err_console.print(f"results: {path}", highlight=False)
    if json_:
        emit_json(results)
    else:
        console.print(split_table(res["splits"], f"logistic-regression probe on {res['features']}, C={res['C']} (chosen on dev accuracy)"))
