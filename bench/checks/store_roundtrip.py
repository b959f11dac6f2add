"""Save then load gives identical predictions, on the real models and their whole test sets:
load model_store/<name>, save it to a temporary store, load that, predict every test image
with both and compare labels, paths, confidences and nearest slots.

    .venv/bin/python -m bench.checks.store_roundtrip --name fashion-mnist
    .venv/bin/python -m bench.checks.store_roundtrip --name cifar10 --dataset cifar10 \
        --data-dir ../shared/data/cifar10-jpeg.zip
"""

from __future__ import annotations

import argparse
import tempfile

from bench.harness import header, write_record
from service.core.data import load_dataset, normalize
from service.core.store import load_model, save_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="fashion-mnist")
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    m = header(vars(args))
    a = load_model(args.store, args.name)
    with tempfile.TemporaryDirectory() as d:
        save_model(d, args.name, a.model, a.classes, a.input, a.manifest["metrics"])
        b = load_model(d, args.name)
    ds = load_dataset(args.dataset, args.data_dir)
    same = {"labels": 0, "paths": 0, "confidence": 0, "slot": 0}
    n = 0
    for i in range(0, len(ds.test.images), 500):
        x = normalize(ds.test.images[i:i + 500], a.input.mean, a.input.std)
        pa, pb = a.model.predict(x), b.model.predict(x)
        same["labels"] += int((pa.labels == pb.labels).sum())
        same["paths"] += int((pa.used_memory == pb.used_memory).sum())
        same["confidence"] += int((pa.confidence == pb.confidence).sum())
        same["slot"] += int((pa.slot == pb.slot).sum())
        n += len(x)
    results = {"images": n, "identical": {k: v / n for k, v in same.items()},
               "all_identical": all(v == n for v in same.values())}
    print(results)
    write_record(f"store_roundtrip-{args.name}", vars(args), results, m)


if __name__ == "__main__":
    main()
