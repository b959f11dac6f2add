"""What the endpoints of both APIs (routers.py, inference_protocol.py) share: the FastAPI
dependencies that read the app's state from `request.app.state` (the runtime, readiness, the
bearer token, the review queue), and the metrics each predicted image counts in."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..serving.review_queue import ReviewQueue
from ..serving.runtime import ModelRuntime, Served
from .errors import ApiError
from .metrics import Metrics
from .state import AppState

_bearer = HTTPBearer(auto_error=False)


def app_state(request: Request) -> AppState:
    return request.app.state.service


def runtime(state: AppState = Depends(app_state)) -> ModelRuntime:
    if not state.ready or state.runtime is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    if state.runtime.failure:
        raise ApiError(503, "feedback_store_damaged", state.runtime.failure)
    return state.runtime


def ready_runtime(rt: ModelRuntime = Depends(runtime)) -> ModelRuntime:
    """Ready to take traffic: also the feedback log tail is applying others' feedback."""
    reason = rt.not_ready_reason()
    if reason:
        raise ApiError(503, "not_ready", reason)
    return rt


def review_queue(request: Request) -> ReviewQueue | None:
    """The review queue, None when REVIEW_QUEUE is off (app.py's lifespan makes it)."""
    return getattr(request.app.state, "review_queue", None)


def require_review_queue(queue: ReviewQueue | None = Depends(review_queue),
                         rt: ModelRuntime = Depends(runtime)) -> ReviewQueue:
    if queue is None:
        raise ApiError(404, "review_queue_off", "this server keeps no review queue (REVIEW_QUEUE=on turns it on)"
                       if rt.memory is not None else "this model has no memory: it keeps no review queue")
    return queue


def require_token(state: AppState = Depends(app_state),
                  creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    token = state.config.api_token
    if token is None:
        raise ApiError(403, "writes_disabled", "API_TOKEN is not set on the server: feedback and snapshots "
                                               "are refused")
    if creds is None:
        raise ApiError(401, "missing_token", "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise ApiError(403, "invalid_token", "the bearer token is not valid")


def observe_prediction(m: Metrics, rt: ModelRuntime, served: Served, decode_s: list[float], batch_size: int) -> None:
    """Each image of a request's prediction in the metrics: by path and class, and the time of
    each stage (decode: the image's own; the model's stages: its batch's, shared by its images)."""
    p = served.prediction
    for i, (label, path) in enumerate(zip(p.labels.tolist(), p.paths)):
        m.predictions.labels(path, rt.class_name(label)).inc()
        m.stage_latency.labels("decode", path).observe(decode_s[i])
        for stage in ("features", "memory", "head"):
            m.stage_latency.labels(stage, path).observe(p.timings_ms[stage] / 1e3 / batch_size)
