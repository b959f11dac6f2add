"""The service with a 1,000,000-item memory, through its real API (one server process, one
client on loopback), against the same service with the shipped 10,000-item memory:

- /predict latency (p50, p99) with the exact search and with the IVF index (MEMORY_INDEX=ivf),
  in `--runs` rounds (a fresh server each), and where a request's time goes (the server's own
  per-stage histograms: decode, features, memory, head);
- start to ready, broken down (process and imports, model read and checked, IVF index loaded
  or trained, warm-up), and the server's peak resident memory (VmHWM) over the memory's size;
- /predict latency while a snapshot of the memory is written (POST /memory/snapshot), against
  the same client's latency outside snapshots.

The 1M memory is built from the shipped Fashion-MNIST model: its 10,000 trained items, then
990,000 jittered copies of them (same label, key + Gaussian noise, renormalised), D = 256.
It is written to a temporary model store; nothing is kept.

    .venv/bin/python -m bench.perf.memory_scale [--items 1000000] [--runs 3] [--requests 400] [--snapshots 3]
    .venv/bin/python -m bench.perf.memory_scale --choose     # nlist / nprobe by measured recall@1

`--choose` picks the IVF index's cells (nlist) and cells probed (nprobe) for the 1M memory:
queries are the model's features of Fashion-MNIST images, the validation split's to choose,
the test split's to check (held out); recall@1 is the share of queries whose nearest item
through the index (the service's own Memory.search: candidates re-scored from the keys) is
the exact search's. Per nlist, the smallest nprobe whose recall's 95% lower bound reaches 0.95
on the choosing queries; of those, the one comparing a query with the fewest vectors (the nlist
cell centres plus the probed cells' items, faiss's own count: the search's cost on any machine). Then its recall on the held-out queries, and where a
lookup's time goes (faiss search, re-scoring, the class-balanced vote) against the 10k memory's
exact search.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from bench.harness import ROOT, Server, header, percentiles, record_path, spread, test_pngs, vm_kb, write_record
from service.core.data import load_fashion_mnist, normalize, validation_of
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.retrieval import DEFAULT_NPROBE, IVFIndex
from service.core.store import load_model, save_index, save_model
from service.serving.snapshots import SnapshotStore

NLISTS = (1024, 2048, 4096)  # --choose: cells tried (1, 2 and 4 x sqrt(1M))
NPROBES = (1, 2, 4, 6, 8, 12, 16, 24, 32)
TARGET_RECALL = 0.95


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


def serve(state: Path, label: str, store: Path, name: str, index: str, pngs: list[bytes], args,
          snapshots: int = 0) -> dict:
    """A fresh server (its own state folder): start-up, latency, where a request's time goes."""
    cmd = [sys.executable, "-m", "service", "serve", "--port", "{port}", "--log-level", "info", "--workers", "1"]
    # nprobe: the one --choose chose (retrieval.DEFAULT_NPROBE), whatever the settings' default
    s = Server(state, command=cmd, MODEL_STORE=str(store), MODEL_NAME=name, MEMORY_INDEX=index, SNAPSHOT_INTERVAL="0",
               INDEX_NPROBE=str(DEFAULT_NPROBE))
    launched = time.time()
    s.start(timeout=1800)
    try:
        row = {"start_seconds": s.start_seconds, "peak_rss_mb_at_ready": vm_kb(s.proc.pid, "VmHWM") / 1024,
               "rss_mb_at_ready": vm_kb(s.proc.pid, "VmRSS") / 1024,
               "start": start_breakdown(state, launched, s.start_seconds)}
        latencies(s.url, pngs, 30)  # warm-up
        before = stage_seconds(s.url)
        row["predict"] = pct([d for _, d in latencies(s.url, pngs, args.requests)])
        after = stage_seconds(s.url)
        row["stage_mean_ms"] = {k: 1e3 * (after[k][0] - before[k][0]) / (after[k][1] - before[k][1]) for k in after}
        print(f"{label:>10}: start {row['start_seconds']:6.1f} s {row['start']}  peak RSS "
              f"{row['peak_rss_mb_at_ready']:7.0f} MB  /predict p50 {row['predict']['p50_ms']:6.2f} ms  p99 "
              f"{row['predict']['p99_ms']:6.2f} ms  stages {fmt(row['stage_mean_ms'])} ms", flush=True)
        if snapshots:
            row["snapshot"] = snapshot_stall(s, pngs, snapshots)
        return row
    finally:
        s.kill(signal.SIGTERM)


def fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in d.items())


