"""The paper's ablations from one cache: Tables 4-7 and Fig. 5, our numbers (mean ± std over seeds) beside the paper's.

Each table is a small sweep over the flags the paper ablates (SPEC "Ablations"), run by the sweep machinery
with the same resumable run directories and workers. All tables of one ``--out`` share ``<out>/runs/``: a
variant is stored as its difference from the base configuration, so the full model (Table 4's two-step,
Table 5's SPP-SCL, Table 6's four layers, Table 7's CMF, Fig. 5's α = 2/3) is trained once per seed for all.
Each table's own files go to ``<out>/<table>/`` (table.md, runs.csv, summary.csv, summary.md; fig5.png).

The paper reports one number per cell on the test split; the F1 is weighted F1 for MVSA and macro F1 for HFM.
Ours are test when the cache's test split is labelled, and dev (the split that selected the models, so an
optimistic estimate) only when it is not; every column says its split and selection. Each variant also gets
the ensemble of its seeds. With ``cv=K`` the cells are K-fold cross-validated estimates instead (``cv.py``).
When the cache's encoders are not the paper's, the table says so: the paper's numbers are then context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..cache import FeatureCache
from ..config import Config, ConfigError
from ..errors import safe
from ..outputs import atomic_write, check_output_folder, save_figure
from .cv import CVResult, cross_validate
from .cv import table_cells as cv_cells
from .ensemble import ensemble_cell, seed_ensembles
from .stats import bootstrap_method
from .sweeps import Execution, SweepResult, cell, config_slug, run_configs
from .sweeps.tables import missing_intervals

PAPER_COLUMNS = {"mvsa-single": "MVSA-S", "mvsa-multiple": "MVSA-M", "hfm": "HFM"}

# (ACC, F1) per dataset, copied from the paper's tables
_FULL = {"mvsa-single": (0.8133, 0.8015), "mvsa-multiple": (0.7871, 0.7753), "hfm": (0.9469, 0.9450)}
PAPER_ENCODERS = {"image": "resnet50", "text": "bert-base-uncased"}


def encoder_warning(provenance: dict) -> str | None:
    """A warning when the cache's encoders are not the paper's ResNet-50 + BERT-base (None when they are)."""
    names = {k: provenance["encoders"][k]["name"] for k in PAPER_ENCODERS}
    if names == PAPER_ENCODERS:
        return None
    return (
        f"this cache's encoders are {names['image']} + {names['text']}, not the paper's {PAPER_ENCODERS['image']} + "
        f"{PAPER_ENCODERS['text']}: the paper's numbers are context here, not a target."
    )


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, Any]  # every key the table varies, explicitly
    paper: dict[str, tuple[float, float]]  # dataset name -> (ACC, F1); empty: the paper gives no number


@dataclass(frozen=True)
class PaperTable:
    title: str
    variants: tuple[Variant, ...]
    note: str = ""


TABLES: dict[str, PaperTable] = {
    "table4": PaperTable(
        "Table 4: two-step vs one-step update",
        (
            Variant("SPP-SCL (two-step)", {"update": "two-step"}, _FULL),
            Variant(
                "SPP-SCL (one-step)",
                {"update": "one-step"},
                {"mvsa-single": (0.7956, 0.7684), "mvsa-multiple": (0.7276, 0.6929), "hfm": (0.8800, 0.8765)},
            ),
        ),
    ),
    "table5": PaperTable(
        "Table 5: without L_cl_m, without L_cl_i + L_cl_t",
        (
            Variant("SPP-SCL", {"use_inter": True, "use_intra": True}, _FULL),
            Variant(
                "w/o L_cl_m",
                {"use_inter": False, "use_intra": True},
                {"mvsa-single": (0.7289, 0.7040), "mvsa-multiple": (0.7688, 0.7500), "hfm": (0.7812, 0.7753)},
            ),
            Variant(
                "w/o L_cl_i, L_cl_t",
                {"use_inter": True, "use_intra": False},
                {"mvsa-single": (0.7244, 0.7170), "mvsa-multiple": (0.7459, 0.7411), "hfm": (0.9427, 0.9409)},
            ),
        ),
    ),
    "table6": PaperTable(
        "Table 6: hierarchical attention over the last k text layers",
        (
            Variant(
                "w: last three layers",
                {"ha_layers": 3},
                {"mvsa-single": (0.7667, 0.7565), "mvsa-multiple": (0.7612, 0.7275), "hfm": (0.9402, 0.9385)},
            ),
            Variant(
                "w: last two layers",
                {"ha_layers": 2},
                {"mvsa-single": (0.8222, 0.8181), "mvsa-multiple": (0.5918, 0.5847), "hfm": (0.9311, 0.9293)},
            ),
            Variant(
                "w: last one layer",
                {"ha_layers": 1},
                {"mvsa-single": (0.7133, 0.7025), "mvsa-multiple": (0.7282, 0.6840), "hfm": (0.6617, 0.6512)},
            ),
            Variant("SPP-SCL (last four layers)", {"ha_layers": 4}, _FULL),
        ),
    ),
    "table7": PaperTable(
        "Table 7: cross-modal fusion (CMF) vs concatenation",
        (
            Variant(
                "w/o CMF (concatenation)",
                {"fusion": "concat"},
                {"mvsa-single": (0.7289, 0.7482), "mvsa-multiple": (0.7453, 0.7389), "hfm": (0.8117, 0.8260)},
            ),
            Variant("SPP-SCL (CMF)", {"fusion": "batch"}, _FULL),
        ),
        note="The paper's image-only ResNet-50 and ViT rows of this table are not retrained here.",
    ),
    "fig5": PaperTable(
        "Fig. 5: sensitivity to the gate threshold α",
        tuple(
            Variant(f"α = {text}", {"alpha": value}, {})
            for text, value in (("1/3", 1 / 3), ("1/2", 1 / 2), ("2/3", 2 / 3), ("5/6", 5 / 6), ("1", 1.0))
        ),
        note="The paper gives Fig. 5 as a plot only (best at α = 2/3), so there are no paper numbers to set beside ours.",
    ),
}


@dataclass
class Reproduction:
    table: str
    spec: PaperTable
    dataset: str
    paper_column: str | None  # MVSA-S / MVSA-M / HFM, or None for other datasets
    rows: list[tuple[Variant, dict]]  # each variant with its summary row (mean/std/n over seeds)
    sweep: SweepResult
    markdown: str
    files: list[Path]
    ensembles: dict[str, dict]  # config slug -> the ensemble of its seeds' results (2+ seeds finished)
    warning: str | None
    cv: CVResult | None = None


def minimal_overrides(overrides: dict[str, Any], base: Config) -> dict[str, Any]:
    """A variant as its difference from the base configuration: equal variants of different tables share runs."""
    return {k: v for k, v in overrides.items() if getattr(base.train, k) != v}


def reproduce(
    table: str,
    cache_path: Path,
    base_cfg: Config,
    out: Path,
    seeds: list[int],
    execution: Execution = Execution(),
    progress: bool = True,
    console: Console | None = None,
    cv: int | None = None,
) -> Reproduction:
    """Train every variant of ``table`` for every seed (resumably), write ``<out>/<table>/table.md`` (and fig5.png).
    With ``cv=K``: every variant on K folds of the labelled train+dev rows instead (``<out>/<table>-cv<K>/``)."""
    check_output_folder(Path(out), "the reproduction")
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r} (tables: {', '.join(TABLES)})")
    spec = TABLES[table]
    out = Path(out)
    provenance = FeatureCache(cache_path).provenance
    dataset = provenance["dataset"]["name"]
    warning = encoder_warning(provenance)
    column = PAPER_COLUMNS.get(dataset)
    configs = [minimal_overrides(v.overrides, base_cfg) for v in spec.variants]
    if cv:
        report = out / f"{table}-cv{cv}"
        res = cross_validate(
            cache_path, base_cfg, report, cv, seeds, [(v.label, c) for v, c in zip(spec.variants, configs)], execution, out / "runs", True, progress, console
        )
        markdown = render_cv_markdown(spec, res, dataset, column, warning)
        atomic_write(report / "table.md", markdown, "the table")
        return Reproduction(table, spec, dataset, column, [], res.sweep, markdown, [report / "table.md"], {}, warning, res)
    keys = list(dict.fromkeys(k for v in spec.variants for k in v.overrides))
    report = out / table
    result = run_configs(cache_path, base_cfg, configs, seeds, report, keys, runs_dir=out / "runs", execution=execution, progress=progress, console=console)
    by_slug = {s["config"]: s for s in result.summary}
    rows = [(v, by_slug[config_slug(c)]) for v, c in zip(spec.variants, configs)]
    ensembles = seed_ensembles(result, cache_path, out / "ensembles")
    markdown = render_markdown(table, spec, rows, dataset, column, result, ensembles, warning)
    atomic_write(report / "table.md", markdown, "the table")
    files = [report / "table.md"]
    if table == "fig5":
        files.append(plot_alpha(rows, report / "fig5.png", dataset, result.primary_f1))
    return Reproduction(table, spec, dataset, column, rows, result, markdown, files, ensembles, warning)


def _cell(s: dict, col: str) -> str:
    """``mean ± std [95% CI] (n=3)``: the interval where the summary holds one (test columns, see sweeps/tables.py)."""
    lo, hi = s.get(f"{col}_ci95_low"), s.get(f"{col}_ci95_high")
    return cell(s[f"{col}_mean"], s[f"{col}_std"], s["n"], ci=(lo, hi) if lo is not None else None)


def _has_test(rows: list[tuple[Variant, dict]]) -> bool:
    return any(s.get("test_accuracy_mean") is not None for _, s in rows)


def table_cells(
    rows: list[tuple[Variant, dict]], dataset: str, column: str | None, primary_f1: str, ensembles: dict[str, dict] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and body shared by the Markdown file and the console table; every one of our cells says its n.

    Our columns are test when it is labelled, else dev; each says its split and that the model was selected on dev."""
    f1 = f"{primary_f1}_f1"
    split = "test" if _has_test(rows) else "dev"
    sel = "selected on dev" if split == "test" else "the selection split: optimistic"
    head = ["Method"]
    if column:
        head += [f"paper {column} test ACC", f"paper {column} test F1"]
    head += [f"ours {split} ACC ({sel})", f"ours {split} F1 ({sel})"]
    body = []
    for v, s in rows:
        paper = []
        if column:
            acc, f = v.paper.get(dataset, (None, None))
            paper = ["-" if acc is None else f"{acc:.4f}", "-" if f is None else f"{f:.4f}"]
        body.append([v.label, *paper, *[_cell(s, f"{split}_{m}") for m in ("accuracy", f1)]])
        ens = (ensembles or {}).get(s.get("config"))
        if ens is not None:
            m = ens["splits"][split]
            body.append([f"{v.label}: ensemble of its {len(ens['members'])} seeds", *(["", ""] if column else []), ensemble_cell(m, "accuracy"), ensemble_cell(m, f1)])
    return head, body


