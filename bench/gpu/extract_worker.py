"""One extraction with deterministic kernels, alone or as a torchrun rank:
``python -m bench.gpu.extract_worker PRESET OUT LIMIT THREADS JSON`` (or ``torchrun ... -m bench.gpu.extract_worker ...``).

cuDNN's deterministic algorithms (and torch's deterministic mode, warning only where an op has none), so that two
processes computing the same batches write the same bits. Rank 0 writes the fill loop's seconds, the samples, the
world size and the process-group backend the job formed (None for a plain process) to JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sppscl.config import load_config
from sppscl.stage1.distributed import Ranks
from sppscl.stage1.extract import extract


def main(preset: str, out: str, limit: str, threads: str, result: str) -> None:
    torch.set_num_threads(int(threads))
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS: the parent sets CUBLAS_WORKSPACE_CONFIG
    backends: list[str] = []
    init = dist.init_process_group

    def recording_init(backend=None, *args, **kwargs):
        backends.append(str(backend))
        return init(backend, *args, **kwargs)

    dist.init_process_group = recording_init  # which backend extract's Ranks chose, for the report
    ranks = Ranks.from_env()
    s = extract(load_config(preset), Path(out), limit=int(limit), progress=False, force=True)
    if ranks.is_zero:
        Path(result).write_text(
            json.dumps({"seconds": s.seconds, "samples": s.samples_encoded, "world_size": ranks.world_size, "backend": backends[0] if backends else None})
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
