"""The HTTP service: FastAPI app over a `ModelRuntime`.

Endpoints are thin: parse and check the request, run the work off the event loop (image
decoding in the thread pool, the model on one dedicated thread), shape the response.
`uvicorn service.app:app` serves the app configured from the environment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import BatchConfig, DynamicBatcher
from .images import ImageError, ImageLimits, decode_image
from .journal import JournalError
from .metrics import Metrics
from .runtime import LabelError, ModelRuntime
from .schemas import (ClassScore, ErrorBody, FeedbackItem, FeedbackResponse, Health, ImagePrediction,
                      MemoryResponse, NearestItem, PredictJSON, PredictResponse, SnapshotResponse)
from .settings import ServiceConfig

log = logging.getLogger("service.app")
ROUTES = {"/predict", "/feedback", "/memory", "/memory/snapshot", "/metrics", "/healthz", "/readyz",
          "/docs", "/openapi.json"}
ERRORS = {s: {"model": ErrorBody} for s in (401, 403, 408, 413, 415, 422, 503, 507)}


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail, headers: dict | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": jsonable_encoder(detail)}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class LimitsAndMetrics:
    """Pure ASGI middleware: refuses bodies over the limit (413, by Content-Length or while
    streaming) and bodies that trickle in slower than `body_timeout` seconds per chunk (408:
    a slow upload must not hold a connection forever), and counts every request by endpoint
    and status."""

    def __init__(self, app, max_body: int, metrics: Metrics, body_timeout: float = 30.0):
        self.app, self.max_body, self.metrics, self.body_timeout = app, max_body, metrics, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500, "started": False}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        async def refuse():
            resp = error_response(413, "body_too_large", f"request body exceeds {self.max_body} bytes")
            await resp(scope, receive, send_wrapper)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await refuse()
            else:
                received = 0

                async def receive_limited():
                    nonlocal received
                    try:
                        message = await asyncio.wait_for(receive(), self.body_timeout)
                    except asyncio.TimeoutError:
                        raise BodyTimeout() from None
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge()
                    return message

                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except BodyTooLarge:
                    if not status["started"]:
                        await refuse()
                except BodyTimeout:
                    if not status["started"]:
                        await error_response(408, "body_timeout", "the request body arrived too slowly")(
                            scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, scope["method"], str(status["code"])).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - t0)


class AppState:
    def __init__(self, config: ServiceConfig | None):
        self.config = config
        self.runtime: ModelRuntime | None = None
        self.batcher: DynamicBatcher | None = None  # None: MAX_BATCH_SIZE 1, each request runs alone
        self.ready = False
        self.metrics = Metrics()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        self.metrics.batch_size.observe(size)
        for w in waits:
            self.metrics.batch_queue.observe(w)

    def start_batcher(self) -> None:
        cfg = self.config
        if cfg.max_batch_size > 1:
            rt = self.runtime
            self.batcher = DynamicBatcher(lambda x: self.on_model_thread(rt.predict, x),
                                          BatchConfig(cfg.max_batch_size, cfg.max_batch_wait_ms), self._observe_batch)
            self.batcher.start()

    async def predict(self, images: torch.Tensor):
        """Through the dynamic batcher, or straight to the model thread without one."""
        if self.batcher is None:
            served = await self.on_model_thread(self.runtime.predict, images)
            self._observe_batch(len(images), [])
            return served, len(images)
        r = await self.batcher.submit(images)
        return r.result.select(r.rows), r.batch_size


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    """The app; `config` defaults to ServiceConfig.from_env() read at start-up."""
    state = AppState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        cfg = state.config = state.config or ServiceConfig.from_env()
        state.runtime = rt = await state.on_model_thread(
            ModelRuntime, cfg.model_store, cfg.model_name, cfg.state_dir, cfg.confidence_threshold,
            cfg.memory_index, cfg.index_nprobe, cfg.new_class_threshold, cfg.class_balance,
            cfg.protect_feedback)
        spec = rt.loaded.input
        await state.on_model_thread(rt.predict, torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size))
        m = state.metrics
        m.model_info.info({"name": rt.loaded.name, "version": rt.loaded.version,
                           "memory_kind": rt.model.config.memory, "threshold": str(rt.threshold)})
        _update_memory_gauges(state)
        state.start_batcher()
        state.ready = True
        log.info("ready: model %s version %s, memory %s", rt.loaded.name, rt.loaded.version, rt.memory_info()["size"])
        task = asyncio.create_task(_periodic_snapshots(state)) if cfg.snapshot_interval > 0 else None
        try:
            yield
        finally:
            state.ready = False
            if task:
                task.cancel()
            if state.batcher is not None:
                await state.batcher.stop()
            if rt.memory is not None:
                try:
                    await state.on_model_thread(rt.snapshot)
                    log.info("shutdown snapshot written")
                except OSError as e:
                    log.error("shutdown snapshot failed: %s", e)
            rt.close()
            state.model_thread.shutdown(wait=True)

    app = FastAPI(title="Memory-augmented image classifier", version="0.1.0", lifespan=lifespan,
                  description="Predicts image classes through a feature memory or the network head; "
                              "labelled feedback updates the memory online.")
    app.state.service = state
    limits = config or ServiceConfig.from_env()
    app.add_middleware(LimitsAndMetrics, max_body=limits.max_upload_bytes, metrics=state.metrics,
                       body_timeout=limits.body_timeout)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return error_response(413, "body_too_large", "request body exceeds the upload limit")

    @app.exception_handler(BodyTimeout)
    async def _too_slow(request: Request, exc: BodyTimeout):
        return error_response(408, "body_timeout", "the request body arrived too slowly", {"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal_error", "unexpected server error (logged)")

    def runtime() -> ModelRuntime:
        if not state.ready or state.runtime is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet")
        return state.runtime

    bearer = HTTPBearer(auto_error=False)

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = state.config.api_token if state.config else None
        if token is None:
            raise ApiError(403, "writes_disabled", "API_TOKEN is not set on the server: feedback and snapshots "
                                                   "are refused")
        if creds is None:
            raise ApiError(401, "missing_token", "send Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise ApiError(403, "invalid_token", "the bearer token is not valid")

    image_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": PredictJSON.model_json_schema()}}}}
    feedback_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file", "label"], "properties": {
            "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
            "label": {"type": "string", "description": "class name or index; a new name teaches a new class"}}}}}}}

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=image_body)
    async def predict(request: Request, rt: ModelRuntime = Depends(runtime)) -> PredictResponse:
        t0 = time.perf_counter()
        files = await read_images(request, state.config, allow_json=True)
        batch, decode_s = await decode_batch(files, rt, state.config)
        served, batch_size = await state.predict(batch)
        return predict_response(rt, served, decode_s, time.perf_counter() - t0, state, batch_size)

    @app.post("/feedback", response_model=FeedbackResponse, responses=ERRORS, openapi_extra=feedback_body,
              dependencies=[Depends(require_token)])
    async def feedback(request: Request, rt: ModelRuntime = Depends(runtime)) -> FeedbackResponse:
        files, label = await read_images(request, state.config, allow_json=False, label_field=True)
        try:
            _, _, is_new = rt.resolve_label(label)  # early, clear refusal; checked again under the lock
        except LabelError as e:
            raise ApiError(422, "invalid_label", str(e))
        batch, _ = await decode_batch(files, rt, state.config)
        features = await state.on_model_thread(rt.features, batch)
        try:
            outcomes = await state.on_model_thread(rt.feedback, features, label, state.metrics.journal_latency.observe)
        except LabelError as e:
            raise ApiError(422, "invalid_label", str(e))
        except JournalError as e:
            raise ApiError(507, "journal_unavailable", f"feedback not stored, nothing changed: {e}")
        for o in outcomes:
            state.metrics.feedback.labels(o.action).inc()
        _update_memory_gauges(state)
        return FeedbackResponse(new_class=is_new, items=[
            FeedbackItem(feedback_id=o.feedback_id, action=o.action, slot=o.slot, replaced_label=o.previous_label,
                         label=o.label, label_index=o.label_index) for o in outcomes])

    @app.get("/memory", response_model=MemoryResponse)
    async def memory(rt: ModelRuntime = Depends(runtime)) -> MemoryResponse:
        return MemoryResponse(**rt.memory_info())

    @app.post("/memory/snapshot", response_model=SnapshotResponse, responses=ERRORS,
              dependencies=[Depends(require_token)])
    async def snapshot(rt: ModelRuntime = Depends(runtime)) -> SnapshotResponse:
        if rt.memory is None:
            raise ApiError(422, "no_memory", "this model has no memory to snapshot")
        try:
            path = await state.on_model_thread(rt.snapshot)
        except OSError as e:
            raise ApiError(507, "snapshot_failed", f"snapshot not written: {e}")
        return SnapshotResponse(file=path.name, last_feedback_id=rt.stats.last_snapshot_id,
                                time=rt.stats.last_snapshot_time)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="alive")

    @app.get("/readyz", response_model=Health, responses={503: {"model": ErrorBody}})
    async def readyz() -> Health:
        rt = runtime()
        return Health(status="ready", model=rt.loaded.name, model_version=rt.loaded.version)

    return app


# --- request parsing ----------------------------------------------------------------------
async def read_images(request: Request, cfg: ServiceConfig, allow_json: bool, label_field: bool = False):
    """The image files of a request (multipart `file` parts, or JSON image_base64), and the
    `label` form field when asked. Every refusal is an ApiError naming the problem."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(422, "empty_body", "the request body is empty")
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=cfg.max_files, max_fields=8, max_part_size=cfg.max_upload_bytes)
        except (BodyTooLarge, BodyTimeout):
            raise
        except StarletteHTTPException as e:
            status = 413 if "Too many files" in str(e.detail) else 422
            raise ApiError(status, "bad_multipart", f"multipart body refused: {e.detail}")
        except Exception as e:
            raise ApiError(422, "bad_multipart", f"malformed multipart body: {e}")
        try:
            expected = {"file", "label"} if label_field else {"file"}
            unknown = sorted(set(form.keys()) - expected)
            if unknown:
                raise ApiError(422, "unexpected_field", f"unexpected field(s) {unknown}; expected {sorted(expected)}")
            parts = form.getlist("file")
            if not parts:
                raise ApiError(422, "missing_field", "missing field 'file' (one or more image files)")
            if len(parts) > cfg.max_files:
                raise ApiError(413, "too_many_files", f"at most {cfg.max_files} files per request")
            files = []
            for p in parts:
                if not isinstance(p, UploadFile):
                    raise ApiError(422, "not_a_file", "field 'file' must be a file upload, not text")
                files.append(await p.read())
            if not label_field:
                return files
            labels = form.getlist("label")
            if len(labels) != 1 or not isinstance(labels[0], str):
                raise ApiError(422, "missing_field", "exactly one text field 'label' (class name or index) is required")
            return files, labels[0]
        finally:
            await form.close()
    if ctype == "application/json" and allow_json:
        body = await request.body()
        if not body:
            raise ApiError(422, "empty_body", "the request body is empty")
        try:
            payload = PredictJSON.model_validate_json(body)
        except ValidationError as e:
            raise ApiError(422, "invalid_json", json.loads(e.json(include_url=False, include_context=False)))
        try:
            return [base64.b64decode(payload.image_base64, validate=True)]
        except (binascii.Error, ValueError) as e:
            raise ApiError(422, "invalid_base64", f"image_base64 is not valid base64: {e}")
    accepted = "multipart/form-data" + (" or application/json" if allow_json else "")
    raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} not accepted; send {accepted}")


