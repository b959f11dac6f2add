"""Online learning through /feedback, measured through the service's own HTTP API.

new-classes: a model trained without two classes (bench/train_models.sh fashion-mnist-8,
  cifar10-8) is served; K labelled training images of each held-out class are posted to
  /feedback; the whole test set then goes through /predict. Baselines on the same shots,
  in-process on the same trained network:
    finetune         head (grown to the new classes) + last backbone stage fine-tuned on the shots
    finetune-replay  the same plus replay of as many old-class training images as shots
    ncm              nearest class mean of backbone features (old classes: all their training
                     images; new classes: the shots)
shift: the served 10-class model meets rotated (90 degrees) images; K rotated training
  images per class are posted as feedback; accuracy on rotated and clean test images
  (never the posted ones: those are training images) before and after.

policy-grid: chooses the routing policy's online-learning settings (class balance,
  new-class threshold) on validation data only: old classes are the 8-class model's own
  validation split (training images its training held out, rebuilt from the manifest); the
  new classes' shots and their validation images are disjoint draws from the held-out
  classes' training images. Runs the served runtime in-process (same code path as the
  service: ModelRuntime.feedback and .predict); the test set is not read.

Each setting is repeated over --seeds draws of the shots; tables report the mean.

    .venv/bin/python bench/online_learning.py policy-grid --dataset fashion-mnist
    .venv/bin/python bench/online_learning.py new-classes --dataset fashion-mnist [--ks 1 5 10 50]
    .venv/bin/python bench/online_learning.py shift --dataset fashion-mnist [--ks 10 50]
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import header, write_record  # noqa: E402
from service.core.data import Dataset, load_dataset, normalize, validation_of  # noqa: E402
from service.serving.feedback_store import Upload  # noqa: E402
from service.serving.runtime import ModelRuntime  # noqa: E402
from service.core.routing import RoutingPolicy  # noqa: E402
from service.core.store import load_model  # noqa: E402
from bench.live import Server  # noqa: E402

SETTINGS = {  # dataset -> (data dir, 8-class model, held-out classes, 10-class model)
    "fashion-mnist": (None, "fashion-mnist-8", ["Sneaker", "Bag"], "fashion-mnist"),
    "cifar10": (str(ROOT / "../shared/data/cifar10-jpeg.zip"), "cifar10-8", ["truck", "ship"], "cifar10"),
}
CHUNK = 250  # images per /predict request


def png(img: torch.Tensor) -> bytes:
    a = img.permute(1, 2, 0).numpy()  # (H, W, C) uint8
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


class Served:
    """A live server process and the two calls the benchmark makes."""

    def __init__(self, store: Path, model: str, state_dir: Path, **env):
        self.server = Server(state_dir, MODEL_STORE=str(store), MODEL_NAME=model, MAX_FILES=str(CHUNK),
                             SNAPSHOT_INTERVAL="0", **env).start()
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
def features(model, images: torch.Tensor, mean, std, bs: int = 500) -> torch.Tensor:
    return torch.cat([model.backbone(normalize(images[i:i + bs], mean, std)) for i in range(0, len(images), bs)])


def finetune(model, x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 60, lr: float = 0.01):
    """Grow the head to n_classes, fine-tune it and the last backbone stage (BN statistics
    frozen) on (x, y) full-batch; returns a function (activations before the last stage) ->
    predicted class index, so the test set's earlier stages run once for every baseline."""
    m = copy.deepcopy(model).eval()
    old = m.head
    head = torch.nn.Linear(old.in_features, n_classes)
    with torch.no_grad():
        head.weight[:old.out_features] = old.weight
        head.bias[:old.out_features] = old.bias
    last = m.backbone.stage_list()[-1]
    params = list(head.parameters()) + list(last.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    with torch.no_grad():
        pre = before_last_stage(m, x)
    for _ in range(steps):
        loss = F.cross_entropy(head(m.backbone.pool(last(pre))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(pre_test: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(m.backbone.pool(last(p))).argmax(-1) for p in pre_test.split(500)])
    return predict


@torch.no_grad()
def before_last_stage(model, x: torch.Tensor) -> torch.Tensor:
    out = []
    for b in x.split(500):
        for stage in model.backbone.stage_list()[:-1]:
            b = stage(b)
        out.append(b)
    return torch.cat(out)


def new_classes(args, m: dict) -> dict:
    data_dir, model_name, held_out, _ = SETTINGS[args.dataset]
    ds = load_dataset(args.dataset, data_dir)
    loaded = load_model(args.store, model_name)
    model, old_names = loaded.model.eval(), list(loaded.classes)
    mean, std = loaded.input.mean, loaded.input.std
    names = old_names + held_out  # index space of the baselines
    test_truth = [ds.classes[int(i)] for i in ds.test.labels]
    test_x = normalize(ds.test.images, mean, std)
    print(f"encoding {len(ds.test.images)} test images", flush=True)
    test_png = [png(im) for im in ds.test.images]
    held_idx = [ds.classes.index(c) for c in held_out]
    old_mask = ~torch.isin(ds.train.labels, torch.tensor(held_idx))
    if args.baselines:
        old_feats = F.normalize(features(model, ds.train.images[old_mask], mean, std), dim=-1)
        old_labels = torch.tensor([names.index(ds.classes[int(i)]) for i in ds.train.labels[old_mask]])
        old_protos = torch.stack([old_feats[old_labels == c].mean(0) for c in range(len(old_names))])
        test_feats = F.normalize(features(model, ds.test.images, mean, std), dim=-1)
    test_pre = before_last_stage(model, test_x) if args.baselines else None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = Served(args.store, model_name, Path(tmp) / "before", **args.env)
        pred, paths = s.predict(test_png)
        s.close()
        before = scores(pred, paths, test_truth, held_out)
        rows.append({"k": 0, "method": "before feedback", "seed": 0, **before})
        print(f"before feedback: {before}", flush=True)
        for k in args.ks:
            for seed in range(args.seeds):
                shots = {c: pick_shots(ds, ds.classes.index(c), k, seed) for c in held_out}
                s = Served(args.store, model_name, Path(tmp) / f"k{k}-s{seed}", **args.env)
                for c in held_out:
                    s.feedback([png(ds.train.images[i]) for i in shots[c]], c)
                pred, paths = s.predict(test_png)
                s.close()
                rows.append({"k": k, "method": "memory (this service)", "seed": seed,
                             **scores(pred, paths, test_truth, held_out)})
                if not args.baselines:
                    r = rows[-1]
                    print(f"K={k:>2} seed {seed} memory: new recall {r['new_recall']:.3f}  old acc "
                          f"{r['old_accuracy']:.3f}  mean(old,new) {r['mean_old_new']:.3f}", flush=True)
                    continue

                shot_idx = torch.cat([shots[c] for c in held_out])
                shot_y = torch.tensor([names.index(c) for c in held_out]).repeat_interleave(k)
                shot_x = normalize(ds.train.images[shot_idx], mean, std)
                ft = finetune(model, shot_x, shot_y, len(names))
                rows.append({"k": k, "method": "finetune", "seed": seed,
                             **scores([names[i] for i in ft(test_pre)], None, test_truth, held_out)})
                g = torch.Generator().manual_seed(seed)
                replay = old_mask.nonzero().squeeze(1)[torch.randperm(int(old_mask.sum()), generator=g)[:len(shot_idx)]]
                rx = torch.cat([shot_x, normalize(ds.train.images[replay], mean, std)])
                ry = torch.cat([shot_y, torch.tensor([names.index(ds.classes[int(i)])
                                                      for i in ds.train.labels[replay]])])
                ftr = finetune(model, rx, ry, len(names))
                rows.append({"k": k, "method": "finetune-replay", "seed": seed,
                             **scores([names[i] for i in ftr(test_pre)], None, test_truth, held_out)})
                new_protos = torch.stack([F.normalize(features(model, ds.train.images[shots[c]], mean, std), dim=-1)
                                          .mean(0) for c in held_out])
                protos = F.normalize(torch.cat([old_protos, new_protos]), dim=-1)
                ncm = (test_feats @ protos.T).argmax(-1)
                rows.append({"k": k, "method": "ncm", "seed": seed,
                             **scores([names[i] for i in ncm], None, test_truth, held_out)})
                for r in rows[-4:]:
                    print(f"K={k:>2} seed {seed} {r['method']:>22}: new recall {r['new_recall']:.3f}  "
                          f"old acc {r['old_accuracy']:.3f}  overall {r['accuracy']:.3f}  "
                          f"mean(old,new) {r['mean_old_new']:.3f}"
                          + (f"  memory share {r['memory_share']:.3f}" if "memory_share" in r else ""), flush=True)
    return {"rows": rows, "table": summarise(rows), "before": before}


def shift(args, m: dict) -> dict:
    data_dir, _, _, model_name = SETTINGS[args.dataset]
    ds = load_dataset(args.dataset, data_dir)
    truth = [ds.classes[int(i)] for i in ds.test.labels]
    rotate = (lambda x: torch.rot90(x, 1, (2, 3))) if args.transform == "rot90" else (lambda x: 255 - x)
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


GRID = {"class_balance": [0.0, 0.5, 1.0], "new_class_threshold": [None, 0.5, 0.3]}
NEW_VALIDATION = 500  # validation images per held-out class, never drawn as shots


def policy_grid(args, m: dict) -> dict:
    data_dir, model_name, held_out, _ = SETTINGS[args.dataset]
    ds = load_dataset(args.dataset, data_dir)
    loaded = load_model(args.store, model_name)
    old_val = validation_of(ds, loaded.manifest["data"])  # old classes, indices of the 8-class model
    mean, std = loaded.input.mean, loaded.input.std
    old_names = list(loaded.classes)
    x_old = normalize(old_val.images, mean, std)
    truth_old = [old_names[int(i)] for i in old_val.labels]
    new_val, pools = {}, {}
    for c in held_out:  # per held-out class: a fixed validation draw, the rest is the pool of shots
        idx = (ds.train.labels == ds.classes.index(c)).nonzero().squeeze(1)
        pick = torch.zeros(len(idx), dtype=torch.bool)
        pick[torch.randperm(len(idx), generator=torch.Generator().manual_seed(12345))[:NEW_VALIDATION]] = True
        new_val[c], pools[c] = idx[pick], idx[~pick]
    x_new = normalize(ds.train.images[torch.cat([new_val[c] for c in held_out])], mean, std)
    truth_new = [c for c in held_out for _ in range(NEW_VALIDATION)]
    x_all, truth = torch.cat([x_old, x_new]), truth_old + truth_new
    grid = [(cb, nt) for cb in GRID["class_balance"] for nt in GRID["new_class_threshold"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cb, nt in grid:
            for seed in range(args.seeds):
                overrides = {"class_balance": cb, "new_class_threshold": nt}
                rt = ModelRuntime(args.store, model_name, Path(tmp) / f"{cb}-{nt}-{seed}", overrides)
                if nt is None:  # "unset" overrides nothing: the manifest's value would stay
                    rt.policy = RoutingPolicy(**{**rt.policy.to_dict(), "new_class_threshold": None})
                for c in held_out:
                    g = torch.Generator().manual_seed(seed * 1000 + ds.classes.index(c))
                    shots = pools[c][torch.randperm(len(pools[c]), generator=g)[:args.k]]
                    rt.commit_feedback(rt.embed(normalize(ds.train.images[shots], mean, std)), c,
                                       [Upload(png(im), "image/png") for im in ds.train.images[shots]])
                pred, paths = [], []
                for b in x_all.split(500):
                    served = rt.predict(b)
                    pred += [rt.class_name(int(i)) for i in served.prediction.labels]
                    paths += served.prediction.paths
                rt.close()
                r = {"class_balance": cb, "new_class_threshold": nt, "seed": seed,
                     **scores(pred, paths, truth, held_out)}
                rows.append(r)
                print(f"class_balance {cb} new_class_threshold {nt} seed {seed}: new recall {r['new_recall']:.3f} "
                      f"old acc {r['old_accuracy']:.3f} mean {r['mean_old_new']:.3f}", flush=True)
    table = []
    for cb, nt in grid:
        rs = [r for r in rows if r["class_balance"] == cb and r["new_class_threshold"] == nt]
        table.append({"class_balance": cb, "new_class_threshold": nt, "seeds": len(rs),
                      **{k: statistics.mean(r[k] for r in rs) for k in ("new_recall", "old_accuracy", "mean_old_new")}})
    best = max(table, key=lambda t: t["mean_old_new"])
    print(f"chosen on validation (K={args.k}): class_balance {best['class_balance']} new_class_threshold "
          f"{best['new_class_threshold']} mean(old, new) {best['mean_old_new']:.4f}", flush=True)
    return {"rows": rows, "table": table, "chosen": best, "k": args.k,
            "validation": {"old": len(truth_old), "new_per_class": NEW_VALIDATION}}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = ("new_recall", "old_accuracy", "accuracy", "mean_old_new", "memory_share", "new_memory_share")
    for k, method in dict.fromkeys((r["k"], r["method"]) for r in rows):
        rs = [r for r in rows if r["k"] == k and r["method"] == method]
        row = {"k": k, "method": method, "seeds": len(rs)}
        for key in keys:
            if key in rs[0]:
                vals = [r[key] for r in rs]
                row[key] = statistics.mean(vals)
                row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["policy-grid", "new-classes", "shift"])
    ap.add_argument("--k", type=int, default=10, help="policy-grid: shots per new class")
    ap.add_argument("--dataset", choices=sorted(SETTINGS), default="fashion-mnist")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--store", type=Path, default=ROOT / "runs/store", help="where the 8-class models are")
    ap.add_argument("--transform", choices=["rot90", "invert"], default="rot90")
    ap.add_argument("--env", nargs="*", default=[], help="server settings, NAME=value")
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--no-baselines", dest="baselines", action="store_false", help="the memory rows only")
    args = ap.parse_args()
    args.ks = args.ks or ([1, 5, 10, 50] if args.experiment == "new-classes" else [10, 50])
    args.env = dict(e.split("=", 1) for e in args.env)
    torch.manual_seed(0)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    m = header(config)
    result = {"policy-grid": policy_grid, "new-classes": new_classes, "shift": shift}[args.experiment](args, m)
    name = f"online-{args.experiment}-{args.dataset}" + (f"-{args.transform}" if args.experiment == "shift" else "")
    write_record(name + args.tag, config, result, m)


if __name__ == "__main__":
    main()
