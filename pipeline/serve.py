"""``sppscl serve``: a trained run behind HTTP (FastAPI + uvicorn, the optional extra ``serve``).

The encoders and heads load once, when the app is made; every request then reuses them. A pair's answer never
depends on other requests: each request is decoded, encoded and predicted on its own, with no batching across
requests (padding to a shared batch changes float16 states, and a batch-fusion checkpoint attends across its
batch). The single form is ``sppscl predict --image --text`` (a batch of one); the batch form is ``sppscl predict
--input FILE --on-error skip`` on a file holding the request's pairs in order, so its numbers are the file's.

Answers use the CLI's words (``write_output``'s JSONL rows): ``id``, ``pred`` (the class name), ``probabilities``
(class name -> probability), plus ``classes`` in the model's order. Bad input is a 4xx whose ``detail`` is one line.

This module imports library code only, never the CLI; the model is the public API's (``sppscl.load``), reached
through :func:`load_model`, and images go to it as the bytes received (nothing is written to disk).
"""


import base64
import dataclasses
import binascii
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SppsclError

# A request body above this is refused before it is read whole (413): an image post is a few MB at most.
MAX_BODY_BYTES = 16 * 1024 * 1024
# Pairs in one batch request; more is a 413 naming the limit (split the batch).
MAX_BATCH_PAIRS = 256


class ServeError(SppsclError, ValueError):
    """The server cannot start as asked (no such run, a bad limit)."""


