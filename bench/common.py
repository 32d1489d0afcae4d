"""Shared pieces of the benchmark suite: result rows and targets, timing, machine facts, report writers."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.table import Table

from sppscl.config import Config, TrainConfig
from sppscl.stage2.heads import SPPSCLModel

from .profiles import Profile

CLASSES = ["positive", "neutral", "negative"]


@dataclass(frozen=True)
class Target:
    """What the pipeline must reach: ``ratio >= value`` or ``ours <= value`` and the like."""

    op: str  # ">=" or "<="
    value: float
    on: str = "ratio"  # "ratio" or "ours"
    unit: str = "x"

    def met(self, ours: float, ratio: float | None) -> bool | None:
        x = ours if self.on == "ours" else ratio
        if x is None or not math.isfinite(x):
            return None
        return x >= self.value if self.op == ">=" else x <= self.value

    def text(self) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        what = "" if self.on == "ratio" else "ours "
        return f"{what}{sign} {fmt(self.value, self.unit)}"


@dataclass
class Row:
    """One line of the results table: our pipeline against its alternative, measured in the same run."""

    section: str
    key: str
    measurement: str
    ours: float
    unit: str  # unit of ours and alternative: s, samples/s, B, FLOP/s
    alternative: float | None
    alternative_label: str
    ratio: float | None  # always defined so that the target reads naturally (speed-up, share, overhead)
    ratio_unit: str = "x"
    target: Target | None = None
    met: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.target is not None:
            self.met = self.target.met(self.ours, self.ratio)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = None if self.target is None else {**asdict(self.target), "text": self.target.text()}
        return d


@dataclass
class Section:
    """What a section returns: its raw numbers (for results.json) and its table rows."""

    name: str
    raw: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Context:
    profile: Profile
    workdir: Path
    console: Console
    # numbers one section measures that a later one may reuse (e.g. the paper encoders' extraction rate)
    shared: dict[str, Any] = field(default_factory=dict)
    keep: bool = False
    # the folder results.json goes to (a section that writes a report of its own puts it beside)
    out: Path | None = None

    def log(self, section: str, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [bold cyan]{section:<10}[/] {message}", highlight=False)


# ----------------------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads (None: leave as is), restoring the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- stage two


def train_config(batch_size: int) -> TrainConfig:
    """Stage two's defaults (Table 2, MVSA-Single) on the CPU, with the profile's batch size."""
    cfg = Config()
    cfg.train.device = "cpu"
    cfg.train.batch_size = batch_size
    return cfg.train


def new_heads(image_channels: int, hidden: int, layers: int, tc: TrainConfig, seed: int = 0) -> tuple[SPPSCLModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = SPPSCLModel(image_channels, hidden, layers, len(CLASSES), tc)
    return model, torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


# ----------------------------------------------------------------------------------------- machine


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM from /proc (ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "cuda": torch.cuda.is_available(),
    }


def default_threads() -> int:
    """torch's own choice of intra-op threads: one per usable core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------------------- formatting


def fmt(value: float | None, unit: str) -> str:
    """A number with its unit, scaled for reading (1.2 h, 384 kB, 41.0 GFLOP/s, 1,234×); bytes in decimal units."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if unit == "s":
        for limit, div, name in ((1.0, 1e-3, "ms"), (120.0, 1.0, "s"), (7200.0, 60.0, "min"), (172800.0, 3600.0, "h")):
            if value < limit:
                return f"{value / div:.3g} {name}"
        return f"{value / 86400.0:.3g} d"
    if unit in ("B", "B/sample"):
        suffix = "" if unit == "B" else "/sample"
        for div, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= div:
                return f"{value / div:.3g} {name}{suffix}"
        return f"{value:.0f} B{suffix}"
    if unit == "FLOP/s":
        return f"{value / 1e9:.3g} GFLOP/s"
    if unit == "samples/s":
        return f"{value:.3g} samples/s"
    if unit == "x":
        return f"{value:,.0f}×" if value >= 100 else f"{value:.3g}×"
    if unit == "share":
        return f"{value:.2f}"
    return f"{value:.3g} {unit}".strip()


def met_text(met: bool | None) -> str:
    return {True: "yes", False: "**short**", None: "–"}[met]


# ----------------------------------------------------------------------------------------- reports


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def markdown(rows: list[Row], header: str) -> str:
    """The results table (measurement, ours, alternative, ratio, target, met?) with numbered notes below."""
    lines = [header, "", "| measurement | ours | alternative | ratio | target | met? |", "|---|---|---|---|---|---|"]
    notes: list[str] = []
    for row in rows:
        label = row.measurement
        if row.note:
            notes.append(row.note)
            label += f" [{len(notes)}]"
        alt = "–" if row.alternative is None else f"{fmt(row.alternative, row.unit)} ({row.alternative_label})"
        target = "–" if row.target is None else row.target.text()
        lines.append(f"| {label} | {fmt(row.ours, row.unit)} | {alt} | {fmt(row.ratio, row.ratio_unit)} | {target} | {met_text(row.met)} |")
    if notes:
        lines += ["", *[f"{i}. {n}" for i, n in enumerate(notes, 1)]]
    return "\n".join(lines) + "\n"


def rich_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for col, justify in (("measurement", "left"), ("ours", "right"), ("alternative", "right"), ("ratio", "right"), ("target", "right"), ("met?", "center")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    style = {True: "green", False: "bold red", None: "dim"}
    for row in rows:
        alt = "–" if row.alternative is None else f"{fmt(row.alternative, row.unit)} ({row.alternative_label})"
        table.add_row(
            row.measurement,
            fmt(row.ours, row.unit),
            alt,
            fmt(row.ratio, row.ratio_unit),
            "–" if row.target is None else row.target.text(),
            f"[{style[row.met]}]{met_text(row.met).strip('*')}[/]",
        )
    return table
