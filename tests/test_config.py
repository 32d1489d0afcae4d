from pathlib import Path

import pytest

import yaml

from sppscl.config import PRESET_DIR, Config, ConfigError, apply_overrides, load_config, preset_names


@pytest.mark.parametrize("name", ["mvsa-single", "mvsa-multiple", "hfm", "demo"])
def test_presets_load_and_validate(name):
    cfg = load_config(name)
    assert cfg.dataset.name == name
    cfg.validate()


def test_table2_values():
    """The presets carry SPEC §6 / Table 2 exactly."""
    expect = {
        "mvsa-single": dict(lambda_ce=5, lr=1e-4, step_size=10, batch_size=64),
        "mvsa-multiple": dict(lambda_ce=5, lr=1e-4, step_size=15, batch_size=128),
        "hfm": dict(lambda_ce=10, lr=5e-5, step_size=5, batch_size=256),
    }
    for name, values in expect.items():
        t = load_config(name).train
        for k, v in values.items():
            assert getattr(t, k) == v, (name, k)
        assert (t.gamma, t.weight_decay, t.dropout, t.epochs, t.tau, t.dim) == (0.5, 1e-6, 0.2, 150, 0.07, 32)
        assert t.alpha == pytest.approx(2 / 3)
        # the authors' evaluation batch for every dataset: with batch fusion a prediction depends on it
        assert t.eval_batch_size == 64, name
    assert load_config("hfm").dataset.primary_f1 == "macro"


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["lr=5e-5", "epochs=3", "use_inter=false", "alpha=1/3", "fusion=sample", "encoders.max_length=64"])
    assert cfg.train.lr == 5e-5 and cfg.train.epochs == 3 and cfg.train.use_inter is False
    assert cfg.train.alpha == pytest.approx(1 / 3)
    assert cfg.train.fusion == "sample" and cfg.encoders.max_length == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("lrr=1", "unknown key 'lrr'"),
        ("epochs=ten", "expected a int"),
        ("fusion=attention", "not one of batch, sample, concat"),
        ("use_inter=maybe", "expected true/false"),
        ("ha_layers=5", "ha_layers=5"),
        ("nosection.x=1", "unknown section"),
        ("lr", "key=value"),
        ("threads=-1", "train.threads=-1: must be 0"),
            ("lr=nan", "train.lr=nan: must be a finite number"),
            ("epochs=5/2", "expected a int"),
            ("alpha=inf", "train.alpha=inf: must be a finite number"),
            ("batch_size=0", "train.batch_size=0: must be at least 2"),
            ("gamma=1.5", "train.gamma=1.5: must be in"),
            ("seed=-3", "train.seed=-3: must be between"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [override])


def test_unknown_key_in_preset_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown key train.learning_rate"):
        load_config(p)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*hfm"):
        load_config("nope")


def test_round_trip_through_dict():
    cfg = apply_overrides(load_config("hfm"), ["lr=1e-3"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("name", ["mvsa-single", "mvsa-multiple", "hfm"])
def test_preset_data_dir_is_data_dataset_under_the_current_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(name).data_dir() == tmp_path / "data" / name
    # the same preset named by its path is still a preset
    assert load_config(PRESET_DIR / f"{name}.yaml").data_dir() == tmp_path / "data" / name


def test_command_line_data_dir_resolves_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("hfm")
    assert cfg.data_dir("mydata") == tmp_path / "mydata"
    assert cfg.data_dir(Path("../x")) == tmp_path.parent / "x"
    assert cfg.data_dir("/elsewhere") == Path("/elsewhere")


def test_data_dir_in_a_yaml_file_resolves_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.yaml").write_text("dataset: {name: mine, format: clmlf, data_dir: ../sets/mine}\n")
    monkeypatch.chdir("/")
    assert load_config(tmp_path / "exp" / "mine.yaml").data_dir() == tmp_path / "sets" / "mine"
    assert load_config(tmp_path / "exp" / "mine.yaml").data_dir("d") == Path("/d")


def test_presets_are_listed_and_shown_with_every_default(capsys):
    from sppscl.cli import main

    assert main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert listed == preset_names() == ["demo", "hfm", "mvsa-multiple", "mvsa-single"]
    assert main(["presets", "show", "hfm"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config("hfm").to_dict()
    del cfg["source"]
    assert shown == cfg
    assert main(["presets", "show", "nope"]) == 2
    assert "no preset named 'nope'" in capsys.readouterr().err


def test_a_shown_preset_saved_to_a_file_loads_as_the_same_config(tmp_path, monkeypatch):
    from sppscl.presets import preset_yaml

    (tmp_path / "mine.yaml").write_text(preset_yaml("mvsa-single"))
    monkeypatch.chdir(tmp_path)
    mine, preset = load_config(tmp_path / "mine.yaml"), load_config("mvsa-single")
    assert mine.to_dict() | {"source": ""} == preset.to_dict() | {"source": ""}
    # copied next to the working directory, the relative data_dir means the same folder
    assert mine.data_dir() == preset.data_dir()


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    from sppscl.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="'cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")
