"""Early exit: what reading the memory at an earlier backbone stage buys, per model.

For each trained model (same backbone, memory at `final`, `stage1`, `stage2`):
- threshold: from the threshold sweep on the model's validation split (the training images
  its training held out, rebuilt from the manifest), the one with the largest memory share
  whose routed accuracy stays within --max-drop points of the same network with every
  sample on the network path (the backbone without memory); the test set only reports;
- per-sample cost at batch 1 (the latency case), medians over the test images, and in
  batches of --batch-size (every sample through one path, time / samples):
  memory path = stages up to the exit + memory lookup; network path = that + the rest of
  the backbone + head; no memory = the plain backbone + head;
- end-to-end throughput over the whole test set in batches of --batch-size at that threshold
  vs the plain backbone + head over the same images (repeats interleaved, medians).

    .venv/bin/python -m bench.experiments.early_exit --dataset fashion-mnist \
        --models model_store/fashion-mnist runs/store/fashion-mnist-stage1 runs/store/fashion-mnist-stage2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness import CIFAR_ZIP, header, spread, write_record
from service.core.data import load_dataset, normalize, validation_of
from service.core.store import load_model
from service.core.train import SWEEP_THRESHOLDS, collect_predictions, evaluate, threshold_sweep

DATA_DIRS = {"fashion-mnist": None, "cifar10": str(CIFAR_ZIP)}


@torch.no_grad()
def plain(model, x: torch.Tensor) -> torch.Tensor:
    """The backbone without memory: all stages, pool, head."""
    return model.head(model.backbone(x)).argmax(-1)


@torch.no_grad()
def per_sample_ms(model, x: torch.Tensor, n: int) -> dict:
    mem, net, none = [], [], []
    for i in range(n + 10):
        xi = x[i:i + 1]
        t0 = time.perf_counter()
        keys, hidden = model.embed(xi)
        model.retrieve(keys.float())
        t1 = time.perf_counter()
        model.network_logits(hidden)
        t2 = time.perf_counter()
        plain(model, xi)
        t3 = time.perf_counter()
        if i >= 10:  # warm-up
            mem.append(1e3 * (t1 - t0))
            net.append(1e3 * (t2 - t0))
            none.append(1e3 * (t3 - t2))
    return {"memory_path_ms": spread(mem), "network_path_ms": spread(net), "no_memory_ms": spread(none)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATA_DIRS))
    ap.add_argument("--models", nargs="+", required=True, help="model folders (store/name)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy points below the plain network allowed")
    args = ap.parse_args()
    m = header(vars(args))
    ds = load_dataset(args.dataset, DATA_DIRS[args.dataset])
    rows = []
    for path in args.models:
        path = Path(path)
        loaded = load_model(path.parent, path.name)
        model = loaded.model.eval()
        mean, std = loaded.input.mean, loaded.input.std
        heads = model.config.num_classes
        val = validation_of(ds, loaded.manifest["data"])  # chooses the threshold
        xv = normalize(val.images, mean, std).contiguous(memory_format=torch.channels_last)
        val_sweep = threshold_sweep(collect_predictions(model, val.images, mean, std, model.policy), val.labels,
                                    model.policy, heads, sorted({*SWEEP_THRESHOLDS, 0.3, 0.4}))
        val_plain = (torch.cat([plain(model, b) for b in xv.split(1000)]) == val.labels).float().mean().item()
        ok = [s for s in val_sweep if s["accuracy"] >= val_plain - args.max_drop / 100]
        chosen_val = max(ok, key=lambda s: s["memory_usage"]) if ok else max(val_sweep, key=lambda s: s["accuracy"])
        thr = chosen_val["threshold"]
        policy = model.policy.replace(confidence_threshold=thr)
        labels = ds.test.labels  # reports only, at the threshold validation chose
        x = normalize(ds.test.images, mean, std).contiguous(memory_format=torch.channels_last)
        chosen = vars(evaluate(collect_predictions(model, ds.test.images, mean, std, policy), labels, policy, heads))
        sweep = val_sweep
        plain_acc = (torch.cat([plain(model, b) for b in x.split(1000)]) == labels).float().mean().item()

        batches = x.split(args.batch_size)
        for b in batches[:2]:  # warm-up
            model.predict(b, policy)
            plain(model, b)
        routed_ips, plain_ips, mem_only, net_all = [], [], [], []
        for _ in range(args.repeats):  # interleaved: machine noise hits both alike
            with torch.no_grad():  # per-sample cost of each path in batches: every sample through it
                t0 = time.perf_counter()
                hidden = []
                for b in batches:
                    keys, h = model.embed(b)
                    model.retrieve(keys.float())
                    hidden.append(h)
                t1 = time.perf_counter()
                for h in hidden:
                    model.network_logits(h)
                t2 = time.perf_counter()
            mem_only.append(1e3 * (t1 - t0) / len(x))
            net_all.append(1e3 * (t2 - t0) / len(x))
            del hidden
            t0 = time.perf_counter()
            for b in batches:
                model.predict(b, policy)
            routed_ips.append(len(x) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for b in batches:
                plain(model, b)
            plain_ips.append(len(x) / (time.perf_counter() - t0))
        lat = per_sample_ms(model, x, args.latency_samples)
        row = {"model": path.name, "exit_stage": model.config.exit_stage, "threshold": thr,
               "threshold_chosen_on": "validation", "validation_accuracy": chosen_val["accuracy"],
               "validation_plain_accuracy": val_plain, "validation_memory_usage": chosen_val["memory_usage"],
               "accuracy": chosen["accuracy"], "plain_accuracy": plain_acc, "memory_usage": chosen["memory_usage"],
               "memory_path_accuracy": chosen["memory_path_accuracy"], "validation_sweep": sweep,
               "throughput_images_per_s": spread(routed_ips), "plain_images_per_s": spread(plain_ips),
               "speedup": spread(routed_ips)["median"] / spread(plain_ips)["median"],
               "batched_memory_path_ms": spread(mem_only), "batched_network_path_ms": spread(net_all), **lat}
        row["memory_over_network_batched"] = spread(mem_only)["median"] / spread(net_all)["median"]
        row["memory_over_network_per_sample"] = lat["memory_path_ms"]["median"] / lat["network_path_ms"]["median"]
        row["memory_over_plain_per_sample"] = lat["memory_path_ms"]["median"] / lat["no_memory_ms"]["median"]
        rows.append(row)
        print(f"{path.name:>24} exit {row['exit_stage']:>6}: threshold {thr:.2f}  accuracy {row['accuracy']:.4f} "
              f"(plain {plain_acc:.4f})  memory share {row['memory_usage']:.3f}  throughput "
              f"{row['throughput_images_per_s']['median']:.0f}/s vs {row['plain_images_per_s']['median']:.0f}/s "
              f"= {row['speedup']:.2f}x  per sample: memory {lat['memory_path_ms']['median']:.2f} ms, network "
              f"{lat['network_path_ms']['median']:.2f} ms ({row['memory_over_network_per_sample']:.2f}x), "
              f"no memory {lat['no_memory_ms']['median']:.2f} ms; batched per sample memory/network "
              f"{row['memory_over_network_batched']:.2f}x", flush=True)
    write_record(f"early_exit-{args.dataset}", vars(args), {"rows": rows}, m)


if __name__ == "__main__":
    main()
