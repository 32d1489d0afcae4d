"""The allocator setting of issue 13: what it sets, what it leaves alone, and that it stops the page-fault churn.

Each check runs in a fresh interpreter: the setting is process-wide and would otherwise leak into the tests
that follow.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

# Allocates, touches and frees a 64 MiB block 20 times and returns the minor page faults that cost: with glibc's
# defaults every round maps fresh pages (above the 32 MiB dynamic ceiling); kept in the heap, only the first does.
CHURN = """
import ctypes, resource
def churn_faults():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        p = libc.malloc(64 << 20)
        ctypes.memset(p, 1, 64 << 20)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
SETTING = CHURN + """
import json, sys
from sppscl.allocator import keep_freed_memory
setting = keep_freed_memory() if sys.argv[1] == "on" else None
faults = churn_faults()
print(json.dumps({"faults": faults, "applied": setting.applied if setting else None,
                  "reason": setting.reason if setting else None,
                  "same_object": keep_freed_memory() is setting if setting else None}))
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return {**env, **extra}


def _run(mode: str, **env_extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SETTING, mode], env=_env(**env_extra), cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_setting_stops_the_churn_of_large_blocks():
    off, on = _run("off"), _run("on")
    assert on["applied"] == {"MALLOC_MMAP_THRESHOLD_": 1 << 30, "MALLOC_TRIM_THRESHOLD_": 1 << 30}
    assert on["same_object"] is True  # made once per process
    assert off["faults"] >= 15 * PAGES  # glibc's defaults: fresh pages (nearly) every round
    assert on["faults"] <= 3 * PAGES  # kept: the pages are touched once


def test_user_settings_are_kept():
    r = _run("on", MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    assert r["applied"] == {"MALLOC_TRIM_THRESHOLD_": 1 << 30}
    assert "MALLOC_MMAP_THRESHOLD_" in r["reason"]
    assert r["faults"] >= 15 * PAGES  # the user's small threshold stays in force, and so does the churn
    r = _run("on", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert r["applied"] == {"MALLOC_MMAP_THRESHOLD_": 1 << 30}
    assert "MALLOC_TRIM_THRESHOLD_" in r["reason"]


@pytest.mark.parametrize(
    "module, name, argv",
    [
        ("sppscl.stage1.extract", "extract", ["extract", "--config", "demo", "--quiet"]),
        ("sppscl.stage2.predict", "Predictor", ["predict", "--checkpoint", "best.pt", "--image", "a.jpg", "--text", "hi"]),
    ],
)
def test_the_commands_that_run_the_encoders_make_the_setting(tmp_path, module, name, argv):
    """A plain `sppscl extract` / `sppscl predict` (no environment variables) runs without the churn: measured
    inside the command, where the encoders would start."""
    code = CHURN + f"""
import sys
import {module} as m
def measure(*args, **kw):
    print("faults", churn_faults())
    raise SystemExit(0)
m.{name} = measure
from sppscl.cli import app
sys.argv = ["sppscl", *{argv!r}]
app()
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.startswith("faults "), out.stderr
    assert int(out.stdout.split()[1]) <= 3 * PAGES


def test_train_keeps_glibc_defaults(tmp_path):
    """Stage two measured no faster with the setting (docs/performance.md), so train leaves malloc alone."""
    code = CHURN + """
import sys
import sppscl.api as api
def measure(*args, **kw):
    print("faults", churn_faults())
    raise SystemExit(0)
api.train = measure  # the function `sppscl train` calls (the CLI is thin over the API)
from sppscl.cli import app
sys.argv = ["sppscl", "train", "--cache", "c.h5", "--quiet"]
app()
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.startswith("faults "), out.stderr
    assert int(out.stdout.split()[1]) >= 15 * PAGES
