"""``sppscl sweep``, ``sweep summary``, ``reproduce``, ``cv`` and ``ensemble``: many runs from one cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import ConfigError
from ..errors import masked_url, safe
from ..report import record_command
from .banner import DRY_RUN_HELP, print_banner
from .console import DEFAULT_SEEDS, DEVICE_HELP, STORAGE_HELP, WHICH_HELP, console, err_console, split_table, state
from .options import train_config

# cv and reproduce take --prune only to refuse it in one line (a hidden option), instead of typer's "no such option"
NEVER_PRUNES = "{command} --prune {flag}: {command} never prunes ({why}); --prune is for searches: sppscl sweep --random N --space ... --prune median|hyperband"

sweep_app = typer.Typer(
    no_args_is_help=False,
    help="Many stage-two runs from one cache: a grid or a random/TPE search, x seeds, resumable; tables mean ± std over seeds.",
)


@sweep_app.callback(invoke_without_command=True)
def sweep(
    ctx: typer.Context,
    cache: Optional[Path] = typer.Option(None, help="Feature cache written by `sppscl extract` (read once per worker)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a base hyperparameter for every run, e.g. --set epochs=50."),
    grid: list[str] = typer.Option([], "--grid", help="A swept key and its values, e.g. --grid lr=1e-4,5e-5 (repeat for more keys: every combination runs)."),
    random_: Optional[int] = typer.Option(None, "--random", min=1, help="Instead of a grid: N configurations drawn by an Optuna study over --space."),
    space: list[str] = typer.Option([], "--space", help="A search dimension for --random: key=low:high, key=low:high:log or key=a,b,c."),
    sampler: str = typer.Option("tpe", help="Optuna sampler for --random: random or tpe."),
    prune: Optional[str] = typer.Option(
        None, "--prune", help="With --random: stop a configuration's first seed early when Optuna's pruner finds its per-epoch dev accuracy behind: median or hyperband. Pruned runs are finished (never retried), in no mean; their other seeds are not started. Default: no pruning."
    ),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds, each configuration runs once per seed (the same default as reproduce)."),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", min=1, help="Parallel runs on this machine (default: min(runs, cores), or devices x --runs-per-device; each gets cores/jobs threads; 1 runs in this process)."
    ),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Place the parallel runs round-robin on these devices: cuda:0,cuda:1,... or all (overrides --device)."),
    runs_per_device: int = typer.Option(1, "--runs-per-device", min=1, help="With --devices: concurrent runs per device; small stage-two runs share a GPU well."),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    study: Optional[str] = typer.Option(None, "--study", help="With --storage: the study's name (the same on every machine)."),
    heartbeat: int = typer.Option(10, "--heartbeat", min=1, help="With --storage: seconds between a running trial's heartbeats; a trial silent for 4 beats is run again elsewhere."),
    out: Optional[Path] = typer.Option(None, help="Sweep directory (default: sweeps/<cache name>-<hash of the sweep's definition>, or sweeps/<study> with --study)."),
    quiet: bool = typer.Option(False, help="No progress bar and no start banner."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Many stage-two runs from one cache: a grid or a random/TPE search, x seeds, resumable; tables mean ± std over seeds."""
    if ctx.invoked_subcommand is not None:
        return
    from ..api import sweep as run_sweep
    from ..stage2.ensemble import ensemble_table
    from ..stage2.sweeps import Execution, default_sweep_dir, parse_devices, parse_seeds, print_summary

    if cache is None:
        raise ConfigError("sppscl sweep needs --cache (or: sppscl sweep summary ... for the tables of a finished sweep)")
    cfg = train_config(cache, config, set_, None, device, "sweep")  # a bad --set stops here, before the folder is made
    execution = Execution(jobs, parse_devices(devices), runs_per_device, storage, study, heartbeat)
    if prune is not None and random_ is None:
        raise ConfigError(f"--prune {prune}: only a search prunes (--random N --space ... --sampler tpe|random); a grid trains every run to its end")
    # a search with pruning is another sweep than one without; the folder of a search without it keeps its name
    out = out or (Path("sweeps") / study if study else default_sweep_dir(cache, config, set_, grid, space, random_, sampler, *([prune] if prune else [])))
    seed_list = parse_seeds(seeds)  # a usage error stops here, before the folder is made
    if not quiet or dry_run:
        from ..stage2.sweeps.spec import grid_configs, parse_grid

        n_configs = random_ if random_ else len(grid_configs(parse_grid(grid)))
        n_seeds = len(parse_seeds(seeds))
        what = f"{n_configs * n_seeds} runs ({n_configs} configuration(s) x {n_seeds} seed(s)) of {cfg.train.epochs} epochs"
        if _banner(cache, config, cfg, out, "sweep", what, dry_run):
            return
    record_command(out, state.argv)
    console.print(f"sweep directory: {out}" + (f" (study {study} in {masked_url(storage)})" if storage else ""), markup=False, highlight=False)
    result = run_sweep(
        cache, out, grid=grid, space=space, n_random=random_, sampler=sampler, seeds=seed_list, config=cfg, execution=execution,
        progress=not quiet, console=err_console, prune=prune,
    )
    ensembles = result.ensembles
    print_summary(result, console)
    if ensembles:
        head, body = ensemble_table(result, ensembles)
        t = Table(title="ensemble of each configuration's seeds, beside the mean ± std of those runs")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i < len(result.keys or ["config"]) + 1 else "right")
        for b in body:
            t.add_row(*[safe(x) for x in b])
        console.print(t)
    folder_report(out)
    if result.failed:
        raise typer.Exit(code=1)


