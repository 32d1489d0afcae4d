"""``sppscl cache ...``: commands on cache files (joining shards), registered by ``sppscl.cli.root``."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import console, err_console, rows_table

cache_app = typer.Typer(no_args_is_help=True, help="Work with feature caches: join the shards of `sppscl extract --shard I/N`.")


@cache_app.command("merge")
def merge(
    shards: list[Path] = typer.Argument(..., help="Every shard file of one extraction (written with --shard 0/N ... N-1/N)."),
    out: Path = typer.Option(..., help="The whole cache to write."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Join shard files into one cache, identical to a single-process extraction's.

    Refuses shards extracted differently (saying what differs), unfinished shards, rows held twice and rows no shard holds (saying which).
    """
    from ..stage1.merge import merge_shards

    s = merge_shards(shards, out, force=force, progress=not quiet, console=err_console)  # progress on stderr, as everywhere
    console.print(rows_table(s.rows, "rows per split"))
    if s.skipped:
        console.print(f"[yellow]skipped {len(s.skipped)} samples[/] (recorded in the cache under /skipped)")
    names = ", ".join(f"{path} ({name})" for path, name in s.shards)
    console.print(f"merged {len(s.shards)} shards into {s.path} in {s.seconds:.1f}s, {s.file_bytes / 1e6:.1f} MB: {names}", markup=False, highlight=False)
