"""``sppscl predict``, ``analyze``, ``report``, ``serve``, ``checkpoint convert`` and ``demo``: using trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import ConfigError
from ..outputs import STDOUT, check_output_file, check_output_folder, check_writable_dir
from .console import ALLOW_DOWNLOAD_HELP, DEVICE_HELP, WHICH_HELP, console, err_console, safe

checkpoint_app = typer.Typer(no_args_is_help=True, help="Checkpoints: convert the .pt files of older sppscl versions.")


def predict(
    checkpoint: list[Path] = typer.Option(
        ...,
        help="A run folder (its best checkpoint, or --which last) or a checkpoint (RUN/best.safetensors; a legacy RUN/best.pt loads too); repeat it to average several "
        "(same encoders and classes) into an ensemble.",
    ),
    image: Optional[Path] = typer.Option(None, help="One pair: its image file (with --text)."),
    text: Optional[str] = typer.Option(None, help="One pair: its text (with --image)."),
    input_: Optional[Path] = typer.Option(
        None, "--input", help="Many pairs: .jsonl or .csv rows with text, image (relative to the file's folder) and optional id."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Write one row per input here (.jsonl or .csv; - writes CSV to standard output, the table to standard error) (default: print a table)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    on_error: str = typer.Option("stop", help="Bad row: 'stop' (error naming line and id) or 'skip' (reported in the output with its error)."),
    batch_size: Optional[int] = typer.Option(
        None, min=1, help="Pairs per encoder batch (default: the checkpoint's extract.batch_size); the heads always run in its eval_batch_size."
    ),
    allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
    which: str = typer.Option("best", "--which", help=WHICH_HELP),
) -> None:
    """Predict new image-text pairs with the encoders that built the checkpoint's cache, then its heads."""
    from ..allocator import keep_freed_memory
    from ..stage1.encoders import allow_downloads
    from ..stage2.predict import ON_ERROR, OUTPUT_SUFFIXES, Pair, Predictor, read_pairs, write_output

    keep_freed_memory()
    single = image is not None or text is not None
    if single == (input_ is not None) or (single and (image is None or text is None)):
        raise ConfigError("give either --image and --text (one pair) or --input (a file of pairs)")
    if on_error not in ON_ERROR:
        raise ConfigError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    to_stdout = out is not None and str(out) == STDOUT
    if out is not None and not to_stdout:
        if out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ConfigError(f"--out {out}: must end in .jsonl or .csv (or - for standard output)")
        # before the encoders load and every pair is predicted; --out names a file: never a device, FIFO or link
        check_output_file(out, "the predictions")
        check_writable_dir(out.parent, "the predictions")
    # with the predictions on standard output, everything else goes to standard error
    show = err_console if to_stdout else console
    pairs = [Pair(image.name, text, image)] if single else read_pairs(input_)
    with allow_downloads(allow_download):
        predictor = Predictor(checkpoint, device, which)
    note = predictor.fusion_note(single)
    if note:
        err_console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    preds = predictor.predict(pairs, on_error, batch_size, str(input_ or ""), progress=not (quiet or single), console=err_console)
    if out is not None:
        write_output(out, preds, predictor.classes)
    classes = predictor.classes
    if single and preds[0].error is None:
        show.print(f"pred: [bold]{safe(preds[0].pred)}[/]")
    t = Table(title=f"predictions of {safe(', '.join(map(str, checkpoint)))}" + (" (mean class probabilities)" if len(checkpoint) > 1 else ""))
    for col in ("id", "pred", *classes, "error"):
        t.add_column(safe(col), justify="right" if col in classes else "left")
    if single or out is None or to_stdout:
        for p in preds:
            probs = [f"{p.probs[c]:.4f}" for c in classes] if p.error is None else [""] * len(classes)
            error = "" if p.error is None else f"line {p.line}: {p.error}" if p.line else p.error
            t.add_row(safe(p.id), safe(p.pred or ""), *probs, safe(error))
        show.print(t)
    failed = sum(p.error is not None for p in preds)
    if out is not None:
        show.print(f"{len(preds) - failed} predictions written to {'standard output' if to_stdout else safe(out)}")
    if failed:
        show.print(f"[yellow]{failed} rows not predicted[/] (their errors are in the output)")


