"""Load benchmark: requests/s, latency and server CPU per request under 1..64 concurrent
clients on loopback, with two load generators.

Servers, each started fresh (a new process, an empty state folder) for every repeat, all
serving the same stored model:
  ours           this service with default settings: `serve` runs one process per core (two
                 here, one torch thread each, kept consistent through the feedback store),
                 adaptive batching
  ours-1proc     the same in one process (`--workers 1`, two torch threads)
  ours-unbatched the default with MAX_BATCH_SIZE 1 (the 1-client latency reference)
  litserve-w1    LitServe with its own batching (bench/servers/litserve_server.py), workers_per_device 1
  litserve-w2    the same with workers_per_device 2 (one torch thread each)
  plain          a plain FastAPI endpoint calling the model per request, one torch thread
  ours-int8, ours-1proc-int8, litserve-w1-int8, litserve-w2-int8
                 the same servers on the model's openvino-int8 engine (service/core/engine.py:
                 ENGINE=openvino-int8 for ours, --engine for LitServe); the others run eager fp32
                 (ENGINE=eager), whatever engine the stored model has. The int8 servers need a
                 model retrofitted with the engine (`python -m service retrofit --engine
                 openvino-int8`; --store names where it is)
Load generators: `wrk` (bench/wrk_post.lua, rotating over 200 real 28x28 Fashion-MNIST test
PNGs) and `hey` (one of those images per run). Bodies: JSON {"image_base64": ...} for every
server (LitServe cannot pass a multipart upload to its worker), and multipart uploads for
this service. Every server's answers on the 200 images are checked equal to the first server's of the
same engine (int8 answers may differ from eager's on a few images).
CPU seconds per request: user + system time of the server's whole process group over a run,
divided by the requests it answered. Then:
  ceiling        the model's own throughput in this process at its best batch size
                 (normalised tensors -> model.predict; and decode + predict), no HTTP

Client and server share this machine's cores: the numbers are for the whole box.

    .venv/bin/python -m bench.perf.load [--seconds 8] [--repeats 2] [--clients 1 8 32 64] [--store model_store]
        [--servers ours ours-1proc litserve-w1 litserve-w2 ours-int8 litserve-w1-int8 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.harness import (BOUNDARY, ROOT, SERVER_KINDS, fashion_mnist_pngs, group_cpu_seconds, header, hey,
                           json_body, launch, multipart, spread, write_bodies, write_record, wrk)
from service.core.engine import load_engine_model
from service.core.preprocess import ImageLimits, decode_image

INT8 = "openvino-int8"
ENGINE_KINDS = {f"{kind}-int8": kind for kind in ("ours", "ours-1proc", "litserve-w1", "litserve-w2")}
SERVERS = (*SERVER_KINDS, *ENGINE_KINDS)
MULTIPART = ("ours", "ours-1proc", "ours-unbatched", "ours-int8", "ours-1proc-int8")  # servers that take multipart


def engine_of(kind: str) -> str:
    return INT8 if kind in ENGINE_KINDS else "eager"


def measure(generator: str, url: str, clients: int, seconds: float, tmp: Path, body: str, sid: int) -> dict:
    ctype = f"multipart/form-data; boundary={BOUNDARY}" if body == "multipart" else "application/json"
    cpu0 = group_cpu_seconds(sid)
    if generator == "wrk":
        r = wrk(url + "/predict", clients, seconds, tmp / body, len(list((tmp / body).iterdir())), content_type=ctype)
    else:
        r = hey(url + "/predict", clients, seconds, tmp / body / "0.body", ctype)
    r["cpu_s_per_request"] = (group_cpu_seconds(sid) - cpu0) / max(1, r["requests"])
    return r


def answers(url: str, pngs: list[tuple[bytes, str]]) -> list[str]:
    """The server's label for each posted image (every server runs the same model)."""
    with httpx.Client(timeout=30) as c:
        out = []
        for png, _ in pngs:
            r = c.post(url + "/predict", content=json_body(png), headers={"Content-Type": "application/json"})
            r.raise_for_status()
            out.append(r.json()["predictions"][0]["label"])
        return out


