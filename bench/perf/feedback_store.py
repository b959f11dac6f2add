"""The feedback store under load (issue 11): acknowledged feedback per second, replication lag
between processes, and start time with a large store. Every server is a real
`python -m service serve` process (testkit.live.Server) on loopback; PostgreSQL is a throwaway
cluster (testkit.postgres.Postgres). The model is a frozen copy of model_store/<name> taken when the
run starts (a training job may rewrite model_store meanwhile); its version is recorded.

    # 1. acknowledged /feedback per second (durable: each answer after its commit) at 1, 8
    #    and 32 concurrent clients, SQLite (default store) and PostgreSQL; each cell a fresh
    #    server, STATE_DIR and database; warm-up discarded; repeats interleaved across stores
    .venv/bin/python -m bench.perf.feedback_store throughput [--clients 1 8 32] [--duration 10]
        [--warmup 2] [--repeats 3] [--stores sqlite pg]

    # 2. replication lag: feedback to process A, poll process B's /predict with the same
    #    image until B answers from memory with A's feedback id; one sample at a time
    .venv/bin/python -m bench.perf.feedback_store lag [--samples 200] [--stores pg sqlite]

    # 3. start time with n stored examples: (a) newest snapshot (~99% of the log) + the
    #    tail, 3 starts; (b) a new model version (head bias + 1e-3): every example re-embedded
    .venv/bin/python -m bench.perf.feedback_store startup [--n 100000] [--fill-budget 300]

Clients are Python threads, one httpx.Client (keep-alive connection) each; every request
sends one distinct 28x28 grey PNG (throughput: Fashion-MNIST training images with their
classes; lag: uniform random noise with a random class). `--server-threads` sets
OMP_NUM_THREADS for the servers and torch threads in-process (default 1: on a shared,
loaded 2-core machine two spinning OpenMP threads per process made every request ~50x
slower; `--server-threads default` leaves torch's default). Each run records
os.getloadavg() and the busiest processes at its start and end.
Records: bench/results/feedback_store-{throughput,lag,startup}.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.harness import (ROOT, TOKEN, Server, cpu_seconds, fashion_mnist_pngs, header, percentile, percentiles, png,
                           spread, write_record)

PREVIOUS_32_CLIENTS = 94.0  # acknowledged feedback/s at 32 clients, the journal design before the store


# --- shared plumbing ----------------------------------------------------------------------------
def load_info() -> dict:
    """Load average and the busiest processes now (other jobs share this machine)."""
    ps = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True).stdout.splitlines()
    return {"time": time.time(), "loadavg": list(os.getloadavg()), "ps": [line[:220] for line in ps[:8]]}


def latency_percentiles(ms: list[float]) -> dict:
    """p50, p90, p99, max, mean and n; {"n": 0} for none."""
    return percentiles(ms, (50, 90, 99), extra=("max", "mean"))


def frozen_models(folder: Path, name: str) -> tuple[Path, str]:
    """Copy model_store/<name> to <folder>/<name> and check it loads (a training run may be
    replacing it right now: retry until a consistent copy). Returns (store, version)."""
    from service.core.store import ModelStoreError, load_model

    for attempt in range(10):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            shutil.copytree(ROOT / "model_store" / name, folder / name)
            return folder, load_model(folder, name).version
        except (ModelStoreError, OSError) as e:
            print(f"model copy not consistent ({e}); retrying")
            time.sleep(2)
    raise RuntimeError(f"no consistent copy of model_store/{name}")


def server_env(args, models: Path, **extra) -> dict:
    env = {"MODEL_STORE": str(models), "MODEL_NAME": args.model_name, "SNAPSHOT_INTERVAL": "0"}
    if args.server_threads != "default":
        env["OMP_NUM_THREADS"] = args.server_threads
        env["MKL_NUM_THREADS"] = args.server_threads
    if getattr(args, "taught_rows", "model") == "off":
        env["TAUGHT_ROWS"] = "false"
    return env | extra


def fashion_pngs(count: int) -> tuple[list[bytes], np.ndarray, list[str]]:
    """`count` distinct PNGs: Fashion-MNIST training images, then their mirror images."""
    return fashion_mnist_pngs(count, split="train", mirror=True)


def scrape(url: str) -> dict:
    """The /metrics numbers this benchmark reads."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"commit_count": 0.0, "commit_sum": 0.0, "feedback_by_status": {}}
    for line in text.splitlines():
        if line.startswith("feedback_commit_duration_seconds_count"):
            out["commit_count"] = float(line.split()[-1])
        elif line.startswith("feedback_commit_duration_seconds_sum"):
            out["commit_sum"] = float(line.split()[-1])
        elif line.startswith("http_requests_total{") and 'endpoint="/feedback"' in line:
            status = re.search(r'status="(\d+)"', line).group(1)
            out["feedback_by_status"][status] = float(line.split()[-1])
    return out


