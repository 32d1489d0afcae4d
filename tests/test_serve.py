"""`sppscl serve`: real HTTP against a server started here on 127.0.0.1 (a free port), answers equal to `predict`."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sppscl.config import apply_overrides
from sppscl.serve import create_app, load_model
from sppscl.stage2.predict import Pair
from sppscl.stage2.train import train

uvicorn = pytest.importorskip("uvicorn")


class Server:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0; stopped when the test module ends."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory):
    """A one-epoch batch-fusion run (the paper's; its answers would depend on a shared batch) behind a live server."""
    path, cfg = tiny_cache
    run = tmp_path_factory.mktemp("serve") / "run"
    train(path, apply_overrides(cfg, ["epochs=1", "fusion=batch"]), run, progress=False)
    model = load_model(run, "cpu")
    with Server(create_app(run, model=model, max_body=200_000, max_batch=8)) as url:
        yield url, run, model, cfg.data_dir()


def _rows(data_dir: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (data_dir / "dev.jsonl").read_text().splitlines()][:n]
    return [{"id": r["id"], "text": r["text"], "image": data_dir / r["image"]} for r in rows]


def _alone(model, row: dict):
    """`predict --image --text` on this pair alone: a batch of one."""
    return model.predict([Pair(row["id"], row["text"], row["image"])])[0]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_and_model(served):
    url, run, model, _ = served
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "classes": model.classes}
    info = httpx.get(f"{url}/model").json()
    assert info["classes"] == model.classes and info["fusion"] == "batch"
    assert info["provenance"]["encoders"]["image"]["name"] == "tiny-cnn"
    results = json.loads((run / "results.json").read_text())
    assert set(info["metrics"]) >= {"dev", "test"} and info["epoch"] == results["best_epoch"]
    assert info["metrics"]["dev"]["accuracy"] == results["splits"]["dev"]["accuracy"]


def test_multipart_and_json_answer_as_predict_does_alone(served):
    url, _, model, data_dir = served
    row = _rows(data_dir, 1)[0]
    want = _alone(model, row)
    with open(row["image"], "rb") as fh:
        a = httpx.post(f"{url}/predict", data={"text": row["text"], "id": row["id"]}, files={"image": ("x.jpg", fh, "image/jpeg")}).json()
    b = httpx.post(f"{url}/predict", json={"id": row["id"], "text": row["text"], "image_base64": _b64(row["image"])}).json()
    for got in (a, b):
        assert got["id"] == row["id"] and got["pred"] == want.pred and got["classes"] == model.classes
        # bit for bit: JSON floats round-trip a float32 widened to float64 exactly
        assert [got["probabilities"][c] for c in model.classes] == [want.probs[c] for c in model.classes]


def test_answers_under_concurrent_load_equal_predict_on_each_pair_alone(served):
    url, _, model, data_dir = served
    rows = _rows(data_dir, 6)
    want = {r["id"]: [_alone(model, r).probs[c] for c in model.classes] for r in rows}
    bodies = [{"id": r["id"], "text": r["text"], "image_base64": _b64(r["image"])} for r in rows] * 3

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: client.post(f"{url}/predict", json=b).json(), bodies))
    for a in answers:
        assert [a["probabilities"][c] for c in model.classes] == want[a["id"]]


def test_batch_form_is_predict_on_a_file_of_the_pairs(served, tmp_path):
    url, _, model, data_dir = served
    rows = _rows(data_dir, 5)
    body = {"pairs": [{"id": r["id"], "text": r["text"], "image_base64": _b64(r["image"])} for r in rows]}
    body["pairs"].insert(2, {"id": "bad", "text": "", "image_base64": _b64(rows[0]["image"])})
    got = httpx.post(f"{url}/predict/batch", json=body).json()
    # predict --input on a file of the same rows, --on-error skip: the bad row reported, the others batched together
    file_pairs = [Pair(r["id"], r["text"], r["image"], line=k + 1) for k, r in enumerate(rows)]
    file_pairs.insert(2, Pair("bad", "", rows[0]["image"], line=3))
    want = model.predict(file_pairs, on_error="skip")
    assert got["failed"] == 1 and [p["id"] for p in got["predictions"]] == [p.id for p in want]
    assert got["predictions"][2] == {"id": "bad", "error": "pair 3: empty text"}
    for g, w in zip(got["predictions"], want):
        if w.error is None:
            assert g["pred"] == w.pred and [g["probabilities"][c] for c in model.classes] == [w.probs[c] for c in model.classes]


def test_bad_requests_are_4xx_with_one_line(served, tmp_path):
    url, _, _, data_dir = served
    row = _rows(data_dir, 1)[0]
    not_image = tmp_path / "x.jpg"
    not_image.write_bytes(b"this is not an image")
    cases = [
        (dict(data={"text": "hello"}), 422, "no image"),
        (dict(json={"text": "hello"}), 422, "no image"),
        (dict(json={"text": "   ", "image_base64": _b64(row["image"])}), 422, "empty text"),
        (dict(json={"image_base64": _b64(row["image"])}), 422, "no text"),
        (dict(json={"text": "hi", "image_base64": "%%%"}), 422, "not valid base64"),
        (dict(json={"text": "hi", "image_base64": _b64(not_image)}), 422, "undecodable image: image bytes (20 bytes)"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"}), 400, "nested too deeply"),
        (dict(content=b"x" * 300_000, headers={"content-type": "application/json"}), 413, "over the limit"),
        (dict(content=b"hi", headers={"content-type": "text/plain"}), 415, "unsupported content type"),
    ]
    for kwargs, status, words in cases:
        r = httpx.post(f"{url}/predict", **kwargs)
        detail = r.json()["detail"]
        assert r.status_code == status and words in detail and "\n" not in detail and "0x" not in detail, (kwargs.get("json"), r.status_code, detail)
    r = httpx.post(f"{url}/predict/batch", json={"pairs": [{"text": "a", "image_base64": _b64(row["image"])}] * 9})
    assert r.status_code == 413 and "batch limit of 8" in r.json()["detail"]
    assert httpx.post(f"{url}/predict/batch", json={"pairs": []}).status_code == 422
    # and the server still answers
    assert httpx.get(f"{url}/health").status_code == 200


def test_streamed_body_over_the_limit_is_413(served):
    url, *_ = served

    def chunks():
        for _ in range(30):
            yield b"y" * 10_000

    r = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


def test_serve_command_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    from sppscl.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: no such run folder or checkpoint"


def test_serve_which_last_serves_the_run_folders_last_checkpoint(served, monkeypatch, capsys):
    """`serve RUN --which last`, as every other command that takes a run folder; a bad --which is one line, exit 2."""
    from sppscl.cli import main

    url, run, model, _ = served
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(run), "--which", "last", "--device", "cpu", "--port", "0"]) == 0
    (app,) = apps
    app = app.app  # inside the body-limit middleware
    assert app.state.service.model.checkpoint == run / "last.safetensors"
    assert app.state.service.describe()["which"] == "last"
    assert str(run / "last.safetensors") in capsys.readouterr().out
    assert httpx.get(f"{url}/model").json()["which"] == "best"  # the default
    assert main(["serve", str(run), "--which", "middle", "--port", "0"]) == 2
    assert "middle" in capsys.readouterr().err
