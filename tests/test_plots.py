"""The pictures every run writes: confusion matrices with counts, row shares and a colour bar; titles that fit."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sppscl.stage2.plots import confusion_axes, row_shares, short_name


def test_row_shares_are_shares_of_the_true_class():
    m = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    np.testing.assert_allclose(row_shares(m), [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])


def test_confusion_cells_show_count_and_share_with_a_colour_bar():
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    confusion_axes(fig, ax, np.array([[3, 1], [0, 4]]), ["pos", "neg"], "t")
    assert sorted(t.get_text() for t in ax.texts) == sorted(["3\n75%", "1\n25%", "0\n0%", "4\n100%"])
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "share of the true class (row)"
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"


def test_long_titles_are_cut_in_the_middle():
    long = "evaluate /tmp/pytest-of-root/pytest-99/some/long/run/folder/best.safetensors"
    cut = short_name(long)
    assert len(cut) == 48 and cut.startswith("evaluate /tmp/") and cut.endswith("folder/best.safetensors")
    assert short_name("short") == "short"


def test_few_epochs_get_one_tick_each():
    from sppscl.stage2.plots import epoch_axis

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([1], [0.5])
    epoch_axis(ax, [1])
    assert list(ax.get_xticks()) == [1] and ax.get_xlabel() == "epoch"
