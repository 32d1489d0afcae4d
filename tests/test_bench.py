"""Smoke test of the benchmark suite: every section's code path at tiny sizes, and the shape of its reports.

Never asserts a time: benchmarks report, they do not fail on numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
# bench/ is run as `python -m bench.run` from the repository root, not installed with the package
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import Row, Target, default_threads, fmt, markdown  # noqa: E402
from bench.run import RUNNERS, TABLE_ORDER, main  # noqa: E402

SECTIONS = {"caching", "extraction", "ranks", "loader", "scale", "compute", "sweeps"}
# The default suite's one bench run: the CPU suite's in-process sections and the GPU run's CPU form (``gpu``, which
# writes results-gpu.md/json beside results.json). Extraction, ranks and sweeps start a dozen fresh interpreters between
# them (about two minutes on 2 cores): their smoke run is ``slow``, and the GPU form's extraction (extract in fp32/bf16,
# channels_last on and off), ranks (a torchrun rank's cache equal to a plain process's) and sweeps (run_configs) take
# the same code paths in the default one.
SMOKE_SECTIONS = {"caching", "loader", "scale", "compute", "gpu"}


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=200)


def _bench(tmp_path_factory, name: str, sections) -> tuple[int, Path, Path]:
    root = tmp_path_factory.mktemp(name)
    out, work = root / "out", root / "work"
    # serve's section starts sppscl processes and a server: its own slow test below
    code = main(["--quick", "--scale", "40", "--only", ",".join(s for s in RUNNERS if s in sections), "--out", str(out), "--workdir", str(work)], console=_quiet())
    return code, out, work


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[int, Path, Path]:
    """The default suite's one bench run (``--quick``, with the GPU run's CPU form as its last section)."""
    return _bench(tmp_path_factory, "bench", SMOKE_SECTIONS)


@pytest.fixture(scope="module")
def every_section_run(tmp_path_factory) -> tuple[int, Path, Path]:
    return _bench(tmp_path_factory, "bench-all", SECTIONS)


@pytest.fixture(params=["smoke", pytest.param("every", marks=pytest.mark.slow)])
def quick_run(request) -> tuple[int, Path, Path]:
    """Either run: the report-shape checks hold for both."""
    return request.getfixturevalue("smoke_run" if request.param == "smoke" else "every_section_run")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_writes_json_with_its_sections_and_the_gpu_form(smoke_run):
    code, out, work = smoke_run
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["sections"]) == SMOKE_SECTIONS
    assert {"cores", "torch_threads", "torch", "cpu", "load_average_start"} <= set(report["machine"])
    assert report["profile"]["name"] == "quick" and report["profile"]["scale_sizes"] == [40]
    # the GPU form adds its own report, not rows
    assert {r["section"] for r in report["rows"]} == SMOKE_SECTIONS - {"gpu"}
    gpu = report["sections"]["gpu"]["raw"]
    assert gpu["exit_code"] == 0 and gpu["failed"] == [] and gpu["results"] == str(out / "results-gpu.json")
    keys = {(r["section"], r["key"]) for r in report["rows"]}
    assert {("scale", "bytes_gzip"), ("caching", "run_hfm")} <= keys
    assert (("compute", "threads") in keys) == (default_threads() > 1)
    order = [TABLE_ORDER.index(r["section"]) for r in report["rows"]]
    assert order == sorted(order)
    # temporary caches and images are gone (the GPU form's too); the folder given as --workdir itself is left alone
    assert work.is_dir() and not any(work.iterdir())


@pytest.mark.slow
def test_quick_run_writes_json_with_every_section(every_section_run):
    code, out, work = every_section_run
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["sections"]) == SECTIONS
    assert {"cores", "torch_threads", "torch", "cpu", "load_average_start"} <= set(report["machine"])
    assert report["profile"]["name"] == "quick" and report["profile"]["scale_sizes"] == [40]
    assert {r["section"] for r in report["rows"]} == SECTIONS
    keys = {(r["section"], r["key"]) for r in report["rows"]}
    assert {("extraction", "offline_no_workers"), ("scale", "bytes_gzip"), ("caching", "run_hfm")} <= keys
    assert (("compute", "threads") in keys) == (default_threads() > 1)
    # the 2-process extraction wrote the same cache as the single process
    assert report["sections"]["ranks"]["raw"]["identical"] is True
    # the table follows the order
    order = [TABLE_ORDER.index(r["section"]) for r in report["rows"]]
    assert order == sorted(order)
    # temporary caches and images are gone; the folder given as --workdir itself is left alone
    assert work.is_dir() and not any(work.iterdir())


def test_every_ratio_is_a_finite_positive_number(quick_run):
    _, out, _ = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        assert _positive(r["ours"]), r
        assert _positive(r["ratio"]), r
        if r["alternative"] is not None:
            assert _positive(r["alternative"]), r
            # the ratio relates the two columns (ours/alt or alt/ours), up to rounding
            assert math.isclose(r["ratio"], r["ours"] / r["alternative"], rel_tol=1e-6) or math.isclose(
                r["ratio"], r["alternative"] / r["ours"], rel_tol=1e-6
            ), r


def test_targets_carry_met_flags(quick_run):
    _, out, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    targeted = [r for r in report["rows"] if r["target"] is not None]
    assert all(isinstance(r["met"], bool) for r in targeted)
    assert [t["met"] for t in report["targets"]] == [r["met"] for r in targeted]
    keys = {(r["section"], r["key"]) for r in targeted}
    assert {("caching", "epoch_hfm"), ("loader", "stream"), ("scale", "rss_40"), ("compute", "flops")} <= keys
    if "extraction" in report["sections"]:
        # caching x3, extraction x2 (+ its kernel share x2), loader x2, peak RSS of the largest size, compute
        assert len(targeted) == 11
        assert {("extraction", "paper"), ("extraction", "offline_sys_share"), ("extraction", "paper_sys_share")} <= keys
    else:
        # caching x3, loader x2, peak RSS of the largest size, compute
        assert len(targeted) == 7


def test_markdown_table_has_one_line_per_row(quick_run):
    _, out, _ = quick_run
    md = (out / "results.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0] == "| measurement | ours | alternative | ratio | target | met? |"
    assert len(table) == 1 + len(rows)
    for line, r in zip(table[1:], rows):
        assert line.startswith(f"| {r['measurement']}")
        assert line.count("|") == 7
    # every referenced note is written below the table
    refs = sum(1 for r in rows if r["note"])
    assert f"\n{refs}. " in md


def test_only_runs_the_named_sections(tmp_path):
    code = main(["--quick", "--only", "loader", "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w")], console=_quiet())
    assert code == 0
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(report["sections"]) == ["loader"]
    assert {r["section"] for r in report["rows"]} == {"loader"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "caching,warp"], "unknown section(s) warp"),
        (["--scale", "1000,lots"], "--scale '1000,lots'"),
        (["--scale", "5"], "at least 20 samples"),
        (["--official-batches", "0"], "--official-batches must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, message):
    buf = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    assert main(["--quick", "--out", str(tmp_path / "o"), *args], console=buf) == 2
    buf.file.close()
    assert message in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "o").exists()


def test_target_and_formatting():
    assert Target(">=", 300).met(1.0, 301.0) is True
    assert Target(">=", 300).met(1.0, 299.0) is False
    assert Target("<=", 4e9, on="ours", unit="B").met(5e9, 0.1) is False
    assert Target("<=", 1.1).met(1.0, float("nan")) is None
    assert fmt(5400.0, "s") == "90 min"
    assert fmt(9.6e9, "B") == "9.6 GB"
    assert fmt(1234.0, "x") == "1,234×"
    row = Row("s", "k", "thing", 2.0, "s", 600.0, "alt", 300.0, target=Target(">=", 300), note="why")
    assert row.met is True
    md = markdown([row], "header")
    assert "| thing [1] | 2 s | 10 min (alt) | 300× | ≥ 300× | yes |" in md
    assert md.rstrip().endswith("1. why")


@pytest.mark.slow
def test_serve_section_answers_equal_predict_alone(tmp_path):
    """The serve section's code path at tiny sizes: its rows, and no answer under load differing from predict alone."""
    out = tmp_path / "out"
    assert main(["--quick", "--only", "serve", "--out", str(out), "--workdir", str(tmp_path / "work")], console=_quiet()) == 0
    report = json.loads((out / "results.json").read_text())
    keys = {r["key"] for r in report["rows"]}
    assert keys == {"single_c1", "single_c4", "single_c16", "batch_c1", "batch_c4", "batch_c16", "equal"}
    raw = report["sections"]["serve"]["raw"]
    assert raw["mismatches_single"] == raw["mismatches_batch"] == 0 and raw["answers_checked"] >= 16 + 4 + 1 + 16 * 4
    assert [lv["clients"] for lv in raw["single"]] == [1, 4, 16] and all(_positive(lv["p95_s"]) for lv in raw["single"] + raw["batch_levels"])