def server_log_problems(state_dir: Path) -> list[str]:
    lines = []
    for f in sorted(Path(state_dir).glob("server-*.log")):
        for line in f.read_text(errors="replace").splitlines():
            if re.search(r"ERROR|Traceback|CRITICAL|Exception", line):
                lines.append(f"{f.name}: {line[:300]}")
    return lines[:20]


class PgCluster:
    """One throwaway cluster for the run; a new database per cell."""

    def __init__(self, folder: Path):
        from testkit.postgres import Postgres

        self.pg = Postgres(folder).init().start()
        self.base = self.pg.url.rsplit("/", 1)[0]

    def _admin(self):
        import psycopg

        return psycopg.connect(self.pg.url, autocommit=True)

    def create(self, name: str) -> str:
        with self._admin() as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"{self.base}/{name}"

    def drop(self, name: str) -> None:
        with self._admin() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def wal(self) -> dict:
        """Cluster-wide WAL counters (PostgreSQL 14+): wal_sync = WAL fsyncs (one per durable
        commit flush). Backends report them when they go idle or exit."""
        with self._admin() as c:
            row = c.execute("SELECT wal_records, wal_write, wal_sync, wal_bytes FROM pg_stat_wal").fetchone()
        return {"wal_records": int(row[0]), "wal_write": int(row[1]), "wal_sync": int(row[2]),
                "wal_bytes": int(row[3])}

    def stop(self) -> None:
        self.pg.stop("immediate")


# --- 1. throughput ------------------------------------------------------------------------------
def run_load(url: str, auth: dict, clients: int, warmup: float, duration: float, pool: list[bytes],
             labels: list[str], server_pid: int) -> dict:
    """`clients` threads post /feedback back to back for warmup + duration seconds; what
    completed inside the measured window counts."""
    counter = itertools.count()
    t0 = time.perf_counter() + 0.2  # all threads start together
    win_start, win_end = t0 + warmup, t0 + warmup + duration
    done: list[list[tuple]] = [[] for _ in range(clients)]
    metrics: dict = {}

    def client(k: int) -> None:
        out = done[k]
        with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
            while time.perf_counter() < t0:
                time.sleep(0.001)
            while time.perf_counter() < win_end:
                i = next(counter)
                data = pool[i % len(pool)]
                t = time.perf_counter()
                try:
                    r = c.post("/feedback", files={"file": ("x.png", data, "image/png")},
                               data={"label": labels[i % len(labels)]})
                    status = r.status_code
                    fid = r.json()["items"][0]["feedback_id"] if status == 200 else None
                except httpx.HTTPError as e:
                    status, fid = type(e).__name__, None
                out.append((t, time.perf_counter(), status, fid))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, win_start - time.perf_counter()))
    metrics["start"] = scrape(url)
    cpu0 = cpu_seconds(server_pid), cpu_seconds()
    time.sleep(max(0.0, win_end - time.perf_counter()))
    cpu1 = cpu_seconds(server_pid), cpu_seconds()
    metrics["end"] = scrape(url)
    for t in threads:
        t.join(120)
    rows = [r for out in done for r in out]
    window = [r for r in rows if win_start <= r[1] < win_end]
    acked = [r for r in window if r[2] == 200]
    statuses: dict = {}
    for r in rows:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    fids = [r[3] for r in rows if r[3] is not None]
    m0, m1 = metrics["start"], metrics["end"]
    commits = m1["commit_count"] - m0["commit_count"]
    return {
        "acked_per_s": len(acked) / duration,
        "acked_in_window": len(acked),
        "requests_in_window": len(window),
        "latency_ms": latency_percentiles([1e3 * (r[1] - r[0]) for r in acked]),
        "all_requests": len(rows), "all_acked": sum(r[2] == 200 for r in rows), "statuses": statuses,
        "distinct_feedback_ids": len(set(fids)), "feedback_ids": len(fids),
        "server_5xx": sum(v for s, v in m1["feedback_by_status"].items() if s.startswith("5")),
        # CPU seconds per second of the window: the server process, and this benchmark's clients
        "cpu_cores_used": {"server": (cpu1[0] - cpu0[0]) / duration, "clients": (cpu1[1] - cpu0[1]) / duration},
        "server_cpu_ms_per_ack": 1e3 * (cpu1[0] - cpu0[0]) / len(acked) if acked else None,
        # observed once per request (its wait for the group commit), so count = requests, not
        # transactions: the histogram cannot say how many requests shared a transaction
        "commit_histogram_window": {"count": commits, "sum_s": m1["commit_sum"] - m0["commit_sum"],
                                    "mean_wait_ms": 1e3 * (m1["commit_sum"] - m0["commit_sum"]) / commits
                                    if commits else None},
    }