def ceiling(model_name: str, pngs: list[bytes], repeats: int, device: str = "cpu", store: Path = ROOT / "model_store",
            engine: str = "eager") -> dict:
    loaded = load_engine_model(store, model_name, engine, device)
    model = loaded.model.for_inference().to(device)  # as every server runs it
    decoded = torch.stack([decode_image(p, loaded.input, ImageLimits()) for p in pngs]).to(device)  # (N, C, H, W)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # GPU work ends before the clock reads
    out = {}
    for bs in (1, 8, 32, 64, 128, 256):
        x = decoded[:bs].repeat(max(1, 256 // bs) if bs < 256 else 1, 1, 1, 1)[:max(bs, 256)]
        batches = list(x.split(bs))
        for b in batches[:2]:
            model.predict(b)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 1.0:
                for b in batches:
                    model.predict(b)
                    n += len(b)
                sync()
            runs.append(n / (time.perf_counter() - t0))
        out[bs] = spread(runs)
    best = max(out, key=lambda b: out[b]["median"])
    runs = []  # decode + predict at the best batch size (at most the images there are): what a server must at least do
    best_decoded = min(best, len(pngs))
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 1.0:
            for i in range(0, len(pngs) - best_decoded + 1, best_decoded):
                model.predict(torch.stack([decode_image(p, loaded.input, ImageLimits())
                                           for p in pngs[i:i + best_decoded]]).to(device))
                n += best_decoded
        runs.append(n / (time.perf_counter() - t0))
    return {"images_per_second_by_batch": out, "best_batch": best, "best": out[best],
            "with_decode_at_best_batch": spread(runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fashion-mnist")
    ap.add_argument("--store", default=str(ROOT / "model_store"), help="the model store every server reads")
    ap.add_argument("--servers", nargs="+", default=list(SERVER_KINDS), choices=SERVERS,
                    help="default: the eager servers; add the -int8 ones for a model with the engine")
    ap.add_argument("--generators", nargs="+", default=["wrk", "hey"], choices=["wrk", "hey"])
    ap.add_argument("--bodies", nargs="+", default=["json", "multipart"], choices=["json", "multipart"])
    ap.add_argument("--multipart-servers", nargs="+", default=["ours"], choices=MULTIPART)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--record", default="load", help="name of the JSON record in bench/results/")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where every server runs its model (ours: DEVICE; LitServe: its accelerator)")
    ap.add_argument("--images-zip", default=None, help="post the test/<class>/ images of this image-folder zip "
                    "(e.g. the CIFAR-10 JPEG copy) as they are, instead of Fashion-MNIST test PNGs")
    args = ap.parse_args()
    args.store = str(Path(args.store).resolve())
    wrk_version = (subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
                   if "wrk" in args.generators else None)
    config = vars(args) | {"wrk": wrk_version, "hey": "hey (Debian)"}
    m = header(config)

    if args.images_zip:
        pngs = zip_test_images(args.images_zip, args.images)
    else:
        images, labels, classes = fashion_mnist_pngs(args.images)
        pngs = [(p, classes[int(y)]) for p, y in zip(images, labels)]
    runs: dict = {}  # (server, body, generator, clients) -> [run, ...]
    labels: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_bodies(tmp / "json", [json_body(p) for p, _ in pngs])
        write_bodies(tmp / "multipart", [multipart([p])[0] for p, _ in pngs])
        for rep in range(args.repeats):
            for kind in args.servers:  # alternated: every server once per repeat
                server = launch(ENGINE_KINDS.get(kind, kind), args.model, tmp / f"state-{kind}-{rep}",
                                device=args.device, store=Path(args.store), engine=engine_of(kind))  # fresh, empty
                url = server.url
                try:
                    got = answers(url, pngs)  # also the warm-up
                    labels.setdefault(kind, got)
                    if got != labels[kind]:
                        raise RuntimeError(f"{kind} answered differently in repeat {rep}")
                    for body in args.bodies:
                        if body == "multipart" and kind not in args.multipart_servers:
                            continue
                        for gen in args.generators:
                            for c in args.clients:
                                measure(gen, url, c, 1, tmp, body, server.proc.pid)  # warm-up
                                r = measure(gen, url, c, args.seconds, tmp, body, server.proc.pid)
                                runs.setdefault(f"{kind}|{body}|{gen}|{c}", []).append(r)
                                print(f"rep {rep} {kind:>14} {body:>9} {gen:>3} c={c:>2}: {r['rps']:8.1f} req/s  "
                                      f"p50 {r['p50_us'] / 1e3:6.1f} ms  p99 {r['p99_us'] / 1e3:6.1f} ms  "
                                      f"cpu {r['cpu_s_per_request'] * 1e3:5.2f} ms/req  errors {r['errors']}",
                                      flush=True)
                finally:
                    server.stop()
    truth = [label for _, label in pngs]
    checks = {}
    for k, v in labels.items():  # against the first server of the same engine
        first = next(s for s in args.servers if engine_of(s) == engine_of(k))
        checks[k] = {"engine": engine_of(k), "answers_equal_to_" + first: v == labels[first],
                     "accuracy": sum(a == b for a, b in zip(v, truth)) / len(truth)}
    print("answers:", json.dumps(checks))
    table = {key: {"runs": rs, **{k: spread([r[k] for r in rs]) for k in ("rps", "p50_us", "p95_us", "p99_us",
                                                                         "cpu_s_per_request", "errors")}}
             for key, rs in runs.items()}
    results = {"answers": checks, "table": table}
    results["ceiling"] = cl = ceiling(args.model, [p for p, _ in pngs], 3, args.device, Path(args.store))
    print(f"  ceiling: {cl['best']['median']:.0f} images/s at batch {cl['best_batch']} (model only), "
          f"{cl['with_decode_at_best_batch']['median']:.0f} images/s with PNG decoding", flush=True)
    if any(engine_of(k) == INT8 for k in args.servers):
        results["ceiling_int8"] = cl8 = ceiling(args.model, [p for p, _ in pngs], 3, args.device, Path(args.store),
                                                INT8)
        print(f"  ceiling ({INT8}): {cl8['best']['median']:.0f} images/s at batch {cl8['best_batch']} (model only), "
              f"{cl8['with_decode_at_best_batch']['median']:.0f} images/s with PNG decoding", flush=True)
    results["ratios"] = ratios(table, args, cl)
    if "ceiling_int8" in results:
        results["ratios_int8"] = ratios(table, args, results["ceiling_int8"], suffix="-int8")
        # the first goal: ours as shipped (int8) against LitServe serving the eager model
        results["ratios_int8_vs_eager_litserve"] = ratios(table, args, results["ceiling_int8"], suffix="-int8",
                                                          lit_suffix="")
    for k, v in results["ratios"].items():
        print(f"  {k}: {v}")
    write_record(args.record, config, results, m)


def zip_test_images(path: str, n: int) -> list[tuple[bytes, str]]:
    """n files of test/<class>/ in the zip, taken in turn from each class: (bytes, class)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        by_class: dict[str, list[str]] = {}
        for name in sorted(z.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[2]:
                by_class.setdefault(parts[1], []).append(name)
        names = [f for group in zip(*by_class.values()) for f in group][:n]
        return [(z.read(f), f.split("/")[1]) for f in names]


def ratios(table: dict, args, cl: dict, suffix: str = "", lit_suffix: str | None = None) -> dict:
    """Ours (the better of the default and one process) against LitServe at its best
    (the better of w1 and w2), per generator and client count, from the medians; `suffix`
    "-int8": ours on the int8 engine, against LitServe on the same engine, or on `lit_suffix`'s
    ("": eager fp32, the model a user would hand LitServe)."""
    lit_suffix = suffix if lit_suffix is None else lit_suffix
    def med(kind, gen, c, k="rps", body="json"):
        row = table.get(f"{kind}|{body}|{gen}|{c}")
        return row[k]["median"] if row else None
    out = {}
    for gen in args.generators:
        for c in args.clients:
            ours = max((k + suffix for k in ("ours", "ours-1proc") if med(k + suffix, gen, c)),
                       key=lambda k: med(k, gen, c), default=None)
            lit = max((k + lit_suffix for k in ("litserve-w1", "litserve-w2") if med(k + lit_suffix, gen, c)),
                      key=lambda k: med(k, gen, c), default=None)
            row = {"ours_best": ours, "litserve_best": lit}
            if ours and lit:
                row["rps_ratio"] = med(ours, gen, c) / med(lit, gen, c)
                row["p99_ratio"] = med(ours, gen, c, "p99_us") / med(lit, gen, c, "p99_us")
            if ours:
                row["ours_over_ceiling"] = med(ours, gen, c) / cl["best"]["median"]
            if not suffix and med("ours", gen, c) and med("ours-unbatched", gen, c):
                row["ours_p50_over_unbatched_p50"] = med("ours", gen, c, "p50_us") / med("ours-unbatched", gen, c,
                                                                                            "p50_us")
            out[f"{gen} c={c}"] = row
    return out


if __name__ == "__main__":
    main()
