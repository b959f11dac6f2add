"""A real server process on a free loopback port (tests and benchmarks).

    s = Server(tmp_dir, MODEL_NAME="fashion-mnist").start()   # python -m service serve
    httpx.get(s.url + "/readyz"); s.kill(signal.SIGTERM)

By default the server is this service, one process (`workers=1`: kill -9 and restart tests
mean one process, not a group); `workers=None` is serve's default (one process per core).
Keyword arguments in capitals are the server's environment (its settings). The benchmarks
also start other servers with it (`command=[...]`, `{port}` replaced by the chosen port, ready
when `health` answers 200) and ask for a process group of its own (`new_session=True`): then
`stop()` ends the server and every child, and `proc.pid` is the session id that
bench.harness.group_cpu_seconds reads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state_dir: Path, token: str = "server-test-token", workers: int | None = 1, *,
                 command: list[str] | None = None, health: str = "/readyz", new_session: bool = False, **env):
        self.state_dir, self.token, self.workers, self.env = Path(state_dir), token, workers, env
        self.command, self.health, self.new_session = command, health, new_session
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_seconds = float("nan")

    @property
    def workers_flag(self) -> list[str]:
        return [] if self.workers is None else ["--workers", str(self.workers)]  # None: serve's default

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def _environment(self) -> dict:
        return os.environ | {"API_TOKEN": self.token, "STATE_DIR": str(self.state_dir),
                             "MODEL_STORE": str(ROOT / "model_store"), "MODEL_NAME": "fashion-mnist",
                             "PYTHONPATH": str(ROOT)} | self.env

    def start(self, timeout: float = 120, all_workers: bool = False) -> "Server":
        """Launch, then wait until `health` answers 200 (start_seconds: launch to that answer).
        all_workers: then also until every process of a `--workers N` server has answered."""
        env = self._environment()
        if self.command is None:
            cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--log-level", "warning",
                   *self.workers_flag]
        else:
            cmd = [a.replace("{port}", str(self.port)) for a in self.command]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / f"server-{time.time_ns()}.log", "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log.name}")
            try:
                if httpx.get(self.url + self.health, timeout=1).status_code == 200:
                    self.start_seconds = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise TimeoutError(f"server not ready; see {log.name}")
        if all_workers and self.command is None:
            self._wait_for_workers(self.expected_workers(env), deadline)
        return self

    def expected_workers(self, env: dict | None = None) -> int:
        """The processes `serve` runs: --workers, else its default (WEB_CONCURRENCY or the cores)."""
        if self.workers is not None:
            return self.workers
        from service.web.settings import usable_cores

        return int((env or self._environment()).get("WEB_CONCURRENCY") or usable_cores())

    def answering_pids(self, requests: int = 8) -> set[int]:
        """The server processes that answered `requests` concurrent GET /memory, each on its own
        connection (several processes share the port and take connections as they come)."""
        def one(_) -> int | None:
            try:
                r = httpx.get(self.url + "/memory", timeout=30)
                return r.json().get("pid") if r.status_code == 200 else None
            except httpx.HTTPError:
                return None
        with ThreadPoolExecutor(requests) as ex:
            return {p for p in ex.map(one, range(requests)) if p}

    def _wait_for_workers(self, n: int, deadline: float) -> None:
        seen: set[int] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            seen |= self.answering_pids()
            if len(seen) >= n:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{len(seen)} of {n} server processes answered")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after `timeout` s: to the whole process group with new_session."""
        if self.proc is None:
            return

        def send(sig) -> None:
            try:
                if self.new_session:
                    os.killpg(self.proc.pid, sig)  # the server and its children (workers, LitServe's)
                else:
                    self.proc.send_signal(sig)
            except ProcessLookupError:  # gone already
                pass
        send(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            self.proc.wait()

def copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database, its write-ahead log included (SQLite's backup
    API: copying the main file alone can miss the commits still in `-wal`)."""
    import sqlite3

    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    b.close()
    a.close()
