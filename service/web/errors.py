"""Every error the two APIs answer, in one place: domain errors (raised by the core, the
serving runtime and the inference protocol's codec, which know nothing of HTTP) map to a
status and a code in one table, DOMAIN_ERRORS, and each API renders them in its own form: the
REST API `{"error": code, "detail": ...}`, the Open Inference Protocol `{"error": message}`.

The table's OIP column is the one place the two differ: the protocol answers a request it
cannot use 400 (Bad Request) where the REST API says 422 (Unprocessable Content)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.preprocess import ImageError, ImageTooLarge, UnsupportedImageFormat
from ..serving.feedback_store import (FeedbackStoreError, IdempotencyKeyReused, NotFound, OutcomeUnknown,
                                      StoreUnavailable)
from ..serving.runtime import IdempotencyInFlight
from ..serving.snapshots import SnapshotError
from ..serving.vocabulary import LabelError
from .oip_schema import (InferenceRequestTooLarge, InvalidInferenceRequest, UnsupportedContentEncoding,
                         validation_message)

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal found by the web layer itself (bad request shape, missing token, not ready)."""

    def __init__(self, status: int, code: str, detail, headers: dict | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class BodyTooLarge(Exception):
    """The request body passed MAX_UPLOAD_BYTES while streaming in."""


class BodyTimeout(Exception):
    """The next chunk of the request body did not arrive within BODY_TIMEOUT."""


@dataclass(frozen=True)
class ErrorRule:
    kind: type[Exception]
    status: int  # the REST API's
    oip: int  # the Open Inference Protocol's
    code: str | None  # None: the exception's own .code
    prefix: str = ""  # before the exception's message
    default: str = ""  # the message when the exception has none
    close: bool = False  # answer with `Connection: close` (the rest of the body may never come)


# Most specific classes first: the first isinstance match wins.
DOMAIN_ERRORS: list[ErrorRule] = [
    #         kind                        REST  OIP  code
    ErrorRule(ImageTooLarge,              413, 413, None),
    ErrorRule(UnsupportedImageFormat,     415, 415, None),
    ErrorRule(ImageError,                 422, 400, None),
    ErrorRule(LabelError,                 422, 400, "invalid_label"),
    ErrorRule(IdempotencyKeyReused,       422, 400, "idempotency_key_reused"),
    ErrorRule(IdempotencyInFlight,        409, 409, "idempotency_request_in_flight"),
    ErrorRule(StoreUnavailable,           503, 503, "feedback_store_unavailable", "nothing was written: "),
    ErrorRule(OutcomeUnknown,             503, 503, "feedback_outcome_unknown"),
    ErrorRule(FeedbackStoreError,         503, 503, "feedback_store_damaged", "refusing to go on: "),
    ErrorRule(NotFound,                   404, 404, "not_found"),
    ErrorRule(SnapshotError,              507, 507, "snapshot_failed"),
    ErrorRule(BodyTooLarge,               413, 413, "body_too_large",
              default="request body exceeds the upload limit (MAX_UPLOAD_BYTES)"),
    ErrorRule(BodyTimeout,                408, 408, "body_timeout", default="the request body arrived too slowly",
              close=True),
    # FastAPI's own: a parameter of the wrong type (detail: pydantic's errors)
    ErrorRule(RequestValidationError,     422, 400, "invalid_request"),
    # the inference protocol's codec (oip_codec.py): only its endpoints raise these
    ErrorRule(InferenceRequestTooLarge,   413, 413, "request_too_large"),
    ErrorRule(UnsupportedContentEncoding, 415, 415, "unsupported_content_encoding"),
    ErrorRule(InvalidInferenceRequest,    422, 400, "invalid_inference_request"),
]
STATUSES = (401, 403, 404, 408, 409, 410, 413, 415, 422, 503, 507)


def rule_for(exc: Exception) -> ErrorRule | None:
    return next((r for r in DOMAIN_ERRORS if isinstance(exc, r.kind)), None)


def _detail(exc: Exception, rule: ErrorRule):
    """What is wrong, the same for both APIs (RequestValidationError: pydantic's errors)."""
    if isinstance(exc, RequestValidationError):
        return exc.errors()
    return rule.prefix + (str(exc) or rule.default)


def _headers(rule: ErrorRule) -> dict | None:
    return {"Connection": "close"} if rule.close else None


# --- the REST API: {"error": code, "detail": ...} -------------------------------------------------
def error_response(status: int, code: str, detail, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": jsonable_encoder(detail)}, status_code=status, headers=headers)


def domain_error_response(exc: Exception) -> JSONResponse:
    rule = rule_for(exc)
    if rule is None:
        raise TypeError(f"not a domain error: {exc!r}")
    return error_response(rule.status, rule.code or getattr(exc, "code", "error"), _detail(exc, rule), _headers(rule))


# --- the Open Inference Protocol: {"error": message} -----------------------------------------------
def protocol_error_response(exc: Exception) -> JSONResponse | None:
    """The protocol's answer to `exc`: a domain error at the table's OIP status, an ApiError
    (a refusal of the web layer's own: an unknown model, not ready) at its status; None for
    anything else (an unexpected error: the app's handler logs it and answers 500)."""
    if isinstance(exc, ApiError):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status, headers=exc.headers)
    rule = rule_for(exc)
    if rule is None:
        return None
    detail = _detail(exc, rule)
    message = validation_message(list(detail)) if isinstance(exc, RequestValidationError) else detail
    return JSONResponse({"error": message}, status_code=rule.oip, headers=_headers(rule))


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    async def domain_error(request: Request, exc: Exception):
        return domain_error_response(exc)

    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", exc.detail, getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal_error", "unexpected server error (logged)")

    app.add_exception_handler(ApiError, api_error)
    for rule in DOMAIN_ERRORS:
        app.add_exception_handler(rule.kind, domain_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
