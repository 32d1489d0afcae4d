"""5. Compute efficiency: stage two's achieved FLOP/s against this machine's dense float32 matmul FLOP/s.

A step's FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers,
matmuls, einsums, and the BiLSTM's matmuls where its kernel is decomposed into them; an analytic count
stands in where the fused LSTM kernel hides them). The
step is stage two's ``two_step_update`` on batches assembled beforehand (the loader section measures the
loader), so this is the heads' compute alone.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sppscl.cache import FeatureCache
from sppscl.stage2.data import Batch, SplitBatches
from sppscl.stage2.losses import step1_loss, step2_loss
from sppscl.stage2.train import two_step_update

from .common import Context, Row, Section, Target, default_threads, median, new_heads, torch_threads, train_config
from .synth import write_cache

TARGET = Target(">=", 0.30, unit="share")
OTHER_BUDGET_S = 30.0


def lstm_forward_flops(lstm: nn.LSTM, tokens: int) -> float:
    """Multiply-adds x 2 of the gates' matmuls, input and recurrent, over ``tokens`` (sample, position) steps."""
    directions = 2 if lstm.bidirectional else 1
    return float(directions * lstm.num_layers * tokens * 2 * 4 * lstm.hidden_size * (lstm.input_size + lstm.hidden_size))


def step_flops(model: nn.Module, batch: Batch, tc) -> dict[str, float]:
    """FLOPs of one forward, step 1's backward and step 2's backward of ``model`` (counted on a copy).

    A two-step update costs ``2 * forward + backward1`` plus ``backward2`` when the gate fires. The LSTM's
    backward computes gradients for its input and its weights: twice its forward.
    """
    m = copy.deepcopy(model).train()
    tokens: list[int] = []
    hook = m.text_head.lstm.register_forward_hook(lambda mod, inp, out: tokens.append(int(inp[0].data.shape[0])))
    try:
        with FlopCounterMode(display=False) as fc:
            out = m(batch.image, batch.tokens, batch.mask)
            loss1 = step1_loss(
                out.logits, batch.labels, out.image_emb, out.text_emb,
                lambda_ce=tc.lambda_ce, tau=tc.tau, use_intra=tc.use_intra, self_term=tc.supcon_self_term,
            ).total
        forward, forward_counts = fc.get_total_flops(), fc.get_flop_counts()
        with FlopCounterMode(display=False) as fc:
            loss1.backward()
        backward1 = fc.get_total_flops()
        out = m(batch.image, batch.tokens, batch.mask)
        loss2 = step2_loss(out.text_emb, out.image_emb, batch.labels, tau=tc.tau, symmetric=tc.inter_symmetric).total
        m.zero_grad()
        with FlopCounterMode(display=False) as fc:
            loss2.backward()
        backward2 = fc.get_total_flops()
    finally:
        hook.remove()
    lstm = lstm_forward_flops(m.text_head.lstm, tokens[0])
    # Which LSTM kernel runs decides whether the counter sees its matmuls (the packed training path is
    # decomposed into aten.mm calls; the fused CPU kernel is not): add the analytic count only when unseen.
    seen = sum(sum(ops.values()) for name, ops in forward_counts.items() if name.endswith("text_head.lstm"))
    extra = 0.0 if seen else lstm
    return {
        "forward": forward + extra,
        "backward1": backward1 + 2 * extra,
        "backward2": backward2 + 2 * extra,
        "lstm_forward": lstm,
        "lstm_counted_by_flop_counter": bool(seen),
    }


class Matmul:
    """The hardware reference: FLOP/s of one float32 ``n x n`` torch.matmul, measured on demand."""

    def __init__(self, n: int):
        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(self.a, self.b)  # warm-up

    def rate(self) -> float:
        t0 = time.perf_counter()
        torch.matmul(self.a, self.b)
        return 2.0 * self.n**3 / (time.perf_counter() - t0)


def interleaved_steps(batches: list[Batch], dims: tuple[int, int, int], tc, matmul: Matmul, other_threads: int | None) -> dict[str, list]:
    """Two-step updates over ``batches`` from fresh heads, each step next to a matmul measurement and (when
    ``other_threads`` is given) to the same step of a second copy of the heads run with that many torch
    threads, so that both comparisons are paired in time on a machine whose load moves. The comparison
    stops after ``OTHER_BUDGET_S`` seconds: oversubscribed threads can stall for many seconds a step."""
    model, opt = new_heads(*dims, tc)
    other, other_opt = new_heads(*dims, tc)
    warm = copy.deepcopy(model)
    two_step_update(warm, torch.optim.AdamW(warm.parameters(), lr=tc.lr), batches[0], tc)
    out: dict[str, list] = {"seconds": [], "fired": [], "matmul": [], "other_threads_seconds": []}
    for batch in batches:
        out["matmul"].append(matmul.rate())
        t0 = time.perf_counter()
        log = two_step_update(model, opt, batch, tc)
        out["seconds"].append(time.perf_counter() - t0)
        out["fired"].append(log.fired)
        if other_threads and sum(out["other_threads_seconds"]) < OTHER_BUDGET_S:
            with torch_threads(other_threads):
                t0 = time.perf_counter()
                two_step_update(other, other_opt, batch, tc)
                out["other_threads_seconds"].append(time.perf_counter() - t0)
    return out


