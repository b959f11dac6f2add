"""Accuracy a user gets: the shipped model served with default settings by a fresh
`python -m service serve` process, every test image posted to /predict over HTTP.

Fashion-MNIST: the test images as PNG files; CIFAR-10 (JPEG copy): the test JPEG files as
they are in the zip. Reports accuracy (an abstained answer's label is its best guess, counted
like any other), memory-path share, the share that abstained ("none of these": path abstain),
and the model's own training report (manifest) beside it.

    .venv/bin/python -m bench.checks.served_accuracy --dataset fashion-mnist
    .venv/bin/python -m bench.checks.served_accuracy --dataset cifar10
    .venv/bin/python -m bench.checks.served_accuracy --dataset cifar10 --engine eager   # the torch network

`--engine` is the server's ENGINE (auto, the default, serves the engine the manifest names);
a run with another engine is recorded as served_accuracy-<dataset>-<engine>.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import httpx

from bench.harness import CIFAR_ZIP, ROOT, Server, fashion_mnist_pngs, header, write_record
from service.core.store import load_model

CHUNK = 64  # images per request (MAX_FILES default)


def test_files(dataset: str) -> list[tuple[bytes, str, str]]:
    """(file bytes, content type, true class name) for every test image."""
    if dataset == "fashion-mnist":
        pngs, labels, classes = fashion_mnist_pngs()
        return [(p, "image/png", classes[int(y)]) for p, y in zip(pngs, labels)]
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.split("/")[-3:-2] == ["test"] and n.lower().endswith(".jpg"))
        return [(z.read(n), "image/jpeg", n.split("/")[-2]) for n in names]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist")
    ap.add_argument("--engine", choices=["auto", "eager", "openvino-int8"], default="auto")
    args = ap.parse_args()
    m = header(vars(args))
    model = {"fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}[args.dataset]
    files = test_files(args.dataset)
    with tempfile.TemporaryDirectory() as d:
        s = Server(Path(d), workers=None, MODEL_NAME=model, ENGINE=args.engine).start()  # serve's default settings
        right = memory = abstained = 0
        with httpx.Client(base_url=s.url, timeout=120) as c:
            for i in range(0, len(files), CHUNK):
                chunk = files[i:i + CHUNK]
                r = c.post("/predict", files=[("file", (f"{j}", data, ct)) for j, (data, ct, _) in enumerate(chunk)])
                r.raise_for_status()
                for p, (_, _, truth) in zip(r.json()["predictions"], chunk):
                    right += p["label"] == truth
                    memory += p["path"] == "memory"
                    abstained += p["abstained"]  # label is still the best guess: counted in accuracy
            info = c.get("/memory").json()
        s.kill(15)
    manifest = load_model(ROOT / "model_store", model).manifest
    results = {"images": len(files), "accuracy": right / len(files), "memory_share": memory / len(files),
               "abstained_share": abstained / len(files),
               "engine": info["engine"], "policy": info["policy"], "policy_overrides": info["policy_overrides"],
               "manifest_test_accuracy": manifest["metrics"]["test_accuracy"], "model_version": manifest["version"],
               "threshold_chosen_on": manifest["data"].get("threshold_chosen_on")}
    print(f"{model}: served accuracy {results['accuracy']:.4f} over {len(files)} test images via HTTP "
          f"(training report: {results['manifest_test_accuracy']:.4f}), memory share {results['memory_share']:.3f}, "
          f"abstained {results['abstained_share']:.3f}, engine {results['engine']}")
    suffix = "" if args.engine == "auto" else f"-{args.engine}"
    write_record(f"served_accuracy-{args.dataset}{suffix}", vars(args), results, m)


if __name__ == "__main__":
    main()
