"""The ``sppscl`` command: a thin layer over stage one and stage two.

Every command takes an explicit argument list through ``main(argv)``, so tests run the real paths.
Errors are handled in one place, ``main``: an error the user can act on (bad data, options, ``--set`` values,
output locations, a full disk) prints one line naming the file/row/id/key and what to do, never a traceback;
``--debug`` or ``SPPSCL_DEBUG=1`` adds the traceback. Exit codes: 0 done; 1 the run failed (full disk,
problems found by ``data verify``, failed sweep runs, an internal error); 2 the command cannot run as
given (bad input, option or output location); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_cache import cache_app
from .config import CONFIG_DIR, STAGE_SECTIONS, Config, ConfigError, apply_overrides, load_config
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, SppsclError, atomic_write, check_writable_dir, disk_full, is_disk_full
from .presets import app as presets_app

# one default for sweep and reproduce: every mean they print is over the same three seeds unless told otherwise
DEFAULT_SEEDS = "1,2,3"
DEVICE_HELP = "cpu, cuda, cuda:N or auto (the GPU when there is one)."

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SPP-SCL image-text sentiment analysis: extract frozen features once (stage one), train the heads from the cache (stage two).",
    epilog="Exit codes: 0 done, 1 the run failed (full disk, problems found, failed runs), 2 bad input, option or output location, "
    "130 interrupted. --debug (or SPPSCL_DEBUG=1) shows the traceback of an error.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and check datasets before extraction.")
app.add_typer(data_app, name="data")
app.add_typer(presets_app, name="presets")
checkpoint_app = typer.Typer(no_args_is_help=True, help="Checkpoints: convert the .pt files of older sppscl versions.")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(cache_app, name="cache")
console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)


# set by --debug (or SPPSCL_DEBUG=1): errors then show their traceback too
_debug = False


def _config(config: Optional[str], sets: list[str], command: str = "extract", **section_overrides) -> Config:
    """A stage-one configuration: --set keys resolve among the dataset, encoders and extract sections only."""
    cfg = load_config(config or "demo", sets, STAGE_SECTIONS["extract"], command)
    extra = {k: v for k, v in section_overrides.items() if v is not None}
    return apply_overrides(cfg, extra) if extra else cfg


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (also SPPSCL_DEBUG=1)."),
) -> None:
    global _debug
    _debug = _debug or debug
    if version:
        console.print(f"sppscl {__version__}")
        raise typer.Exit()


# ----------------------------------------------------------------------------------- stage one

DATA_DIR_HELP = (
    "Dataset folder (relative to the current directory); overrides the preset's data_dir. "
    "The public layouts (CLMLF files, HFM's and MVSA's releases) are recognised: README, Datasets."
)
ALLOW_DOWNLOAD_HELP = "Let missing encoder weights download (torchvision, Hugging Face hub); also SPPSCL_ALLOW_DOWNLOAD=1."


@data_app.command("verify")
def data_verify(
    config: str = typer.Option(..., "--config", "-c", help="Preset name (hfm, mvsa-single, ...) or a YAML file."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    no_images: bool = typer.Option(False, "--no-images", help="Skip decoding images (checks files exist only if not set)."),
    workers: int = typer.Option(2, min=1, help="Image-decoding workers (threads here, processes in extract: the same job)."),
    set_: list[str] = typer.Option([], "--set", help="Override a dataset/encoders/extract key, as for extract, e.g. --set dataset.hfm_keyword_filter=false."),
) -> None:
    """Check a dataset without extracting: decodable images, non-empty texts, ids unique across all splits, known labels."""
    from .stage1.adapters import load_samples
    from .stage1.verify import verify_samples

    cfg = _config(config, set_, "data verify")
    report = load_samples(cfg, data_dir)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    for reason, ids in report.dropped.items():
        console.print(f"[yellow]dropped by the adapter:[/] {len(ids)} rows ({reason})")
    result = verify_samples(
        report.samples, len(cfg.dataset.classes), check_images=not no_images, workers=workers, progress=True,
        load_report=report, data_dir=cfg.data_dir(data_dir),
    )
    result.render(console)
    if not result.ok:
        raise typer.Exit(code=1)


@app.command()
def extract(
    config: str = typer.Option(..., "--config", "-c", help="Preset name or YAML file (data location, encoders)."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    out: Optional[Path] = typer.Option(None, help="Cache file to write (default: cache/<dataset>.h5)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (preset: extract.device)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Samples per encoder batch (preset: extract.batch_size)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N samples of each split (quick trials)."),
    on_error: str = typer.Option("stop", help="Bad sample: 'stop' (error naming file and id) or 'skip' (recorded in the cache, counted)."),
    force: bool = typer.Option(False, help="Rebuild even if a complete or different cache exists at --out."),
    workers: Optional[int] = typer.Option(
        None, min=-1, help="Image-decoding worker processes (preset: extract.num_workers; -1 = auto: 2 on CPU, cores-1 up to 8 on CUDA)."
    ),
    precision: Optional[str] = typer.Option(
        None, help="Encoder compute precision: fp32 (default), bf16 or fp16 (autocast; recorded in the cache, never mixed)."
    ),
    image_encoder: Optional[str] = typer.Option(None, help="Image encoder name or path (resnet50, efficientnet-lite0, tiny-cnn, any torchvision CNN, a .pth)."),
    text_encoder: Optional[str] = typer.Option(None, help="Text encoder name or path (bert-base-uncased, minilm-l6, tiny-bert, any HF name or local dir)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a dataset/encoders/extract key, e.g. --set max_length=128 (bare keys resolve among these; train keys are an error)."
    ),
    allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
    shard: Optional[str] = typer.Option(
        None, help="I/N: write only shard I of N of the rows to --out (machines without a shared filesystem); join them with `sppscl cache merge`."
    ),
) -> None:
    """Stage one: run the frozen encoders once and write the HDF5 feature cache (resumable).

    Under torchrun (--nproc-per-node, --nnodes) the ranks fill one cache together."""
    from .allocator import keep_freed_memory
    from .stage1.distributed import PeerFailed, Ranks, Shard
    from .stage1.encoders import allow_downloads
    from .stage1.extract import extract as run_extract

    # the commands that run the encoders set the allocator up first (README, performance notes); train does not
    keep_freed_memory()
    ranks = Ranks.from_env()
    console.quiet = not ranks.is_zero  # one report per job: rank 0's
    try:
        cfg = _config(config, set_, **{"encoders.image": image_encoder, "encoders.text": text_encoder, "extract.precision": precision})
        out = out or Path("cache") / f"{cfg.dataset.name}.h5"
        part = Shard.parse(shard) if shard else None
        with allow_downloads(allow_download):
            s = run_extract(
                cfg, out, data_dir, device, batch_size, limit, on_error, force, workers, progress=not quiet, console=err_console, shard=part
            )
    except BaseException as e:  # noqa: BLE001 - under torchrun, say which rank failed (main() handles a single process)
        if not ranks.distributed:
            raise
        if isinstance(e, PeerFailed) and not ranks.is_zero:
            raise typer.Exit(code=EXIT_FAILED) from None  # one message per failure: the failing rank's, or rank 0's
        code, message = error_exit(e)
        err_console.print(f"[bold red]error:[/] {escape(ranks.label() + message)}", markup=True, highlight=False)
        raise typer.Exit(code=code) from None
    _print_extract_summary(s)


def rows_table(rows: dict[str, int], title: str) -> Table:
    """Rows per split of a cache (extract, cache merge)."""
    t = Table(title=title)
    t.add_column("split")
    t.add_column("rows", justify="right")
    for split, n in rows.items():
        t.add_row(split, str(n))
    return t


def _print_extract_summary(s) -> None:
    for note in s.notes:
        console.print(f"[yellow]note:[/] {note}")
    if s.status == "up-to-date":
        console.print(f"{s.path} is complete and matches this request: nothing to do (use --force to rebuild).")
    console.print(rows_table(s.rows, f"cache {s.path} ({s.status})"))
    if s.dropped_by_adapter:
        for reason, n in s.dropped_by_adapter.items():
            console.print(f"dropped by the adapter: {n} ({reason})")
    if s.skipped:
        console.print(f"[yellow]skipped {len(s.skipped)} samples[/] (recorded in the cache under /skipped):")
        for split, sid, reason in s.skipped[:20]:
            console.print(f"  {split} {sid}: {reason}")
        if len(s.skipped) > 20:
            console.print(f"  ... and {len(s.skipped) - 20} more")
    if s.samples_encoded:
        console.print(f"encoded {s.samples_encoded} samples in {s.seconds:.1f}s ({s.samples_per_second:.1f} samples/s)")
    console.print(f"file size {s.file_bytes / 1e6:.1f} MB, {s.bytes_per_sample / 1e3:.1f} KB per sample")


# ----------------------------------------------------------------------------------- stage two


def _train_config(cache: Path, config: Optional[str], sets: list[str], seed: Optional[int], device: Optional[str] = None, command: str = "train") -> Config:
    """The preset given, else the one named after the cache's dataset, else defaults; then --set overrides (train keys only)."""
    from .cache import FeatureCache

    if config is None:
        name = FeatureCache(cache).provenance["dataset"]["name"]
        config = name if (CONFIG_DIR / f"{name}.yaml").exists() else None
    cfg = load_config(config) if config else Config()
    if seed is not None:
        sets = [*sets, f"seed={seed}"]
    if device is not None:
        sets = [*sets, f"device={device}"]
    return apply_overrides(cfg, sets, STAGE_SECTIONS["train"], command)



