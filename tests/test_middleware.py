"""service/web/middleware.py: connection balancing among server processes."""

import asyncio
import os
import time

from service.web.middleware import BalanceConnections, WorkerCounts


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def answer(app, client: tuple[str, int]) -> dict:
    """Headers of the answer to one request from `client` (host, port = one connection)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    asyncio.run(app({"type": "http", "client": client, "method": "GET", "path": "/"}, receive, send))
    return dict(sent[0]["headers"])


def test_a_process_over_its_share_of_connections_closes_the_excess_ones(tmp_path):
    (tmp_path / f"{os.getppid()}.connections").write_text("0")  # another live process, no connections
    app = BalanceConnections(ok_app, WorkerCounts(tmp_path, period=0.0))
    closed = [b"connection" in answer(app, ("127.0.0.1", port)) for port in range(1000, 1006)]
    # mean of (mine, 0) + 1: 1 connection is within it, 2 after the first; beyond that each is closed
    assert closed == [False, False, True, True, True, True]
    assert answer(app, ("127.0.0.1", 1000)) == {b"content-type": b"text/plain"}  # kept ones stay open


def test_a_lone_process_closes_nothing_and_forgets_a_dead_ones_count(tmp_path):
    dead = tmp_path / "999999999.connections"  # no such process
    dead.write_text("0")
    app = BalanceConnections(ok_app, WorkerCounts(tmp_path, period=0.0))
    assert not any(b"connection" in answer(app, ("127.0.0.1", port)) for port in range(1000, 1020))
    assert not dead.exists()
    assert (tmp_path / f"{os.getpid()}.connections").read_text() == "20"  # its own count, published


def test_connections_idle_past_the_window_are_not_counted(tmp_path):
    counts = WorkerCounts(tmp_path, window=0.5, period=0.0)
    seen = {("h", 1): 0.0, ("h", 2): 10.0}
    assert counts.update(seen, now=10.2)[0] == 1 and list(seen) == [("h", 2)]
    counts.close()
    assert not (tmp_path / f"{os.getpid()}.connections").exists()


def test_a_process_silent_for_a_window_counts_as_holding_no_connections(tmp_path):
    other = tmp_path / f"{os.getppid()}.connections"
    other.write_text("16")  # its count from a busy moment, not rewritten since
    old = time.time() - 5
    os.utime(other, (old, old))
    app = BalanceConnections(ok_app, WorkerCounts(tmp_path, window=1.0, period=0.0))
    closed = [b"connection" in answer(app, ("127.0.0.1", port)) for port in range(1000, 1004)]
    assert closed == [False, False, True, True]  # as if the other held none, not 16
