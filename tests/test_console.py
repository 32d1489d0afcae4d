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
