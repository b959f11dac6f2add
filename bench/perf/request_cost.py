"""Where the CPU of one /predict request goes: what bounds requests/s on a CPU-bound box.

In this process, one torch thread (as each `serve` worker runs), CPU time per call, median
of 5 repeats: reading the JSON body, the header read for the pixel budget, decoding a
28x28 PNG, the model with its memory (`ModelRuntime.predict`: backbone, search, routing) and
the backbone alone per image at batch 1..32, the model with and without the ood_score's probe
(back to back, batch 1 and 32), building and serialising the answer, and the request's
Prometheus updates (multiprocess mode, as `serve` runs them).
Then over HTTP, this service with default settings (fresh process, empty state folder),
`hey` with 32 clients: server CPU per request (the whole process group) for GET /healthz,
a /predict refused after its JSON is parsed (invalid base64, 422), and a real /predict.

The bound: a server that spent nothing beyond the refused request's cost, one decode and
the model at batch 16 could reach at best (LitServe's CPU per request) / (that sum) of
LitServe's requests/s (both CPU-bound on the same cores, the client's share aside).

    .venv/bin/python -m bench.perf.request_cost [--seconds 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread, as in each serve worker
# Prometheus values in shared files, as serve's workers write them (chosen when
# prometheus_client is first imported, so before anything imports it)
METRICS_DIR = tempfile.mkdtemp(prefix="request-cost-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR
import torch  # noqa: E402

from bench.harness import (ROOT, cpu_per_call, group_cpu_seconds, header, hey, hey_get, json_body, launch,  # noqa: E402
                           record_path, spread, test_pngs, write_record)
from service.core.preprocess import ImageLimits, decode_image, image_header  # noqa: E402


def cpu_us(fn, calls: int, repeats: int = 5) -> dict:
    """CPU microseconds per call of fn: median (and spread) of `repeats` timed loops."""
    return cpu_per_call(fn, calls, repeats, warmup=max(3, calls // 20), scale=1e6)


def in_process(model: str, pngs: list[bytes]) -> dict:
    from service.serving.runtime import ModelRuntime
    from service.web.metrics import Metrics
    from service.web.routers import predict_response
    from service.web.schemas import PredictJSON

    torch.set_num_threads(1)
    out = {}
    body = json_body(pngs[0])
    out["json_body_us"] = cpu_us(lambda: base64.b64decode(PredictJSON.model_validate_json(body).image_base64), 5000)
    out["header_read_us"] = cpu_us(lambda: image_header(pngs[0]), 5000)
    with tempfile.TemporaryDirectory() as state:
        rt = ModelRuntime(ROOT / "model_store", model, state)
        limits = ImageLimits()
        out["decode_us"] = cpu_us(lambda: decode_image(pngs[0], rt.loaded.input, limits), 2000)
        images = torch.stack([decode_image(p, rt.loaded.input, limits) for p in pngs[:32]])  # (32, C, H, W)
        for b in (1, 4, 16, 32):
            x = images[:b]
            calls = max(10, 320 // b)
            out[f"predict_per_image_us_b{b}"] = {k: v / b for k, v in cpu_us(lambda: rt.predict(x), calls).items()
                                                 if k != "n"}
            with torch.no_grad():
                out[f"backbone_per_image_us_b{b}"] = {k: v / b for k, v in
                                                      cpu_us(lambda: rt.model.embed(x), calls).items() if k != "n"}
        novelty = rt.model.novelty
        if novelty is not None and novelty.probe_calibrated:  # the ood_score's probe: what it adds, back to back
            weight = float(novelty.probe_weight)
            for b in (1, 32):
                x, calls = images[:b], max(10, 320 // b)
                for name, w in (("probe_off", 0.0), ("probe_on", weight)):  # weight 0: the memory's part alone
                    novelty.probe_weight.fill_(w)
                    out[f"{name}_per_image_us_b{b}"] = {k: v / b for k, v in cpu_us(lambda: rt.predict(x), calls).items()
                                                        if k != "n"}
        metrics = Metrics()
        state = SimpleNamespace(config=SimpleNamespace(top_k=5), metrics=metrics)
        served = rt.predict(images[:1])
        # the answer, with its per-image prediction metrics
        out["answer_us"] = cpu_us(lambda: predict_response(rt, served, [1e-4], 1e-3, state, 1).model_dump_json(),
                                  2000)

        def request_metrics():  # what the middleware and the batcher add per request
            metrics.requests.labels("/predict", "POST", "200").inc()
            metrics.request_latency.labels("/predict").observe(0.004)
            metrics.batch_queue.observe(0.001)
        out["request_metrics_us"] = cpu_us(request_metrics, 5000)
        rt.close()
    return out


def over_http(model: str, png: bytes, seconds: float, repeats: int, tmp: Path) -> dict:
    bodies = {"refused": json.dumps({"image_base64": "!!!"}).encode(),
              "predict": json_body(png)}
    for name, b in bodies.items():
        (tmp / f"{name}.json").write_bytes(b)
    runs: dict[str, list] = {}
    for rep in range(repeats):
        server = launch("ours", model, tmp / f"state-{rep}")
        url, sid = server.url, server.proc.pid
        try:
            for name, path, method in (("healthz", None, "GET"), ("refused_predict_422", "refused", "POST"),
                                       ("predict", "predict", "POST")):
                for secs in (1, seconds):  # 1 s warm-up, discarded
                    cpu0 = group_cpu_seconds(sid)
                    if method == "GET":
                        r = hey_get(url + "/healthz", 32, secs)
                    else:
                        r = hey(url + "/predict", 32, secs, tmp / f"{path}.json", "application/json")
                    r["cpu_us_per_request"] = (group_cpu_seconds(sid) - cpu0) / max(1, r["requests"]) * 1e6
                runs.setdefault(name, []).append(r)
                print(f"rep {rep} {name:>20}: {r['rps']:8.1f} req/s  cpu {r['cpu_us_per_request']:7.1f} us/request",
                      flush=True)
        finally:
            server.stop()
    return {name: {"runs": rs, "rps": spread([r["rps"] for r in rs]),
                   "cpu_us_per_request": spread([r["cpu_us_per_request"] for r in rs])} for name, rs in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fashion-mnist")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--load-record", default="load", help="bench/results/<name>.json with LitServe's CPU per request")
    args = ap.parse_args()
    m = header(vars(args))
    pngs = test_pngs(32)
    results = {"in_process": in_process(args.model, pngs)}
    for k, v in results["in_process"].items():
        print(f"  {k}: {v['median']:.1f} us", flush=True)
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]  # the servers set their own
    shutil.rmtree(METRICS_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["http"] = over_http(args.model, pngs[0], args.seconds, args.repeats, Path(tmp))

    ip, http = results["in_process"], results["http"]
    floor_us = (http["refused_predict_422"]["cpu_us_per_request"]["median"] + ip["decode_us"]["median"]
                + ip["predict_per_image_us_b16"]["median"])
    load = json.loads(record_path(args.load_record).read_text())["results"]["table"]
    lit = {gen: min((load[f"{k}|json|{gen}|32"]["cpu_s_per_request"]["median"] * 1e6
                     for k in ("litserve-w1", "litserve-w2") if f"{k}|json|{gen}|32" in load)) for gen in ("wrk", "hey")}
    results["bound"] = {"floor_us": floor_us, "ours_us": http["predict"]["cpu_us_per_request"]["median"],
                        "litserve_us_at_32_clients": lit,
                        "best_possible_ratio": {g: v / floor_us for g, v in lit.items()},
                        "ratio_at_measured_cost": {g: v / http["predict"]["cpu_us_per_request"]["median"]
                                                   for g, v in lit.items()}}
    print("bound:", json.dumps(results["bound"]))
    write_record("request-cost", vars(args), results, m)


if __name__ == "__main__":
    main()
