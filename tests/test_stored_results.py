"""Results sppscl stores to skip work on a rerun (the probe's CV folds, a configuration's seed ensemble): one that is
not a regular file, damaged or nested too deeply is computed again, never read blindly (a FIFO blocked the read for
ever; a damaged file was an internal error)."""

from __future__ import annotations

import json
import os

import pytest

from sppscl.errors import SppsclError
from sppscl.outputs import read_stored_json


@pytest.mark.parametrize("content", ["{oops", "[" * 100_000 + "]" * 100_000, "[1, 2]", b"\xff\xfe{}"])
def test_a_damaged_stored_result_reads_as_none(tmp_path, content):
    path = tmp_path / "stored.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert read_stored_json(path) is None
    path.write_text(json.dumps({"key": 1}))
    assert read_stored_json(path) == {"key": 1}


def test_the_probes_cv_folds_are_computed_again_over_a_damaged_record_and_a_fifo_is_refused(tiny_cache, tmp_path):
    from sppscl.cache import FeatureCache
    from sppscl.stage2.cv import _cached_probe

    cache = FeatureCache(tiny_cache[0])
    damaged = tmp_path / "probe.json"
    damaged.write_text("[" * 100_000 + "]" * 100_000)
    folds = _cached_probe(damaged, cache, 2, 0, 0.1)
    assert len(folds) == 2 and json.loads(damaged.read_text())["folds"] == folds
    assert _cached_probe(damaged, cache, 2, 0, 0.1) == folds  # now read back
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SppsclError, match="FIFO"):
        _cached_probe(fifo, cache, 2, 0, 0.1)
    assert fifo.is_fifo()
