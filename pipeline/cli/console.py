"""What every command shares: the two consoles, tables, JSON output, shared option help and errors as exit codes.

Results go to ``console`` (stdout); progress, notes and errors to ``err_console`` (stderr).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from ..errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, SppsclError, disk_full, is_disk_full, printable, safe

# one default for sweep and reproduce: every mean they print is over the same three seeds unless told otherwise
DEFAULT_SEEDS = "1,2,3"
DEVICE_HELP = "cpu, cuda, cuda:N or auto (the GPU when there is one)."
ALLOW_DOWNLOAD_HELP = "Let missing encoder weights download (torchvision, Hugging Face hub); also SPPSCL_ALLOW_DOWNLOAD=1."
OUT_JSON_HELP = "Print the results as one JSON document on stdout (and nothing else there)."
WHICH_HELP = "For a run folder: its best checkpoint (selected on dev) or its last (the last epoch's)."
STORAGE_HELP = "A shared Optuna study storage, e.g. postgresql://USER@HOST/DB: any number of machines run the same command, each run trains once."

# A log is as wide as its longest line: a table printed to a file or a pipe keeps every digit and its whole title.
LOG_WIDTH = 10_000


class LogConsole(Console):
    """A rich console that prints whole lines when its stream is not a terminal.

    Rich falls back to 80 columns off a terminal (or takes the width of whichever std stream is one), so a table
    piped to a file or a CI log was cut (``0.7…``, titles wrapped). Here a console whose own stream is not a
    terminal is ``LOG_WIDTH`` wide; tables are never wider than their content, so they print as they are. An
    explicit ``width`` (or a terminal) keeps rich's behaviour.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def render_str(self, text: str, **kwargs):
        """Every string this console shows (a line, a table cell, a title or caption) has its control characters
        shown escaped (:func:`~sppscl.errors.printable`): a run name, path or class name from data that holds
        ``ESC[2J`` or a bidirectional override cannot drive the terminal, whichever print path it takes. Markup in
        data is escaped where the line is built (:func:`~sppscl.errors.safe`)."""
        return super().render_str(printable(text), **kwargs)

    def rule(self, title="", **kwargs) -> None:
        """A rule spans the terminal; in a log it spans 80 columns (and its title stays whole)."""
        if self.is_terminal or self._width is not None:
            return super().rule(title, **kwargs)
        from rich.rule import Rule

        super().print(Rule(title, **kwargs), width=max(80, len(str(title)) + 6))

    def print(self, *objects, **kwargs) -> None:
        """Off a terminal, a table's title and caption print as lines of their own: rich wraps them to the table's
        width, which cuts a long title over several lines of a log."""
        if self.is_terminal or self._width is not None or not any(isinstance(o, Table) for o in objects):
            return super().print(*objects, **kwargs)
        for obj in objects:
            if not isinstance(obj, Table) or (obj.title is None and obj.caption is None):
                super().print(obj, **kwargs)
                continue
            bare = copy.copy(obj)
            bare.title = bare.caption = None
            if obj.title is not None:
                super().print(obj.title, style=obj.title_style or "table.title", highlight=False)
            super().print(bare, **kwargs)
            if obj.caption is not None:
                super().print(obj.caption, style=obj.caption_style or "table.caption", highlight=False)


console = LogConsole(stderr=False)
err_console = LogConsole(stderr=True, soft_wrap=True)


class _State:
    """Set by --debug (or SPPSCL_DEBUG=1): errors then show their traceback too; and the argument list."""

    debug = False
    # the command line being run (sweep, cv and reproduce record it in their folder's commands.txt)
    argv: list[str] = []


state = _State()


def rows_table(rows: dict[str, int], title: str) -> Table:
    """Rows per split of a cache (extract, cache merge)."""
    t = Table(title=title)
    t.add_column("split")
    t.add_column("rows", justify="right")
    for split, n in rows.items():
        t.add_row(safe(split), str(n))
    return t



