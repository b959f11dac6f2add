"""A throwaway PostgreSQL server for tests and benchmarks: Debian's `postgresql` binaries
(initdb + pg_ctl, not on PATH), a cluster in a temporary folder, listening on a free
loopback port only. PostgreSQL refuses to run as root: as root the cluster is owned by
and run as the `postgres` user the Debian package creates.

    with Postgres(tmp_dir) as pg:
        url = pg.url          # postgresql://postgres@127.0.0.1:<port>/postgres
        pg.stop(); pg.start() # to test an outage
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

from testkit.live import free_port


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"{name} not found under /usr/lib/postgresql/*/bin: install Debian's postgresql "
                                "(`make test` and .ci/run do)")
    return found[-1]


class Postgres:
    def __init__(self, folder: str | Path, settings: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.settings = settings or {}  # postgresql.conf lines after the defaults (they win)
        self.data = self.folder / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> "Postgres":
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.folder}'"
                    "\nfsync = on\nsynchronous_commit = on\nmax_connections = 200\n")
            f.writelines(f"{k} = {v}\n" for k, v in self.settings.items())
        return self

    def start(self) -> "Postgres":
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "postgres.log"), "-w", "-t", "60",
                  "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def __enter__(self) -> "Postgres":
        return self.init().start()

    def __exit__(self, *exc) -> None:
        self.stop("immediate")


def wait_until(predicate, timeout: float = 30, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
