"""Corrections under a shift, measured through the service's own HTTP API.

shift: the served 10-class model meets rotated (90 degrees) images; K rotated training
  images per class are posted as feedback; accuracy on rotated and clean test images
  (never the posted ones: those are training images) before and after. Each setting is
  repeated over --seeds draws of the shots; tables report the mean.

New classes from a few examples: bench/experiments/few_shot.py (this module's helpers serve both).

    .venv/bin/python -m bench.experiments.online_learning shift --dataset fashion-mnist [--ks 10 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.harness import CIFAR_ZIP, ROOT, Server, header, png, write_record
from service.core.data import Dataset, carve_validation, load_dataset, normalize
from service.core.online_choice import predictions_after_teaching
from service.core.store import load_model

SETTINGS = {  # dataset -> (data dir, 8-class model, held-out classes, 10-class model)
    "fashion-mnist": (None, "fashion-mnist-8", ["Sneaker", "Bag"], "fashion-mnist"),
    "cifar10": (str(CIFAR_ZIP), "cifar10-8", ["truck", "ship"], "cifar10"),
}
CHUNK = 250  # images per /predict request


class Served:
    """A live server process and the two calls the benchmark makes."""

    def __init__(self, store: Path, model: str, state_dir: Path, workers: int | None = 1, **env):
        """workers=None: serve's default (one process per core)."""
        self.server = Server(state_dir, workers=workers, MODEL_STORE=str(store), MODEL_NAME=model,
                             MAX_FILES=str(CHUNK), SNAPSHOT_INTERVAL="0", **env).start()
        self.client = httpx.Client(base_url=self.server.url, timeout=300)

    def predict(self, pngs: list[bytes]) -> tuple[list[str], list[str]]:
        labels, paths = [], []
        for i in range(0, len(pngs), CHUNK):
            r = self.client.post("/predict", files=[("file", ("x.png", p, "image/png")) for p in pngs[i:i + CHUNK]])
            r.raise_for_status()
            for p in r.json()["predictions"]:
                labels.append(p["label"])
                paths.append(p["path"])
        return labels, paths

    def feedback(self, pngs: list[bytes], label: str) -> None:
        for i in range(0, len(pngs), CHUNK):
            r = self.client.post("/feedback", files=[("file", ("x.png", p, "image/png")) for p in pngs[i:i + CHUNK]],
                                 data={"label": label}, headers=self.server.auth)
            r.raise_for_status()

    def close(self) -> None:
        self.client.close()
        self.server.kill(15)


def scores(pred: list[str], paths: list[str] | None, truth: list[str], new: list[str]) -> dict:
    pred_a, truth_a = np.array(pred), np.array(truth)
    is_new = np.isin(truth_a, new)
    right = pred_a == truth_a
    out = {"new_recall": float(right[is_new].mean()), "old_accuracy": float(right[~is_new].mean()),
           "accuracy": float(right.mean())}
    out["mean_old_new"] = (out["new_recall"] + out["old_accuracy"]) / 2
    if paths is not None:
        mem = np.array(paths) == "memory"
        out["memory_share"] = float(mem.mean())
        out["new_memory_share"] = float(mem[is_new].mean())
    return out


def pick_shots(ds: Dataset, class_index: int, k: int, seed: int) -> torch.Tensor:
    idx = (ds.train.labels == class_index).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed * 1000 + class_index)
    return idx[torch.randperm(len(idx), generator=g)[:k]]


@torch.no_grad()
def embed_all(model, images: torch.Tensor, mean, std, batch: int = 500) -> torch.Tensor:
    """uint8 images -> (N, D) features, as the service embeds them."""
    return torch.cat([model.embed(normalize(images[i:i + batch], mean, std))[0].float()
                      for i in range(0, len(images), batch)])


ROTATE = {"rot90": lambda x: torch.rot90(x, 1, (2, 3)), "invert": lambda x: 255 - x}
CORRECTION_GRID = [-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 1.0]
MAX_CLEAN_DROP = 0.005  # the goal: corrections may cost clean images at most half a point


