"""8. Serving: `sppscl serve` under 1, 4 and 16 concurrent clients against `sppscl predict` on the same pairs.

A run is trained for one epoch on a small synthetic cache (the offline encoders in the full profile, the tiny
random ones in the quick one), served by ``sppscl serve`` in its own process on 127.0.0.1, and sent single pairs
(multipart) and batches (JSON) by N client threads; each level is bounded in requests and in time. The
alternative is what a user has without the server: ``sppscl predict --image --text`` as one process per pair
(encoders reloaded every time), and ``sppscl predict --input`` on a file of the same pairs (loaded once).

Every answer received under load is compared with the Predictor on that pair alone (single) or on a file of that
batch's pairs (batch), bit for bit: the server never lets a request's answer depend on another's.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sppscl.config import Config, apply_overrides
from sppscl.stage1.extract import extract
from sppscl.api import load
from sppscl.stage2.predict import Pair
from sppscl.stage2.train import train

from .common import Context, Row, Section, Target

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)
# a level stops sending once this much time has passed, whatever is left of its count
LEVEL_SECONDS = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}


def served_run(ctx: Context) -> tuple[Path, list[dict]]:
    """A one-epoch run on a small synthetic cache and the dev pairs to send."""
    p = ctx.profile
    cfg = Config()
    cfg.dataset.name, cfg.dataset.format, cfg.dataset.data_dir = "bench-serve", "synthetic", str(ctx.workdir / "serve-data")
    cfg.dataset.splits = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
    cfg.dataset.synthetic_size = p.serve_samples
    if p.offline_encoders:
        cfg.encoders.image, cfg.encoders.text = "efficientnet-lite0", "minilm-l6"
    else:
        cfg.encoders.image, cfg.encoders.text, cfg.encoders.max_length = "tiny-cnn", "tiny-bert", 32
    cfg.extract.batch_size, cfg.extract.num_workers = 16, 0
    cfg = apply_overrides(cfg, {"epochs": 1, "batch_size": 16, "eval_batch_size": 16, "device": "cpu", "fusion": "batch"})
    cache = ctx.workdir / "serve.h5"
    extract(cfg, cache, progress=False)
    run = ctx.workdir / "serve-run"
    train(cache, cfg, run, progress=False)
    data = Path(cfg.dataset.data_dir)
    rows = []
    for split in ("dev", "test", "train"):
        for line in (data / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            rows.append({"id": r["id"], "text": r["text"], "image": data / r["image"]})
    return run, rows


class Server:
    def __init__(self, run: Path):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "sppscl", "serve", str(run), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sppscl serve exited ({self.proc.returncode}): {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sppscl serve did not answer /health within 300 s")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_level(url: str, bodies: list, clients: int, batch: bool) -> dict:
    """Send ``bodies`` from ``clients`` threads (each its own connection), bounded by LEVEL_SECONDS; latencies and
    answers in the order sent."""
    import httpx

    deadline = time.monotonic() + LEVEL_SECONDS
    path = "/predict/batch" if batch else "/predict"

    def worker(k: int) -> list[tuple[int, float, dict]]:
        out = []
        with httpx.Client(timeout=300) as client:
            for i in range(k, len(bodies), clients):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                if batch:
                    r = client.post(url + path, json=bodies[i])
                else:
                    row = bodies[i]
                    with open(row["image"], "rb") as fh:
                        r = client.post(url + path, data={"text": row["text"], "id": row["id"]}, files={"image": ("image.jpg", fh, "image/jpeg")})
                lat = time.perf_counter() - t0
                r.raise_for_status()
                out.append((i, lat, r.json()))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [x for part in pool.map(worker, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    lat = np.array([x[1] for x in done])
    return {
        "clients": clients,
        "requests": len(done),
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
        "answers": {i: a for i, _, a in done},
    }


def predict_per_pair_s(run: Path, rows: list[dict], n: int) -> float:
    """Seconds per pair of `sppscl predict --image --text`, one process per pair (what a user runs without serve)."""
    t0 = time.perf_counter()
    for row in rows[:n]:
        cmd = [sys.executable, "-m", "sppscl", "predict", "--checkpoint", str(run), "--image", str(row["image"]), "--text", row["text"], "--device", "cpu"]
        subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True)
    return (time.perf_counter() - t0) / n


def predict_file_s(run: Path, rows: list[dict], workdir: Path) -> float:
    """Seconds for `sppscl predict --input` on a file of ``rows`` (one process, encoders loaded once)."""
    f = workdir / "serve-pairs.jsonl"
    f.write_text("".join(json.dumps({"id": r["id"], "text": r["text"], "image": str(r["image"])}) + "\n" for r in rows))
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "sppscl", "predict", "--checkpoint", str(run), "--input", str(f), "--out", str(workdir / "serve-out.jsonl"), "--device", "cpu", "--quiet"]
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True)
    return time.perf_counter() - t0


def run(ctx: Context) -> Section:
    p = ctx.profile
    sec = Section("serve")
    run_dir, rows = served_run(ctx)
    rows = rows[: p.serve_pairs]
    b = p.serve_batch
    batches = [rows[i : i + b] for i in range(0, len(rows) - b + 1, b)]
    ctx.log("serve", f"run trained; {len(rows)} pairs, {len(batches)} batches of {b}")

    model = load(run_dir, device="cpu")
    classes = model.classes
    alone = {i: [model.predict([Pair(r["id"], r["text"], r["image"])])[0].probs[c] for c in classes] for i, r in enumerate(rows)}
    as_file = {}
    for j, chunk in enumerate(batches):
        preds = model.predict([Pair(r["id"], r["text"], r["image"], line=k + 1) for k, r in enumerate(chunk)])
        as_file[j] = [[q.probs[c] for c in classes] for q in preds]
    del model

    per_pair = predict_per_pair_s(run_dir, rows, p.serve_predict_calls)
    file_s = predict_file_s(run_dir, rows, ctx.workdir)
    ctx.log("serve", f"predict: {per_pair:.1f} s per pair as a process each; {file_s:.1f} s for a file of {len(rows)}")
    batch_bodies = [{"pairs": [{"id": r["id"], "text": r["text"], "image_base64": base64.b64encode(Path(r["image"]).read_bytes()).decode()} for r in chunk]} for chunk in batches]

    singles, batched = [], []
    with Server(run_dir) as server:
        for n in CLIENTS:
            # bounded: a fixed count per level (at least one request per client), and LEVEL_SECONDS
            bodies = (rows * (1 + max(p.serve_requests, n) // len(rows)))[: max(p.serve_requests, n)]
            level = load_level(server.url, bodies, n, batch=False)
            level["index"] = [rows.index(x) for x in bodies]
            singles.append(level)
            ctx.log("serve", f"single, {n} clients: {level['requests_per_s']:.2f} req/s, p50 {level['p50_s'] * 1e3:.0f} ms, p95 {level['p95_s'] * 1e3:.0f} ms")
            bb = (batch_bodies * (1 + max(p.serve_batch_requests, n) // len(batch_bodies)))[: max(p.serve_batch_requests, n)]
            level = load_level(server.url, bb, n, batch=True)
            level["index"] = [j % len(batch_bodies) for j in range(len(bb))]
            batched.append(level)
            ctx.log("serve", f"batch of {b}, {n} clients: {level['requests_per_s']:.2f} req/s, p50 {level['p50_s'] * 1e3:.0f} ms")

    bad_single = sum(
        [a["probabilities"][c] for c in classes] != alone[level["index"][i]] for level in singles for i, a in level["answers"].items()
    )
    bad_batch = sum(
        [q["probabilities"][c] for c in classes] != as_file[level["index"][i]][k]
        for level in batched
        for i, a in level["answers"].items()
        for k, q in enumerate(a["predictions"])
    )
    checked = sum(len(lv["answers"]) for lv in singles) + sum(len(lv["answers"]) * b for lv in batched)

    def strip(levels):
        return [{k: v for k, v in lv.items() if k not in ("answers", "index")} for lv in levels]

    sec.raw = {"pairs": len(rows), "batch": b, "predict_per_pair_s": per_pair, "predict_file_s": file_s, "single": strip(singles),
               "batch_levels": strip(batched), "mismatches_single": bad_single, "mismatches_batch": bad_batch, "answers_checked": checked,
               "encoders": "offline (efficientnet-lite0 + minilm-l6)" if p.offline_encoders else "tiny random"}
    for lv in singles:
        n = lv["clients"]
        sec.rows.append(Row("serve", f"single_c{n}", f"serve: single pairs, {n} client{'s' * (n > 1)}", lv["requests_per_s"], "req/s", 1 / per_pair,
                            "predict, a process per pair", lv["requests_per_s"] * per_pair,
                            note=f"p50 {lv['p50_s'] * 1e3:.0f} ms, p95 {lv['p95_s'] * 1e3:.0f} ms over {lv['requests']} requests (multipart)"))
    for lv in batched:
        n = lv["clients"]
        pairs_s = lv["requests_per_s"] * b
        sec.rows.append(Row("serve", f"batch_c{n}", f"serve: batches of {b}, {n} client{'s' * (n > 1)}", pairs_s, "pairs/s", len(rows) / file_s,
                            f"predict --input, a file of {len(rows)}", pairs_s * file_s / len(rows),
                            note=f"{lv['requests_per_s']:.2f} req/s; p50 {lv['p50_s'] * 1e3:.0f} ms, p95 {lv['p95_s'] * 1e3:.0f} ms over {lv['requests']} requests (JSON, base64)"))
    sec.rows.append(Row("serve", "equal", "serve: answers under load that differ from predict alone", float(bad_single + bad_batch), "answers", None, "-", None,
                        target=Target("<=", 0, on="ours", unit="answers"),
                        note=f"{checked} answers compared bit for bit: single pairs with predict on the pair alone, batches with predict on a file of the batch"))
    return sec