def _notes(spec: PaperTable, dataset: str, column: str | None, result: SweepResult, test: bool, warning: str | None = None) -> list[str]:
    f1_name = f"{result.primary_f1} F1"
    ours = (
        f"Ours: mean ± sample std (ddof=1; 0 when n=1) over seeds {', '.join(map(str, result.seeds))}; n = seeds averaged; "
        f"each run's best dev checkpoint; F1 = {f1_name}; ensemble rows average the seeds' class probabilities. "
        + (
            f"Scored on test, which took no part in training or selection. [95% CI]: {bootstrap_method()} of the test split, "
            "the same resampled rows for every seed and the seed mean per resample (paired); it covers which test rows were "
            "drawn, not the seeds (their spread is the ± std); an ensemble row's interval is its own bootstrap."
            if test
            else "The test split has no labels here, so the cells are dev, the split the models were selected on: optimistic; "
            "no interval is given for them."
        )
    )
    paper = (
        f"Paper: the {column} column, test split, one number per cell; F1 = weighted F1 for MVSA, macro F1 for HFM."
        if column
        else f"No paper column: the paper reports MVSA-S, MVSA-M and HFM, and this cache's dataset is {dataset!r}."
    )
    notes = [f"WARNING: {warning}"] if warning else []
    notes += [ours, paper]
    if test and missing_intervals(result.summary):
        notes.append(missing_intervals(result.summary))
    if spec.note:
        notes.append(spec.note)
    failed = [r for r in result.rows if r["status"] != "ok"]
    if failed:
        notes.append(f"{len(failed)} runs failed (rerun the same command to retry): " + "; ".join(f"{r['run']}: {r['error']}" for r in failed))
    return notes


