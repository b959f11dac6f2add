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


def test_asgi_app_is_importable_for_uvicorn():
    code = "import service.web.app as m; from fastapi import FastAPI; assert isinstance(m.app, FastAPI)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