@sweep_app.command("summary")
def sweep_summary(
    out: Optional[Path] = typer.Option(None, help="The sweep folder (its local study), or where to write the tables of a --storage study (default: sweeps/<study>)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The study storage the sweep ran against, e.g. postgresql://USER@HOST/DB."),
    study: Optional[str] = typer.Option(None, "--study", help="The study's name (needed with --storage, or when a folder holds several)."),
) -> None:
    """The tables of a sweep from its study, on any machine: runs.csv, summary.csv, summary.md, and the table printed."""
    from ..stage2.sweeps import print_summary, summary

    if out is None and (storage is None or study is None):
        raise ConfigError("give the sweep folder (--out), or --storage and --study")
    result = summary(out or Path("sweeps") / study, storage, study)
    print_summary(result, console, trained=False)
    if result.failed:
        raise typer.Exit(code=1)


def _banner(cache: Path, config: Optional[str], cfg, out: Path, what: str, runs: str, dry_run: bool) -> bool:
    """The start banner on stderr; with --dry-run also what would run, on stdout. True: stop here (a dry run)."""
    base = train_config(cache, config, [], None, None, what.split()[0])
    print_banner(err_console, cache, cfg, base, out, what)
    if dry_run:
        console.print(f"dry run: would train {runs} into {out}; nothing written", markup=False, highlight=False)
    return dry_run


def folder_report(folder: Path) -> None:
    """report.html in a sweep, cv or reproduce folder, after its tables. The tables are written by then, so a report
    that cannot be made is a warning naming the command that rebuilds it, not a failed command."""
    from ..report import REPORT_FILE, write_report

    try:
        path = write_report([folder], folder / REPORT_FILE)
    except Exception as e:  # noqa: BLE001 - any failure here must not turn finished runs into a failed command
        if state.debug:
            raise
        err_console.print(f"[yellow]warning:[/] no report ({safe(e)}); rebuild it with: sppscl report {safe(folder)} --out {safe(folder / REPORT_FILE)}", highlight=False)
        return
    console.print(f"report: {path}", markup=False, highlight=False)


