"""kill -9 during a stream of feedback, restart, count acknowledged feedback lost or doubled.

Each round: start the server, post distinct random images with random labels from two
client threads, SIGKILL the server at a random moment, restart it on the same state
folder, then check that every acknowledged feedback is in memory (its image is answered
from the memory path with its label and its feedback id) and that the restarted memory
(snapshot + feedback log) equals a memory rebuilt from the log alone by a fresh server on a
copy of the feedback store without snapshots: an example applied twice, or not at all,
makes the two state hashes differ.

    .venv/bin/python -m bench.checks.crash_recovery [--rounds 10]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.harness import Server, header, png, write_record
from testkit.live import copy_sqlite


def stream(server: Server, stop: threading.Event, acked: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=server.url, timeout=10, headers=server.auth) as c:
        while not stop.is_set():
            data = png(rng.integers(0, 255, (28, 28), dtype=np.uint8))
            label = int(rng.integers(0, 10))
            try:
                r = c.post("/feedback", files={"file": ("x.png", data, "image/png")}, data={"label": str(label)})
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acked.append((data, label, r.json()["items"][0]["feedback_id"]))


def rebuild_from_log(state: Path) -> str:
    """Start a fresh server on a copy of the feedback store alone (no snapshot); its state hash."""
    with tempfile.TemporaryDirectory() as d:
        copy_sqlite(state / "feedback.db", Path(d) / "feedback.db")
        s = Server(Path(d), SNAPSHOT_INTERVAL="0").start()
        try:
            return httpx.get(s.url + "/memory", timeout=30).json()["state_hash"]
        finally:
            s.kill(signal.SIGKILL)  # no shutdown snapshot: nothing of it is kept anyway


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    m = header(vars(args))
    rng = np.random.default_rng(args.seed)
    rounds = []
    with tempfile.TemporaryDirectory() as d:  # one state folder across rounds: memory accumulates
        for k in range(args.rounds):
            s = Server(d).start()
            acked: list = []
            stop = threading.Event()
            threads = [threading.Thread(target=stream, args=(s, stop, acked, 1000 * k + i)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(float(rng.uniform(0.5, 3.0)))  # a random moment in the stream
            s.kill(signal.SIGKILL)
            stop.set()
            for t in threads:
                t.join()
            s2 = Server(d).start()
            with httpx.Client(base_url=s2.url, timeout=30) as c:
                mem = c.get("/memory").json()
                lost = 0
                for data, label, fid in acked:
                    p = c.post("/predict", files={"file": ("x.png", data, "image/png")}).json()["predictions"][0]
                    ok = p["path"] == "memory" and p["label_index"] == label and p["nearest"]["feedback_id"] == fid
                    lost += not ok
            s2.kill(signal.SIGTERM)
            rebuilt_hash = rebuild_from_log(Path(d))
            rounds.append({"round": k, "acknowledged": len(acked), "lost": lost,
                           "equals_rebuild_from_log": mem["state_hash"] == rebuilt_hash,
                           "applied_seq": mem["applied_seq"], "feedback_items": mem["feedback_items"],
                           "restart_seconds": s2.start_seconds})
            print(rounds[-1], flush=True)
    results = {"rounds": rounds, "acknowledged": sum(r["acknowledged"] for r in rounds),
               "lost": sum(r["lost"] for r in rounds),
               "rounds_differing_from_rebuild": sum(not r["equals_rebuild_from_log"] for r in rounds)}
    print(f"{args.rounds} kill -9 rounds: {results['acknowledged']} acknowledged feedback, {results['lost']} lost, "
          f"{results['rounds_differing_from_rebuild']} rounds whose memory differs from a rebuild from the log")
    write_record("crash_recovery", vars(args), results, m)


if __name__ == "__main__":
    main()
