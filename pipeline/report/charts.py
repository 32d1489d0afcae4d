"""The report's charts, drawn with matplotlib's Agg canvas (no pyplot: the caller's backend is left alone) and
returned as ``data:image/png;base64`` URIs, so the HTML file carries them and loads nothing."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from ..stage2.plots import confusion_axes, draw_curves, epoch_axis

# a sweep of many configurations gets one panel each up to this many; the rest are named, not drawn
MAX_PANELS = 24


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curves_by_config(groups: list[tuple[str, list[tuple[str, list[dict]]]]], metric: str = "dev_accuracy", label: str = "dev accuracy") -> str:
    """One panel per configuration (title), one line per run (its seed) of ``metric`` against the epoch (from 1);
    every panel on the same y scale, so configurations compare at a glance."""
    groups = groups[:MAX_PANELS]
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = _figure(3.6 * cols, 2.8 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, (title, runs) in zip(axes.flat, groups):
        for name, metrics in runs:
            epochs = [r["epoch"] for r in metrics if metric in r]
            ax.plot(epochs, [r[metric] for r in metrics if metric in r], marker="." if len(epochs) < 30 else None, label=name)
        ax.set_title(title, fontsize=9, wrap=True)
        ax.set_ylabel(label)
        epoch_axis(ax, [r["epoch"] for _, metrics in runs for r in metrics])
        ax.grid(alpha=0.3)
        if len(runs) <= 6:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    return to_uri(fig)


def confusion(matrix, classes: list[str], title: str) -> str:
    """A confusion matrix: counts and row shares (of the true class) in the cells, colour = row share, with its bar."""
    m = np.asarray(matrix)
    fig = _figure(1.1 * len(classes) + 3.2, 1.0 * len(classes) + 2.2)
    ax = fig.add_subplot()
    confusion_axes(fig, ax, m, classes, title)
    return to_uri(fig)


def run_curves(metrics: list[dict]) -> str:
    """A run's curves.png panels (losses, each term on its own scale; dev metrics; step-2 firing rate)."""
    fig = _figure(16, 3.8)
    draw_curves(fig, metrics)
    return to_uri(fig)
