"""Rich progress bars shared by long-running commands (extraction, training, sweeps, prediction)."""

from __future__ import annotations


from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. samples/s during extraction."""

    def __init__(self, unit: str = "samples/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -  " + self.unit if speed is None else f"{speed:6.1f} {self.unit}", style="progress.data.speed")


class _Disabled:
    """Same interface as rich's Progress, doing nothing (quiet runs, tests, sweeps' worker processes)."""

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass

    def reset(self, *a, **k):
        pass

    def note(self, text: str) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Progress(Progress):
    def note(self, text: str) -> None:
        """A line printed above the live bars (stays in the scrollback and in logs)."""
        self.console.print(text, highlight=False)


def silence_third_party_progress() -> None:
    """Turn off the bars other libraries draw: transformers' "Loading weights" bar always (one per model load, noise
    in every log), and huggingface_hub's download bars when stderr is not a terminal (a log gets one line per tick)."""
    import sys

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def make_progress(enabled: bool = True, console: Console | None = None, unit: str = "samples/s"):
    if not enabled:
        return _Disabled()
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


__all__ = ["make_progress", "RateColumn", "silence_third_party_progress"]
