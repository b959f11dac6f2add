"""What hostile images cost: one decode in this process, and the service's throughput for
other clients while an attacker posts them.

1. Per image, each decoded in a fresh subprocess (CPU seconds: median of 5 decodes; extra
   memory: peak RSS growth over the process before decoding), with this round's decoder
   and with the decoder of an earlier commit (--before, read from git) for comparison:
   a 32 KB 4096x4096 16-bit PNG, a 4096x4096 8-bit PNG, a 4096x4096 JPEG of noise.
2. Served (`python -m service serve`, default settings): `wrk` with 8 clients posting real
   28x28 PNGs (JSON) for --seconds, alone and then while attacker threads post, back to back,
   (a) requests of 64 such 16-bit PNGs, (b) one 16-bit PNG per request, from 1 and from 4
   connections. Throughput under attack over throughput alone.

    .venv/bin/python -m bench.perf.hostile_images [--seconds 10] [--attackers 1 4] [--before 26a59f0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.harness import (ROOT, Server, header, hostile_files, json_body, multipart, spread, test_pngs, write_bodies,
                           write_record, wrk)

# run in a fresh interpreter, the decoder's folder first on PYTHONPATH: decode one file N
# times, print CPU seconds and RSS growth
PROBE = r"""
import json, sys, time
from preprocess_under_test import decode_pixels, ImageLimits
from service.core.store import InputSpec
def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
data = open(sys.argv[1], "rb").read()
spec = InputSpec(28, 1, [0.5], [0.5])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the RSS now
base = kb("VmRSS")
cpu = []
for _ in range(5):
    t = time.process_time()
    decode_pixels(data, spec, ImageLimits())
    cpu.append(time.process_time() - t)
print(json.dumps({"cpu_s": cpu, "extra_mb": (kb("VmHWM") - base) / 1024}))
"""


def decoder_dir(folder: Path, commit: str | None) -> Path:
    """A folder with `preprocess_under_test.py`: this checkout's decoder, or `commit`'s."""
    folder.mkdir(parents=True, exist_ok=True)
    src = (subprocess.run(["git", "show", f"{commit}:service/core/preprocess.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout if commit else (ROOT / "service/core/preprocess.py").read_text())
    (folder / "preprocess_under_test.py").write_text(src.replace("from .store import", "from service.core.store import"))
    return folder


def probe(code_dir: Path, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": f"{code_dir}:{ROOT}", "OMP_NUM_THREADS": "1"}).stdout
    r = json.loads(out)
    return {"cpu_ms": spread([c * 1e3 for c in r["cpu_s"]]), "extra_mb": r["extra_mb"]}


def attack(url: str, body: bytes, ctype: str, stop: threading.Event, statuses: dict) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            try:
                code = c.post(url + "/predict", content=body, headers={"Content-Type": ctype}).status_code
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--attackers", type=int, nargs="+", default=[1, 4], help="attacker connections, each back to back")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--before", default="26a59f0", help="commit whose decoder is compared (empty: none)")
    args = ap.parse_args()
    config = vars(args)
    m = header(config)
    results: dict = {"decode": {}, "served": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = hostile_files(tmp)
        decoders = {"now": decoder_dir(tmp / "now", None)}
        if args.before:
            decoders[f"before ({args.before})"] = decoder_dir(tmp / "before", args.before)
        for name, path in files.items():
            for which, code_dir in decoders.items():
                r = probe(code_dir, path)
                results["decode"].setdefault(name, {"bytes": path.stat().st_size})[which] = r
                print(f"{name:>16} ({path.stat().st_size / 1024:6.0f} KB) {which:>18}: "
                      f"{r['cpu_ms']['median']:7.1f} ms CPU, +{r['extra_mb']:6.1f} MB", flush=True)

        write_bodies(tmp / "json", [json_body(p) for p in test_pngs(200)])
        png16 = files["png16_4096"].read_bytes()
        kinds = {"64 x 16-bit 4096x4096 per request": multipart([png16] * 64, boundary="hostileboundary"),
                 "1 x 16-bit 4096x4096 per request": multipart([png16], boundary="hostileboundary")}
        attacks = {"none": (None, 0)} | {f"{k}, {n} attacker(s)": (body, n) for k, body in kinds.items()
                                         for n in args.attackers}
        s = Server(tmp / "state", workers=None, SNAPSHOT_INTERVAL="0")  # the default: one process per core
        s.start()
        try:
            wrk(s.url + "/predict", args.clients, 2, tmp / "json", 200)  # warm-up
            for name, (attack_body, n) in attacks.items():
                stop, statuses = threading.Event(), {}
                threads = [threading.Thread(target=attack, args=(s.url, *attack_body, stop, statuses))
                           for _ in range(n)]
                for t in threads:
                    t.start()
                time.sleep(1 if threads else 0)
                r = wrk(s.url + "/predict", args.clients, args.seconds, tmp / "json", 200)
                stop.set()
                for t in threads:
                    t.join()
                results["served"][name] = {"rps": r["rps"], "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
                                           "errors": r["errors"], "attacker_statuses": {str(k): v for k, v in
                                                                                        statuses.items()}}
                print(f"{name:>48}: others {r['rps']:7.1f} req/s  p99 {r['p99_us'] / 1e3:6.1f} ms  "
                      f"attacker answers {statuses}", flush=True)
        finally:
            s.kill(15)
        base = results["served"]["none"]["rps"]
        results["served_ratio"] = {k: v["rps"] / base for k, v in results["served"].items() if k != "none"}
        print("throughput under attack / alone:", json.dumps(results["served_ratio"]))
    write_record("hostile-images", config, results, m)


if __name__ == "__main__":
    main()
