"""The figures every run folder gets: training curves from ``metrics.jsonl`` and a confusion matrix per labelled split.

Drawn with matplotlib's Agg backend (no display needed), from the files the run already wrote, so a figure
never shows anything that metrics.jsonl or results.json does not hold.
"""

from __future__ import annotations

import json
from pathlib import Path

LOSS_TERMS = {
    "loss_total": "total",
    "loss_lambda_ce": "λ·CE",
    "loss_intra_image": "intra image",
    "loss_intra_text": "intra text",
    "loss_inter": "inter (step 2)",
}


def _pyplot():
    # imported on first use: matplotlib costs a second of start-up that sweep workers and --help need not pay
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_curves(metrics_path: Path, out: Path) -> Path:
    """curves.png: the loss terms, dev accuracy and F1, and the step-2 firing rate per epoch (epochs from 1)."""
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for key, label in LOSS_TERMS.items():
        axes[0].plot(epochs, [r[key] for r in rows], label=label, marker="." if len(rows) < 30 else None)
    axes[0].set_title("training losses (mean over batches)")
    for key, label in (("dev_accuracy", "accuracy"), ("dev_weighted_f1", "weighted F1"), ("dev_macro_f1", "macro F1")):
        axes[1].plot(epochs, [r[key] for r in rows], label=label, marker="." if len(rows) < 30 else None)
    best = rows[-1]["best_epoch"] if rows else 0
    if best:
        axes[1].axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
    axes[1].set_title("dev metrics")
    axes[2].plot(epochs, [r["step2_fired"] for r in rows], color="tab:purple", marker="." if len(rows) < 30 else None)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_title("step 2 (inter-modal) fired: fraction of batches")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str, out: Path) -> Path:
    """A confusion matrix (rows true, columns predicted), counts in the cells."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix)
    # drawn directly: sklearn's ConfusionMatrixDisplay costs ~1 s a figure, paid by every run of a sweep
    fig, ax = plt.subplots(figsize=(1.0 * len(classes) + 2.5, 1.0 * len(classes) + 2), layout="constrained")
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_confusions(splits: dict[str, dict], classes: list[str], out_dir: Path, what: str) -> list[Path]:
    """confusion-<split>.png for every labelled split of a results dict."""
    return [
        plot_confusion(m["confusion_matrix"], classes, f"{what}: {name} (n={m['n']}, acc {m['accuracy']:.4f})", Path(out_dir) / f"confusion-{name}.png")
        for name, m in splits.items()
        if "confusion_matrix" in m
    ]