# ----------------------------------------------------------------------------------------- the GPU run's CPU form

GPU_SECTIONS = ["extraction", "ranks", "stage2", "sweeps"]


@pytest.fixture(scope="module")
def gpu_quick_run(smoke_run) -> tuple[int, dict, str, Path]:
    """``python -m bench.run --gpu --quick`` on the CPU, the same code the GPU run takes, as the smoke run's last section
    (with a generous budget: the shared test machine must not turn a slow section into a budget skip)."""
    _, out, work = smoke_run
    report = json.loads((out / "results-gpu.json").read_text())
    code = json.loads((out / "results.json").read_text())["sections"]["gpu"]["raw"]["exit_code"]
    return code, report, (out / "results-gpu.md").read_text(), work


def _figures(report: dict, section: str) -> list[dict]:
    return [f for f in report["figures"] if f["section"] == section]


def test_gpu_quick_runs_every_section_and_cleans_up(gpu_quick_run):
    code, report, md, work = gpu_quick_run
    assert code == 0, report["failed"]
    assert report["sections_run"] == GPU_SECTIONS
    assert report["failed"] == [] and report["skipped"] == []
    assert all(_figures(report, s) for s in GPU_SECTIONS)
    assert set(report["section_timings"]) == set(GPU_SECTIONS)
    # one table line per figure, bars inside cells escaped
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(report["figures"])
    assert all(ln.replace("\\|", "").count("|") == 5 for ln in table)
    assert work.is_dir() and not any(work.iterdir())


