"""Deployment files: no Docker engine here, so the Dockerfile is linted and the compose and
Prometheus files are validated by their own tools (installed by .ci/run and `make test`)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` / .ci/run install it")
    return path


def test_dockerfile_passes_hadolint():
    r = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "COPY model_store" in text and "VOLUME" in text and "service.web.app:app" in text


def test_compose_file_is_valid():
    r = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                       capture_output=True, text=True, env=os.environ | {"API_TOKEN": "x"})
    assert r.returncode == 0, r.stderr


def test_prometheus_config_is_valid():
    r = subprocess.run([tool("promtool"), "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
