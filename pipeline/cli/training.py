"""``sppscl train``, ``evaluate`` and ``probe``: stage two on one cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .banner import DRY_RUN_HELP, print_banner
from .console import DEVICE_HELP, OUT_JSON_HELP, WHICH_HELP, console, emit_json, err_console, json_file, print_metrics, print_results, split_table


def train(
    cache: Path = typer.Option(..., help="Feature cache written by `sppscl extract`."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter, e.g. --set lr=5e-5 --set fusion=sample. Unknown keys are an error."),
    seed: Optional[int] = typer.Option(None, min=0, help="Random seed (preset: train.seed)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (preset: train.device)"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<cache name>-<time>)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, help="No live view and no start banner."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Stage two: train the SPP-SCL heads from the cache, select on dev, evaluate the best checkpoint, write the model card."""
    from ..api import train as run_train
    from ..api import train_config

    if not quiet or dry_run:
        cfg = train_config(cache, config, set_, seed, device)
        base = cfg if resume else train_config(cache, config)
        where = out if out is not None else Path("runs") / f"{cache.stem}-<date>-<time>"
        print_banner(err_console, cache, cfg, base, where, "train" + (" --resume (the run's own configuration)" if resume else ""))
        if dry_run:
            console.print(f"dry run: would train one run of {cfg.train.epochs} epochs (seed {cfg.train.seed}) into {where}; nothing written", markup=False, highlight=False)
            return
    run = run_train(cache, out, config=config, overrides=set_, seed=seed, device=device, resume=resume, progress=not quiet, console=err_console)
    console.print(f"run directory: {run.path}", markup=False, highlight=False)
    print_results(run.results)
    console.print(f"model card: {run.model_card}", markup=False, highlight=False, soft_wrap=True)



def evaluate(
    checkpoint: Path = typer.Option(
        ..., help="A run folder (its best checkpoint, or --which last) or a checkpoint (RUN/best.safetensors, RUN/last.safetensors; a legacy RUN/best.pt loads too)."
    ),
    cache: Path = typer.Option(..., help="A cache built with the checkpoint's encoders."),
    split: str = typer.Option("test", help="Split to evaluate."),
    out: Optional[Path] = typer.Option(
        None,
        help="Folder for results.json (every metric, per class, confusion matrix), predictions-<split>.csv and confusion-<split>.png; "
        "a name ending in .json gets the results alone.",
    ),
    json_: bool = typer.Option(False, "--json", help=OUT_JSON_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    which: str = typer.Option("best", "--which", help=WHICH_HELP),
) -> None:
    """Evaluate a checkpoint on one split of a matching cache (metrics if labelled, predictions always)."""
    from ..api import evaluate as run_evaluate

    results = run_evaluate(checkpoint, cache, split, which=which, out=out, device=device)
    metrics = results["splits"][split]
    if out is not None:
        err_console.print(f"results: {out if json_file(out) else out / 'results.json'}", markup=False, highlight=False)
        if not json_file(out):
            err_console.print(f"predictions: {out / f'predictions-{split}.csv'}", markup=False, highlight=False)
    if json_:
        emit_json(results)
    elif "accuracy" not in metrics:
        console.print(f"split {split} has no labels: {metrics['n']} predictions, no metrics", markup=False, highlight=False)
    else:
        print_metrics(metrics, f"{results['checkpoint']} on {cache}:{split} (n={metrics['n']})")


def probe(
    cache: Path = typer.Option(..., help="Feature cache."),
    modalities: str = typer.Option("both", help="both, image or text."),
    seed: int = typer.Option(0, min=0, help="Random seed of the solver."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for results.json (every metric, per class, confusion matrix) and confusion-<split>.png; a name ending in .json gets the results alone."
    ),
    json_: bool = typer.Option(False, "--json", help=OUT_JSON_HELP),
) -> None:
    """Baseline: logistic regression on pooled image features + last-layer [CLS], C chosen on dev (scikit-learn, CPU).

    The result (both modalities) is also recorded beside the cache as <cache stem>.probe.json, where `sppscl train`
    on that cache finds it and prints the probe's dev accuracy beside its own."""
    from ..api import probe as run_probe

    results = run_probe(cache, modalities=modalities, seed=seed, out=out)
    if out is not None:
        err_console.print(f"results: {out if json_file(out) else out / 'results.json'}", markup=False, highlight=False)
    if results["probe_record"]:
        err_console.print(f"recorded beside the cache for `sppscl train`: {results['probe_record']}", markup=False, highlight=False)
    if json_:
        emit_json(results)
    else:
        console.print(split_table(results["splits"], f"logistic-regression probe on {results['features']}, C={results['C']} (chosen on dev accuracy)"))
