"""The one-command demo: synthetic image-text data, the offline encoders, SPP-SCL against unimodal variants.

Everything is real except the data: the generator draws images whose colours and shapes carry the sentiment
and writes templated texts, with a share of pairs where only one modality carries the label, so the fused
model should beat both text-only and image-only heads trained the same way from the same cache.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import apply_overrides, load_config
from .outputs import check_output_folder
from .stage1.extract import extract
from .stage2.train import train

VARIANTS = {
    "SPP-SCL (image + text)": [],
    "SPP-SCL, concat fusion": ["fusion=concat"],
    "text only": ["modalities=text"],
    "image only": ["modalities=image"],
}


def _run_name(variant: str) -> str:
    return variant.split(" (")[0].replace(" ", "-").replace(",", "").lower()


def run_demo(out: Path, cache: Path, epochs: int | None, console: Console, progress_console: Console | None = None) -> dict[str, dict]:
    """Extract, train the variants, print the comparison on ``console``; headings and progress go to
    ``progress_console`` (the CLI's stderr) when given."""
    t0 = time.perf_counter()
    log = progress_console or console
    # the folder is replaced on each demo run: only when it holds nothing or the demo's own runs
    check_output_folder(out, "the demo's runs", markers=tuple(_run_name(n) for n in VARIANTS))
    cfg = load_config("demo")
    if epochs is not None:
        cfg = apply_overrides(cfg, {"epochs": epochs})
    log.rule("[bold]1/2 stage one: generate the synthetic set, extract features with EfficientNet-Lite0 + MiniLM-L6")
    summary = extract(cfg, cache, progress=True, console=log)
    speed = f"{summary.samples_per_second:.1f} samples/s" if summary.samples_encoded else "already complete, reused"
    log.print(f"cache {cache}: {sum(summary.rows.values())} rows ({speed})", markup=False, highlight=False)
    if out.exists():
        shutil.rmtree(out)
    results, run_dirs = {}, {}
    for i, (name, sets) in enumerate(VARIANTS.items(), 1):
        log.rule(f"[bold]2/2 stage two ({i}/{len(VARIANTS)}): {name}")
        run_dirs[name] = out / _run_name(name)
        results[name] = train(cache, apply_overrides(cfg, sets), run_dirs[name], progress=True, console=log)
    table = Table(title=f"demo results (synthetic data, {cfg.train.epochs} epochs, best dev checkpoint)")
    for col in ("model", "dev acc", "dev macro F1", "test acc", "test macro F1"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, r in results.items():
        d, t = r["splits"]["dev"], r["splits"]["test"]
        table.add_row(name, f"{d['accuracy']:.3f}", f"{d['macro_f1']:.3f}", f"{t['accuracy']:.3f}", f"{t['macro_f1']:.3f}")
    console.print(table)
    console.print(f"runs (checkpoints, metrics.jsonl, results.json, predictions, curves.png): {', '.join(str(p) for p in run_dirs.values())}", markup=False, highlight=False)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return results