@app.command()
def train(
    cache: Path = typer.Option(..., help="Feature cache written by `sppscl extract`."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter, e.g. --set lr=5e-5 --set fusion=sample. Unknown keys are an error."),
    seed: Optional[int] = typer.Option(None, min=0, help="Random seed (preset: train.seed)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (preset: train.device)"),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<cache name>-<time>)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, help="No live view."),
) -> None:
    """Stage two: train the SPP-SCL heads from the cache, select on dev, evaluate the best checkpoint."""
    from .stage2.train import train as run_train

    if resume and out is None:
        raise ConfigError("--resume needs --out naming the run directory to continue")
    cfg = _train_config(cache, config, set_, seed, device)
    out = out or Path("runs") / f"{cache.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    # on --resume these may only change what keeps it one run (more epochs, threads, device); the rest is refused
    overrides = [*set_, *([f"seed={seed}"] if seed is not None else []), *([f"device={device}"] if device is not None else [])]
    results = run_train(
        cache, cfg, out, resume=resume, progress=not quiet, console=err_console, resume_overrides=overrides, resume_preset=config
    )
    console.print(f"run directory: {out}")
    print_results(results)


def print_results(results: dict, title: str = "best checkpoint") -> None:
    console.print(split_table(results["splits"], f"{title} (epoch {results['best_epoch']}, selected on dev accuracy)"))


