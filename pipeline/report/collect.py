"""What a report shows, read from the files runs, sweeps, cv and reproduce already wrote (nothing is recomputed
but what follows from them: sums of confusion matrices and the majority-class reference).

A folder is recognised by its files: a run (``results.json`` + ``config.json``), a sweep (``summary.md``), a cv
(``cv.md``), a reproduce table (``table.md``) or a reproduce folder (subfolders holding ``table.md``). Tables are
the markdown tables those commands wrote, with every column they have (intervals included, where a table has
them); runs are found through the ``run_dir`` column of ``runs.csv``, then beside the folder, and the runs that
cannot be reached here are named, not silently left out.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SppsclError, check_input_file, check_input_folder
from . import charts

COMMANDS_FILE = "commands.txt"


class ReportError(SppsclError, ValueError):
    """A path given to ``report`` is not something a report can be made of; the message names it."""


@dataclass
class Table:
    title: str
    head: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    source: str = ""
    highlight_first: bool = False


@dataclass
class Chart:
    title: str
    uri: str
    caption: str = ""


@dataclass
class Section:
    title: str
    kind: str  # run | runs | sweep | cv | reproduce
    path: str
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


@dataclass
class Run:
    """A run folder's files as read: results.json, metrics.jsonl, best.json's provenance."""

    name: str
    path: Path
    results: dict
    metrics: list[dict]
    checkpoint: dict

    @classmethod
    def read(cls, path: Path, name: str | None = None) -> "Run":
        path = Path(path)
        try:
            # each file is checked from stat first: a FIFO planted in a run folder would block the read for ever
            check_input_file(path / "results.json", "a run's results.json")
            results = json.loads((path / "results.json").read_text())
            metrics_file = path / "metrics.jsonl"
            metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()] if check_input_file(metrics_file, "a run's metrics.jsonl") else []
            best = path / "best.json"
            checkpoint = json.loads(best.read_text()) if check_input_file(best, "a run's best.json") else {}
        except SppsclError as e:
            raise ReportError(str(e)) from None
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise ReportError(f"{path}: cannot read the run's files ({e})") from None
        except RecursionError:
            raise ReportError(f"{path}: cannot read the run's files (JSON nested too deeply)") from None
        return cls(name or path.name, path, results, metrics, checkpoint)

    @property
    def classes(self) -> list[str]:
        return list(self.results.get("classes", []))


# ------------------------------------------------------------------------------------ tables from files


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


def markdown_tables(text: str, source: str, title: str | None = None) -> list[Table]:
    """Every pipe table of a markdown file, titled by the heading above it (or ``title``), with the file's bullet and
    paragraph lines as the notes of the table before them (or after, for lines above the first table)."""
    tables: list[Table] = []
    heading = title
    pending: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[i + 1].strip()):
            head = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            bold = "**" in (lines[i - len(rows)] if rows else "")
            tables.append(Table(heading or source, head, rows, pending, source, bold))
            pending = []
            continue
        elif line.strip():
            note = line.strip()[2:] if line.strip().startswith("- ") else line.strip()
            (tables[-1].notes if tables else pending).append(note)
        i += 1
    if pending and tables:
        tables[-1].notes += pending
    return tables


def read_markdown(path: Path, title: str | None = None) -> list[Table]:
    return markdown_tables(Path(path).read_text(), str(path), title)


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------ runs of a folder


def locate_run(row: dict, folder: Path) -> Path | None:
    """A runs.csv row's folder: its run_dir when it exists here, else beside the sweep (runs/ or ../runs/)."""
    candidates = [Path(row["run_dir"])] if row.get("run_dir") else []
    candidates += [folder / "runs" / row["run"], folder.parent / "runs" / row["run"]]
    for c in candidates:
        if (c / "results.json").is_file():
            return c
    return None


