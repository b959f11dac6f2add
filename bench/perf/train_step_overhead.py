"""Cost of the memory in a training step: the same step with no memory, a full 10,000-item
cached memory and a full 10,000-item trainable memory, repeats interleaved so that machine
noise hits every variant alike. Reports median step time and the ratio to no memory.

    .venv/bin/python -m bench.perf.train_step_overhead [--backbone poolnet] [--batch-size 1024] [--repeats 20]

Defaults: the shipped models' backbone and the airbench recipe's batch (service/core/recipes.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.harness import header, spread, write_record
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.train import TrainConfig, make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="poolnet")
    ap.add_argument("--memory-size", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    config = vars(args) | {"precision": "bf16" if TrainConfig().use_bf16() else "fp32"}
    m = header(config)
    torch.manual_seed(0)
    bf16 = TrainConfig().use_bf16()
    B, C, S = args.batch_size, args.channels, args.image_size
    x = torch.randn(B, C, S, S).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (B,))
    variants = {}
    for kind in ("none", "cached", "trainable"):
        model = EnhancedClassifier(ClassifierConfig(backbone=args.backbone, in_chans=C, image_size=S, memory=kind,
                                                    memory_size=args.memory_size)).to(memory_format=torch.channels_last)
        if model.memory is not None:  # full memory: the steady state of training
            with torch.no_grad():
                feats = torch.randn(args.memory_size, model.feature_dim)
                model.memory.update(feats, torch.randint(0, 10, (args.memory_size,)))
        opt, _ = make_optimizer(model.train(), TrainConfig(), 10_000)
        variants[kind] = (model, opt)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        for kind, (model, opt) in variants.items():
            t = time.perf_counter()
            train_step(model, opt, x, y, 0.4, 0.1, bf16)
            if r >= args.warmup:
                times[kind].append(1e3 * (time.perf_counter() - t))
    results = {k: spread(v) for k, v in times.items()}
    base = results["none"]["median"]
    for k, v in results.items():
        v["ratio_to_none"] = v["median"] / base
        print(f"{k:10s} median {v['median']:8.1f} ms  [q1 {v['q1']:.1f}, q3 {v['q3']:.1f}]  x{v['ratio_to_none']:.3f}")
    write_record("train_step_overhead", config, results, m)


if __name__ == "__main__":
    main()