def branch_seconds(batches: list[Batch], dims: tuple[int, int, int], tc) -> dict[str, float]:
    """Median forward+backward seconds per batch of the image branch and of the text branch alone."""
    model, _ = new_heads(*dims, tc)
    model.train()
    out: dict[str, list[float]] = {"image branch": [], "text branch": []}
    for batch in batches:
        for name, fn in (("image branch", lambda: model.image_head(batch.image)), ("text branch", lambda: model.text_head(batch.tokens, batch.mask))):
            t0 = time.perf_counter()
            fn().sum().backward()
            out[name].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in out.items()}


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("compute")
    tc = train_config(p.batch_size)
    dims = (p.image_shape[0], p.hidden, p.layers)
    path = ctx.workdir / "compute.h5"
    write_cache(path, {"train": p.compute_batches * p.batch_size}, p.image_shape, p.layers, p.hidden, p.mean_tokens, p.max_length)
    split = FeatureCache(path).load("train", in_memory=True)
    batches = list(SplitBatches(split).train_batches(p.batch_size, np.random.default_rng(0)))
    if not ctx.keep:
        path.unlink()

    model, _ = new_heads(*dims, tc)
    flops = [step_flops(model, b, tc) for b in batches]
    matmul = Matmul(p.matmul_n)
    threads = torch.get_num_threads()
    # the other side of the threads comparison: torch's default when running with 1, else 1
    other = (default_threads() if threads == 1 else 1) if default_threads() > 1 else None
    rates = [matmul.rate() for _ in range(p.matmul_reps)]
    steps = interleaved_steps(batches, dims, tc, matmul, other)
    rates += steps["matmul"] + [matmul.rate() for _ in range(p.matmul_reps)]
    times, fired, other_times = steps["seconds"], steps["fired"], steps["other_threads_seconds"] or None
    step_total = [2 * f["forward"] + f["backward1"] + (f["backward2"] if fd else 0.0) for f, fd in zip(flops, fired)]
    # medians: robust to the stalls a shared machine throws in
    achieved = median([f / t for f, t in zip(step_total, times)])
    peak = median(rates)
    ctx.log("compute", f"stage two {achieved / 1e9:.1f} GFLOP/s (median of {len(batches)} steps); matmul {peak / 1e9:.1f} GFLOP/s")
    if other_times:
        ctx.log("compute", f"median step: {median(times):.3f} s at {threads} thread(s), {median(other_times):.3f} s at {other}")
    branches = branch_seconds(batches, dims, tc)

    per_sample = sum(step_total) / (len(batches) * p.batch_size)
    # two forwards, step 1's backward (2x) and, when fired, step 2's backward (2x)
    lstm_share = sum((4 + 2 * fd) * f["lstm_forward"] for f, fd in zip(flops, fired)) / sum(step_total)
    sec.raw = {
        "steps": len(batches),
        "step_seconds": times,
        "step_flops": step_total,
        "flops_parts": flops,
        "step2_fired": fired,
        "achieved_flops_per_s": achieved,
        "matmul_n": p.matmul_n,
        "matmul_flops_per_s_samples": rates,
        "matmul_flops_per_s": peak,
        "flops_per_sample": per_sample,
        "lstm_flop_share": lstm_share,
        "branch_forward_backward_seconds": branches,
        "torch_threads": threads,
        "other_threads": other,
        "other_threads_step_seconds": other_times,
    }
    note = (
        f"{len(batches)} two-step updates of batch {p.batch_size} on pre-assembled batches (compute only), "
        f"{per_sample / 1e9:.3f} GFLOP per sample per step ({lstm_share:.0%} of it in the BiLSTM), step 2 fired in "
        f"{sum(fired)} of {len(fired)}. FLOPs: FlopCounterMode over a forward and both backwards "
        f"({'including the BiLSTM matmuls' if flops[0]['lstm_counted_by_flop_counter'] else 'plus an analytic BiLSTM count, which it does not see'}). "
        "Forward+backward per batch: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in branches.items())
        + f" of {median(times) * 1000:.0f} ms per step. Hardware: torch.matmul of {p.matmul_n}×{p.matmul_n} float32, "
        f"median of {len(rates)} measured before, between and after the steps."
    )
    sec.rows.append(
        Row("compute", "flops", "Compute: stage-two achieved FLOP/s", achieved, "FLOP/s", peak, "dense matmul", achieved / peak, "share", TARGET, note=note)
    )
    if other_times is not None:
        paired = times[: len(other_times)]
        sec.rows.append(
            Row(
                "compute",
                "threads",
                f"Compute: stage-two step, {threads} torch thread(s) vs {other}",
                median(paired),
                "s",
                median(other_times),
                f"{other} thread(s)",
                median(other_times) / median(paired),
                note=(
                    f"Median of the same {len(other_times)} steps, run back to back on two copies of the heads (the comparison "
                    f"stops after {OTHER_BUDGET_S:.0f} s of the other setting); ratio > 1 means "
                    f"{threads} thread(s) ran faster than {other} at this machine's load."
                ),
            )
        )
    return sec
