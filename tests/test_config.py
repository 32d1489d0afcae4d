from pathlib import Path

import pytest

from sppscl.config import CONFIG_DIR, Config, ConfigError, apply_overrides, load_config


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
    assert load_config("hfm").dataset.splits["dev"] == "valid.json"
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
        ("threads=-1", "train.threads must be 0"),
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


def test_relative_data_dir_resolves_against_project_root():
    cfg = load_config("mvsa-single")
    assert cfg.data_dir() == (CONFIG_DIR.parent / "../shared/data/mvsa-single")
    assert cfg.data_dir("/elsewhere") == Path("/elsewhere")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    from sppscl.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="'cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")