def test_gpu_quick_extraction_measures_precisions_and_layouts(gpu_quick_run):
    _, report, _, _ = gpu_quick_run
    runs = [f["raw"] for f in _figures(report, "extraction") if "samples_per_s" in f["raw"]]
    assert {(r["precision"], r["channels_last"]) for r in runs} == {("fp32", True), ("fp32", False), ("bf16", True), ("bf16", False)}
    assert all(_positive(r["samples_per_s"]) and _positive(r["encoders_alone_samples_per_s"]) for r in runs)
    diffs = {f["measurement"].split(": ", 1)[1]: f["raw"] for f in _figures(report, "extraction") if "image" in f["raw"]}
    bf16 = diffs["largest fp32 − bf16 difference in the cache"]
    layout = diffs["largest channels_last on − off difference in the cache (fp32)"]
    for kind in ("image", "tokens"):
        # bf16 really ran (its features differ), and the two layouts compute the same features up to rounding
        assert 0 < bf16[kind]["max_abs_diff"] < 0.05 * bf16[kind]["max_abs_value"]
        assert layout[kind]["max_abs_diff"] <= 1e-3 * layout[kind]["max_abs_value"]
    assert {f["raw"]["ratio"] > 0 for f in _figures(report, "extraction") if "ratio" in f["raw"]} == {True}


def test_gpu_quick_torchrun_rank_forms_a_group_and_equals_a_single_process(gpu_quick_run):
    _, report, _, _ = gpu_quick_run
    (check,) = _figures(report, "ranks")
    assert check["raw"] == {"held": True, "backend": "gloo", "identical": True, "differing": []}


def test_gpu_quick_stage_two_and_sweeps(gpu_quick_run):
    _, report, _, _ = gpu_quick_run
    epochs = _figures(report, "stage2")
    assert [f["measurement"].split(",")[1].split("(")[0].strip() for f in epochs] == ["MVSA-Single", "HFM"]
    assert all(_positive(f["raw"]["epoch_seconds"]) for f in epochs)
    (sweep,) = _figures(report, "sweeps")
    assert sweep["raw"]["runs_per_device"] == 1 and sweep["raw"]["devices"] == ["cpu"]
    assert _positive(sweep["raw"]["runs_per_minute"]) and sweep["raw"]["gpu_utilisation_percent"] is None


