"""Soak: 32 concurrent clients on loopback, 90% /predict and 10% /feedback (random labels,
new class names among them) for SOAK_SECONDS (30 in `make test`; `make soak` runs 600). Afterwards:
no 5xx, no connection error, memory invariants, the memory equals the state rebuilt from
the feedback log alone, and resident memory grows less than 10% from the first to the last
quarter of the run."""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.serving.runtime import ModelRuntime
from testkit.live import ROOT, Server, copy_sqlite
from tests.test_server import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.server]

CLIENTS = 32
NEW_CLASSES = ["Hat", "Scarf", "Glove", "Umbrella", "Belt"]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def client_loop(url, auth, pngs, deadline, seed, stats, lock):
    rng = random.Random(seed)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"] + NEW_CLASSES
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            data = pngs[rng.randrange(len(pngs))][0]
            try:
                if rng.random() < 0.9:
                    r = c.post("/predict", files={"file": ("x.png", data, "image/png")})
                    kind = "predict"
                else:
                    label = rng.choice(classes)
                    r = c.post("/feedback", files={"file": ("x.png", data, "image/png")}, data={"label": label},
                               headers=auth)
                    kind = "feedback"
                    if r.status_code == 200:
                        with lock:
                            stats["acked_labels"].add(label)
            except httpx.HTTPError as e:
                with lock:
                    stats["connection_errors"].append(repr(e))
                continue
            with lock:
                stats["requests"] += 1
                stats["by_kind"][kind] = stats["by_kind"].get(kind, 0) + 1
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1


def test_soak_mixed_load(tmp_path, images):
    seconds = float(os.environ.get("SOAK_SECONDS", "30"))
    s = Server(tmp_path / "state", TOKEN, SNAPSHOT_INTERVAL="20").start()
    stats = {"requests": 0, "by_kind": {}, "status": {}, "connection_errors": [], "acked_labels": set()}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(s.url, s.auth, images, deadline, i, stats, lock))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    rss = []
    while time.monotonic() < deadline:
        rss.append(rss_kb(s.proc.pid))
        time.sleep(0.5)
    for t in threads:
        t.join()

    mem = httpx.get(s.url + "/memory").json()
    assert s.kill(signal.SIGTERM) in (0, -signal.SIGTERM)  # writes the final snapshot
    quarter = max(1, len(rss) // 4)
    first, last = sum(rss[:quarter]) / quarter, sum(rss[-quarter:]) / quarter
    report = {"seconds": seconds, "clients": CLIENTS, "requests": stats["requests"], "by_kind": stats["by_kind"],
              "status": stats["status"], "connection_errors": len(stats["connection_errors"]),
              "rss_first_quarter_mb": first / 1024, "rss_last_quarter_mb": last / 1024,
              "rss_growth": last / first - 1, "memory_size": mem["size"], "applied_seq": mem["applied_seq"]}
    print(json.dumps(report))
    (tmp_path / "soak.json").write_text(json.dumps(report))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(report, indent=2))

    assert stats["requests"] > 0 and stats["by_kind"].get("feedback", 0) > 0
    assert not any(code >= 500 for code in stats["status"]), stats["status"]
    assert not stats["connection_errors"], stats["connection_errors"][:3]
    assert mem["size"] <= mem["capacity"]
    assert sum(mem["per_class"].values()) == mem["size"]
    original = set(mem["classes"][:10])
    assert set(mem["classes"][10:]) <= stats["acked_labels"]  # every new class came from an acked feedback
    assert set(mem["per_class"]) <= original | stats["acked_labels"]
    assert report["rss_growth"] < 0.10, report

    # the memory equals the state rebuilt from the feedback log alone (no snapshot)
    replay_dir = tmp_path / "replay"
    replay_dir.mkdir()
    copy_sqlite(tmp_path / "state" / "feedback.db", replay_dir / "feedback.db")
    rebuilt = ModelRuntime(ROOT / "model_store", "fashion-mnist", replay_dir)
    assert rebuilt.stats.restored_from_seq == 0 and rebuilt.applied_seq == mem["applied_seq"]
    assert rebuilt.state_hash() == mem["state_hash"]
    rebuilt.close()
