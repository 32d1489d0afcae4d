"""The figures every run folder gets: training curves from ``metrics.jsonl`` and a confusion matrix per labelled split.

Drawn with matplotlib's Agg backend (no display needed), from the files the run already wrote, so a figure
never shows anything that metrics.jsonl or results.json does not hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..outputs import save_figure

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


def _marker(n: int) -> str | None:
    return "." if n < 30 else None


def epoch_axis(ax, epochs: list[int]) -> None:
    """Whole epochs on the x axis: each one as a tick when there are few (one epoch got ticks at 0.95, 1.00, 1.05)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    if 0 < len(set(epochs)) <= 12:
        ax.set_xticks(sorted(set(epochs)))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(metrics_path: Path, out: Path) -> Path:
    """curves.png: the total loss, its terms on their own scale, dev accuracy and F1, and the step-2 firing rate per
    epoch (epochs from 1). The total is λ·CE plus the contrastive terms, so beside them it would flatten them."""
    plt = _pyplot()
    fig = plt.figure(figsize=(18, 4.2), layout="constrained")
    draw_curves(fig, read_metrics(metrics_path))
    save_figure(fig, out, dpi=90)
    plt.close(fig)
    return out


def draw_curves(fig, rows: list[dict]) -> None:
    """The four panels of curves.png on ``fig``, from metrics.jsonl's rows."""
    from matplotlib.ticker import PercentFormatter

    epochs = [r["epoch"] for r in rows]
    mk = _marker(len(rows))
    axes = fig.subplots(1, 4)
    axes[0].plot(epochs, [r["loss_total"] for r in rows], marker=mk, color="black")
    axes[0].set_title("total training loss")
    axes[0].set_ylabel("loss (mean over batches)")
    for key, label in LOSS_TERMS.items():
        if key != "loss_total":
            axes[1].plot(epochs, [r[key] for r in rows], label=label, marker=mk)
    axes[1].set_title("loss terms, each its own line")
    axes[1].set_ylabel("loss (mean over batches)")
    for key, label in (("dev_accuracy", "accuracy"), ("dev_weighted_f1", "weighted F1"), ("dev_macro_f1", "macro F1")):
        axes[2].plot(epochs, [r[key] for r in rows], label=label, marker=mk)
    best = rows[-1]["best_epoch"] if rows else 0
    if best:
        axes[2].axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
    axes[2].set_title("dev metrics")
    axes[2].set_ylabel("score (0-1)")
    axes[3].plot(epochs, [r["step2_fired"] for r in rows], color="tab:purple", marker=mk)
    axes[3].set_ylim(-0.02, 1.02)
    axes[3].yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[3].set_title("step 2 (inter-modal) fired")
    axes[3].set_ylabel("share of the epoch's batches")
    for ax in axes:
        epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)


def row_shares(m: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix as shares of its true class (a row with no samples stays 0)."""
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros(m.shape, dtype=np.float64), where=totals > 0)


def confusion_axes(fig, ax, m: np.ndarray, classes: list[str], title: str) -> None:
    """Draw a confusion matrix (rows true, columns predicted) on ``ax``: count and row share in every cell, colour
    = row share (so classes of different sizes compare), with a colour bar."""
    shares = row_shares(np.asarray(m))
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(np.asarray(m)):
        ax.text(j, i, f"{v}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8, color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class (row)")


def plot_confusion(matrix: list[list[int]], classes: list[str], title: str, out: Path) -> Path:
    """A confusion matrix with counts and row shares, colour bar included."""
    plt = _pyplot()
    # drawn directly: sklearn's ConfusionMatrixDisplay costs ~1 s a figure, paid by every run of a sweep
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 3.2, 1.0 * len(classes) + 2.2), layout="constrained")
    confusion_axes(fig, ax, np.asarray(matrix), classes, title)
    save_figure(fig, out, dpi=90)
    plt.close(fig)
    return out


def short_name(what: str, width: int = 48) -> str:
    """A long title part (a checkpoint path) cut in the middle to ``width`` characters, so a title is never clipped."""
    return what if len(what) <= width else what[:14] + "…" + what[-(width - 15) :]


def plot_confusions(splits: dict[str, dict], classes: list[str], out_dir: Path, what: str) -> list[Path]:
    """confusion-<split>.png for every labelled split of a results dict; the title says what and which split on two lines."""
    return [
        plot_confusion(
            m["confusion_matrix"], classes, f"{short_name(what)}\n{name} split: n={m['n']}, accuracy {m['accuracy']:.4f}", Path(out_dir) / f"confusion-{name}.png"
        )
        for name, m in splits.items()
        if "confusion_matrix" in m
    ]
