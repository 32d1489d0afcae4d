"""One extraction in a fresh process, alone or as a torchrun rank: ``python -m bench.extract_worker PRESET OUT
LIMIT THREADS JSON`` (or ``torchrun ... -m bench.extract_worker ...``). Rank 0 writes the job's fill-loop
seconds (the slowest rank's) and samples to JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sppscl.config import load_config
from sppscl.stage1.distributed import Ranks
from sppscl.stage1.extract import extract


def main(preset: str, out: str, limit: str, threads: str, result: str) -> None:
    torch.set_num_threads(int(threads))
    s = extract(load_config(preset), Path(out), limit=int(limit), progress=False, force=True)
    if Ranks.from_env().is_zero:
        Path(result).write_text(json.dumps({"seconds": s.seconds, "samples": s.samples_encoded}))


if __name__ == "__main__":
    main(*sys.argv[1:])
