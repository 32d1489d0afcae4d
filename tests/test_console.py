"""What a person reads: hints for mistyped keys and options, the start banner, --dry-run, output in logs."""

from __future__ import annotations

import pytest

from sppscl.cli import main
from sppscl.config import Config, ConfigError, apply_overrides


@pytest.mark.parametrize(
    "override, hint",
    [("epoch=3", "did you mean 'epochs'?"), ("train.epoch=3", "did you mean 'train.epochs'?"), ("lamda_ce=5", "'lambda_ce'")],
)
def test_unknown_set_key_suggests_the_close_one(override, hint):
    with pytest.raises(ConfigError, match="unknown key") as e:
        apply_overrides(Config(), [override], ("train",), "train")
    assert hint in str(e.value)


def test_unknown_set_key_without_a_close_one_gets_no_guess():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["zzzz=1"], ("train",), "train")
    assert "did you mean" not in str(e.value)


def test_set_did_you_mean_reaches_the_command_line(tmp_path, capsys):
    assert main(["extract", "--config", "demo", "--set", "max_lenght=64", "--out", str(tmp_path / "c.h5")]) == 2
    assert "unknown key 'max_lenght' (did you mean 'max_length'?)" in capsys.readouterr().err
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--cache", "c.h5", "--epochs", "3"], "no option --epochs on `sppscl train`: epochs is a configuration key (train.epochs); use --set epochs=3"),
        (["sweep", "--cache", "c.h5", "--lr=1e-3"], "use --set lr=1e-3"),
        (["extract", "--config", "demo", "--max-length", "64"], "use --set max_length=64"),
        (["train", "--cache", "c.h5", "--max-length", "64"], "(encoders.max_length) of another stage, which `sppscl train` does not use"),
    ],
)
def test_an_option_that_is_a_set_key_points_to_set(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_an_unknown_option_that_is_no_key_keeps_clicks_message(capsys):
    assert main(["train", "--cache", "c.h5", "--outt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--outt" in err and "--set" not in err


# ------------------------------------------------------------------------------------ output that reads in logs


def test_a_table_printed_to_a_file_keeps_every_digit_and_its_title():
    import io

    from sppscl.cli.console import LogConsole, split_table

    title = "a long title that names the checkpoint, the cache and the split it was scored on, " * 2
    splits = {f"split-{i}": {"n": 450, "accuracy": 0.7311111, "weighted_f1": 0.7086222, "macro_f1": 0.6035333,
                             "ci95": {"accuracy": [0.6901234, 0.7712345]}, "ci95_method": "bootstrap"} for i in range(3)}
    out = io.StringIO()
    LogConsole(file=out).print(split_table(splits, title.strip()))
    text = out.getvalue()
    assert "…" not in text
    assert "0.7311 [0.6901, 0.7712]" in text and "0.6035" in text
    assert title.strip() in text  # on one line, not cut or wrapped
    # an explicit width is still honoured (a terminal's behaviour, for callers that ask)
    narrow = io.StringIO()
    LogConsole(file=narrow, width=40).print(split_table(splits, title.strip()))
    assert "…" in narrow.getvalue() or title.strip() not in narrow.getvalue()


def test_data_verify_puts_only_results_on_stdout(tmp_path, capsys):
    from test_layouts import clmlf_repo

    folder = clmlf_repo(tmp_path)
    assert main(["data", "verify", "--config", "mvsa-single", "--data-dir", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "OK: no problems found" in captured.out and "samples per split" in captured.out
    # the recognised layout is a note and the image check a progress bar: stderr only
    assert "note:" in captured.err and "note:" not in captured.out
    assert "checking images" not in captured.out


def test_transformers_loading_bar_is_silenced(tmp_path):
    from transformers.utils import logging as transformers_logging

    from sppscl.stage1.encoders import load_text_encoder

    transformers_logging.enable_progress_bar()
    from sppscl.stage1.encoders import _tiny_bert

    model, tokenizer = _tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    load_text_encoder(str(tmp_path / "bert"), max_length=16)
    assert not transformers_logging.is_progress_bar_enabled()


# ------------------------------------------------------------------------------------ the start banner and --dry-run


def _label_sorted_cache(tmp_path):
    """A tiny cache whose dev split holds one class (as --limit used to make of the label-sorted split files)."""
    from test_extract import _label_sorted_manifest

    from sppscl.stage1.extract import extract

    cfg = _label_sorted_manifest(tmp_path / "data", {"train": [4, 4, 4], "dev": [5, 0, 0], "test": [2, 2, 2]})
    extract(cfg, tmp_path / "c.h5", progress=False)
    return tmp_path / "c.h5"


@pytest.fixture(scope="module")
def sorted_cache(tmp_path_factory):
    return _label_sorted_cache(tmp_path_factory.mktemp("banner"))


def test_train_banner_and_dry_run_write_nothing(sorted_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--cache", str(sorted_cache), "--set", "epochs=3", "--set", "lr=1e-3", "--seed", "5", "--out", str(out), "--dry-run"]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "device cpu" in err and "torch thread" in err
    assert "train: 12 rows (positive 33%, neutral 33%, negative 33%)" in err
    assert "dev: 5 rows (positive 100%, neutral 0%, negative 0%)" in err
    assert "warning: split 'dev' holds one class only (positive)" in err
    # the resolved configuration's differences from its preset, and where the run would go
    assert "lr 0.0001 -> 0.001" in err and "epochs 150 -> 3" in err and "seed 42 -> 5" in err
    assert f"output: {out}" in err
    assert f"would train one run of 3 epochs (seed 5) into {out}" in captured.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sweep", "--grid", "lr=1e-3,1e-4", "--seeds", "1,2"], "would train 4 runs (2 configuration(s) x 2 seed(s)) of 150 epochs"),
        (["cv", "--folds", "3", "--seeds", "1"], "would train 3 runs (3 folds x 1 seed(s)) of 150 epochs, and the probe on each fold"),
        (["reproduce", "table5", "--seeds", "1,2"], "would train 6 runs (3 variants x 2 seed(s)) of 150 epochs"),
    ],
)
def test_dry_run_of_many_runs_says_what_would_run_and_writes_nothing(sorted_cache, tmp_path, capsys, argv, expected):
    out = tmp_path / "folder"
    assert main([*argv, "--cache", str(sorted_cache), "--out", str(out), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert expected in captured.out and f"output: {out}" in captured.err
    assert not out.exists()


def test_presets_show_takes_set_and_refuses_unknown_keys(capsys):
    assert main(["presets", "show", "mvsa-single", "--set", "epochs=3", "--set", "encoders.text=minilm-l6"]) == 0
    text = capsys.readouterr().out
    import yaml

    body = yaml.safe_load(text)
    assert body["train"]["epochs"] == 3 and body["encoders"]["text"] == "minilm-l6" and body["train"]["lr"] == 1e-4
    assert "# with --set epochs=3 --set encoders.text=minilm-l6" in text
    assert main(["presets", "show", "mvsa-single", "--set", "epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_a_data_folder_named_like_a_preset_is_not_read_as_the_config(tmp_path, monkeypatch):
    """docs/datasets.md clones HFM's release into ./hfm, then runs --config hfm (found by the docs' command test)."""
    from sppscl.config import load_config

    (tmp_path / "hfm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("hfm").dataset.name == "hfm"


# ------------------------------------------------------------------------------------ data in console output (issue 17 leftovers)

# what a hostile run name, path, class name or grid value may hold: a terminal escape (clear screen, red), CR, a C1
# CSI, a bidirectional override, and rich markup (a closing tag with nothing open made rich raise before)
HOSTILE = "ev\x1b[2J\x1b[31mil\r\x9b1m\u202e[/][bold]x"
SHOWN = "ev\\x1b[2J\\x1b[31mil\\x0d\\x9b1m\\u202e[/][bold]x"


def _printed(fn) -> str:
    import io

    from sppscl.cli.console import LogConsole

    buf = io.StringIO()
    fn(LogConsole(file=buf))
    return buf.getvalue()


def test_any_string_a_console_shows_has_its_control_characters_escaped():
    """The consoles escape control characters in every string they render (lines, cells, titles, captions), so a
    print path that forgot the helper cannot send data raw to the terminal."""
    from rich.table import Table

    def show(c):
        t = Table(title="t " + HOSTILE.replace("[", "("), caption="c " + HOSTILE.replace("[", "("))
        t.add_column("h")
        t.add_row("cell " + HOSTILE.replace("[", "("))
        c.print(t)
        c.print("line " + HOSTILE.replace("[", "("), markup=False)

    text = _printed(show)
    assert not [c for c in ("\x1b", "\r", "\x9b", "\u202e") if c in text], repr(text)
    assert text.count("\\x1b(2J") == 4 and text.count("\\u202e") == 4, text


def test_sweep_summary_table_shows_names_and_paths_from_data_escaped(tmp_path):
    from sppscl.stage2.sweeps import METRIC_COLUMNS, SweepResult, print_summary

    row = {"lr": HOSTILE, "config": HOSTILE, "n": 1, "n_failed": 0, "test_ci95_note": ""}
    row.update({f"{c}_mean": 0.5 for c in METRIC_COLUMNS} | {f"{c}_std": 0.0 for c in METRIC_COLUMNS})
    run = {"run": HOSTILE, "status": "failed", "error": "boom " + HOSTILE}
    result = SweepResult(tmp_path / HOSTILE, tmp_path / "runs", ["lr"], [run], [row], [], [HOSTILE], "weighted", [1])
    text = _printed(lambda c: print_summary(result, c))
    assert text.count(SHOWN) >= 4, text  # title, the lr cell, the failed run and its error.txt path
    assert not [c for c in ("\x1b", "\r", "\x9b", "\u202e") if c in text], repr(text)


def test_cv_and_reproduce_tables_show_cells_and_paths_from_data_escaped(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sppscl.stage2 import cv, reproduce

    monkeypatch.setattr(cv, "table_cells", lambda r: (["model " + HOSTILE, "acc"], [[HOSTILE, "0.5"]]))
    monkeypatch.setattr(cv, "notes", lambda r: ["note " + HOSTILE])
    fake = SimpleNamespace(folds=2, out=tmp_path / HOSTILE, sweep=SimpleNamespace(runs_dir=tmp_path / HOSTILE))
    text = _printed(lambda c: cv.print_cv(fake, c))
    assert text.count(SHOWN) >= 5, text
    assert not [c for c in ("\x1b", "\r", "\x9b", "\u202e") if c in text], repr(text)

    monkeypatch.setattr(reproduce, "table_cells", lambda *a: (["variant", "acc"], [[HOSTILE, "0.5"]]))
    monkeypatch.setattr(reproduce, "_notes", lambda *a: ["note " + HOSTILE])
    rep = SimpleNamespace(warning="warn " + HOSTILE, cv=None, spec=SimpleNamespace(title="Table 4 " + HOSTILE), dataset=HOSTILE, rows=[],
                          paper_column=None, sweep=SimpleNamespace(primary_f1="weighted", runs_dir=tmp_path / HOSTILE), ensembles={},
                          files=[tmp_path / HOSTILE])
    monkeypatch.setattr(reproduce, "_has_test", lambda rows: False)
    text = _printed(lambda c: reproduce.print_reproduction(rep, c))
    assert text.count(SHOWN) >= 5, text
    assert not [c for c in ("\x1b", "\r", "\x9b", "\u202e") if c in text], repr(text)


def test_evaluate_and_ensemble_tables_show_class_and_split_names_escaped(tmp_path, monkeypatch, capsys):
    from sppscl.cli import console as cli_console
    from sppscl.cli.console import print_metrics
    from sppscl.stage2 import ensemble as ens

    metrics = {"accuracy": 0.5, "weighted_f1": 0.5, "macro_f1": 0.5, "confusion_matrix": [[1]],
               "per_class": {HOSTILE: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}}
    monkeypatch.setattr(cli_console, "console", cli_console.LogConsole(file=(buf := __import__("io").StringIO())))
    print_metrics(metrics, "on " + HOSTILE)
    text = buf.getvalue()
    assert text.count(SHOWN) == 2, text
    assert "\x1b" not in text and "\u202e" not in text

    m = {"n": 3, "accuracy": 0.5, "weighted_f1": 0.5, "macro_f1": 0.5}
    mm = {k: {"mean": 0.5, "std": 0.0} for k in ("accuracy", "weighted_f1", "macro_f1")}
    monkeypatch.setattr(ens, "ensemble", lambda *a, **k: {"splits": {HOSTILE: m}, "members": ["a", "b"], "members_mean": {HOSTILE: mm}})
    assert main(["ensemble", "a", "b", "--cache", str(tmp_path / "c.h5")]) == 0
    out = capsys.readouterr().out
    assert out.count(SHOWN) == 2, out
    assert "\x1b" not in out and "\u202e" not in out


def test_extract_says_what_it_will_do_on_stderr_before_the_encoders_load(tmp_path, capsys, monkeypatch):
    """extract's start banner, like train's and sweep's: dataset and folder, encoders, device, batch size, workers,
    rows per split with class shares, the cache file; on stderr, before the (slow) encoder load; none with --quiet."""
    from test_failure_matrix import Dataset, rows

    from sppscl.stage1 import extract as stage1_extract

    ds = Dataset(tmp_path / "ds")
    # a split named with a terminal escape and markup (from the preset): shown escaped in the banner, bar and table
    ds.splits["ex\x1b[2J[red]tra"] = [dict(r, id=f"x{i}", image="images/train0.jpg") for i, r in enumerate(rows(3, "dev"))]
    preset = ds.write()
    real = stage1_extract.load_image_encoder
    seen = []
    monkeypatch.setattr(stage1_extract, "load_image_encoder", lambda *a, **k: (seen.append(capsys.readouterr()), real(*a, **k))[1])
    assert main(["extract", "--config", str(preset), "--out", str(tmp_path / "c.h5"), "--batch-size", "2", "--workers", "0"]) == 0
    before = seen[0]
    for line in (f"extract: dataset bad (format manifest) from {tmp_path / 'ds' / 'data'}", "encoders: image tiny-cnn, text tiny-bert (max_length 32",
                 "device cpu, precision fp32, batch size 2, 0 image-decoding worker(s)", "  train: 4 rows (positive 50%, neutral 25%, negative 25%)",
                 "  dev: 3 rows (positive 33%, neutral 33%, negative 33%)", f"output: {tmp_path / 'c.h5'}"):
        assert line in before.err, before.err
    after = capsys.readouterr()
    assert "extract: dataset" not in before.out + after.out
    assert "  ex\\x1b[2J[red]tra: 3 rows" in before.err and "ex\\x1b[2J[red]tra" in after.out
    assert "\x1b" not in before.err + before.out + after.err + after.out
    seen.clear()
    assert main(["extract", "--config", str(preset), "--out", str(tmp_path / "q.h5"), "--quiet"]) == 0
    assert "extract: dataset" not in seen[0].err + capsys.readouterr().err


def test_extract_progress_bar_on_a_terminal_shows_a_split_name_escaped(tmp_path, monkeypatch):
    """The bar's description is rendered from markup by rich (``Text.from_markup``), past the consoles' net: extract
    escapes the split name (from the preset) itself. Every description extract gives its bar is checked as rich
    renders it."""
    from rich.text import Text
    from test_failure_matrix import Dataset, rows

    from sppscl import api
    from sppscl.stage1 import extract as stage1_extract

    descriptions = []
    real = stage1_extract.make_progress

    def spying(*a, **k):
        prog = real(*a, **k)
        update = prog.update
        prog.update = lambda task, **kw: (descriptions.append(kw["description"]) if "description" in kw else None, update(task, **kw))[1]
        return prog

    monkeypatch.setattr(stage1_extract, "make_progress", spying)
    ds = Dataset(tmp_path / "ds")
    ds.splits["ex\x1b[2J[red]tra"] = [dict(r, id=f"x{i}", image="images/train0.jpg") for i, r in enumerate(rows(3, "dev"))]
    api.extract(ds.write(), tmp_path / "c.h5", progress=True, console=__import__("rich.console").console.Console(file=__import__("io").StringIO()))
    shown = [Text.from_markup(d).plain for d in descriptions]
    assert "extract ex\\x1b[2J[red]tra" in shown, shown
    assert not [d for d in shown if "\x1b" in d]


@pytest.mark.parametrize("argv", [["sweep", "--grid", "fusion=batch"], ["cv", "--folds", "2"], ["reproduce", "table7"]])
def test_a_refused_folder_is_not_announced_as_the_commands_folder(argv, tiny_cache, tmp_path, capsys):
    """sweep, cv and reproduce name their folder on stdout only once it is accepted (a FIFO there was announced as
    'sweep directory: ...', then refused)."""
    import os

    os.mkfifo(tmp_path / "folder")
    assert main([*argv, "--cache", str(tiny_cache[0]), "--seeds", "1", "--out", str(tmp_path / "folder"), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "directory" not in out and "is a FIFO" in err, (out, err)