def reproduce(
    table: str = typer.Argument(..., help="table4 (two-step vs one-step), table5 (loss ablation), table6 (HA layers), table7 (CMF vs concat) or fig5 (α)."),
    cache: Path = typer.Option(..., help="Feature cache; its dataset picks the paper's column (mvsa-single, mvsa-multiple, hfm)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a base hyperparameter for every run, e.g. --set epochs=50."),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds; every number printed is a mean over them (the same default as sweep)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Parallel runs (default: min(runs, cores); each gets cores/jobs threads; 1 runs in this process)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    out: Optional[Path] = typer.Option(None, help="Directory shared by all tables of one cache (default: sweeps/<cache name>-paper)."),
    cv: Optional[int] = typer.Option(None, "--cv", help="K: fill the table with K-fold cross-validated estimates over the labelled train+dev rows."),
    quiet: bool = typer.Option(False, help="No progress bar and no start banner."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    prune: Optional[str] = typer.Option(None, "--prune", hidden=True),
) -> None:
    """A paper ablation (Tables 4-7, Fig. 5) on this cache, in the paper's layout with the paper's numbers beside ours."""
    if prune is not None:
        raise ConfigError(NEVER_PRUNES.format(command="reproduce", flag=prune, why="every variant's mean is over whole runs, as the paper's"))
    from ..stage2.reproduce import print_reproduction
    from ..stage2.reproduce import reproduce as run_reproduce
    from ..stage2.sweeps import Execution, default_sweep_dir, parse_seeds

    cfg = train_config(cache, config, set_, None, device, "reproduce")
    # another base configuration gets its own directory, so runs of different bases never mix
    out = out or (Path("sweeps") / f"{cache.stem}-paper" if not (config or set_) else default_sweep_dir(cache, "paper", config, set_))
    seed_list, execution = parse_seeds(seeds), Execution(jobs)  # usage errors stop here, before the folder is made
    if not quiet or dry_run:
        from ..stage2.reproduce import TABLES

        if table not in TABLES:
            raise ConfigError(f"unknown table {table!r}: one of {', '.join(TABLES)}")
        n_variants, n_seeds = len(TABLES[table].variants), len(parse_seeds(seeds))
        what = f"{n_variants * n_seeds * (cv or 1)} runs ({n_variants} variants x {n_seeds} seed(s)" + (f" x {cv} folds" if cv else "") + f") of {cfg.train.epochs} epochs (runs already in {out / 'runs'} are reused)"
        if _banner(cache, config, cfg, out, f"reproduce {table}", what, dry_run):
            return
    record_command(out, state.argv)
    console.print(f"reproduce directory: {out}", markup=False, highlight=False)
    rep = run_reproduce(table, cache, cfg, out, seed_list, execution, progress=not quiet, console=err_console, cv=cv)
    print_reproduction(rep, console, err_console)
    folder_report(out)
    if rep.sweep.failed:
        raise typer.Exit(code=1)


def cv(
    cache: Path = typer.Option(..., help="Feature cache; its labelled train+dev rows are split into folds (its test split is never read)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or YAML (default: the preset named after the cache's dataset)."),
    set_: list[str] = typer.Option([], "--set", help="Override a hyperparameter for every run, e.g. --set epochs=20 --set patience=5."),
    folds: int = typer.Option(5, help="K: stratified folds over the labelled train+dev rows."),
    seeds: str = typer.Option(DEFAULT_SEEDS, help="Comma-separated seeds per fold (the same default as sweep); 2+ adds seed ensembles."),
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", min=1, help="Parallel runs (default: min(runs, cores); each gets cores/jobs threads; 1 runs in this process)."
    ),
    workers: Optional[str] = typer.Option(None, "--workers", hidden=True),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + " Every run uses it (preset: train.device)."),
    out: Optional[Path] = typer.Option(None, help="CV directory (default: sweeps/<cache name>-cv<K>-<hash>); rerun the same command to resume."),
    quiet: bool = typer.Option(False, help="No progress bar and no start banner."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    prune: Optional[str] = typer.Option(None, "--prune", hidden=True),
) -> None:
    """Cross-validated estimate: K folds x seeds, each selected on a validation part of its training folds and scored on
    the held-out fold; mean ± std, seed ensembles, and the probe on the same folds."""
    if prune is not None:
        raise ConfigError(NEVER_PRUNES.format(command="cv", flag=prune, why="the estimate is the mean over every fold's whole run"))
    from ..api import cv as run_cv
    from ..stage2.cv import print_cv
    from ..stage2.sweeps import Execution, default_sweep_dir, parse_seeds

    if workers is not None:
        # one meaning everywhere: --workers is image decoding (extract, data verify); cv decodes no images
        raise ConfigError(f"cv --workers {workers}: --workers means image-decoding workers (extract, data verify), and cv decodes no images; give the number of parallel runs with --jobs {workers}")
    cfg = train_config(cache, config, set_, None, device, "cv")  # a bad --set stops here, before the folder is made
    # seeds are not part of the name: rerunning with more seeds reuses the finished ones
    d = default_sweep_dir(cache, "cv", folds, config, set_)
    out = out or d.with_name(f"{cache.stem}-cv{folds}-{d.name.rsplit('-', 1)[1]}")
    seed_list, execution = parse_seeds(seeds), Execution(jobs)  # usage errors stop here, before the folder is made
    if not quiet or dry_run:
        n_seeds = len(parse_seeds(seeds))
        what = f"{folds * n_seeds} runs ({folds} folds x {n_seeds} seed(s)) of {cfg.train.epochs} epochs, and the probe on each fold"
        if _banner(cache, config, cfg, out, f"cv --folds {folds}", what, dry_run):
            return
    record_command(out, state.argv)
    console.print(f"cv directory: {out}", markup=False, highlight=False)
    result = run_cv(
        cache, out, folds=folds, seeds=seed_list, config=cfg, execution=execution, progress=not quiet, console=err_console,
    )
    print_cv(result, console)
    folder_report(out)
    if result.sweep.failed:
        raise typer.Exit(code=1)