def test_gpu_section_with_a_missing_package_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    from bench.gpu import main as gpu_main
    from bench.gpu.report import Report

    class Missing:
        @staticmethod
        def run(ctx, report):
            raise ModuleNotFoundError("No module named 'h5py'", name="h5py")

    monkeypatch.setattr(gpu_main.importlib, "import_module", lambda name: Missing)
    report = Report(tmp_path / "r.md", tmp_path / "r.json")
    gpu_main.run_section("stage2", None, report)
    assert report.skips == [("stage2", "needs the Python package 'h5py', which is not installed here")]
    assert report.failures == []
    assert "stage2     skipped: needs the Python package 'h5py'" in capsys.readouterr().out
    assert "- stage2: needs the Python package 'h5py'" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quick", "--only", "stage2,warp"], "unknown section(s) warp"),
        (["--quick", "--budget", "0"], "--budget 0.0: expected a positive number"),
        (["--quick", "--device", "meta"], "only cuda and cpu are measured"),
        (["--quick", "--device", "warp"], "is not a device"),
    ],
)
def test_gpu_bad_arguments_exit_2(tmp_path, capsys, args, message):
    assert main(["--gpu", *args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_full_run_without_cuda_says_to_use_quick(tmp_path, capsys):
    assert main(["--gpu", "--out", str(tmp_path / "o")]) == 2
    assert "python -m bench.run --gpu --quick" in capsys.readouterr().err


def test_gpu_entry_imports_only_the_standard_library_and_torch():
    """A GPU node's own Python may lack the suite's packages: `--gpu` must get to its sections without them."""
    code = "import sys, bench.run, bench.gpu.main; print(','.join(m for m in ('rich', 'h5py', 'sppscl', 'optuna', 'transformers') if m in sys.modules))"
    done = __import__("subprocess").run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_gpu_section_belongs_to_the_quick_profile(tmp_path):
    buf = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    assert main(["--only", "gpu", "--out", str(tmp_path / "o")], console=buf) == 2
    buf.file.close()
    assert "the GPU run's CPU form is part of --quick" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "o").exists()


def test_pruning_section_is_skipped_in_one_line_without_the_data(tmp_path, monkeypatch):
    from rich.console import Console

    from bench import pruning
    from bench.common import Context
    from bench.profiles import QUICK

    monkeypatch.setattr(pruning, "DATA", tmp_path / "no-mvsa")
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        sec = pruning.run(Context(QUICK, tmp_path, Console(file=fh, width=200)))
    assert sec.rows == [] and "no MVSA-Single data" in sec.raw["skipped"]
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    assert len(lines) == 1 and "skipped: no MVSA-Single data at" in lines[0]
    # not in a quick run unless named: it trains on the real data for up to 15 minutes
    from bench.run import parse_args, resolve

    assert "pruning" not in resolve(parse_args(["--quick"]))[1] and "pruning" in resolve(parse_args([]))[1]


def test_pruning_rows_compare_best_dev_score_and_epochs_and_name_a_budget_cut():
    from bench.pruning import rows

    off = {"finished": 12, "pruned": 0, "epochs": 120, "best_dev_accuracy": 0.70, "cut_by_budget": True}
    on = {"finished": 24, "pruned": 15, "epochs": 60, "best_dev_accuracy": 0.7175, "cut_by_budget": False}
    best, epochs = rows(off, on)
    assert (best.ours, best.alternative) == (0.7175, 0.70) and best.ratio == pytest.approx(0.7175 / 0.70)
    assert (epochs.ours, epochs.alternative, epochs.ratio) == (60, 120, 0.5)
    assert "the budget stopped the search without pruning" in epochs.note and "24 with (15 pruned), 12 without" in epochs.note


def test_pruning_subset_is_the_cache_extract_limit_writes(tiny_cache, tmp_path):
    """The pruning bench cuts its --limit subset from the full cache instead of re-extracting: the same rows, features,
    offsets and provenance as `extract --limit`, and a cache stage two opens."""
    import h5py
    import numpy as np

    from bench.pruning import subset_cache
    from sppscl.cache import FeatureCache
    from sppscl.stage1.extract import extract

    path, cfg = tiny_cache
    ours, theirs = tmp_path / "subset.h5", tmp_path / "limit.h5"
    n = subset_cache(path, ours, 7)
    extract(cfg, theirs, limit=7, progress=False)
    FeatureCache(ours)  # the layout checks pass
    with h5py.File(ours, "r") as a, h5py.File(theirs, "r") as b:
        assert a.attrs["provenance"] == b.attrs["provenance"] and "limit_per_split" in a.attrs["provenance"]
        assert set(a["splits"]) == set(b["splits"]) and n == {s: len(b["splits"][s]["ids"]) for s in b["splits"]}
        assert all(v <= 7 for v in n.values()) and sum(n.values()) < sum(len(g["ids"]) for g in h5py.File(path, "r")["splits"].values())
        for split in b["splits"]:
            for key in ("ids", "texts", "labels", "offsets", "status"):
                assert (a["splits"][split][key][()] == b["splits"][split][key][()]).all(), (split, key)
            for key in ("image", "tokens"):
                np.testing.assert_allclose(a["splits"][split][key][()], b["splits"][split][key][()], atol=1e-3)
    mtime = ours.stat().st_mtime_ns
    assert subset_cache(path, ours, 7) == n and ours.stat().st_mtime_ns == mtime  # reused, not rewritten
