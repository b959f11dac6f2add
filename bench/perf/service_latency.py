"""The service as a user meets it, one client on loopback:

- start to ready: seconds from launching `python -m service serve` to /readyz answering 200;
- /predict and /feedback latency with real 28x28 Fashion-MNIST PNGs: p50, p90, p99;
- the bad-input corpus (tests/corpus.py): every case's status, and how many got a 5xx.

    .venv/bin/python -m bench.perf.service_latency [--requests 500] [--starts 3]
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time

import httpx

from bench.harness import TOKEN, Server, fashion_mnist_pngs, header, percentiles, spread, write_record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-name", default="fashion-mnist")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--feedback", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--starts", type=int, default=3)
    args = ap.parse_args()
    config = vars(args)
    m = header(config)
    env = {"MODEL_NAME": args.model_name, "MAX_UPLOAD_BYTES": "200000", "MAX_PIXELS": "1000000", "MAX_FILES": "8"}

    images, labels, _ = fashion_mnist_pngs(args.requests + args.feedback + args.warmup)
    pngs = [(p, int(y)) for p, y in zip(images, labels)]

    results: dict = {}
    starts = []
    for _ in range(args.starts):
        with tempfile.TemporaryDirectory() as d:
            s = Server(d, TOKEN, workers=None, **env).start()  # serve's defaults: one process per core
            starts.append(s.start_seconds)
            s.kill(signal.SIGTERM)
    results["start_to_ready_s"] = spread(starts)
    print(f"start to ready: median {results['start_to_ready_s']['median']:.2f} s over {len(starts)} starts")

    with tempfile.TemporaryDirectory() as d:
        s = Server(d, TOKEN, workers=None, **env).start()
        try:
            with httpx.Client(base_url=s.url, timeout=30) as c:
                lat, paths = [], {"memory": 0, "network": 0, "abstain": 0}
                for i, (data, _) in enumerate(pngs[: args.warmup + args.requests]):
                    t = time.perf_counter()
                    r = c.post("/predict", files={"file": ("x.png", data, "image/png")})
                    ms = 1e3 * (time.perf_counter() - t)
                    assert r.status_code == 200, r.text
                    if i >= args.warmup:
                        lat.append(ms)
                        paths[r.json()["predictions"][0]["path"]] += 1
                results["predict_ms"] = percentiles(lat) | {"paths": paths}
                flat = []
                for data, label in pngs[args.warmup + args.requests:]:
                    t = time.perf_counter()
                    r = c.post("/feedback", files={"file": ("x.png", data, "image/png")}, data={"label": str(label)},
                               headers={"Authorization": f"Bearer {TOKEN}"})
                    flat.append(1e3 * (time.perf_counter() - t))
                    assert r.status_code == 200, r.text
                results["feedback_ms"] = percentiles(flat)

                from tests.corpus import BAD_FEEDBACK, BAD_PREDICT

                mem_before = c.get("/memory").json()
                cases = []
                requests = [("/predict", *case) for case in BAD_PREDICT]
                requests += [("/feedback", *case) for case in BAD_FEEDBACK]
                for endpoint, name, kw, expected in requests:
                    headers = {"Authorization": f"Bearer {TOKEN}"} if endpoint == "/feedback" else {}
                    r = c.post(endpoint, headers=headers | kw.pop("headers", {}), **kw)
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    cases.append({"endpoint": endpoint, "case": name, "expected": expected, "status": r.status_code,
                                  "json_error": is_json and ("error" in r.json() or r.status_code == 200)})
                results["bad_inputs"] = {
                    "cases": cases, "tried": len(cases),
                    "as_expected": sum(c_["status"] == c_["expected"] and c_["json_error"] for c_ in cases),
                    "5xx": sum(c_["status"] >= 500 for c_ in cases),
                    "memory_unchanged": c.get("/memory").json() == mem_before,
                    "process_alive": s.alive(),
                }
        finally:
            s.kill(signal.SIGTERM)
    for k in ("predict_ms", "feedback_ms"):
        v = results[k]
        print(f"{k}: p50 {v['p50']:.2f}  p90 {v['p90']:.2f}  p99 {v['p99']:.2f}  (n={v['n']})")
    b = results["bad_inputs"]
    print(f"bad inputs: {b['as_expected']}/{b['tried']} answered as expected, {b['5xx']} 5xx, "
          f"memory unchanged: {b['memory_unchanged']}")
    write_record("service_latency", config, results, m)


if __name__ == "__main__":
    main()
