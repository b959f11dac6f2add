"""Pure ASGI middleware, before any endpoint runs: body limits and request metrics; connections
evened out among server processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

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


class BalanceConnections:
    """Moves keep-alive connections from a server process holding more than its share of
    them to the others (`serve --workers N`).

    Each process accepts connections for itself from the shared socket, and one may take a
    whole burst of new connections (an event loop accepts all that are waiting) and keep
    them for as long as the clients do, so that throughput and p99 follow the busier process
    (BENCHMARKS.md, "Load"). Closing connections after a fixed number of requests (nginx's
    keepalive_requests) did not even them out. Here each
    process counts the connections it answered in the last second and publishes the count
    (`WorkerCounts`); a process over the mean + 1 answers the request with
    `Connection: close`, and the client reconnects, landing on either process, until the
    counts even out. One process, or none published: nothing is closed. Connections are told
    apart by the client's address and port; behind a proxy uvicorn trusts (FORWARDED_ALLOW_IPS)
    that is the forwarded address with port 0, and all of one client's connections count as one."""

    def __init__(self, app, counts: "WorkerCounts | None"):
        self.app, self.counts = app, counts
        self.seen: dict[tuple, float] = {}  # (client host, port) -> last request's time

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] != "http" or self.counts is None or not client:
            return await self.app(scope, receive, send)
        key, now = tuple(client), time.monotonic()
        self.seen[key] = now
        mine, fair = self.counts.update(self.seen, now)
        if mine <= fair + 1:
            return await self.app(scope, receive, send)
        del self.seen[key]  # counted as gone at once, so that one refresh closes only the excess

        async def send_closing(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)
        await self.app(scope, receive, send_closing)


class WorkerCounts:
    """Connections in use per server process, shared through a folder: each process writes its
    count to `<pid>.connections` and reads the others' at most every `period` seconds."""

    def __init__(self, folder: str | os.PathLike, window: float = 1.0, period: float = 0.1):
        self.folder, self.window, self.period = Path(folder), window, period
        self.mine = self.folder / f"{os.getpid()}.connections"
        self.next_refresh, self.fair = 0.0, float("inf")

    def update(self, seen: dict[tuple, float], now: float) -> tuple[int, float]:
        """(connections of this process, the mean over live processes) after forgetting
        connections idle for `window` seconds; the mean is refreshed every `period`."""
        if now >= self.next_refresh:
            self.next_refresh = now + self.period
            for key in [k for k, t in seen.items() if now - t > self.window]:
                del seen[key]
            self.fair = self._refresh(len(seen))
        return len(seen), self.fair

    def _refresh(self, mine: int) -> float:
        counts = [mine]
        try:
            tmp = self.mine.with_suffix(".tmp")
            tmp.write_text(str(mine))
            tmp.replace(self.mine)  # readers see a whole number, old or new
            others = [f for f in self.folder.glob("*.connections") if f != self.mine]
        except OSError:
            return float("inf")  # the folder unusable: balance nothing rather than fail a request
        for f in others:
            try:
                pid = int(f.stem)
                if not _alive(pid):
                    f.unlink(missing_ok=True)  # a worker that died without cleaning up
                    continue
                # a process publishes only when it answers: one silent for a window holds none
                idle = time.time() - f.stat().st_mtime > self.window
                counts.append(0 if idle else int(f.read_text()))
            except (OSError, ValueError):  # gone meanwhile (a worker stopped), or not ours
                continue
        return sum(counts) / len(counts) if len(counts) > 1 else float("inf")

    def close(self) -> None:
        self.mine.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