async def decode_batch(files: list[bytes], rt: ModelRuntime, cfg: ServiceConfig) -> tuple[torch.Tensor, list[float]]:
    limits = ImageLimits(max_pixels=cfg.max_pixels)

    def decode_all():
        out, times = [], []
        for i, data in enumerate(files):
            t = time.perf_counter()
            try:
                out.append(decode_image(data, rt.loaded.input, limits))
            except ImageError as e:
                where = f"file {i + 1} of {len(files)}: " if len(files) > 1 else ""
                raise ApiError(e.status, e.code, where + e.message)
            times.append(time.perf_counter() - t)
        return torch.stack(out), times  # (B, C, H, W)
    return await run_in_threadpool(decode_all)


def predict_response(rt: ModelRuntime, served, decode_s: list[float], total_s: float, state: AppState,
                     batch_size: int) -> PredictResponse:
    p = served.prediction
    B = len(p.labels)
    known = len(rt.classes)
    scores = p.class_scores[:, :known]  # (B, known)
    k = min(state.config.top_k, known)
    top_scores, top_idx = scores.topk(k, dim=-1)
    m = state.metrics
    items = []
    for i in range(B):
        label = int(p.labels[i])
        path = p.paths[i]
        nearest = None
        if int(p.slot[i]) >= 0:
            nearest = NearestItem(slot=int(p.slot[i]), label=served.nearest_labels[i] or "",
                                  similarity=float(p.similarity[i]), feedback_id=served.feedback_ids[i])
        items.append(ImagePrediction(
            label=rt.class_name(label), label_index=label, confidence=float(p.confidence[i]), path=path,
            top_k=[ClassScore(label=rt.class_name(int(j)), label_index=int(j), score=float(s))
                   for s, j in zip(top_scores[i].tolist(), top_idx[i].tolist())],
            nearest=nearest, latency_ms=1e3 * total_s))
        m.predictions.labels(path, rt.class_name(label)).inc()
        m.stage_latency.labels("decode", path).observe(decode_s[i])
        for stage in ("features", "memory", "head"):
            m.stage_latency.labels(stage, path).observe(p.timings_ms[stage] / 1e3 / batch_size)
    return PredictResponse(model=rt.loaded.name, model_version=rt.loaded.version, predictions=items)


def _update_memory_gauges(state: AppState) -> None:
    rt = state.runtime
    if rt is not None and rt.memory is not None:
        state.metrics.memory_size.set(rt.memory.size)
        state.metrics.memory_capacity.set(rt.memory.capacity)


async def _periodic_snapshots(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.config.snapshot_interval)
        rt = state.runtime
        if rt is not None and rt.dirty:
            try:
                await state.on_model_thread(rt.snapshot)
            except OSError as e:
                log.error("periodic snapshot failed: %s", e)


def __getattr__(name: str):
    # `service.app:app` for uvicorn and the Dockerfile, built on first access so that
    # importing this module (tests, create_app) reads no environment
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
