"""``sppscl data verify`` and ``sppscl extract``: stage one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .console import ALLOW_DOWNLOAD_HELP, DEVICE_HELP, console, err_console, error_exit, rows_table
from .options import stage1_config
from ..errors import EXIT_FAILED, safe

DATA_DIR_HELP = (
    "Dataset folder (relative to the current directory); overrides the preset's data_dir. "
    "The public layouts (CLMLF files, HFM's and MVSA's releases) are recognised: docs/datasets.md."
)

data_app = typer.Typer(no_args_is_help=True, help="Inspect and check datasets before extraction.")


@data_app.command("verify")
def data_verify(
    config: str = typer.Option(..., "--config", "-c", help="Preset name (hfm, mvsa-single, ...) or a YAML file."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    no_images: bool = typer.Option(False, "--no-images", help="Skip decoding images (checks files exist only if not set)."),
    workers: int = typer.Option(2, min=1, help="Image-decoding workers (threads here, processes in extract: the same job)."),
    set_: list[str] = typer.Option([], "--set", help="Override a dataset/encoders/extract key, as for extract, e.g. --set dataset.hfm_keyword_filter=false."),
) -> None:
    """Check a dataset without extracting: decodable images, non-empty texts, ids unique across all splits, known labels."""
    from ..stage1.adapters import load_samples
    from ..stage1.verify import verify_samples

    cfg = stage1_config(config, set_, "data verify")
    report = load_samples(cfg, data_dir)
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    for reason, ids in report.dropped.items():
        console.print(f"[yellow]dropped by the adapter:[/] {len(ids)} rows ({safe(reason)})", highlight=False)
    result = verify_samples(
        report.samples, len(cfg.dataset.classes), check_images=not no_images, workers=workers, progress=True,
        load_report=report, data_dir=cfg.data_dir(data_dir),
    )
    result.render(console)
    if not result.ok:
        raise typer.Exit(code=1)


def extract(
    config: str = typer.Option(..., "--config", "-c", help="Preset name or YAML file (data location, encoders)."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    out: Optional[Path] = typer.Option(None, help="Cache file to write (default: cache/<dataset>.h5)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " (preset: extract.device)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Samples per encoder batch (preset: extract.batch_size)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most N samples of each split, drawn stratified by label with a fixed seed (quick trials; recorded in the cache)."),
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
    from ..allocator import keep_freed_memory
    from ..api import extract as run_extract
    from ..stage1.distributed import PeerFailed, Ranks

    # the commands that run the encoders set the allocator up first (docs/performance.md); train does not
    keep_freed_memory()
    ranks = Ranks.from_env()
    console.quiet = not ranks.is_zero  # one report per job: rank 0's
    try:
        s = run_extract(
            config, out, overrides=set_, data_dir=data_dir, limit=limit, device=device, batch_size=batch_size, on_error=on_error, force=force,
            workers=workers, precision=precision, image_encoder=image_encoder, text_encoder=text_encoder, allow_download=allow_download,
            progress=not quiet, console=err_console, shard=shard,
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



def _print_extract_summary(s) -> None:
    for note in s.notes:
        err_console.print(f"[yellow]note:[/] {safe(note)}", highlight=False)
    for warning in s.warnings:
        err_console.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False)
    if s.status == "up-to-date":
        console.print(f"{s.path} is complete and matches this request: nothing to do (use --force to rebuild).", markup=False, highlight=False)
    console.print(rows_table(s.rows, f"cache {safe(s.path)} ({s.status})"))
    if s.dropped_by_adapter:
        for reason, n in s.dropped_by_adapter.items():
            console.print(f"dropped by the adapter: {n} ({reason})", markup=False, highlight=False)
    if s.skipped:
        console.print(f"[yellow]skipped {len(s.skipped)} samples[/] (recorded in the cache under /skipped):")
        for split, sid, reason in s.skipped[:20]:
            console.print(f"  {split} {sid}: {reason}", markup=False, highlight=False)
        if len(s.skipped) > 20:
            console.print(f"  ... and {len(s.skipped) - 20} more")
    if s.samples_encoded:
        console.print(f"encoded {s.samples_encoded} samples in {s.seconds:.1f}s ({s.samples_per_second:.1f} samples/s)")
    console.print(f"file size {s.file_bytes / 1e6:.1f} MB, {s.bytes_per_sample / 1e3:.1f} KB per sample")
