"""Deployment files: no Docker engine here, so the Dockerfile is linted and the compose and
Prometheus files are validated by their own tools (installed by .ci/run and `make test`)."""

import json
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


def test_dockerfile_runs_as_non_root_with_healthcheck_and_serves_on_every_core():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "COPY model_store" in text and "VOLUME" in text
    cmd = json.loads(text.split("\nCMD ", 1)[1].splitlines()[0])
    assert cmd[:4] == ["python", "-m", "service", "serve"] and "--workers" not in cmd  # default: the cores


@pytest.mark.parametrize("compose", ["docker-compose.yml", "docker-compose.replicated.yml"])
def test_compose_file_is_valid(compose):
    r = subprocess.run([tool("docker-compose"), "-f", str(ROOT / compose), "config", "--quiet"],
                       capture_output=True, text=True, env=os.environ | {"API_TOKEN": "x", "POSTGRES_PASSWORD": "y"})
    assert r.returncode == 0, r.stderr


def test_replicated_compose_runs_two_replicas_on_postgresql_behind_nginx():
    import yaml

    r = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.replicated.yml"), "config"],
                       capture_output=True, text=True, env=os.environ | {"API_TOKEN": "x", "POSTGRES_PASSWORD": "y"})
    services = yaml.safe_load(r.stdout)["services"]
    replicas = [s for s in services if s.startswith("classifier")]
    assert len(replicas) == 2 and {"postgres", "nginx", "prometheus"} <= set(services)
    for name in replicas:
        assert services[name]["environment"]["FEEDBACK_DB"].startswith("postgresql://")
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert all(f"server {name}:8000" in nginx for name in replicas)


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-replicated.yml"])
def test_prometheus_config_is_valid(config):
    r = subprocess.run([tool("promtool"), "check", "config", str(ROOT / "deploy" / config)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nginx_config_is_valid():
    conf = (ROOT / "deploy" / "nginx.conf").read_text().replace("server classifier-1:8000", "server 127.0.0.1:8001") \
        .replace("server classifier-2:8000", "server 127.0.0.1:8002").replace("listen 8000;", "listen 127.0.0.1:18000;")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "nginx.conf"
        path.write_text(conf)
        r = subprocess.run([tool("nginx"), "-t", "-c", str(path), "-p", d, "-e", str(Path(d) / "error.log"),
                            "-g", f"pid {d}/nginx.pid;"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