def runs_of(rows: list[dict], folder: Path) -> tuple[dict[str, list[Run]], list[str]]:
    """The finished runs of a runs table grouped by configuration (table order), and a line for each run that is
    listed but not reachable here (where it was, on which host)."""
    groups: dict[str, list[Run]] = {}
    missing = []
    for row in rows:
        if row.get("status") != "ok":
            continue
        path = locate_run(row, folder)
        if path is None:
            missing.append(f"{row['run']} (host {row.get('host') or '?'}, {row.get('run_dir') or 'no run_dir recorded'})")
            continue
        groups.setdefault(row["config"], []).append(Run.read(path, row["run"]))
    return groups, missing


def _line_labels(runs: list[Run]) -> list[str]:
    """A panel's line labels: ``seed N`` when that tells its runs apart (a configuration's seeds), else the run names
    (runs compared side by side often share a seed)."""
    seeds = [f"seed {r.checkpoint.get('config', {}).get('train', {}).get('seed', r.name)}" for r in runs]
    return seeds if len(set(seeds)) == len(seeds) else [r.name for r in runs]


def curves_chart(groups: dict[str, list[Run]], what: str) -> list[Chart]:
    if not groups:
        return []
    items = [(config, [(label, r.metrics) for label, r in zip(_line_labels(runs), runs)]) for config, runs in groups.items()]
    caption = f"{what}: every run's dev accuracy per epoch (the checkpoint selection's score), one panel per configuration, one line per run."
    if len(items) > charts.MAX_PANELS:
        caption += f" The first {charts.MAX_PANELS} of {len(items)} configurations are drawn."
    return [Chart("dev curves by configuration", charts.curves_by_config(items), caption)]


def summed_confusions(runs: list[Run], label: str, splits: dict[str, str] | None = None) -> list[Chart]:
    """The confusion matrix of each labelled split summed over ``runs`` (e.g. a configuration's seeds); ``splits``
    maps the split names to show to what they are called (default dev and test, as named)."""
    out = []
    if not runs:
        return out
    classes = runs[0].classes
    for split, shown in (splits or {"dev": "dev", "test": "test"}).items():
        ms = [r.results["splits"][split]["confusion_matrix"] for r in runs if "confusion_matrix" in r.results["splits"].get(split, {})]
        if ms:
            total = np.sum(ms, axis=0)
            title = f"{label}\n{shown}, summed over {len(ms)} run{'s' * (len(ms) > 1)}: n={int(total.sum())}"
            out.append(Chart(f"confusion: {label}, {shown}", charts.confusion(total, classes, title)))
    return out


def majority_reference(run: Run) -> Table | None:
    """The majority class of the train split (from its confusion matrix's row sums), scored on every labelled split:
    accuracy is that class's share; its F1 is 2p/(1+p) (precision p, recall 1) and 0 for the other classes."""
    splits = run.results.get("splits", {})
    if "confusion_matrix" not in splits.get("train", {}):
        return None
    classes = run.classes
    k = int(np.argmax(np.asarray(splits["train"]["confusion_matrix"]).sum(axis=1)))
    rows = []
    for name in ("train", "dev", "test"):
        if "confusion_matrix" not in splits.get(name, {}):
            continue
        support = np.asarray(splits[name]["confusion_matrix"]).sum(axis=1)
        p = support[k] / support.sum()
        f1 = 2 * p / (1 + p)
        rows.append([name, str(int(support.sum())), f"{p:.4f}", f"{p * f1:.4f}", f"{f1 / len(classes):.4f}"])
    return Table(
        f"majority-class reference: always '{classes[k]}' (train's most frequent class)",
        ["split", "n", "accuracy", "weighted F1", "macro F1"],
        rows,
        ["Computed from the run's confusion matrices: a model must beat these to have learned anything."],
    )


