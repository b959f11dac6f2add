"""The service with a 1,000,000-item memory, through its real API (one server process, one
client on loopback), against the same service with the shipped 10,000-item memory:

- /predict latency (p50, p99) with the exact search and with the IVF index (MEMORY_INDEX=ivf);
- start to ready, and the server's peak resident memory (VmHWM) over the memory's own size;
- /predict latency while a snapshot of the memory is written (POST /memory/snapshot), against
  the same client's latency outside snapshots.

The 1M memory is built from the shipped Fashion-MNIST model: its 10,000 trained items, then
990,000 jittered copies of them (same label, key + Gaussian noise, renormalised), D = 256.
It is written to a temporary model store; nothing is kept.

    .venv/bin/python -m bench.perf.memory_scale [--items 1000000] [--requests 400] [--snapshots 3]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from bench.harness import ROOT, Server, header, percentiles, spread, test_pngs, vm_kb, write_record
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.store import load_model, save_model


def build_store(store: Path, items: int, noise: float = 0.3, seed: int = 0) -> tuple[str, int]:
    """A copy of the shipped model whose memory holds `items` items; returns (name, memory bytes)."""
    lm = load_model(ROOT / "model_store", "fashion-mnist")
    model = EnhancedClassifier(ClassifierConfig(**(lm.model.config.to_dict() | {"memory_size": items})))
    own = {k: v for k, v in lm.model.state_dict().items() if not k.startswith("memory.")}
    model.load_state_dict(own, strict=False)
    model.policy = lm.model.policy
    base_keys, base_labels = lm.model.memory.keys, lm.model.memory.labels  # (10k, D), (10k,)
    n0, d = base_keys.shape
    g = torch.Generator().manual_seed(seed)
    mem = model.memory
    with torch.no_grad():
        mem.keys[:n0], mem.labels[:n0] = base_keys, base_labels
        for start in range(n0, items, 100_000):
            stop = min(start + 100_000, items)
            src = torch.arange(start, stop) % n0
            jitter = noise * torch.randn(stop - start, d, generator=g) / d ** 0.5
            mem.keys[start:stop] = F.normalize(base_keys[src] + jitter, dim=-1)
            mem.labels[start:stop] = base_labels[src]
        mem.written_at.copy_(torch.arange(1, items + 1))
        mem.writes.fill_(items)
        mem._recount()
    name = f"fashion-mnist-{items // 1000}k"
    save_model(store, name, model, lm.classes, lm.input, metrics={"built_by": "bench/perf/memory_scale.py"},
               splits=lm.manifest.get("data"))
    size = sum(v.numel() * v.element_size() for v in mem.state_dict().values())
    return name, size


def latencies(url: str, pngs: list[bytes], n: int, stop: threading.Event | None = None,
              out: list | None = None) -> list[tuple[float, float]]:
    """(start time, seconds) of sequential /predict requests: n of them, or until `stop`."""
    out = [] if out is None else out
    with httpx.Client(timeout=60) as c:
        i = 0
        while (stop is None and i < n) or (stop is not None and not stop.is_set()):
            t = time.perf_counter()
            r = c.post(url + "/predict", files={"file": ("x.png", pngs[i % len(pngs)], "image/png")})
            r.raise_for_status()
            out.append((t, time.perf_counter() - t))
            i += 1
    return out


def pct(xs: list[float]) -> dict:
    """p50 and p99 in ms of latencies in seconds."""
    return percentiles(xs, (50, 99), scale=1e3, suffix="_ms", extra=())


def serve(tmp: Path, label: str, store: Path, name: str, index: str, pngs: list[bytes], args) -> dict:
    s = Server(tmp / f"state-{label}", MODEL_STORE=str(store), MODEL_NAME=name, MEMORY_INDEX=index,
               SNAPSHOT_INTERVAL="0")
    s.start(timeout=1800)
    try:
        row = {"start_seconds": s.start_seconds, "peak_rss_mb_at_ready": vm_kb(s.proc.pid, "VmHWM") / 1024,
               "rss_mb_at_ready": vm_kb(s.proc.pid, "VmRSS") / 1024}
        latencies(s.url, pngs, 30)  # warm-up
        row["predict"] = pct([d for _, d in latencies(s.url, pngs, args.requests)])
        print(f"{label:>14}: start {row['start_seconds']:6.1f} s  peak RSS {row['peak_rss_mb_at_ready']:7.0f} MB  "
              f"/predict p50 {row['predict']['p50_ms']:6.2f} ms  p99 {row['predict']['p99_ms']:6.2f} ms", flush=True)
        if args.snapshots and label.endswith("ivf"):
            row["snapshot"] = snapshot_stall(s, pngs, args.snapshots)
        return row
    finally:
        s.kill(signal.SIGTERM)


def snapshot_stall(s: Server, pngs: list[bytes], repeats: int) -> dict:
    """A client posts /predict back to back while snapshots are written now and then."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    client = threading.Thread(target=latencies, args=(s.url, pngs, 0, stop, samples))
    client.start()
    windows, durations = [], []
    rss_before = vm_kb(s.proc.pid, "VmHWM")
    try:
        for _ in range(repeats):
            time.sleep(3)
            t0 = time.perf_counter()
            httpx.post(s.url + "/memory/snapshot", headers=s.auth, timeout=600).raise_for_status()
            t1 = time.perf_counter()
            windows.append((t0, t1))
            durations.append(t1 - t0)
        time.sleep(3)
    finally:
        stop.set()
        client.join()
    during = [d for t, d in samples if any(a <= t + d and t <= b for a, b in windows)]
    outside = [d for t, d in samples if not any(a - 0.5 <= t + d and t <= b + 0.5 for a, b in windows)]
    row = {"seconds": spread(durations), "during": pct(during), "outside": pct(outside),
           "peak_rss_growth_mb": (vm_kb(s.proc.pid, "VmHWM") - rss_before) / 1024}
    row["p99_during_over_outside"] = row["during"]["p99_ms"] / row["outside"]["p99_ms"]
    print(f"      snapshot: {row['seconds']['median']:.1f} s each; /predict p99 {row['during']['p99_ms']:.2f} ms "
          f"during ({row['during']['n']} requests) vs {row['outside']['p99_ms']:.2f} ms outside "
          f"({row['p99_during_over_outside']:.2f}x); peak RSS +{row['peak_rss_growth_mb']:.0f} MB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--skip-exact-1m", action="store_true", help="leave out the 1M memory with exact search")
    args = ap.parse_args()
    config = vars(args)
    m = header(config)
    pngs = test_pngs(200)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        name, size = build_store(tmp / "store", args.items)
        results["memory_mb"] = size / 2 ** 20
        print(f"built {name}: memory {results['memory_mb']:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
        runs = [("10k-exact", ROOT / "model_store", "fashion-mnist", "exact"),
                ("10k-ivf", ROOT / "model_store", "fashion-mnist", "ivf"),
                (f"{args.items // 1000}k-ivf", tmp / "store", name, "ivf")]
        if not args.skip_exact_1m:
            runs.append((f"{args.items // 1000}k-exact", tmp / "store", name, "exact"))
        for label, store, model_name, index in runs:
            results[label] = serve(tmp, label, store, model_name, index, pngs, args)
    big = f"{args.items // 1000}k"
    results["ratios"] = {
        "p50_1m_ivf_over_10k_exact": results[f"{big}-ivf"]["predict"]["p50_ms"] / results["10k-exact"]["predict"]["p50_ms"],
        "p50_1m_ivf_over_10k_ivf": results[f"{big}-ivf"]["predict"]["p50_ms"] / results["10k-ivf"]["predict"]["p50_ms"],
        "peak_rss_over_memory_1m_ivf": (results[f"{big}-ivf"]["peak_rss_mb_at_ready"]
                                        - results["10k-ivf"]["peak_rss_mb_at_ready"]) / results["memory_mb"],
    }
    if f"{big}-exact" in results:
        results["ratios"]["peak_rss_over_memory_1m_exact"] = (results[f"{big}-exact"]["peak_rss_mb_at_ready"]
                                                              - results["10k-exact"]["peak_rss_mb_at_ready"]) \
            / results["memory_mb"]
    print("ratios:", results["ratios"])
    write_record("memory-scale", config, results, m)


if __name__ == "__main__":
    main()