def print_results(results: dict, title: str = "best checkpoint") -> None:
    """A finished run's table, then the baselines its dev accuracy is read against."""
    from ..stage2.baselines import baseline_lines

    console.print(split_table(results["splits"], f"{title} (epoch {results['best_epoch']}, selected on dev accuracy)"))
    for line in baseline_lines(results):
        console.print(f"reference: {line}", markup=False, highlight=False, soft_wrap=True)


def metric_cell(m: dict, key: str) -> str:
    """``0.7311``, then `` [0.7102, 0.7520]`` when the split holds its 95% interval (``ci95``)."""
    ci = m.get("ci95", {}).get(key)
    return f"{m[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def split_table(splits: dict[str, dict], title: str | None = None) -> Table:
    """Accuracy and F1 per split (with [95% CI] where the split holds one, named in the caption); an unlabelled split
    shows as predictions only."""
    methods = sorted({f"{name}: {m['ci95_method']}" for name, m in splits.items() if "ci95_method" in m})
    t = Table(title=None if title is None else safe(title), caption="[95% CI] " + "; ".join(methods) if methods else None)
    for col in ("split", "n", "accuracy", "weighted F1", "macro F1"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for name, m in splits.items():
        if "accuracy" in m:
            t.add_row(safe(name), str(m["n"]), *[metric_cell(m, k) for k in ("accuracy", "weighted_f1", "macro_f1")])
        else:
            t.add_row(safe(name), str(m["n"]), "-", "-", "predictions only")
    return t


def emit_json(obj: dict) -> None:
    """Machine-readable results: one JSON document on stdout, nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def json_file(out: Path) -> bool:
    return out.suffix.lower() == ".json"


def print_metrics(metrics: dict, title: str) -> None:
    caption = None
    if "ci95_method" in metrics:
        caption = f"[95% CI]: {metrics['ci95_method']}; it covers which rows were drawn (on a split that selected the checkpoint, the score itself is optimistic)"
    t = Table(title=safe(title), caption=caption)
    for c in ("accuracy", "weighted F1", "macro F1"):
        t.add_column(c, justify="right")
    t.add_row(*[metric_cell(metrics, k) for k in ("accuracy", "weighted_f1", "macro_f1")])
    console.print(t)
    pc = Table(title="per class")
    for c in ("class", "precision", "recall", "F1", "support"):
        pc.add_column(c)
    for name, v in metrics["per_class"].items():
        pc.add_row(safe(name), f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"]))
    console.print(pc)
    console.print(f"confusion matrix (rows true, columns predicted): {metrics['confusion_matrix']}", markup=False, highlight=False)



INTERRUPTED = "interrupted; what was written is kept: rerun the same command to resume (train: add --resume)"


def error_exit(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the top of a command; control characters from the
    data it names are shown escaped, never sent to the terminal."""
    code, message = _error_exit(e)
    return code, printable(message)


def _error_exit(e: BaseException) -> tuple[int, str]:
    if isinstance(e, SppsclError):
        return e.exit_code, str(e)
    if isinstance(e, (KeyboardInterrupt, typer.Abort)):
        return EXIT_INTERRUPTED, INTERRUPTED
    if isinstance(e, OSError):
        if is_disk_full(e):
            where = Path(e.filename) if e.filename else Path.cwd()
            return EXIT_FAILED, str(disk_full(where, None, "rerun the same command to resume"))
        if e.filename is not None:
            # a file a library opened for the command (input or output) without naming it in a project error
            return EXIT_USAGE, f"{e.filename}: {e.strerror}. Check the path and its permissions."
        return EXIT_FAILED, f"{e}. Check the files the command reads and writes."
    if isinstance(e, MemoryError):
        return EXIT_FAILED, "out of memory. Lower --batch-size, or set SPPSCL_MEMORY_BUDGET to stream caches from disk."
    return EXIT_FAILED, f"internal error ({type(e).__name__}: {str(e)[:300]}). This is a bug: rerun with --debug and report the traceback."


