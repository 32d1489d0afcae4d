"""Extraction spread over processes: torchrun's ranks filling one cache, and shards of the rows for machines that
share no filesystem. (The lock that keeps uncoordinated writers of one cache apart is ``sppscl.stage1.lock``; the
fixed batches and their deal to workers are ``sppscl.stage1.batching``.)

Under ``torchrun`` every rank plans the same run (samples, tokens, provenance: all deterministic), rank 0 alone
touches the file's layout and metadata, and the ranks fill disjoint sets of the fixed batches with positioned
writes (``sppscl.cache``). Splitting the batch list, never a batch, keeps every batch exactly as a
single-process run forms it, so the finished file is identical to that run's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..devices import resolve_device
from ..errors import EXIT_FAILED, SppsclError
from .batching import deal, fixed_batches

T = TypeVar("T")

# Ranks that finish their share early wait at the final barrier for the slowest one, which on a large dataset
# can take hours; the collective's timeout must not fire on that wait (NCCL's default is 10 minutes).
# A rank that dies does not leave the others waiting this long: torchrun stops them all.
BARRIER_TIMEOUT = timedelta(hours=48)


class PeerFailed(SppsclError):
    """Another rank stopped the job, and has printed why."""

    exit_code = EXIT_FAILED


def _collective(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError as e:  # gloo/NCCL report a peer that exited or was killed as a failed collective
        raise PeerFailed(
            f"another rank of this job stopped before it finished ({type(e).__name__}; its own message says why). Rows "
            "written so far are kept: rerun the same command, with any number of processes, to continue."
        ) from None


@dataclass
class Ranks:
    """This process's place in a torchrun job; a plain process is rank 0 of 1 and no process group exists.

    A torchrun job of one process (``--nproc-per-node 1``) forms its group too: the job runs the same collectives
    (NCCL on a GPU) whatever its size, so a one-GPU node checks the path a many-GPU job takes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (its variables are set), whatever the world size
    _group: bool = False

    @classmethod
    def from_env(cls) -> "Ranks":
        # torchrun exports these to every worker (as read by torchvision's reference scripts); a plain run has none
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), launched=True)
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        """Prefix for messages a rank prints itself (errors): empty for a single process."""
        return f"rank {self.rank} of {self.world_size}: " if self.distributed else ""

    def device(self, requested: str) -> torch.device:
        """The requested device; under torchrun a CUDA request means this node's GPU number LOCAL_RANK."""
        dev = resolve_device(requested)
        if self.launched and dev.type == "cuda":
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise ConfigError(
                    f"LOCAL_RANK {self.local_rank} but this node has {n} GPU(s): start at most {n} processes per node "
                    "(torchrun --nproc-per-node), or extract on the CPU with --device cpu"
                )
            dev = torch.device("cuda", self.local_rank)
        return dev

    def start(self, dev: torch.device) -> None:
        """Join the job's process group: NCCL between GPUs, gloo between CPU processes."""
        if not self.launched:
            return
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # NCCL's collectives (barriers, object broadcasts) run on the current device
            dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        self._group = True

    def stop(self) -> None:
        if self._group:
            dist.destroy_process_group()
            self._group = False

    def on_zero(self, fn: Callable[[], T], share: bool = True) -> T | None:
        """Run ``fn`` on rank 0 only, then release the other ranks with rank 0's result (``share``) or its failure,
        so no rank goes on past a step rank 0 did not complete.

        A broadcast, not a barrier: rank 0 may go on before a slow rank has even arrived. So anything every rank
        must agree on (the pending batches) is read by rank 0 inside ``fn`` and shared, never read by each rank
        after the call; ``all_done`` is the one real barrier."""
        if not self._group:
            return fn()
        result, error = None, None
        if self.is_zero:
            try:
                result = fn()
            except BaseException as e:  # the other ranks must hear of any failure, or they wait for ever
                error = e
            box = [(result if share else None, None if error is None else f"{type(error).__name__}: {error}")]
        else:
            box = [None]
        _collective(dist.broadcast_object_list, box, 0)
        if error is not None:
            raise error
        shared, failure = box[0]
        if failure is not None:
            raise PeerFailed(f"rank 0 stopped: {failure}")  # rank 0 prints it; the others stay quiet
        return result if self.is_zero else shared

    def all_done(self, samples: int, seconds: float) -> tuple[int, float]:
        """Barrier after the fill: every rank has written its batches. Returns the job's samples encoded and the
        slowest rank's seconds."""
        if not self._group:
            return samples, seconds
        everyone: list = [None] * self.world_size
        _collective(dist.all_gather_object, everyone, (samples, seconds))
        return sum(n for n, _ in everyone), max(s for _, s in everyone)


# ------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the fixed batches ``deal`` gives it, written to a file of their own."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            i = n = -1
        if not 0 <= i < n:
            raise ConfigError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def record(self, split_rows: dict[str, int], batch_size: int) -> dict:
        """What the shard's provenance says about it: enough for ``cache merge`` to know its rows."""
        return {"index": self.index, "count": self.count, "batch_size": batch_size, "split_rows": [[s, n] for s, n in split_rows.items()]}

    @staticmethod
    def rows(record: dict) -> dict[str, list[int]]:
        """The rows (of the whole split, in order) a shard with this provenance record holds."""
        batches = {split: fixed_batches(n, record["batch_size"]) for split, n in record["split_rows"]}
        return {split: [i for b in bs for i in b] for split, bs in deal(batches, record["index"], record["count"]).items()}