def render_markdown(
    table: str, spec: PaperTable, rows, dataset: str, column: str | None, result: SweepResult, ensembles=None, warning: str | None = None
) -> str:
    head, body = table_cells(rows, dataset, column, result.primary_f1, ensembles)
    lines = [f"# {spec.title} ({dataset})", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    lines.append("")
    lines += [f"- {n}" for n in _notes(spec, dataset, column, result, _has_test(rows), warning)]
    if table == "fig5":
        lines.append("- Plot: fig5.png (mean with ± std error bars).")
    return "\n".join(lines) + "\n"


def cv_table(spec: PaperTable, res: CVResult, dataset: str, column: str | None) -> tuple[list[str], list[list[str]]]:
    """The CV table with the paper's test numbers beside each variant's single-run row."""
    head, body = cv_cells(res)
    by_label = {v.label: v for v in spec.variants}
    if column:
        head = [head[0], f"paper {column} test ACC", f"paper {column} test F1", *head[1:]]
        for line in body:
            acc, f = by_label[line[0]].paper.get(dataset, (None, None)) if line[0] in by_label else (None, None)
            line[1:1] = ["-" if acc is None else f"{acc:.4f}", "-" if f is None else f"{f:.4f}"]
    return head, body


def render_cv_markdown(spec: PaperTable, res: CVResult, dataset: str, column: str | None, warning: str | None) -> str:
    from .cv import notes as cv_notes

    head, body = cv_table(spec, res, dataset, column)
    lines = [f"# {spec.title} ({dataset}, {res.folds}-fold cross-validation)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    lines.append("")
    notes = ([f"WARNING: {warning}"] if warning else []) + cv_notes(res)
    if column:
        notes.append(f"Paper: the {column} column, test split of the official split, one number per cell (not cross-validated).")
    if spec.note:
        notes.append(spec.note)
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def print_reproduction(rep: Reproduction, console: Console, err_console: Console | None = None) -> None:
    """The table on ``console`` (results: stdout); the encoder warning on ``err_console`` (stderr, where every note
    and warning goes; default ``console``). table.md keeps the warning beside its table."""
    if rep.warning:
        (err_console or console).print(f"[bold yellow]warning:[/] {safe(rep.warning)}", highlight=False)
    if rep.cv is not None:
        from .cv import notes as cv_notes

        head, body = cv_table(rep.spec, rep.cv, rep.dataset, rep.paper_column)
        t = Table(title=safe(f"{rep.spec.title} ({rep.dataset}, {rep.cv.folds}-fold CV, held-out scores)"))
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right")
        for line in body:
            t.add_row(*[safe(x) for x in line])
        console.print(t)
        for note in cv_notes(rep.cv):
            console.print(safe(note), highlight=False)
        console.print(f"written: {safe(', '.join(str(f) for f in rep.files))} (runs: {safe(rep.sweep.runs_dir)})", highlight=False)
        return
    head, body = table_cells(rep.rows, rep.dataset, rep.paper_column, rep.sweep.primary_f1, rep.ensembles)
    t = Table(title=safe(f"{rep.spec.title} ({rep.dataset})"))
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for line in body:
        t.add_row(*[safe(x) for x in line])
    console.print(t)
    for note in _notes(rep.spec, rep.dataset, rep.paper_column, rep.sweep, _has_test(rep.rows)):  # the warning went above
        console.print(safe(note), highlight=False)
    console.print(f"written: {safe(', '.join(str(f) for f in rep.files))} (runs: {safe(rep.sweep.runs_dir)})", highlight=False)


def plot_alpha(rows: list[tuple[Variant, dict]], path: Path, dataset: str, primary_f1: str) -> Path:
    """Fig. 5's layout: accuracy and F1 against α, mean with ± std error bars, n per point. One panel for dev (what
    selected each run's checkpoint) and, when the runs were scored on test, one for test: the split table.md reports."""
    # the Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [(v, s) for v, s in rows if s["n"] > 0]
    xs = [v.overrides["alpha"] for v, _ in done]
    splits = [("dev", "dev (selection)")] + ([("test", "test (scored: the table's split)")] if _has_test(rows) else [])
    fig = Figure(figsize=(5.2 * len(splits), 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, (split, title) in zip(axes, splits):
        for metric, label, marker in (("accuracy", "ACC", "o"), (f"{primary_f1}_f1", f"{primary_f1} F1", "s")):
            ys = [s[f"{split}_{metric}_mean"] for _, s in done]
            es = [s[f"{split}_{metric}_std"] for _, s in done]
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=f"{split} {label}")
        # n under each α's tick: annotations beside the points collided with the error bars and the frame
        ax.set_xticks([v.overrides["alpha"] for v, _ in rows], [f"{v.label.split('= ')[1]}\nn={s['n']}" for v, s in rows])
        ax.margins(x=0.08, y=0.15)
        ax.axvline(2 / 3, color="grey", linestyle=":", linewidth=1, label="paper's best α = 2/3")
        ax.set_xlabel("α (step-2 gate threshold)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("score (0-1), mean ± std over seeds")
    fig.suptitle(f"Sensitivity to α ({dataset})")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path