def stage_seconds(url: str) -> dict[str, tuple[float, float]]:
    """The server's prediction_stage_duration_seconds histogram: stage -> (sum, count), both paths."""
    out: dict[str, list[float]] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        m = re.match(r'prediction_stage_duration_seconds_(sum|count)\{(.*)\} (\S+)$', line)
        if m:
            stage = re.search(r'stage="(\w+)"', m.group(2)).group(1)
            out.setdefault(stage, [0.0, 0.0])[m.group(1) == "count"] += float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def start_breakdown(state: Path, launched: float, ready_seconds: float) -> dict:
    """Start to ready in parts, from the server's log: process and imports, model read and
    checked (sha256), IVF index loaded or trained (and made to hold the memory), the rest
    (warm-up prediction, log tail) until /readyz answered."""
    text = "\n".join(p.read_text(errors="replace") for p in state.glob("server-*.log"))

    def line(pattern: str):
        m = re.search(r"^(\S+ \S+) INFO " + pattern, text, re.MULTILINE)
        return m and (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched, m)
    read_end, read = line(r"service\.core\.store: model .* read and checked in ([\d.]+) s")
    out = {"imports_s": read_end - float(read.group(2)), "read_s": float(read.group(2))}
    index = line(r"service\.serving\.replica: IVF index from (.*) in ([\d.]+) s")
    done = read_end
    if index:
        done = index[0]
        out |= {"index_s": float(index[1].group(3)), "index_source": index[1].group(2)}
    out["warmup_s"] = ready_seconds - done
    return out


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


# --- --choose: the index's cells and probes ------------------------------------------------------
def features(lm, images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) uint8 images -> (N, D) unit memory keys, as the service computes them."""
    with torch.no_grad():
        return F.normalize(lm.model.embed(normalize(images, lm.input.mean, lm.input.std))[0].float(), dim=-1)


def lower_bound(p: float, n: int, z: float = 1.645) -> float:
    """One-sided 95% Wilson lower bound of a proportion p measured on n trials."""
    centre = p + z * z / (2 * n)
    margin = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (centre - margin) / (1 + z * z / n)


def nearest(memory, queries: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(N,) the slot Memory.search puts first (through the index when one is attached)."""
    return torch.cat([memory.search(queries[i:i + 256], k)[1][:, 0] for i in range(0, len(queries), 256)])


def scanned_per_query(index: IVFIndex, queries: torch.Tensor, k: int = 5) -> float:
    """Vectors the index compares a query with (faiss's count), averaged over the queries."""
    import faiss

    faiss.cvar.indexIVF_stats.reset()
    index.search(queries, k)
    return faiss.cvar.indexIVF_stats.ndis / len(queries)


def ms_per_query(fn, queries: torch.Tensor, n: int = 300) -> dict:
    """fn on one query at a time, as a lone client's requests: the spread of n calls, in ms."""
    times = []
    for i in range(n):
        q = queries[i % len(queries)].unsqueeze(0)
        t = time.perf_counter()
        fn(q)
        times.append(1e3 * (time.perf_counter() - t))
    return spread(times)


def try_nlist(memory, nlist: int, queries: torch.Tensor, exact: torch.Tensor) -> tuple[IVFIndex, dict]:
    """Train an index with nlist cells; raise nprobe until recall@1's lower bound reaches the target."""
    t = time.perf_counter()
    index = IVFIndex(memory.keys, memory.filled(), nlist=nlist)
    sizes = torch.tensor([index.index.invlists.list_size(c) for c in range(nlist)]).float()
    row = {"nlist": nlist, "build_seconds": time.perf_counter() - t, "cell_items": {
        "mean": sizes.mean().item(), "p99": sizes.quantile(0.99).item(), "max": sizes.max().item()}, "probes": []}
    memory.index = index
    for nprobe in NPROBES:
        index.nprobe = nprobe
        recall = (nearest(memory, queries) == exact).float().mean().item()
        scanned = scanned_per_query(index, queries)
        row["probes"].append({"nprobe": nprobe, "recall_at_1": recall, "lower_bound": lower_bound(recall, len(exact)),
                              "scanned": scanned, "compared": scanned + nlist})
        print(f"nlist {nlist:5d} nprobe {nprobe:3d}: recall@1 {recall:.3f} (lower bound "
              f"{row['probes'][-1]['lower_bound']:.3f}), {scanned:,.0f} items + {nlist} centres compared", flush=True)
        if row["probes"][-1]["lower_bound"] >= TARGET_RECALL:
            row["chosen"] = row["probes"][-1]
            break
    memory.index = None
    print(f"nlist {nlist}: built in {row['build_seconds']:.1f} s, items per cell mean {row['cell_items']['mean']:.0f} "
          f"max {row['cell_items']['max']:.0f}", flush=True)
    return index, row


