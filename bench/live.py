"""A real `python -m service serve` process on a free loopback port (benchmarks and tests)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state_dir: Path, token: str = "server-test-token", workers: int | None = 1, **env):
        # one process unless asked: kill -9 and restart tests mean one process, not a group
        self.state_dir, self.token, self.workers, self.env = Path(state_dir), token, workers, env
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

    def start(self, timeout: float = 120) -> "Server":
        env = os.environ | {"API_TOKEN": self.token, "STATE_DIR": str(self.state_dir),
                            "MODEL_STORE": str(ROOT / "model_store"), "MODEL_NAME": "fashion-mnist",
                            "PYTHONPATH": str(ROOT)} | self.env
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / f"server-{time.time_ns()}.log", "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *self.workers_flag], env=env, cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    self.start_seconds = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database, its write-ahead log included (SQLite's backup
    API: copying the main file alone can miss the commits still in `-wal`)."""
    import sqlite3

    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    b.close()
    a.close()
