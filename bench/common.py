"""Shared benchmark plumbing: the machine header and one JSON record per run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def header(config: dict) -> dict:
    m = machine()
    print("machine:", json.dumps(m))
    print("config: ", json.dumps(config))
    return m


def spread(xs: list[float]) -> dict:
    """Median with min, max and quartiles of the repeats."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2], "n": len(xs)}


def write_record(name: str, config: dict, results: dict, machine_info: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info, "config": config, "results": results}, indent=2))
    print(f"wrote {path}")
    return path


def test_pngs(n: int) -> list[bytes]:
    """The first n Fashion-MNIST test images as PNG files: what a client posts."""
    import io

    from PIL import Image

    from service.core.data import load_fashion_mnist
    images = load_fashion_mnist().test.images[:n, 0]
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.numpy()).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
