"""The fixed batches extraction encodes, and their deal to workers (torchrun ranks or ``--shard`` files).

Batches are fixed index ranges of a split, so a resumed run, a rank and a shard all form exactly the batches a
single uninterrupted run forms, and the files they write are identical to that run's.
"""

from __future__ import annotations


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """Index ranges [k*bs, (k+1)*bs): fixed, so a resumed run forms exactly the batches a clean run forms."""
    return [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]


def deal(batches: dict[str, list[list[int]]], index: int, count: int) -> dict[str, list[list[int]]]:
    """Worker ``index``'s share of all splits' batches, dealt in order to whichever of the ``count`` workers
    (ranks or shards) has the fewest rows so far: disjoint, whole batches, balanced even where short last batches
    of small splits would make a plain round-robin lopsided. Deterministic, so every worker computes the same deal."""
    out: dict[str, list[list[int]]] = {split: [] for split in batches}
    load = [0] * count
    for split, bs in batches.items():
        for b in bs:
            w = min(range(count), key=lambda i: (load[i], i))
            load[w] += len(b)
            if w == index:
                out[split].append(b)
    return out
