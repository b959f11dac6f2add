"""Pure ASGI middleware, before any endpoint runs: body limits and request metrics."""

from __future__ import annotations

import asyncio
import time

from .errors import BodyTimeout, BodyTooLarge, error_response
from .metrics import Metrics

ROUTES = {"/predict", "/feedback", "/memory", "/memory/snapshot", "/metrics", "/healthz", "/readyz",
          "/docs", "/openapi.json", "/", "/redoc", "/v2", "/v2/health/live", "/v2/health/ready"}


PREFIXES = (("/feedback/", "/feedback/{id}"), ("/v2/models/", "/v2/models/{name}"))


class LimitsAndMetrics:
    """Refuses bodies over the limit (413, by Content-Length or while streaming) and bodies
    that arrive too slowly (408, `Connection: close`): a chunk must come within
    `body_timeout` seconds of the one before, and the whole body within `body_deadline`
    seconds of the request's start, so a client trickling in a byte now and then cannot
    hold a connection forever either. Counts every request by endpoint and status."""

    def __init__(self, app, max_body: int, metrics: Metrics, body_timeout: float = 30.0,
                 body_deadline: float = 60.0):
        self.app, self.max_body, self.metrics, self.body_timeout = app, max_body, metrics, body_timeout
        self.body_deadline = body_deadline

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ROUTES else next((label for prefix, label in PREFIXES if path.startswith(prefix)),
                                                    "other")
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
                received, complete = 0, False
                deadline_s = self.body_deadline
                deadline = time.monotonic() + deadline_s

                async def receive_limited():
                    nonlocal received, complete
                    if complete:  # the body is in: later receives wait for a disconnect, unbounded
                        return await receive()
                    left = deadline - time.monotonic()
                    try:
                        async with asyncio.timeout(max(0.0, min(self.body_timeout, left))):  # no task per chunk
                            message = await receive()
                    except TimeoutError:
                        raise BodyTimeout(
                            f"the request body did not arrive within BODY_DEADLINE ({deadline_s:g} s)"
                            if left <= self.body_timeout else
                            f"no part of the request body arrived for BODY_TIMEOUT ({self.body_timeout:g} s)") from None
                    complete = message["type"] != "http.request" or not message.get("more_body", False)
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge()
                    return message

                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except BodyTooLarge:
                    if not status["started"]:
                        await refuse()
                except BodyTimeout as e:
                    if not status["started"]:
                        await error_response(408, "body_timeout", str(e) or "the request body arrived too slowly",
                                             {"Connection": "close"})(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, scope["method"], str(status["code"])).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - t0)