class BadRequest(Exception):
    """A request the model cannot answer: ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def load_model(run: Path, device: str = "auto", allow_download: bool = False, which: str = "best"):
    """The model behind the server: ``sppscl.load`` of a run folder (its ``which`` checkpoint: best or last) or a
    checkpoint file."""
    from .api import load

    run = Path(run)
    if not run.exists():
        raise ServeError(f"{run}: no such run folder or checkpoint")
    return load(run, which=which, device=device, allow_download=allow_download)


@dataclass
class Upload:
    """One pair as received: its id, text and image bytes (None when absent)."""

    id: str
    text: Any
    image: bytes | None


def _one_line(text: str) -> str:
    """A reason on one line, without PIL's repr of the in-memory file (an address that says nothing to a client)."""
    return " ".join(re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", str(text)).split())


def check_upload(u: Upload, where: str = "") -> None:
    """Refuse a pair that cannot be predicted before anything is decoded: 422 naming what is wrong."""
    at = f"{where}: " if where else ""
    if u.image is None or len(u.image) == 0:
        raise BadRequest(422, f"{at}no image (send a file field 'image', or 'image_base64' in JSON)")
    if not isinstance(u.text, str):
        raise BadRequest(422, f"{at}no text (send a string field 'text')")
    if not u.text.strip():
        raise BadRequest(422, f"{at}empty text")


def _decode_b64(value: Any, where: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(422, f"{where}'image_base64' must be a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(422, f"{where}'image_base64' is not valid base64") from None


def upload_from_json(obj: Any, default_id: str, where: str = "") -> Upload:
    """A pair from a JSON object ``{"text": ..., "image_base64": ..., "id": ...}``."""
    at = f"{where}: " if where else ""
    if not isinstance(obj, dict):
        raise BadRequest(422, f"{at}expected a JSON object with 'text' and 'image_base64', got {type(obj).__name__}")
    raw_id = obj.get("id", default_id)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise BadRequest(422, f"{at}'id' must be a string or an integer")
    return Upload(str(raw_id), obj.get("text"), _decode_b64(obj.get("image_base64"), at))


class Service:
    """The loaded model and the one lock its forward passes take (torch modules are shared by the request threads)."""

    def __init__(self, model, run: Path):
        self.model = model
        self.run = Path(run)
        self.lock = threading.Lock()

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    def answer(self, pred) -> dict:
        """One prediction in write_output's JSONL words, plus the class order."""
        if pred.error is not None:
            return {"id": pred.id, "error": _one_line(pred.error)}
        return {"id": pred.id, "pred": pred.pred, "classes": self.classes, "probabilities": {c: pred.probs[c] for c in self.classes}}

    def predict(self, uploads: list[Upload], single: bool) -> list[dict]:
        """Predict these pairs together, in order, as ``predict`` predicts a file of them (one pair: a batch of one);
        the images are the bytes received."""
        from .stage2.predict import Pair

        pairs = [Pair(u.id, u.text, u.image, line=0 if single else k + 1) for k, u in enumerate(uploads)]
        with self.lock:
            preds = self.model.predict(pairs, on_error="skip")
        if single and preds[0].error is not None:
            # the only reasons left after check_upload are the image's: not decodable, too many pixels
            raise BadRequest(422, _one_line(preds[0].error))
        return [self.answer(p) for p in preds]

    def describe(self) -> dict:
        """GET /model: what answers, from what (provenance, classes, fusion) and how well (the run's results)."""
        m = self.model
        prov = m.provenance
        return {
            "run": str(self.run),
            "checkpoint": str(m.checkpoint),
            "which": m.which,
            "epoch": m.epoch,
            "classes": self.classes,
            "fusion": m.fusion,
            "eval_batch_size": m.config.train.eval_batch_size,
            "provenance": {k: prov.get(k) for k in ("encoders", "dataset", "dtype")} | {"precision": prov.get("precision", "fp32")},
            "config": dataclasses.asdict(m.config.train),
            "metrics": {k: {x: v.get(x) for x in ("n", "accuracy", "weighted_f1", "macro_f1") if x in v} for k, v in m.metrics.items()},
        }


class BodyLimit:
    """ASGI middleware: a body above ``limit`` bytes is a 413 before the app reads it whole (Content-Length, or
    counted as it streams when the client sends none)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"request body of {int(declared)} bytes is over the limit of {self.limit} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BadRequest(413, f"request body is over the limit of {self.limit} bytes")
            return message

        try:
            return await self.app(scope, counted, send)
        except BadRequest as e:
            return await self._refuse(send, e.reason, e.status)

    @staticmethod
    async def _refuse(send, reason: str, status: int = 413):
        body = json.dumps({"detail": reason}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(run: Path, device: str = "auto", model=None, max_body: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH_PAIRS):
    """The FastAPI app for ``run``; its model loads here, once (pass ``model`` to reuse one already loaded)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ServeError(f"sppscl serve needs the 'serve' extra: pip install 'sppscl[serve]' ({e})") from None
    if max_body < 1 or max_batch < 1:
        raise ServeError("the body and batch limits must be positive")
    service = Service(model if model is not None else load_model(run, device), run)
    app = FastAPI(title="sppscl", summary="SPP-SCL image-text sentiment: the heads of one trained run and the encoders that built its cache")
    app.state.service = service

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"detail": _one_line(f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request"))}, status_code=422)

    async def _json(request: Request) -> Any:
        body = await request.body()
        if not body:
            raise BadRequest(422, "empty request body: send JSON or a multipart form with 'text' and 'image'")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"body is not valid JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:
            raise BadRequest(400, "body is JSON nested too deeply to be a request") from None

    async def _form_upload(request: Request) -> Upload:
        form = await request.form()
        image = form.get("image")
        data = None
        if image is not None and hasattr(image, "read"):
            data = await image.read()
        elif isinstance(image, str):
            raise BadRequest(422, "'image' must be an uploaded file (multipart file field), not a text field")
        text = form.get("text")
        raw_id = form.get("id") or (getattr(image, "filename", None) or "1")
        return Upload(str(raw_id), text if isinstance(text, str) else None, data)

    def _kind(request: Request) -> str:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return "form"
        if ctype in ("application/json", ""):
            return "json"
        raise BadRequest(415, f"unsupported content type {ctype!r}: send multipart/form-data or application/json")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "classes": service.classes}

    @app.get("/model")
    def model_info() -> dict:
        return service.describe()

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        """One pair: multipart (file ``image``, field ``text``, optional ``id``) or JSON (``text``, ``image_base64``, ``id``)."""
        u = await _form_upload(request) if _kind(request) == "form" else upload_from_json(await _json(request), "1")
        check_upload(u)
        return (await run_in_threadpool(service.predict, [u], True))[0]

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> dict:
        """Many pairs, JSON ``{"pairs": [{"id", "text", "image_base64"}, ...]}``: predicted together in this order, as
        ``predict --input`` predicts a file of them; a bad pair is answered with its ``error``, the others predicted."""
        if _kind(request) != "json":
            raise BadRequest(415, "the batch form takes JSON: {\"pairs\": [{\"id\", \"text\", \"image_base64\"}, ...]}")
        body = await _json(request)
        pairs = body.get("pairs") if isinstance(body, dict) else None
        if not isinstance(pairs, list) or not pairs:
            raise BadRequest(422, "expected {\"pairs\": [...]} with at least one pair")
        if len(pairs) > max_batch:
            raise BadRequest(413, f"{len(pairs)} pairs is over the batch limit of {max_batch}: split the batch")
        uploads, problems = [], {}
        for k, obj in enumerate(pairs):
            try:
                u = upload_from_json(obj, str(k + 1), f"pair {k + 1}")
                check_upload(u, f"pair {k + 1}")
                uploads.append(u)
            except BadRequest as e:
                problems[k] = {"id": obj.get("id", str(k + 1)) if isinstance(obj, dict) else str(k + 1), "error": e.reason}
        answers = iter(await run_in_threadpool(service.predict, uploads, False) if uploads else [])
        out = [problems[k] if k in problems else next(answers) for k in range(len(pairs))]
        return {"classes": service.classes, "predictions": out, "failed": sum("error" in a for a in out)}

    return BodyLimit(app, max_body)


def serve(run: Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", max_body: int = MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Load ``run`` once and answer on ``host:port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(run, device, max_body=max_body), host=host, port=port, log_level=log_level)
