"""The GPU run's report: each figure printed the moment it is measured, and the files rewritten after each one.

Standard library only, so that a node without the suite's packages still gets its report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class Budget:
    """The run's wall-clock allowance: sections ask what is left before each measurement and skip what would not fit."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def spent(self) -> bool:
        return self.left() <= 0

    def fits(self, estimate_s: float) -> bool:
        """Whether a measurement expected to take ``estimate_s`` ends inside the budget."""
        return estimate_s <= self.left()


@dataclass
class Figure:
    section: str
    measurement: str
    result: str  # as printed: the number with its unit
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # the numbers behind it, for results-gpu.json


class Report:
    """Figures, skips and failures, in the order they happened."""

    def __init__(self, md_path: Path, json_path: Path):
        self.md_path, self.json_path = Path(md_path), Path(json_path)
        self.figures: list[Figure] = []
        self.skips: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str]] = []
        self.checks: list[tuple[str, str, bool]] = []
        self.sections: list[str] = []
        self.timings: dict[str, dict[str, float]] = {}
        self.intro = ""
        self.meta: dict[str, Any] = {}
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.wall_s: float | None = None

    # ------------------------------------------------------------------------------ events

    def header(self, intro: str, meta: dict[str, Any]) -> None:
        self.intro, self.meta = intro, meta
        self._print("run", intro)
        self.write()

    def start(self, section: str) -> None:
        self.sections.append(section)
        self._print(section, "start")

    def done(self, section: str, wall_s: float, cpu_s: float) -> None:
        self.timings[section] = {"wall_seconds": wall_s, "cpu_seconds": cpu_s}
        self._print(section, f"done in {wall_s:.1f} s ({cpu_s:.1f} s of CPU time, child processes included)")
        self.write()

    def figure(self, section: str, measurement: str, result: str, note: str = "", **raw: Any) -> None:
        self.figures.append(Figure(section, measurement, result, note, raw))
        self._print(section, f"{measurement}: {result}" + (f"  ({note})" if note else ""))
        self.write()

    def check(self, section: str, what: str, held: bool, detail: str, **raw: Any) -> None:
        """An equality the run asserts (e.g. bitwise caches): a check that does not hold makes the exit code 1."""
        self.checks.append((section, what, held))
        if not held:
            self.failures.append((section, f"{what}: {detail}"))
        self.figure(section, what, "yes" if held else "NO", detail, held=held, **raw)

    def skip(self, section: str, why: str) -> None:
        self.skips.append((section, why))
        self._print(section, f"skipped: {why}")
        self.write()

    def fail(self, section: str, error: str, trace: str = "") -> None:
        self.failures.append((section, error))
        self._print(section, f"FAILED: {error}")
        if trace:
            print(trace, flush=True)
        self.write()

    def finish(self, wall_s: float) -> None:
        self.wall_s = wall_s
        self.write()

    # ------------------------------------------------------------------------------ output

    @staticmethod
    def _print(section: str, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {section:<10} {message}", flush=True)

    def markdown(self) -> str:
        state = "cut short or still running" if self.wall_s is None else f"{self.wall_s / 60:.1f} min"
        lines = [f"Measured {self.started} ({state}) by {self.intro}", "", "| section | measurement | result | note |", "|---|---|---|---|"]
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731 - a literal bar would end the table cell
        for f in self.figures:
            lines.append(f"| {f.section} | {cell(f.measurement)} | {cell(f.result)} | {cell(f.note)} |")
        if self.skips:
            lines += ["", "Skipped:", *[f"- {s}: {why}" for s, why in self.skips]]
        if self.failures:
            lines += ["", "Failed:", *[f"- {s}: {why}" for s, why in self.failures]]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.md_path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            **self.meta,
            "started": self.started,
            "wall_seconds": self.wall_s,
            "sections_run": self.sections,
            "section_timings": self.timings,
            "figures": [asdict(f) for f in self.figures],
            "skipped": [{"section": s, "why": w} for s, w in self.skips],
            "failed": [{"section": s, "error": e} for s, e in self.failures],
        }
        # each file replaced whole, so a run killed mid-write leaves the previous complete version
        for path, text in ((self.md_path, self.markdown()), (self.json_path, json.dumps(data, indent=2, default=str) + "\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