def analyze(
    checkpoint: Path = typer.Option(
        ..., help="A run folder (its best checkpoint, or --which last) or a checkpoint (RUN/best.safetensors; a legacy RUN/best.pt loads too)."
    ),
    cache: Path = typer.Option(..., help="A cache built with the checkpoint's encoders."),
    split: str = typer.Option("dev", help="A labelled split of the cache."),
    out: Optional[Path] = typer.Option(None, help="Folder for analysis.json and the PNGs (default: RUN/analysis-<split>)."),
    compare: Optional[Path] = typer.Option(None, help="A second checkpoint (e.g. an ablation) as the reference, instead of the untrained heads."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    which: str = typer.Option("best", "--which", help=WHICH_HELP + " Also for --compare."),
) -> None:
    """The paper's diagnostics: IID/TTD/ITD same-label distances, t-SNE of the fused features, step-2 firing rate."""
    from ..stage2.analyze import analyze as run_analyze
    from ..stage2.analyze import render_analysis

    if out is not None:
        check_output_folder(out, "the analysis")
    result = run_analyze(checkpoint, cache, split, out, compare, device, which=which)
    render_analysis(result.report, console)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")


@checkpoint_app.command("convert")
def checkpoint_convert(
    checkpoint: Path = typer.Argument(..., help="A .pt checkpoint written by an older sppscl (RUN/best.pt or RUN/last.pt)."),
    out: Optional[Path] = typer.Option(None, help="Checkpoint name to write, without suffix (default: beside it, RUN/best)."),
) -> None:
    """Rewrite an older .pt checkpoint as NAME.safetensors + NAME.json (read with torch's restricted unpickler only)."""
    from ..stage2.checkpoint import convert_checkpoint

    path = convert_checkpoint(checkpoint, out)
    console.print(f"written: {path} and {path.with_suffix('.json')}")



def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo's runs go (replaced on each demo run)."),
    cache: Path = typer.Option(Path("cache/demo.h5"), help="The demo's feature cache."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Epochs per model (default: the demo preset's train.epochs)."),
) -> None:
    """The whole pipeline on an embedded default: synthetic data, offline encoders, SPP-SCL vs text-only vs image-only."""
    from ..allocator import keep_freed_memory
    from ..demo import run_demo

    keep_freed_memory()
    run_demo(out, cache, epochs, console, err_console)


def report(
    paths: list[Path] = typer.Argument(None, help="Run, sweep, cv or reproduce folders; several runs are compared side by side."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write (self-contained: it loads nothing)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="A sweep's study storage, e.g. postgresql://USER@HOST/DB (with --study)."),
    study: Optional[str] = typer.Option(None, "--study", help="With --storage: the study's name; its tables always, curves for the runs reachable here."),
    title: Optional[str] = typer.Option(None, help="The page's title (default: what it shows)."),
) -> None:
    """One self-contained HTML page: the tables (sortable), dev curves per configuration, confusion matrices, seed
    ensembles, references, provenance and commands of runs, a sweep, a cv or a reproduce folder."""
    from ..report import write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out}: must end in .html")
    check_output_file(out, "the report")  # before any work: nothing but a regular file is ever replaced
    check_writable_dir(out.parent, "the report")
    path = write_report(list(paths or []), out, storage, study, title)
    console.print(f"report: {path}", markup=False, highlight=False)


def serve(
    run: Path = typer.Argument(..., help="A run folder (its best checkpoint, or --which last) or a checkpoint file."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_body: int = typer.Option(16 * 1024 * 1024, "--max-body", min=1, help="Largest request body in bytes; larger is answered 413."),
    allow_download: bool = typer.Option(False, "--allow-download", help=ALLOW_DOWNLOAD_HELP),
    which: str = typer.Option("best", "--which", help=WHICH_HELP),
) -> None:
    """Answer predictions over HTTP: POST /predict (one pair), POST /predict/batch, GET /health, GET /model. The
    encoders load once; each request is predicted on its own, exactly as `predict` predicts it."""
    from ..allocator import keep_freed_memory
    from ..serve import create_app, load_model

    keep_freed_memory()
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("sppscl serve needs the 'serve' extra: pip install 'sppscl[serve]'") from None
    model = load_model(run, device, allow_download, which)
    console.print(f"serving {model.checkpoint} on http://{host}:{port} (classes: {', '.join(model.classes)}; fusion {model.fusion})", markup=False, highlight=False)
    uvicorn.run(create_app(run, model=model, max_body=max_body), host=host, port=port, log_level="info")
