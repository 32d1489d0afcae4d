"""The CLI's one error path: exit codes, one line per error, --debug / SPPSCL_DEBUG for the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from sppscl import cli
import sppscl.cli.console  # noqa: F401  (cli.console, cli.options below)
import sppscl.cli.options  # noqa: F401
from sppscl.cli import main
from sppscl.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE


def test_usage_errors_exit_2_without_traceback(capsys):
    assert main(["extract", "--config", "demo", "--batch-size", "0"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--batch-size" in err and "Traceback" not in err
    assert main(["train", "--cache", "x.h5", "--no-such-option"]) == EXIT_USAGE
    assert "--no-such-option" in capsys.readouterr().err


def test_internal_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    def boom(*a, **k):
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr("sppscl.stage2.probe.run_probe", boom)
    assert main(["probe", "--cache", str(tmp_path / "c.h5")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError: deliberate)" in err and "--debug" in err and "Traceback" not in err

    assert main(["--debug", "probe", "--cache", str(tmp_path / "c.h5")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and "deliberate" in err

    monkeypatch.setenv("SPPSCL_DEBUG", "1")
    assert main(["probe", "--cache", str(tmp_path / "c.h5")]) == EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err
    # the flag of one call does not leak into the next
    monkeypatch.delenv("SPPSCL_DEBUG")
    assert main(["probe", "--cache", str(tmp_path / "c.h5")]) == EXIT_FAILED
    assert "Traceback" not in capsys.readouterr().err


def test_interrupt_exits_130_and_says_how_to_resume(monkeypatch, capsys, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("sppscl.stage2.probe.run_probe", interrupted)
    assert main(["probe", "--cache", str(tmp_path / "c.h5")]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "Traceback" not in err


def test_console_script_goes_through_main(tmp_path):
    """`sppscl` (the installed script) and `python -m sppscl` both use main's error handling."""
    script = REPO / ".venv" / "bin" / "sppscl"
    for cmd in ([str(script)] if script.exists() else []) + [[sys.executable, "-m", "sppscl"]]:
        cmd = cmd if isinstance(cmd, list) else [cmd]
        done = subprocess.run([*cmd, "train", "--cache", str(tmp_path / "none.h5")], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "none.h5: no such cache" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--version"])
def test_root_options_still_work(flag, capsys):
    assert main([flag]) == 0
    assert "sppscl" in capsys.readouterr().out
    assert cli.console.state.debug is False