def where_lookup_time_goes(memory, small, queries: torch.Tensor, balance: float) -> dict:
    """ms per single-query lookup: the index alone, Memory.search (+ exact re-scoring), Memory.retrieve
    (+ the class-balanced vote); and the 10k memory's exact retrieve."""
    index = memory.index
    return {"ivf_search": ms_per_query(lambda q: index.search(q, 5), queries),
            "memory_search": ms_per_query(lambda q: memory.search(q, 5), queries),
            "memory_retrieve": ms_per_query(lambda q: memory.retrieve(q, 5, balance), queries),
            "exact_10k_retrieve": ms_per_query(lambda q: small.retrieve(q, 5, balance), queries)}


def choose(args, m: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        name, _ = build_store(Path(tmp) / "store", args.items)
        lm = load_model(Path(tmp) / "store", name)
    memory, small = lm.model.memory, load_model(ROOT / "model_store", "fashion-mnist")
    ds = load_fashion_mnist()
    choosing = features(lm, validation_of(ds, lm.manifest["data"]).images[:args.queries])
    held_out = features(lm, ds.test.images[:args.queries])
    t = time.perf_counter()
    exact_choosing, exact_held_out = nearest(memory, choosing), nearest(memory, held_out)
    print(f"exact search of {2 * args.queries} queries: {time.perf_counter() - t:.0f} s", flush=True)
    rows, best = [], None
    for nlist in args.nlists:
        index, row = try_nlist(memory, nlist, choosing, exact_choosing)
        rows.append(row)
        if "chosen" in row and (best is None or row["chosen"]["compared"] < best[1]["chosen"]["compared"]):
            best = (index, row)
        del index
    if best is None:
        raise SystemExit(f"no nlist of {args.nlists} reached recall@1 {TARGET_RECALL} with nprobe <= {NPROBES[-1]}")
    memory.index, row = best
    memory.index.nprobe = row["chosen"]["nprobe"]
    held = (nearest(memory, held_out) == exact_held_out).float().mean().item()
    results = {"rows": rows, "chosen": {"nlist": row["nlist"], "nprobe": row["chosen"]["nprobe"],
                                        "recall_at_1_choosing": row["chosen"]["recall_at_1"],
                                        "recall_at_1_held_out": held, "queries": args.queries},
               "lookup_ms": where_lookup_time_goes(memory, small.model.memory, held_out, lm.policy.class_balance)}
    print("chosen:", results["chosen"])
    print("lookup ms (median):", {k: round(v["median"], 3) for k, v in results["lookup_ms"].items()})
    write_record("memory-scale-ivf-choice", vars(args) | {"nprobes": NPROBES, "target": TARGET_RECALL}, results, m)


def ratios(run: dict, big: str, memory_mb: float) -> dict:
    return {"p50_1m_ivf_over_10k_exact": run[f"{big}-ivf"]["predict"]["p50_ms"] / run["10k-exact"]["predict"]["p50_ms"],
            "p50_1m_ivf_over_10k_ivf": run[f"{big}-ivf"]["predict"]["p50_ms"] / run["10k-ivf"]["predict"]["p50_ms"],
            "peak_rss_over_memory_1m_ivf": (run[f"{big}-ivf"]["peak_rss_mb_at_ready"]
                                            - run["10k-ivf"]["peak_rss_mb_at_ready"]) / memory_mb}


def summary(runs: list[dict], label: str) -> dict:
    """Medians over the runs, in the shape of one run's row (bench/report.py's table), with spreads."""
    rows = [r[label] for r in runs]
    out = {k: statistics.median(r[k] for r in rows) for k in ("start_seconds", "peak_rss_mb_at_ready")}
    out["predict"] = {k: statistics.median(r["predict"][k] for r in rows) for k in ("p50_ms", "p99_ms")}
    out["spread"] = {"p50_ms": spread([r["predict"]["p50_ms"] for r in rows]),
                     "p99_ms": spread([r["predict"]["p99_ms"] for r in rows]),
                     "start_seconds": spread([r["start_seconds"] for r in rows]),
                     "peak_rss_mb_at_ready": spread([r["peak_rss_mb_at_ready"] for r in rows])}
    out["start"] = {k: spread([r["start"][k] for r in rows]) for k in rows[0]["start"] if k.endswith("_s")}
    return out


def adopt_saved_index(state: Path, store: Path, name: str, dim: int) -> None:
    """Add the index a server trained and saved in its state folder to the model store."""
    sidecar = next(state.rglob("ivf-*.json"))
    save_index(store, name, SnapshotStore(sidecar.parent).load_index(sidecar, dim))


def serve_runs(args, tmp: Path, pngs: list[bytes]) -> dict:
    t = time.perf_counter()
    name, size = build_store(tmp / "store", args.items)
    results: dict = {"memory_mb": size / 2 ** 20}
    print(f"built {name}: memory {results['memory_mb']:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
    big = f"{args.items // 1000}k"
    # no saved index: trained at start on a sample, saved in the state folder; then the model
    # store gets it, and every later start loads it
    row = serve(tmp / "state-trained", f"{big}-ivf", tmp / "store", name, "ivf", pngs, args)
    results["without_saved_index"] = {"row": row}
    adopt_saved_index(tmp / "state-trained", tmp / "store", name, load_model(tmp / "store", name).model.feature_dim)
    configs = [("10k-exact", ROOT / "model_store", "fashion-mnist", "exact"),
               ("10k-ivf", ROOT / "model_store", "fashion-mnist", "ivf"),
               (f"{big}-ivf", tmp / "store", name, "ivf")]
    runs = []
    for r in range(args.runs):  # interleaved: a drift of the machine shows in every configuration
        print(f"run {r + 1} of {args.runs}", flush=True)
        run = {label: serve(tmp / f"state-{r}-{label}", label, store, model, index, pngs, args,
                            snapshots=args.snapshots if r == args.runs - 1 and label == f"{big}-ivf" else 0)
               for label, store, model, index in configs}
        run["ratios"] = ratios(run, big, results["memory_mb"])
        print("ratios:", run["ratios"], flush=True)
        runs.append(run)
    results["runs"] = runs
    for label, *_ in configs:
        results[label] = summary(runs, label)
    results[f"{big}-ivf"]["snapshot"] = runs[-1][f"{big}-ivf"].get("snapshot")
    if not args.skip_exact_1m:
        results[f"{big}-exact"] = serve(tmp / "state-exact", f"{big}-exact", tmp / "store", name, "exact", pngs, args)
    results["ratios"] = {k: statistics.median(r["ratios"][k] for r in runs) for k in runs[0]["ratios"]}
    results["ratio_spread"] = {k: spread([r["ratios"][k] for r in runs]) for k in runs[0]["ratios"]}
    if f"{big}-exact" in results:
        results["ratios"]["peak_rss_over_memory_1m_exact"] = (results[f"{big}-exact"]["peak_rss_mb_at_ready"]
                                                              - results["10k-exact"]["peak_rss_mb_at_ready"]) \
            / results["memory_mb"]
    return results


# --- --markdown: this benchmark's own tables (BENCHMARKS.md, "A 1M-item memory, served") ---------
def table(*columns: str) -> list[str]:
    """A Markdown table's header and rule."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def span(x: dict, fmt: str = "{:.2f}") -> str:
    """median (min-max) of a spread."""
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}-{fmt.format(x['max'])})"


def choice_tables(r: dict) -> list[str]:
    res = r["results"]
    rows = table("nlist", "built in", "items per cell: mean / max", "nprobe reached", "recall@1 (choosing)",
                 "95% lower bound", "vectors compared per query: centres + items")
    for x in res["rows"]:
        p = x.get("chosen") or x["probes"][-1]
        rows.append(f"| {x['nlist']} | {x['build_seconds']:.1f} s | {x['cell_items']['mean']:.0f} / "
                    f"{x['cell_items']['max']:,.0f} | {p['nprobe']} | {p['recall_at_1']:.3f} | {p['lower_bound']:.3f} "
                    f"| {x['nlist']:,} + {p['scanned']:,.0f} = **{p['compared']:,.0f}** |")
    c = res["chosen"]
    rows += ["", (f"Chosen: nlist **{c['nlist']}**, nprobe **{c['nprobe']}**; recall@1 on the {c['queries']} held-out "
                  f"(test-split) queries: **{c['recall_at_1_held_out']:.3f}** (choosing queries: "
                  f"{c['recall_at_1_choosing']:.3f})."), "",
             *table("one query's lookup, in process", "ms: median (min-max) of 300")]
    names = {"ivf_search": "1M: faiss IVF search (top 5)", "memory_search": "1M: + exact re-scoring (Memory.search)",
             "memory_retrieve": "1M: + class-balanced vote (Memory.retrieve)",
             "exact_10k_retrieve": "10k: exact search + vote (the default)"}
    rows += [f"| {names[k]} | {span(v, '{:.3f}')} |" for k, v in res["lookup_ms"].items()]
    return rows


def serve_tables(r: dict) -> list[str]:
    res, big = r["results"], f"{r['config']['items'] // 1000}k"
    rows = table("run", "10k exact p50", "10k IVF p50", "1M IVF p50", "**1M IVF / 10k exact**",
                 "1M IVF start to ready", "1M IVF peak RSS")
    for i, run in enumerate(res["runs"], 1):
        rows.append(f"| {i} | {run['10k-exact']['predict']['p50_ms']:.2f} ms | {run['10k-ivf']['predict']['p50_ms']:.2f} ms "
                    f"| {run[f'{big}-ivf']['predict']['p50_ms']:.2f} ms | **{run['ratios']['p50_1m_ivf_over_10k_exact']:.2f}x** "
                    f"| {run[f'{big}-ivf']['start_seconds']:.1f} s | {run[f'{big}-ivf']['peak_rss_mb_at_ready']:.0f} MB |")
    rows += ["", *table("server", "start to ready", "process, imports", "model read + sha256", "IVF index",
                        "warm-up, rest")]
    trained = res["without_saved_index"]["row"]
    for label, x in [(f"{big} IVF, saved index ({len(res['runs'])} runs)", res[f"{big}-ivf"]),
                     ("10k exact", res["10k-exact"])]:
        st = x["start"]
        rows.append(f"| {label} | {span(x['spread']['start_seconds'], '{:.1f}')} s | {span(st['imports_s'], '{:.1f}')} "
                    f"| {span(st['read_s'], '{:.1f}')} | {span(st['index_s'], '{:.1f}') if 'index_s' in st else '-'} "
                    f"| {span(st['warmup_s'], '{:.1f}')} |")
    st = trained["start"]
    rows.append(f"| {big} IVF, no saved index (trained at start, once) | {trained['start_seconds']:.1f} s | "
                f"{st['imports_s']:.1f} | {st['read_s']:.1f} | {st['index_s']:.1f} | {st['warmup_s']:.1f} |")
    rows += ["", *table("server", "/predict p50: median (min-max) of runs", "p99",
                        "mean ms per image: decode / features / memory / head (last run)")]
    for label in ("10k-exact", "10k-ivf", f"{big}-ivf"):
        x, last = res[label], res["runs"][-1][label]["stage_mean_ms"]
        rows.append(f"| {label} | {span(x['spread']['p50_ms'])} ms | {span(x['spread']['p99_ms'])} ms | "
                    + " / ".join(f"{last[k]:.2f}" for k in ("decode", "features", "memory", "head")) + " |")
    ra, rs = res["ratios"], res["ratio_spread"]
    rows += ["", f"1M IVF /predict p50 over 10k exact: {span(rs['p50_1m_ivf_over_10k_exact'])}x; over 10k IVF: "
                 f"{span(rs['p50_1m_ivf_over_10k_ivf'])}x. Peak RSS at ready beyond the 10k IVF server's, over the "
                 f"memory's {res['memory_mb']:.0f} MB: {span(rs['peak_rss_over_memory_1m_ivf'])}x"
                 + (f"; exact: {ra['peak_rss_over_memory_1m_exact']:.2f}x" if "peak_rss_over_memory_1m_exact" in ra
                    else "") + "."]
    return rows


def markdown() -> str:
    """The tables of the records memory-scale-ivf-choice.json and memory-scale.json."""
    out = []
    for name, tables in (("memory-scale-ivf-choice", choice_tables), ("memory-scale", serve_tables)):
        path = record_path(name)
        if path.exists():
            r = json.loads(path.read_text())
            out += [f"Record `bench/results/{name}.json` ({r['machine']['time']}): `{r['machine']['command']}`", "",
                    *tables(r), ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3, help="rounds of the 10k and 1M servers, interleaved")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--skip-exact-1m", action="store_true", help="leave out the 1M memory with exact search")
    ap.add_argument("--choose", action="store_true", help="choose the IVF index's nlist and nprobe (see above)")
    ap.add_argument("--nlists", type=int, nargs="+", default=list(NLISTS))
    ap.add_argument("--queries", type=int, default=1000, help="--choose: queries to choose with, and held out")
    ap.add_argument("--markdown", action="store_true", help="print this benchmark's tables from its records")
    args = ap.parse_args()
    if args.markdown:
        return print(markdown())
    config = vars(args)
    m = header(config)
    if args.choose:
        return choose(args, m)
    pngs = test_pngs(200)
    with tempfile.TemporaryDirectory() as tmp:
        results = serve_runs(args, Path(tmp), pngs)
    print("ratios (medians):", results["ratios"])
    write_record("memory-scale", config, results, m)


if __name__ == "__main__":
    main()