def split_table(splits: dict[str, dict], title: str | None = None) -> Table:
    """Accuracy and F1 per split; an unlabelled split shows as predictions only."""
    t = Table(title=title)
    for col in ("split", "n", "accuracy", "weighted F1", "macro F1"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for name, m in splits.items():
        if "accuracy" in m:
            t.add_row(name, str(m["n"]), f"{m['accuracy']:.4f}", f"{m['weighted_f1']:.4f}", f"{m['macro_f1']:.4f}")
        else:
            t.add_row(name, str(m["n"]), "-", "-", "predictions only")
    return t


def _emit_json(obj: dict) -> None:
    """Machine-readable results: one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def save_results(out: Path, results: dict, what: str) -> Path:
    """``out`` ending in .json: the results there, alone. Otherwise ``out`` is a folder: results.json and a
    confusion-<split>.png per labelled split. Returns the JSON's path."""
    from .stage2.plots import plot_confusions

    path = out if _json_file(out) else out / "results.json"
    atomic_write(path, json.dumps(results, indent=2), "the results")
    if not _json_file(out):
        plot_confusions(results["splits"], results["classes"], out, what)
    return path


def _json_file(out: Path) -> bool:
    return out.suffix.lower() == ".json"


def _print_metrics(metrics: dict, title: str) -> None:
    t = Table(title=title)
    for c in ("accuracy", "weighted F1", "macro F1"):
        t.add_column(c, justify="right")
    t.add_row(f"{metrics['accuracy']:.4f}", f"{metrics['weighted_f1']:.4f}", f"{metrics['macro_f1']:.4f}")
    console.print(t)
    pc = Table(title="per class")
    for c in ("class", "precision", "recall", "F1", "support"):
        pc.add_column(c)
    for name, v in metrics["per_class"].items():
        pc.add_row(name, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"]))
    console.print(pc)
    console.print(f"confusion matrix (rows true, columns predicted): {metrics['confusion_matrix']}")


OUT_JSON_HELP = "Print the results as one JSON document on stdout (and nothing else there)."


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="A checkpoint (RUN/best.safetensors or RUN/last.safetensors; a legacy RUN/best.pt loads too)."),
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
    from .cache import FeatureCache
    from .devices import resolve_device
    from .stage2.train import RunError, compatible, evaluate_split, load_checkpoint, model_from_checkpoint, write_predictions

    if out is not None:
        check_writable_dir(out.parent if _json_file(out) else out, "the results")
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
        if not _json_file(out):
            write_predictions(out / f"predictions-{split}.csv", data, pred, ckpt["classes"])
            err_console.print(f"predictions: {out / f'predictions-{split}.csv'}", highlight=False)
    if json_:
        _emit_json(results)
    elif metrics is None:
        console.print(f"split {split} has no labels: {len(data.rows)} predictions, no metrics")
    else:
        _print_metrics(metrics, f"{checkpoint} on {cache}:{split} (n={metrics['n']})")


@app.command()
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
    from .stage2.probe import run_probe

    if out is not None:
        check_writable_dir(out.parent if _json_file(out) else out, "the results")
    res = run_probe(cache, seed=seed, modalities=modalities)
    results = {"cache": str(cache), **res}
    if out is not None:
        path = save_results(out, results, f"probe C={res['C']}")
        err_console.print(f"results: {path}", highlight=False)
    if json_:
        _emit_json(results)
    else:
        console.print(split_table(res["splits"], f"logistic-regression probe on {res['features']}, C={res['C']} (chosen on dev accuracy)"))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo's runs go (replaced on each demo run)."),
    cache: Path = typer.Option(Path("cache/demo.h5"), help="The demo's feature cache."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs per model (default: the demo preset's train.epochs)."),
) -> None:
    """The whole pipeline on an embedded default: synthetic data, offline encoders, SPP-SCL vs text-only vs image-only."""
    from .allocator import keep_freed_memory
    from .demo import run_demo

    keep_freed_memory()
    run_demo(out, cache, epochs, console, err_console)


# ----------------------------------------------------------------------------------- sweeps and paper tables (issue 4)


sweep_app = typer.Typer(
    no_args_is_help=False,
    help="Many stage-two runs from one cache: a grid or a random/TPE search, x seeds, resumable; tables mean ± std over seeds.",
)
app.add_typer(sweep_app, name="sweep")

STORAGE_HELP = "A shared Optuna study storage, e.g. postgresql://USER@HOST/DB: any number of machines run the same command, each run trains once."


@sweep_app.callback(invoke_without_command=True)
def sweep(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Option(None, help="Feature cache written by `sppscl extract` (read once per worker)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a base hyperparameter for every run, e.g. --set epochs=50."),
    grid: list[str] = typer.Option([], "--grid", help="A swept key and its values, e.g. --grid lr=1e-4,5e-5 (repeat for more keys: every combination runs)."),
    random_: Optional[int] = typer.Option(None, "--random", min=1, help="Instead of a grid: N configurations drawn by an Optuna study over --space."),
    space: list[str] = typer.Option([], "--space", help="A search dimension for --random: key=low:high, key=low:high:log or key=a,b,c."),
    sampler: str = typer.Option("tpe", help="Optuna sampler for --random: random or tpe."),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds, each configuration runs once per seed (the same default as reproduce)."),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", min=1, help="Parallel runs on this machine (default: min(runs, cores), or devices x --runs-per-device; each gets cores/jobs threads; 1 runs in this process)."
    ),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Place the parallel runs round-robin on these devices: cuda:0,cuda:1,... or all (overrides --device)."),
    runs_per_device: int = typer.Option(1, "--runs-per-device", min=1, help="With --devices: concurrent runs per device; small stage-two runs share a GPU well."),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    study: Optional[str] = typer.Option(None, "--study", help="With --storage: the study's name (the same on every machine)."),
    heartbeat: int = typer.Option(10, "--heartbeat", min=1, help="With --storage: seconds between a running trial's heartbeats; a trial silent for 4 beats is run again elsewhere."),
    out: Optional[Path] = typer.Option(None, help="Sweep directory (default: sweeps/<cache name>-<hash of the sweep's definition>, or sweeps/<study> with --study)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Many stage-two runs from one cache: a grid or a random/TPE search, x seeds, resumable; tables mean ± std over seeds."""
    if ctx.invoked_subcommand is not None:
        return
    from .stage2.ensemble import ensemble_table, seed_ensembles, write_ensemble_summary
    from .stage2.sweeps import Execution, default_sweep_dir, parse_devices, parse_seeds, print_summary
    from .stage2.sweeps import sweep as run_sweep

    if cache is None:
        raise ConfigError("sppscl sweep needs --cache (or: sppscl sweep summary ... for the tables of a finished sweep)")
    cfg = _train_config(cache, config, set_, None, device, "sweep")
    execution = Execution(jobs, parse_devices(devices), runs_per_device, storage, study, heartbeat)
    out = out or (Path("sweeps") / study if study else default_sweep_dir(cache, config, set_, grid, space, random_, sampler))
    console.print(f"sweep directory: {out}" + (f" (study {study} in {storage})" if storage else ""))
    result = run_sweep(cache, cfg, out, grid, space, random_, sampler, parse_seeds(seeds), execution, progress=not quiet, console=err_console)
    ensembles = seed_ensembles(result, cache, out / "ensembles")
    write_ensemble_summary(out, result, ensembles)
    print_summary(result, console)
    if ensembles:
        head, body = ensemble_table(result, ensembles)
        t = Table(title="ensemble of each configuration's seeds, beside the mean ± std of those runs")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < len(result.keys or ["config"]) + 1 else "right")
        for b in body:
            t.add_row(*[escape(x) for x in b])
        console.print(t)
    if result.failed:
        raise typer.Exit(code=1)


@sweep_app.command("summary")
def sweep_summary(
    out: Optional[Path] = typer.Option(None, help="The sweep folder (its local study), or where to write the tables of a --storage study (default: sweeps/<study>)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The study storage the sweep ran against, e.g. postgresql://USER@HOST/DB."),
    study: Optional[str] = typer.Option(None, "--study", help="The study's name (needed with --storage, or when a folder holds several)."),
) -> None:
    """The tables of a sweep from its study, on any machine: runs.csv, summary.csv, summary.md, and the table printed."""
    from .stage2.sweeps import print_summary, summary

    if out is None and (storage is None or study is None):
        raise ConfigError("give the sweep folder (--out), or --storage and --study")
    result = summary(out or Path("sweeps") / study, storage, study)
    print_summary(result, console, trained=False)
    if result.failed:
        raise typer.Exit(code=1)


@app.command()
def reproduce(
    table: str = typer.Argument(..., help="table4 (two-step vs one-step), table5 (loss ablation), table6 (HA layers), table7 (CMF vs concat) or fig5 (α)."),
    cache: Path = typer.Option(..., help="Feature cache; its dataset picks the paper's column (mvsa-single, mvsa-multiple, hfm)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a base hyperparameter for every run, e.g. --set epochs=50."),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds; every number printed is a mean over them (the same default as sweep)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel runs (default: min(runs, cores); each gets cores/jobs threads; 1 runs in this process)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    out: Optional[Path] = typer.Option(None, help="Directory shared by all tables of one cache (default: sweeps/<cache name>-paper)."),
    cv: Optional[int] = typer.Option(None, "--cv", help="K: fill the table with K-fold cross-validated estimates over the labelled train+dev rows."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """A paper ablation (Tables 4-7, Fig. 5) on this cache, in the paper's layout with the paper's numbers beside ours."""
    from .stage2.reproduce import print_reproduction
    from .stage2.reproduce import reproduce as run_reproduce
    from .stage2.sweeps import Execution, default_sweep_dir, parse_seeds

    cfg = _train_config(cache, config, set_, None, device, "reproduce")
    # another base configuration gets its own directory, so runs of different bases never mix
    out = out or (Path("sweeps") / f"{cache.stem}-paper" if not (config or set_) else default_sweep_dir(cache, "paper", config, set_))
    console.print(f"reproduce directory: {out}")
    rep = run_reproduce(table, cache, cfg, out, parse_seeds(seeds), Execution(jobs), progress=not quiet, console=err_console, cv=cv)
    print_reproduction(rep, console)
    if rep.sweep.failed:
        raise typer.Exit(code=1)


@app.command()
def cv(
    cache: Path = typer.Option(..., help="Feature cache; its labelled train+dev rows are split into folds (its test split is never read)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter for every run, e.g. --set epochs=20 --set patience=5."),
    folds: int = typer.Option(5, help="K: stratified folds over the labelled train+dev rows."),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds per fold (the same default as sweep); 2+ adds seed ensembles."),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", "--workers", help="Parallel runs (default: min(runs, cores); each gets cores/jobs threads; 1 runs in this process)."
    ),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    out: Optional[Path] = typer.Option(None, help="CV directory (default: sweeps/<cache name>-cv<K>-<hash>); rerun the same command to resume."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Cross-validated estimate: K folds x seeds, each selected on a validation part of its training folds and scored on
    the held-out fold; mean ± std, seed ensembles, and the probe on the same folds."""
    from .stage2.cv import cross_validate, print_cv
    from .stage2.sweeps import Execution, default_sweep_dir, parse_seeds

    cfg = _train_config(cache, config, set_, None, device, "cv")
    # seeds are not part of the name: rerunning with more seeds reuses the finished ones
    d = default_sweep_dir(cache, "cv", folds, config, set_)
    out = out or d.with_name(f"{cache.stem}-cv{folds}-{d.name.rsplit('-', 1)[1]}")
    console.print(f"cv directory: {out}")
    result = cross_validate(cache, cfg, out, folds, parse_seeds(seeds), execution=Execution(jobs), progress=not quiet, console=err_console)
    print_cv(result, console)
    if result.sweep.failed:
        raise typer.Exit(code=1)


@app.command()
def ensemble(
    runs: list[Path] = typer.Argument(..., help="Run directories (their best checkpoint) or checkpoint files; same encoders and classes."),
    cache: Path = typer.Option(..., help="A cache extracted like the members' (for CV runs: the same cache, evaluated on their fold)."),
    out: Optional[Path] = typer.Option(None, help="Write results.json and predictions-<split>.csv here."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Average the class probabilities of several runs; metrics on every labelled split, predictions for every split."""
    from .stage2.ensemble import ensemble as run_ensemble

    res = run_ensemble(runs, cache, out, device)
    console.print(split_table(res["splits"], f"ensemble of {len(res['members'])} runs (mean class probabilities)"))
    single = Table(title="the members alone: mean ± std")
    for col in ("split", "accuracy", "weighted F1", "macro F1"):
        single.add_column(col, justify="right" if col != "split" else "left")
    for name, m in res["members_mean"].items():
        single.add_row(name, *[f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in ("accuracy", "weighted_f1", "macro_f1")])
    console.print(single)
    if "cv" in res:
        cvd = res["cv"]
        console.print(f"cross-validation fold {cvd['fold']} of {cvd['folds']}: " + "; ".join(f"{k} = {v}" for k, v in cvd["splits"].items()), highlight=False)
    if out is not None:
        console.print(f"written: {out / 'results.json'}, {out}/predictions-<split>.csv")


# ----------------------------------------------------------------------------------- predict and analyze (issue 5)


@app.command()
def predict(
    checkpoint: list[Path] = typer.Option(
        ...,
        help="A checkpoint (RUN/best.safetensors; a legacy RUN/best.pt loads too); repeat it to average several "
        "(same encoders and classes) into an ensemble.",
    ),
    image: Optional[Path] = typer.Option(None, help="One pair: its image file (with --text)."),
    text: Optional[str] = typer.Option(None, help="One pair: its text (with --image)."),
    input_: Optional[Path] = typer.Option(
        None, "--input", help="Many pairs: .jsonl or .csv rows with text, image (relative to the file's folder) and optional id."
    ),
    out: Optional[Path] = typer.Option(None, help="Write one row per input here (.jsonl or .csv) (default: print a table)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    on_error: str = typer.Option("stop", help="Bad row: 'stop' (error naming line and id) or 'skip' (reported in the output with its error)."),
    batch_size: Optional[int] = typer.Option(
        None, min=1, help="Pairs per encoder batch (default: the checkpoint's extract.batch_size); the heads always run in its eval_batch_size."
    ),
    allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Predict new image-text pairs with the encoders that built the checkpoint's cache, then its heads."""
    from .allocator import keep_freed_memory
    from .stage1.encoders import allow_downloads
    from .stage2.predict import ON_ERROR, OUTPUT_SUFFIXES, Pair, Predictor, read_pairs, write_output

    keep_freed_memory()
    single = image is not None or text is not None
    if single == (input_ is not None) or (single and (image is None or text is None)):
        raise ConfigError("give either --image and --text (one pair) or --input (a file of pairs)")
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if out is not None and out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out}: must end in .jsonl or .csv")
    if out is not None:
        # before the encoders load and every pair is predicted
        check_writable_dir(out.parent, "the predictions")
    pairs = [Pair(image.name, text, image)] if single else read_pairs(input_)
    with allow_downloads(allow_download):
        predictor = Predictor(checkpoint, device)
    note = predictor.fusion_note(single)
    if note:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    preds = predictor.predict(pairs, on_error, batch_size, str(input_ or ""), progress=not (quiet or single), console=err_console)
    if out is not None:
        write_output(out, preds, predictor.classes)
    from rich.markup import escape

    classes = predictor.classes
    if single and preds[0].error is None:
        console.print(f"pred: [bold]{preds[0].label}[/]")
    t = Table(title=f"predictions of {', '.join(map(str, checkpoint))}" + (" (mean class probabilities)" if len(checkpoint) > 1 else ""))
    for col in ("id", "pred", *classes, "error"):
        t.add_column(col, justify="right" if col in classes else "left")
    if single or out is None:
        for p in preds:
            probs = [f"{x:.4f}" for x in p.probs] if p.error is None else [""] * len(classes)
            error = "" if p.error is None else f"line {p.line}: {p.error}" if p.line else p.error
            t.add_row(escape(p.id), p.label or "", *probs, escape(error))
        console.print(t)
    failed = sum(p.error is not None for p in preds)
    if out is not None:
        console.print(f"{len(preds) - failed} predictions written to {out}")
    if failed:
        console.print(f"[yellow]{failed} rows not predicted[/] (their errors are in the output)")


@app.command()
def analyze(
    checkpoint: Path = typer.Option(..., help="A checkpoint (RUN/best.safetensors; a legacy RUN/best.pt loads too)."),
    cache: Path = typer.Option(..., help="A cache built with the checkpoint's encoders."),
    split: str = typer.Option("dev", help="A labelled split of the cache."),
    out: Optional[Path] = typer.Option(None, help="Folder for analysis.json and the PNGs (default: RUN/analysis-<split>)."),
    compare: Optional[Path] = typer.Option(None, help="A second checkpoint (e.g. an ablation) as the reference, instead of the untrained heads."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The paper's diagnostics: IID/TTD/ITD same-label distances, t-SNE of the fused features, step-2 firing rate."""
    from .stage2.analyze import analyze as run_analyze
    from .stage2.analyze import render_analysis

    result = run_analyze(checkpoint, cache, split, out, compare, device)
    from rich.markup import escape

    render_analysis(result.report, console)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")


@checkpoint_app.command("convert")
def checkpoint_convert(
    checkpoint: Path = typer.Argument(..., help="A .pt checkpoint written by an older sppscl (RUN/best.pt or RUN/last.pt)."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint name to write, without suffix (default: beside it, RUN/best)."),
) -> None:
    """Rewrite an older .pt checkpoint as NAME.safetensors + NAME.json (read with torch's restricted unpickler only)."""
    from .stage2.checkpoint import convert_checkpoint

    path = convert_checkpoint(checkpoint, out)
    console.print(f"written: {path} and {path.with_suffix('.json')}")


INTERRUPTED = "interrupted; what was written is kept: rerun the same command to resume (train: add --resume)"


def error_exit(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the top of a command."""
    if isinstance(e, SppsclError):
        return e.exit_code, str(e)
    if isinstance(e, (KeyboardInterrupt, typer.Abort)):
        return EXIT_INTERRUPTED, INTERRUPTED
    if isinstance(e, OSError):
        if is_disk_full(e):
            where = Path(e.filename) if e.filename else Path.cwd()
            return EXIT_FAILED, str(disk_full(where, None, "rerun the same command to resume"))
        if e.filename is not None:
            # a file a library opened for the command (input or output) without naming it in a project error
            return EXIT_USAGE, f"{e.filename}: {e.strerror}. Check the path and its permissions."
        return EXIT_FAILED, f"{e}. Check the files the command reads and writes."
    if isinstance(e, MemoryError):
        return EXIT_FAILED, "out of memory. Lower --batch-size, or set SPPSCL_MEMORY_BUDGET to stream caches from disk."
    return EXIT_FAILED, f"internal error ({type(e).__name__}: {e}). This is a bug: rerun with --debug and report the traceback."


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on an explicit argument list; returns the exit code (for tests and ``python -m sppscl``).

    The one place where errors become messages and exit codes (see the module docstring).
    """
    global _debug
    _debug = os.environ.get("SPPSCL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    try:
        # in non-standalone mode click returns an Exit's code instead of raising it
        code = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED if e.code else 0
    except typer.TyperException as e:  # usage errors: unknown option, bad type or range, missing value
        if hasattr(e, "show"):
            e.show()
        else:
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - the one place every other error becomes a message
        if _debug:
            traceback.print_exc()
        code, message = error_exit(e)
        err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
        return code
    if code == EXIT_INTERRUPTED:
        # typer turns Ctrl-C into this code itself, silently
        err_console.print(f"[bold red]error:[/] {INTERRUPTED}", highlight=False)
    return code if isinstance(code, int) else 0


def run() -> None:
    """The ``sppscl`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
