import os
import subprocess
import sys


def test_importing_core_and_serving_loads_no_web_framework():
    code = ("import sys, service.core.memory, service.core.model, service.core.train, service.core.store, "
            "service.core.preprocess, service.serving.runtime, service.serving.feedback_store, "
            "service.serving.batching; "
            "web = [m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client') if m in sys.modules]; "
            "print(web); sys.exit(1 if web else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_has_train_and_serve():
    r = subprocess.run([sys.executable, "-m", "service", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "serve" in r.stdout


def test_uvicorn_factory_builds_the_app_from_the_environment():
    """`uvicorn --factory service.web.app:create_app_from_environment`, as uvicorn resolves it."""
    code = ("from fastapi import FastAPI; from uvicorn.importer import import_from_string; "
            "app = import_from_string('service.web.app:create_app_from_environment')(); "
            "assert isinstance(app, FastAPI); print(app.state.service.config.top_k)")
    env = {k: v for k, v in os.environ.items() if k != "SERVICE_CONFIG_JSON"} | {"TOP_K": "3"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