def provenance_items(run: Run) -> list[tuple[str, str]]:
    """Encoders, data, dtype and precision of the cache the run was trained on, and the run's training settings."""
    prov = run.checkpoint.get("cache_provenance", {})
    enc = prov.get("encoders", {})
    ds = prov.get("dataset", {})
    items = []
    if enc:
        items.append(("image encoder", f"{enc.get('image', {}).get('name')} (weights {str(enc.get('image', {}).get('weight_sha256', ''))[:12]})"))
        text = enc.get("text", {})
        items.append(("text encoder", f"{text.get('name')} (layers {text.get('layers')}, max_length {text.get('tokenizer', {}).get('max_length')})"))
    if ds:
        items.append(("data", f"{ds.get('name')} ({ds.get('format')}), classes {', '.join(ds.get('classes', []))}, samples sha256 {str(ds.get('samples_sha256', ''))[:12]}"))
    if prov:
        items.append(("features", f"dtype {prov.get('dtype')}, precision {prov.get('precision', 'fp32')}, code {prov.get('code_version')}"))
    if run.checkpoint.get("cache_path"):
        items.append(("cache", str(run.checkpoint["cache_path"])))
    train = run.checkpoint.get("config", {}).get("train", {})
    if train:
        keys = ("epochs", "lr", "batch_size", "fusion", "update", "gate", "alpha", "tau", "lambda_ce", "ha_layers", "dim", "modalities", "patience")
        items.append(("training (the first run found; swept keys vary)", ", ".join(f"{k}={train[k]}" for k in keys if k in train)))
    return items


