"""Pure ASGI middleware: body limits and request metrics, before any endpoint runs."""

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
    that trickle in slower than `body_timeout` seconds per chunk (408: a slow upload must
    not hold a connection forever), and counts every request by endpoint and status."""

    def __init__(self, app, max_body: int, metrics: Metrics, body_timeout: float = 30.0):
        self.app, self.max_body, self.metrics, self.body_timeout = app, max_body, metrics, body_timeout

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
