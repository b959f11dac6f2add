"""Every error the API answers, in one place: domain errors (raised by the core and the
serving runtime, which know nothing of HTTP) map to statuses here, and every answer has
the same JSON form `{"error": code, "detail": ...}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.preprocess import ImageError, ImageTooLarge, UnsupportedImageFormat
from ..serving.feedback_store import FeedbackStoreError, NotFound, StoreUnavailable
from ..serving.snapshots import SnapshotError
from ..serving.vocabulary import LabelError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal found by the web layer itself (bad request shape, missing token, not ready)."""

    def __init__(self, status: int, code: str, detail, headers: dict | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class BodyTooLarge(Exception):
    """The request body passed MAX_UPLOAD_BYTES while streaming in."""


class BodyTimeout(Exception):
    """The next chunk of the request body did not arrive within BODY_TIMEOUT."""


# domain error -> (status, code; None = the exception's own .code, detail prefix). Most
# specific classes first: the first isinstance match wins.
DOMAIN_ERRORS: list[tuple[type[Exception], int, str | None, str]] = [
    (ImageTooLarge, 413, None, ""),
    (UnsupportedImageFormat, 415, None, ""),
    (ImageError, 422, None, ""),
    (LabelError, 422, "invalid_label", ""),
    (StoreUnavailable, 503, "feedback_store_unavailable", "nothing was written: "),
    (FeedbackStoreError, 503, "feedback_store_damaged", "refusing to go on: "),
    (NotFound, 404, "not_found", ""),
    (SnapshotError, 507, "snapshot_failed", ""),
    (BodyTooLarge, 413, "body_too_large", "request body exceeds the upload limit"),
    (BodyTimeout, 408, "body_timeout", "the request body arrived too slowly"),
]
STATUSES = (401, 403, 404, 408, 410, 413, 415, 422, 503, 507)


def error_response(status: int, code: str, detail, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": jsonable_encoder(detail)}, status_code=status, headers=headers)


def domain_error_response(exc: Exception) -> JSONResponse:
    for kind, status, code, prefix in DOMAIN_ERRORS:
        if isinstance(exc, kind):
            message = str(exc) if kind not in (BodyTooLarge, BodyTimeout) else ""
            headers = {"Connection": "close"} if kind is BodyTimeout else None
            return error_response(status, code or getattr(exc, "code", "error"), prefix + message, headers)
    raise TypeError(f"not a domain error: {exc!r}")


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    async def domain_error(request: Request, exc: Exception):
        return domain_error_response(exc)

    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", exc.errors())

    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", exc.detail, getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal_error", "unexpected server error (logged)")

    app.add_exception_handler(ApiError, api_error)
    for kind, *_ in DOMAIN_ERRORS:
        app.add_exception_handler(kind, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