def commands(folder: Path) -> list[str]:
    f = Path(folder) / COMMANDS_FILE
    return [x for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


# ------------------------------------------------------------------------------------ sections


def run_section(path: Path) -> Section:
    run = Run.read(path)
    s = Section(f"run {path}", "run", str(path))
    head = ["split", "n", "accuracy", "weighted F1", "macro F1", *[f"F1 {c}" for c in run.classes]]
    rows = []
    for name, m in run.results.get("splits", {}).items():
        if "accuracy" in m:
            rows.append([name, str(m["n"]), *[f"{m[k]:.4f}" for k in ("accuracy", "weighted_f1", "macro_f1")], *[f"{m['per_class'][c]['f1']:.4f}" for c in run.classes]])
    s.tables.append(
        Table(
            f"best checkpoint (epoch {run.results.get('best_epoch')} of {run.results.get('epochs_trained', '?')})",
            head,
            rows,
            [f"Selected on {run.results.get('selection', 'dev')}; train is scored with the selected checkpoint too."],
            str(path / "results.json"),
        )
    )
    if run.results.get("status") == "pruned":
        s.notes.append(
            f"Pruned: a search's pruner stopped this run at epoch {run.results.get('pruned_at_epoch')} (its dev curve was behind); "
            "only its best epoch's dev scores are recorded, no split was evaluated: it is not a result."
        )
    ref = majority_reference(run)
    if ref:
        s.tables.append(ref)
    if run.metrics:
        s.charts.append(Chart("training curves", charts.run_curves(run.metrics), "Losses (total, and each term on its own scale), dev metrics and the step-2 firing rate per epoch."))
    for split, m in run.results.get("splits", {}).items():
        if "confusion_matrix" in m:
            s.charts.append(Chart(f"confusion: {split}", charts.confusion(m["confusion_matrix"], run.classes, f"{split} split: n={m['n']}, accuracy {m['accuracy']:.4f}")))
    s.provenance = provenance_items(run)
    s.commands = commands(path)
    return s


def runs_section(paths: list[Path]) -> Section:
    """Several runs side by side: one row each, their curves overlaid."""
    runs = [Run.read(p) for p in paths]
    s = Section(f"{len(runs)} runs compared", "runs", ", ".join(map(str, paths)))
    splits = [x for x in ("dev", "test") if any("accuracy" in r.results["splits"].get(x, {}) for r in runs)]
    head = ["run", "best epoch", *[f"{x} {m}" for x in splits for m in ("acc", "weighted F1", "macro F1")]]
    rows = []
    for r in runs:
        cells = []
        for x in splits:
            m = r.results["splits"].get(x, {})
            cells += [f"{m[k]:.4f}" if k in m else "" for k in ("accuracy", "weighted_f1", "macro_f1")]
        rows.append([r.name if sum(q.name == r.name for q in runs) == 1 else str(r.path), str(r.results.get("best_epoch")), *cells])
    s.tables.append(Table("runs", head, rows, ["Each run's best checkpoint (selected on dev)."]))
    ref = majority_reference(runs[0])
    if ref:
        s.tables.append(ref)
    s.charts += curves_chart({"all runs": runs}, "the runs")
    for r in runs:
        s.charts += summed_confusions([r], r.name)
    s.provenance = provenance_items(runs[0])
    return s


def _group_parts(s: Section, folder: Path, rows: list[dict], summary_rows: list[dict] | None, what: str) -> dict[str, list[Run]]:
    """Curves, the best configuration's confusion matrices, references and provenance of a sweep-like folder; returns
    its reachable runs by configuration."""
    groups, missing = runs_of(rows, folder)
    s.missing += missing
    s.charts += curves_chart(groups, what)
    best = next((r["config"] for r in summary_rows or [] if r.get("config") in groups), None)
    if best is not None:
        s.charts += summed_confusions(groups[best], f"best on dev: {best}")
    first = next((r for rs in groups.values() for r in rs), None)
    if first is not None:
        ref = majority_reference(first)
        if ref:
            s.tables.append(ref)
        s.provenance = provenance_items(first)
    return groups


def pruned_table(rows: list[dict]) -> Table | None:
    """The runs of a pruned search (``sweep --prune``) that its pruner stopped, with the epoch each stopped at, and
    the seeds not started because their configuration's first seed was pruned; None when there are none."""
    body = [[r["run"], "pruned", r.get("pruned_epoch", "")] for r in rows if r.get("status") == "pruned"]
    body += [[r["run"], "not started", ""] for r in rows if r.get("status") == "skipped"]
    if not body:
        return None
    return Table(
        "runs stopped early by the search's pruner",
        ["run", "status", "stopped at epoch"],
        body,
        ["A pruned run is finished, not failed: it is in no mean, ensemble or ranking, and a rerun does not retry it; "
         "its folder keeps the epochs it trained. A configuration whose first seed was pruned starts no other seed."],
        "runs.csv",
    )


def sweep_section(folder: Path, title: str | None = None) -> Section:
    s = Section(title or f"sweep {folder}", "sweep", str(folder))
    s.tables += read_markdown(folder / "summary.md", "configurations (mean ± std over seeds)")
    if (folder / "ensembles.md").is_file():
        s.tables += read_markdown(folder / "ensembles.md", "seed ensembles")
    rows = read_csv_rows(folder / "runs.csv") if (folder / "runs.csv").is_file() else []
    summary_rows = read_csv_rows(folder / "summary.csv") if (folder / "summary.csv").is_file() else []
    stopped = pruned_table(rows)
    if stopped:
        s.tables.append(stopped)
    _group_parts(s, folder, rows, summary_rows, "sweep")
    s.commands = commands(folder)
    return s


FOLD_PART = re.compile(r"(^|__)cv_fold-\d+(__|$)")


def variant_of(config: str) -> str:
    """A CV run's configuration without its fold: the runs of one variant over all folds share it."""
    return FOLD_PART.sub(lambda m: "__" if m.group(1) and m.group(2) else "", config) or "base"


def held_out_confusions(groups: dict[str, list[Run]]) -> list[Chart]:
    """Per variant, the held-out folds' confusion matrices summed over every fold and seed (each row scored once)."""
    variants: dict[str, list[Run]] = {}
    for config, runs in groups.items():
        variants.setdefault(variant_of(config), []).extend(runs)
    return [c for v, runs in variants.items() for c in summed_confusions(runs, v, {"test": "held-out folds"})]


def cv_section(folder: Path) -> Section:
    s = Section(f"cross-validation {folder}", "cv", str(folder))
    s.tables += read_markdown(folder / "cv.md")
    per_fold = folder / "per-fold"
    rows = read_csv_rows(per_fold / "runs.csv") if (per_fold / "runs.csv").is_file() else []
    s.charts += held_out_confusions(_group_parts(s, folder, rows, None, "cv (each panel: one fold)"))
    s.notes.append("In a CV run, 'dev' is the validation part carved from its training folds and 'test' its held-out fold.")
    s.commands = commands(folder)
    return s


def reproduce_table_section(folder: Path) -> Section:
    s = Section(f"reproduce {folder.name} ({folder})", "reproduce", str(folder))
    s.tables += read_markdown(folder / "table.md")
    if (folder / "fig5.png").is_file():
        import base64

        s.charts.append(Chart("Fig. 5: sensitivity to α", "data:image/png;base64," + base64.b64encode((folder / "fig5.png").read_bytes()).decode()))
    runs_csv = folder / "runs.csv" if (folder / "runs.csv").is_file() else folder / "per-fold" / "runs.csv"
    rows = read_csv_rows(runs_csv) if runs_csv.is_file() else []
    summary_csv = runs_csv.with_name("summary.csv")
    _group_parts(s, folder, rows, read_csv_rows(summary_csv) if summary_csv.is_file() else None, f"reproduce {folder.name}")
    s.commands = commands(folder) or commands(folder.parent)
    return s


def kind_of(path: Path) -> str:
    """What a path holds, from its files; a ReportError naming the path when it is none of them."""
    try:  # a FIFO, device or file is named as what it is, from stat
        present = check_input_folder(path, "a run, sweep, cv or reproduce folder")
    except SppsclError as e:
        raise ReportError(str(e)) from None
    if not present:
        raise ReportError(f"{path}: no such folder")
    if (path / "table.md").is_file():
        return "reproduce-table"
    if (path / "cv.md").is_file():
        return "cv"
    if (path / "summary.md").is_file():
        return "sweep"
    if (path / "results.json").is_file() and (path / "config.json").is_file():
        return "run"
    if any((p / "table.md").is_file() for p in path.iterdir() if p.is_dir()):
        return "reproduce"
    raise ReportError(f"{path}: not a run, sweep, cv or reproduce folder (none of results.json, summary.md, cv.md, table.md in it)")


def sections_for(paths: list[Path]) -> list[Section]:
    """One section per sweep/cv/reproduce table; the runs given together become one comparison (one run: its own)."""
    paths = [Path(p) for p in paths]
    kinds = [kind_of(p) for p in paths]
    runs = [p for p, k in zip(paths, kinds) if k == "run"]
    out: list[Section] = []
    for p, k in zip(paths, kinds):
        if k == "sweep":
            out.append(sweep_section(p))
        elif k == "cv":
            out.append(cv_section(p))
        elif k == "reproduce-table":
            out.append(reproduce_table_section(p))
        elif k == "reproduce":
            for sub in sorted(q for q in p.iterdir() if (q / "table.md").is_file()):
                out.append(reproduce_table_section(sub))
    if len(runs) == 1:
        out.insert(0, run_section(runs[0]))
    elif runs:
        out.insert(0, runs_section(runs))
    return out


def study_section(storage: str, study: str, where: Path) -> Section:
    """A sweep held in a study storage (e.g. PostgreSQL): its tables from the study (written to ``where``, as
    ``sweep summary`` writes them), curves for the runs whose folders are reachable here, the others named."""
    from ..stage2.sweeps import summary

    summary(where, storage, study)
    s = sweep_section(where, f"sweep study {study}")
    s.path = f"{study} in {storage.split('@')[-1]}"
    return s