def cmd_throughput(args) -> None:
    config = vars(args) | {"func": None}
    m = header(config)
    before = load_info()
    tmp = Path(tempfile.mkdtemp(prefix="fbstore-tp-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    models, version = frozen_models(tmp / "models", args.model_name)
    pool, labels_idx, classes = fashion_pngs(args.pool)  # reused from the start in every cell
    labels = [classes[i] for i in labels_idx]
    pg = PgCluster(tmp / "pg") if "pg" in args.stores else None
    cells: dict = {}
    try:
        for rep in range(args.repeats):
            for clients in args.clients:
                stores = args.stores if rep % 2 == 0 else list(reversed(args.stores))
                for store in stores:
                    key = f"{store}/{clients}"
                    state = tmp / f"state-{store}-{clients}-{rep}"
                    extra, db = {}, None
                    if store == "pg":
                        db = f"bench_{clients}_{rep}"
                        extra["FEEDBACK_DB"] = pg.create(db)
                        wal0 = pg.wal()
                    la0 = os.getloadavg()
                    s = Server(state, TOKEN, **server_env(args, models, **extra)).start()
                    try:
                        r = run_load(s.url, s.auth, clients, args.warmup, args.duration, pool, labels, s.proc.pid)
                        mem = httpx.get(s.url + "/memory", timeout=30).json()
                        r["applied_seq"] = mem["applied_seq"]
                        r["model_version"] = mem["model_version"]
                    finally:
                        s.kill(signal.SIGTERM)  # graceful: PostgreSQL backends report their stats on exit
                    r["start_s"] = s.start_seconds
                    r["loadavg"] = [la0, os.getloadavg()]
                    r["server_log_problems"] = server_log_problems(state)
                    if pg is not None and store == "pg":
                        time.sleep(0.5)
                        wal1 = pg.wal()
                        d = {k: wal1[k] - wal0[k] for k in wal0}
                        # one fsync per durable commit of the single writer connection, plus a few
                        # (schema, checkpoints): all acknowledged requests / fsyncs is a lower
                        # bound on the mean requests per transaction
                        r["pg_wal_delta_whole_cell"] = d
                        r["requests_per_wal_fsync"] = r["all_acked"] / d["wal_sync"] if d["wal_sync"] else None
                        pg.drop(db)
                    shutil.rmtree(state, ignore_errors=True)
                    cells.setdefault(key, []).append(r)
                    lat = r["latency_ms"]
                    print(f"rep {rep} {store:6s} {clients:2d} clients: {r['acked_per_s']:7.1f} acked/s  "
                          f"p50 {lat.get('p50', float('nan')):7.1f} ms  p99 {lat.get('p99', float('nan')):7.1f} ms  "
                          f"statuses {r['statuses']}  load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for key, reps in cells.items():
        summary[key] = {
            "acked_per_s": spread([r["acked_per_s"] for r in reps]),
            "p50_ms": spread([r["latency_ms"]["p50"] for r in reps if r["latency_ms"]["n"]]),
            "p99_ms": spread([r["latency_ms"]["p99"] for r in reps if r["latency_ms"]["n"]]),
            "non_200": sum(sum(v for s, v in r["statuses"].items() if s != "200") for r in reps),
            "server_5xx": sum(r["server_5xx"] for r in reps),
            "server_cpu_ms_per_ack": spread([r["server_cpu_ms_per_ack"] for r in reps if r["server_cpu_ms_per_ack"]]),
            "server_cores_used": spread([r["cpu_cores_used"]["server"] for r in reps]),
            "client_cores_used": spread([r["cpu_cores_used"]["clients"] for r in reps]),
            "commit_mean_wait_ms": spread([r["commit_histogram_window"]["mean_wait_ms"] for r in reps
                                           if r["commit_histogram_window"]["mean_wait_ms"] is not None]),
        }
        if reps[0].get("requests_per_wal_fsync") is not None:
            summary[key]["requests_per_wal_fsync"] = spread([r["requests_per_wal_fsync"] for r in reps])
    goal = 3 * PREVIOUS_32_CLIENTS
    goals = {f"{store}/32": {"median_acked_per_s": summary[f"{store}/32"]["acked_per_s"]["median"],
                             "goal": goal, "met": summary[f"{store}/32"]["acked_per_s"]["median"] >= goal}
             for store in args.stores if f"{store}/32" in summary}
    results = {"model_version": version, "client": "python threads + httpx (one keep-alive connection each)",
               "images": "Fashion-MNIST training images as PNG, true class names as labels, distinct per cell",
               "previous_design_32_clients": PREVIOUS_32_CLIENTS, "goals": goals, "summary": summary,
               "cells": cells, "load_start": before, "load_end": load_info()}
    print("\nstore/clients   acked/s median [min-max]       p50 ms        p99 ms")
    for key, v in summary.items():
        a = v["acked_per_s"]
        print(f"{key:14s} {a['median']:8.1f} [{a['min']:.1f}-{a['max']:.1f}]   {v['p50_ms'].get('median', 0):8.1f}  "
              f"{v['p99_ms'].get('median', 0):8.1f}   non-200 {v['non_200']}")
    print("goals:", goals)
    suffix = "-no-taught-rows" if args.taught_rows == "off" else ""
    write_record(f"feedback_store-throughput{suffix}", config, results, m)


# --- 2. replication lag -------------------------------------------------------------------------
def random_png(rng: np.random.Generator) -> bytes:
    return png(rng.integers(0, 256, (28, 28), dtype=np.uint8))


def measure_lag(a: Server, b: Server, samples: int, warmup: int, timeout: float, classes: list[str],
                rng: np.random.Generator) -> dict:
    lags, polls, misses, a_mismatch, errors = [], [], [], 0, {}
    poll_ms = []
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        for i in range(warmup + samples):
            data, label = random_png(rng), classes[int(rng.integers(len(classes)))]
            r = ca.post("/feedback", files={"file": ("x.png", data, "image/png")}, data={"label": label},
                        headers=a.auth)
            t_ack = time.perf_counter()
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            fid = r.json()["items"][0]["feedback_id"]
            n, seen = 0, None
            while time.perf_counter() - t_ack < timeout:
                t = time.perf_counter()
                p = cb.post("/predict", files={"file": ("x.png", data, "image/png")})
                t1 = time.perf_counter()
                n += 1
                if i >= warmup:
                    poll_ms.append(1e3 * (t1 - t))
                if p.status_code != 200:
                    errors[f"B {p.status_code}"] = errors.get(f"B {p.status_code}", 0) + 1
                    continue
                item = p.json()["predictions"][0]
                if item["path"] == "memory" and (item.get("nearest") or {}).get("feedback_id") == fid:
                    seen = t1 - t_ack
                    break
            # A itself (read-your-writes) must answer the same, else the probe is ambiguous
            pa = ca.post("/predict", files={"file": ("x.png", data, "image/png")}).json()["predictions"][0]
            if not (pa["path"] == "memory" and (pa.get("nearest") or {}).get("feedback_id") == fid):
                a_mismatch += 1
            if i < warmup:
                continue
            if seen is None:
                misses.append(fid)
            else:
                lags.append(1e3 * seen)
                polls.append(n)
        # converged? B's applied_seq reaches A's and the memories hash equal
        deadline, equal = time.monotonic() + 30, False
        while time.monotonic() < deadline:
            ma, mb = ca.get("/memory").json(), cb.get("/memory").json()
            if ma["applied_seq"] == mb["applied_seq"]:
                equal = ma["state_hash"] == mb["state_hash"]
                break
            time.sleep(0.05)
    return {"lag_ms": latency_percentiles(lags), "polls_per_sample": latency_percentiles(polls),
            "b_predict_ms": latency_percentiles(poll_ms),
            "first_poll_hits": sum(p == 1 for p in polls), "never_converged": len(misses),
            "never_converged_ids": misses[:20], "a_not_memory_with_own_id": a_mismatch, "errors": errors,
            "applied_seq": [ma["applied_seq"], mb["applied_seq"]], "state_hash_equal": equal,
            "met_p99_100ms": bool(lags) and percentile(lags, 99) <= 100 and not misses}


def cmd_lag(args) -> None:
    config = vars(args) | {"func": None}
    m = header(config)
    before = load_info()
    tmp = Path(tempfile.mkdtemp(prefix="fbstore-lag-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    models, version = frozen_models(tmp / "models", args.model_name)
    from service.core.store import load_model

    classes = load_model(models, args.model_name).classes
    rng = np.random.default_rng(args.seed)
    results: dict = {"model_version": version, "criterion": "B /predict answers path 'memory' with "
                     "nearest.feedback_id == the id A returned; lag = B's matching answer received - A's answer "
                     "received (so it includes one B /predict round trip)", "stores": {}}
    pg = None
    try:
        for store in args.stores:
            if store == "pg":
                pg = pg or PgCluster(tmp / "pg")
                url = pg.create("bench_lag")
            else:
                url = f"sqlite:///{tmp / 'shared' / 'feedback.db'}"
            env = server_env(args, models, FEEDBACK_DB=url)
            la0 = os.getloadavg()
            a = Server(tmp / f"{store}-A", TOKEN, **env).start()
            b = Server(tmp / f"{store}-B", TOKEN, **env).start()
            try:
                r = measure_lag(a, b, args.samples, args.warmup, args.timeout, classes, rng)
            finally:
                a.kill(signal.SIGTERM)
                b.kill(signal.SIGTERM)
            r["loadavg"] = [la0, os.getloadavg()]
            r["feedback_db"] = url.split("@")[-1]
            r["server_log_problems"] = server_log_problems(tmp / f"{store}-A") + server_log_problems(tmp / f"{store}-B")
            results["stores"][store] = r
            lag = r["lag_ms"]
            print(f"{store}: lag p50 {lag.get('p50', float('nan')):.1f} ms  p99 {lag.get('p99', float('nan')):.1f} ms  "
                  f"max {lag.get('max', float('nan')):.1f} ms  (n={lag['n']}, never converged {r['never_converged']}, "
                  f"A mismatches {r['a_not_memory_with_own_id']}, hashes equal {r['state_hash_equal']})", flush=True)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_start"], results["load_end"] = before, load_info()
    write_record("feedback_store-lag", config, results, m)


# --- 3. start time with a large store -----------------------------------------------------------
def fill(rt, n: int, batch: int, budget: float, snapshot_at: float) -> dict:
    """Commit n examples through ModelRuntime.submit_feedback, `batch` same-class images per
    request, with the real model's embeddings; a snapshot at ~snapshot_at of the log. When the
    first 20 s project past `budget`, n is cut to what fits (said in the record)."""
    import torch

    from service.core.preprocess import ImageLimits, decode_image
    from service.serving.feedback_store import Upload

    spec, limits = rt.loaded.input, ImageLimits(max_pixels=1 << 62)
    images, labels, classes = fashion_pngs(n)
    by_class = {c: list(np.flatnonzero(labels == c)) for c in range(len(classes))}
    order = []  # requests: (class, indices), classes round robin
    while any(by_class.values()):
        for c, idx in by_class.items():
            if idx:
                order.append((c, idx[:batch]))
                del idx[:batch]
    t0, done, requested, reduced = time.perf_counter(), 0, n, None
    snap = None
    for c, idx in order:
        if done >= n:
            break
        idx = idx[:n - done]
        data = [images[i] for i in idx]
        x = torch.stack([decode_image(d, spec, limits) for d in data])
        rt.submit_feedback(rt.embed(x), classes[c], [Upload(d, "image/png") for d in data])
        done += len(idx)
        elapsed = time.perf_counter() - t0
        if reduced is None and elapsed > 20 and done < n:
            projected = elapsed * n / done
            reduced = False
            if projected > budget:
                n = max(done + batch, int(done / elapsed * budget) // 1000 * 1000)
                reduced = True
                print(f"filling {requested} would take ~{projected:.0f} s; using n={n}", flush=True)
        if snap is None and done >= snapshot_at * n:
            snap = {"file": rt.snapshot().name, "seq": rt.applied_seq, "examples": done}
            print(f"snapshot at seq {rt.applied_seq} ({done} examples)", flush=True)
    return {"n_requested": requested, "n": done, "reduced_to_fit_budget": bool(reduced),
            "fill_s": time.perf_counter() - t0, "fill_examples_per_s": done / (time.perf_counter() - t0),
            "snapshot": snap, "last_seq": rt.store.last_seq()}


def count_features(url: str | None, state: Path, version: str) -> int:
    if url and url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url) as c:
            return c.execute("SELECT count(*) FROM features WHERE model_version = %s", (version,)).fetchone()[0]
    path = url[len("sqlite:///"):] if url else state / "feedback.db"
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT count(*) FROM features WHERE model_version = ?", (version,)).fetchone()[0]
    finally:
        c.close()


def timed_start(state: Path, env: dict, timeout: float) -> dict:
    """Launch to /readyz 200; then what the server holds; SIGKILL (no shutdown snapshot)."""
    snaps = sorted(p.name for p in state.rglob("snapshot-*.json"))
    s = Server(state, TOKEN, **env).start(timeout=timeout)
    try:
        mem = httpx.get(s.url + "/memory", timeout=60).json()
    finally:
        s.kill(signal.SIGKILL)
    return {"start_s": s.start_seconds, "applied_seq": mem["applied_seq"], "model_version": mem["model_version"],
            "feedback_items": mem.get("feedback_items"), "size": mem.get("size"),
            "snapshots_unchanged": snaps == sorted(p.name for p in state.rglob("snapshot-*.json")),
            "loadavg_after": list(os.getloadavg())}


def cmd_startup(args) -> None:
    import torch

    from service.core.store import load_model, save_model
    from service.serving.runtime import ModelRuntime

    config = vars(args) | {"func": None}
    m = header(config)
    before = load_info()
    if args.server_threads != "default":
        torch.set_num_threads(int(args.server_threads))
    tmp = Path(tempfile.mkdtemp(prefix="fbstore-start-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    models, version = frozen_models(tmp / "models", args.model_name)
    state = tmp / "state"
    pg, url = None, None
    results: dict = {"model_version": version, "store": args.store}
    try:
        if args.store == "pg":
            pg = PgCluster(tmp / "pg")
            url = pg.create("bench_start")
        # baseline: the same server with an empty store
        results["empty_store_start_s"] = spread([timed_start(tmp / f"empty-{i}", server_env(args, models),
                                                             args.timeout)["start_s"] for i in range(args.repeats)])
        rt = ModelRuntime(models, args.model_name, state, feedback_db=url)
        try:
            results["fill"] = f = fill(rt, args.n, args.batch, args.fill_budget, args.snapshot_at)
        finally:
            rt.close()
        print(f"filled {f['n']} examples in {f['fill_s']:.0f} s ({f['fill_examples_per_s']:.0f}/s)", flush=True)
        env = server_env(args, models, **({"FEEDBACK_DB": url} if url else {}))
        starts = [timed_start(state, env, args.timeout) for _ in range(args.repeats)]
        for s in starts:
            print(f"(a) snapshot + tail of {f['last_seq'] - f['snapshot']['seq']}: {s['start_s']:.2f} s "
                  f"(applied_seq {s['applied_seq']}, snapshots unchanged {s['snapshots_unchanged']})", flush=True)
        results["a_snapshot_plus_tail"] = {
            "start_s": spread([s["start_s"] for s in starts]), "tail_events": f["last_seq"] - f["snapshot"]["seq"],
            "starts": starts, "goal_s": 5.0, "met": max(s["start_s"] for s in starts) <= 5.0,
            "all_caught_up": all(s["applied_seq"] == f["last_seq"] for s in starts)}
        # (b) a second model version: the same weights but the head's bias + 1e-3
        loaded = load_model(models, args.model_name)
        with torch.no_grad():
            loaded.model.head.bias.add_(1e-3)
        store2 = tmp / "models-v2"
        save_model(store2, args.model_name, loaded.model, loaded.classes, loaded.input,
                   metrics=loaded.manifest.get("metrics"))
        version2 = load_model(store2, args.model_name).version
        assert version2 != version
        env2 = server_env(args, store2, **({"FEEDBACK_DB": url} if url else {}))
        before_vectors = count_features(url, state, version2)
        b = timed_start(state, env2, args.timeout)
        b["new_version"] = version2
        b["vectors_before"], b["vectors_after"] = before_vectors, count_features(url, state, version2)
        b["examples_per_s"] = f["n"] / b["start_s"]
        base = results["empty_store_start_s"]["median"]
        b["examples_per_s_excluding_empty_start"] = f["n"] / (b["start_s"] - base) if b["start_s"] > base else None
        b["all_caught_up"] = b["applied_seq"] == f["last_seq"]
        results["b_full_reembed"] = b
        print(f"(b) new version {version2}: {b['start_s']:.1f} s, {b['vectors_after'] - before_vectors} vectors "
              f"re-embedded ({b['examples_per_s']:.0f} examples/s)", flush=True)
        results["server_log_problems"] = server_log_problems(state)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_start"], results["load_end"] = before, load_info()
    write_record("feedback_store-startup", config, results, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-name", default="fashion-mnist")
    ap.add_argument("--server-threads", default="1", help="OMP_NUM_THREADS of the servers (and torch threads "
                    "in-process); 'default' leaves torch's default")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("throughput", help="acknowledged feedback/s at 1, 8, 32 clients, SQLite and PostgreSQL")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--stores", nargs="+", default=["sqlite", "pg"], choices=["sqlite", "pg"])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load discarded first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool", type=int, default=30_000, help="distinct images (a cell sending more repeats them)")
    p.add_argument("--taught-rows", default="model", choices=["model", "off"],
                   help="off: serve with TAUGHT_ROWS=false (no head-row refit after each feedback: what the "
                        "request path itself sustains); record feedback_store-throughput-no-taught-rows")
    p.set_defaults(func=cmd_throughput)
    p = sub.add_parser("lag", help="replication lag between two processes on one store")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5, help="samples discarded first")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a sample counts as never converged")
    p.add_argument("--stores", nargs="+", default=["pg", "sqlite"], choices=["sqlite", "pg"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_lag)
    p = sub.add_parser("startup", help="start time with n stored examples: snapshot + tail; full re-embed")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=64, help="images per feedback request while filling")
    p.add_argument("--fill-budget", type=float, default=300.0, help="seconds of filling at most (n is cut)")
    p.add_argument("--snapshot-at", type=float, default=0.99, help="fraction of the log under the snapshot")
    p.add_argument("--repeats", type=int, default=3, help="starts of (a) and of the empty-store baseline")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a start may take")
    p.add_argument("--store", default="sqlite", choices=["sqlite", "pg"])
    p.set_defaults(func=cmd_startup)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