def shift_choose(args, m: dict) -> dict:
    """correction_bias chosen on validation data: the served 10-class model's own validation
    split, clean and shifted; shots are shifted images of its training split. The largest
    shifted accuracy whose clean accuracy stays within MAX_CLEAN_DROP of no feedback."""
    data_dir, _, _, model_name = SETTINGS[args.dataset]
    ds = load_dataset(args.dataset, data_dir)
    loaded = load_model(ROOT / "model_store", model_name)
    model, mean, std = loaded.model.for_inference(), loaded.input.mean, loaded.input.std
    record = loaded.manifest["data"]
    train, val, _ = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    rotate = ROTATE[args.transform]
    xc, xs = embed_all(model, val.images, mean, std), embed_all(model, rotate(val.images), mean, std)
    acc = lambda pred: float((pred == val.labels).float().mean())  # noqa: E731
    base = loaded.policy
    before = predictions_after_teaching(model, [], [xc, xs], [base])[0]
    rows = []
    policies = [base.replace(correction_bias=cb) for cb in CORRECTION_GRID]
    for seed in range(args.seeds):
        lessons = []
        for c in range(len(ds.classes)):
            idx = (train.labels == c).nonzero().squeeze(1)
            pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(100 + seed * 1000 + c))[:args.k]]
            lessons.append((embed_all(model, rotate(train.images[pick]), mean, std), c))
        for cb, (pc, ps) in zip(CORRECTION_GRID, predictions_after_teaching(model, lessons, [xc, xs], policies)):
            rows.append({"correction_bias": cb, "seed": seed, "clean_accuracy": acc(pc), "shifted_accuracy": acc(ps)})
            print(f"correction_bias {cb} seed {seed}: clean {rows[-1]['clean_accuracy']:.4f} shifted "
                  f"{rows[-1]['shifted_accuracy']:.4f}", flush=True)
    clean0, shifted0 = acc(before[0]), acc(before[1])
    table = []
    for cb in CORRECTION_GRID:
        rs = [r for r in rows if r["correction_bias"] == cb]
        table.append({"correction_bias": cb, **{k: statistics.mean(r[k] for r in rs)
                                                 for k in ("clean_accuracy", "shifted_accuracy")}})
    ok = [t for t in table if t["clean_accuracy"] >= clean0 - MAX_CLEAN_DROP]
    best = max(ok or table, key=lambda t: t["shifted_accuracy"])
    print(f"chosen on validation (K={args.k}): correction_bias {best['correction_bias']}: shifted {shifted0:.4f} -> "
          f"{best['shifted_accuracy']:.4f}, clean {clean0:.4f} -> {best['clean_accuracy']:.4f}", flush=True)
    return {"k": args.k, "before": {"clean_accuracy": clean0, "shifted_accuracy": shifted0}, "rows": rows,
            "table": table, "chosen": best, "validation_images": len(val.labels)}


def shift(args, m: dict) -> dict:
    data_dir, _, _, model_name = SETTINGS[args.dataset]
    ds = load_dataset(args.dataset, data_dir)
    truth = [ds.classes[int(i)] for i in ds.test.labels]
    rotate = ROTATE[args.transform]
    clean_png = [png(im) for im in ds.test.images]
    shifted_png = [png(im) for im in rotate(ds.test.images)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [0] + args.ks:
            for seed in range(1 if k == 0 else args.seeds):
                s = Served(ROOT / "model_store", model_name, Path(tmp) / f"k{k}-s{seed}", **args.env)
                for ci, c in enumerate(ds.classes):
                    if k:
                        shots = pick_shots(ds, ci, k, seed)
                        s.feedback([png(im) for im in rotate(ds.train.images[shots])], c)
                sp, spaths = s.predict(shifted_png)
                cp, _ = s.predict(clean_png)
                s.close()
                r = {"k": k, "seed": seed, "transform": args.transform,
                     "shifted_accuracy": float(np.mean(np.array(sp) == np.array(truth))),
                     "clean_accuracy": float(np.mean(np.array(cp) == np.array(truth))),
                     "shifted_memory_share": float(np.mean(np.array(spaths) == "memory"))}
                rows.append(r)
                print(f"K={k:>2} seed {seed}: shifted {r['shifted_accuracy']:.4f} clean {r['clean_accuracy']:.4f} "
                      f"shifted memory share {r['shifted_memory_share']:.3f}", flush=True)
    base = rows[0]
    table = []
    for k in args.ks:
        rs = [r for r in rows if r["k"] == k]
        sa, ca = statistics.mean(r["shifted_accuracy"] for r in rs), statistics.mean(r["clean_accuracy"] for r in rs)
        table.append({"k": k, "shifted_accuracy": sa, "clean_accuracy": ca,
                      "shifted_gain_points": 100 * (sa - base["shifted_accuracy"]),
                      "clean_change_points": 100 * (ca - base["clean_accuracy"]), "seeds": len(rs)})
        print(f"K={k}: shifted {base['shifted_accuracy']:.4f} -> {sa:.4f} "
              f"({table[-1]['shifted_gain_points']:+.1f} points), clean {base['clean_accuracy']:.4f} -> {ca:.4f} "
              f"({table[-1]['clean_change_points']:+.2f} points)", flush=True)
    return {"rows": rows, "before": base, "table": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["shift", "shift-choose"])
    ap.add_argument("--k", type=int, default=50, help="shift-choose: shifted shots per class")
    ap.add_argument("--dataset", choices=sorted(SETTINGS), default="fashion-mnist")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--transform", choices=["rot90", "invert"], default="rot90")
    ap.add_argument("--env", nargs="*", default=[], help="server settings, NAME=value")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()
    args.ks = args.ks or [10, 50]
    args.env = dict(e.split("=", 1) for e in args.env)
    torch.manual_seed(0)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    m = header(config)
    result = {"shift": shift, "shift-choose": shift_choose}[args.experiment](args, m)
    name = f"online-{args.experiment}-{args.dataset}-{args.transform}"
    write_record(name + args.tag, config, result, m)


if __name__ == "__main__":
    main()