def ensemble(
    runs: list[Path] = typer.Argument(..., help="Run directories (their best checkpoint, or --which last) or checkpoint files; same encoders and classes."),
    cache: Path = typer.Option(..., help="A cache extracted like the members' (for CV runs: the same cache, evaluated on their fold)."),
    out: Optional[Path] = typer.Option(None, help="Write results.json, predictions-<split>.csv and the model card (README.md) here."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    which: str = typer.Option("best", "--which", help=WHICH_HELP),
) -> None:
    """Average the class probabilities of several runs; metrics on every labelled split, predictions for every split."""
    from ..stage2.ensemble import ensemble as run_ensemble
    from ..stage2.sweeps import cell

    res = run_ensemble(runs, cache, out, device, which)
    console.print(split_table(res["splits"], f"ensemble of {len(res['members'])} runs (mean class probabilities)"))
    single = Table(
        title="the members alone: mean ± std",
        caption="[95% CI] of the members' mean, held-out split only: the same resampled rows for every member (paired bootstrap, as above)",
    )
    for col in ("split", "accuracy", "weighted F1", "macro F1"):
        single.add_column(col, justify="right" if col != "split" else "left")
    for name, m in res["members_mean"].items():
        single.add_row(safe(name), *[cell(m[k]["mean"], m[k]["std"], ci=m[k].get("ci95")) for k in ("accuracy", "weighted_f1", "macro_f1")])
    console.print(single)
    if "cv" in res:
        cvd = res["cv"]
        console.print(f"cross-validation fold {cvd['fold']} of {cvd['folds']}: " + "; ".join(f"{k} = {v}" for k, v in cvd["splits"].items()), markup=False, highlight=False)
    if out is not None:
        console.print(f"written: {out / 'results.json'}, {out}/predictions-<split>.csv, model card {out / 'README.md'}", markup=False, highlight=False)
