"""Time per training epoch in one process and in N processes under torchrun (gloo), with the
same cores: one process with N threads against N processes with one thread each. Also the
per-step cost of keeping one memory: rank 0's time in the all_gather of the batch's features
(and, for a trainable memory, in averaging the memory's gradients), measured inside training.

Each run is `python -m service train` as a user starts it, on a stratified slice of the data;
the first epoch of every run is warm-up and discarded; medians are over the other epochs of
all repeats; the variants' repeats are interleaved so that machine noise hits each alike. The
machine is shared: the load average is recorded beside every run.

    .venv/bin/python -m bench.perf.ddp_epoch [--procs 2] [--limit-train 10000] [--epochs 4] [--repeats 2]

Inside training the collectives' time includes waiting for the slower process. The collectives
alone, on the same tensors (one process's share of a 128 batch, D = 128; a 10,000-slot trainable
memory's gradients), with nothing else running in the processes:

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m bench.perf.ddp_epoch --collectives
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, header, spread, write_record


def train(store: Path, procs: int, threads: int, args, memory: str, name: str) -> dict:
    flags = ["train", "--limit-train", str(args.limit_train), "--limit-test", "1000", "--validation-size", "1000",
             "--epochs", str(args.epochs), "--memory", memory, "--backbone", args.backbone, "--no-progress",
             "--store", str(store), "--name", name]
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    load_before = os.getloadavg()
    t = time.perf_counter()
    subprocess.run([*launcher, "-m", "service", *flags], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    report = json.loads((store / name / "metrics.json").read_text())
    return {"history": report["history"], "test_accuracy": report["final"]["test_accuracy"], "wall_seconds": wall,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def collectives(args) -> None:
    """Under torchrun: median time of the per-step memory collectives; rank 0 writes the record."""
    import torch

    from service.core.distributed import setup, shutdown

    comm = setup("cpu", 60)
    share, dim, slots, classes = 128 // comm.world_size, 128, 10000, 20
    features, labels = torch.randn(share, dim), torch.randint(0, 10, (share,))
    params = [torch.nn.Parameter(torch.zeros(slots, dim)), torch.nn.Parameter(torch.zeros(slots, classes))]
    times: dict[str, list[float]] = {"gather_batch": [], "average_gradients": []}
    for i in range(args.iterations + 50):  # the first 50 are warm-up
        for p in params:
            p.grad = torch.randn_like(p)
        comm.barrier()  # both start together: no waiting for the other process in the times
        t = time.perf_counter()
        comm.gather_batch(features, labels)
        t1 = time.perf_counter()
        comm.average_gradients(params)
        t2 = time.perf_counter()
        if i >= 50:
            times["gather_batch"].append(1e3 * (t1 - t))
            times["average_gradients"].append(1e3 * (t2 - t1))
    if comm.is_main:
        config = {"processes": comm.world_size, "share": share, "feature_dim": dim, "memory_slots": slots,
                  "memory_classes": classes, "iterations": args.iterations, "backend": "gloo",
                  "gather_bytes": share * (dim + 1) * 4 * comm.world_size,
                  "grad_bytes": slots * (dim + classes) * 4, "loadavg": os.getloadavg()}
        m = header(config)
        results = {f"{k}_ms": spread(v) for k, v in times.items()}
        print(json.dumps({k: round(v["median"], 3) for k, v in results.items()}))
        write_record("ddp_collectives", config, results, m)
    shutdown(comm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2, help="processes of the parallel variant (= cores used)")
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backbone", default="small_resnet")
    ap.add_argument("--memories", nargs="+", default=["cached", "trainable"])
    ap.add_argument("--record", default="ddp_epoch")
    ap.add_argument("--collectives", action="store_true", help="under torchrun: time the memory's collectives alone")
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()
    if args.collectives:
        return collectives(args)
    config = vars(args) | {"batch_size": 128, "memory_size": 10000, "dataset": "fashion-mnist",
                           "variants": {"1 process": f"1 process x {args.procs} threads",
                                        f"{args.procs} processes": f"{args.procs} processes x 1 thread (gloo)"}}
    m = header(config)
    steps = -(-args.limit_train // 128)
    variants = {"1 process": (1, args.procs), f"{args.procs} processes": (args.procs, 1)}
    runs: dict[str, dict[str, list]] = {mem: {v: [] for v in variants} for mem in args.memories}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for mem in args.memories:
                for v, (procs, threads) in variants.items():
                    run = train(Path(d), procs, threads, args, mem, f"{mem}-{procs}-{r}")
                    runs[mem][v].append(run)
                    print(f"{mem} {v} repeat {r}: epochs {[round(h['epoch_seconds'], 2) for h in run['history']]} s, "
                          f"load {run['loadavg_before'][0]:.2f}", flush=True)
    results = {}
    for mem, by_variant in runs.items():
        results[mem] = {}
        for v, rs in by_variant.items():
            kept = [h for run in rs for h in run["history"][1:]]  # warm-up epoch dropped
            row = {"epoch_seconds": spread([h["epoch_seconds"] for h in kept]),
                   "ms_per_step": 1e3 * spread([h["epoch_seconds"] for h in kept])["median"] / steps,
                   "test_accuracy": [run["test_accuracy"] for run in rs],
                   "loadavg_1min": [run["loadavg_before"][0] for run in rs] + [rs[-1]["loadavg_after"][0]],
                   "runs": rs}
            if "memory_gather_ms_per_step" in kept[0]:
                row["memory_gather_ms_per_step"] = spread([h["memory_gather_ms_per_step"] for h in kept])
                row["memory_grads_ms_per_step"] = spread([h["memory_grads_ms_per_step"] for h in kept])
            results[mem][v] = row
        one, many = (results[mem][v]["epoch_seconds"]["median"] for v in variants)
        results[mem]["speedup"] = one / many
    print("\n| memory | variant | epoch s (median) | ms/step | gather ms/step | memory grads ms/step | speed-up |")
    for mem in args.memories:
        for v in variants:
            r = results[mem][v]
            cells = [r.get(k, {}).get("median") for k in ("memory_gather_ms_per_step", "memory_grads_ms_per_step")]
            cells = ["-" if c is None else f"{c:.2f}" for c in cells]
            speedup = "" if v == "1 process" else f"{results[mem]['speedup']:.2f}x"
            print(f"| {mem} | {v} | {r['epoch_seconds']['median']:.2f} | {r['ms_per_step']:.1f} | "
                  f"{cells[0]} | {cells[1]} | {speedup} |")
    write_record(args.record, config, results, m)


if __name__ == "__main__":
    main()
