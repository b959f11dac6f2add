"""Load benchmark: requests/s and latency under 1..64 concurrent clients on loopback.

Servers, each a fresh process serving the same stored model, one at a time:
  batched    this service, dynamic batching (MAX_BATCH_SIZE 32, MAX_BATCH_WAIT_MS 2)
  unbatched  this service, MAX_BATCH_SIZE 1 (each request runs alone)
  litserve   LitServe 0.2 with its own batching (bench/litserve_server.py, same batch settings)
  plain      a plain FastAPI endpoint calling the model per request (bench/plain_server.py)
The load generator is `wrk` (Debian) with bench/wrk_post.lua, posting real 28x28
Fashion-MNIST test PNGs, rotating over 200 of them, as JSON {"image_base64": ...} (the form
every server takes: LitServe cannot pass a multipart upload to its worker process), and to
this service also as multipart uploads (batched-multipart). Then:
  ceiling    the model's own throughput in the benchmark process at its best batch size
             (normalised tensors -> model.predict; and decode + predict), no HTTP
  feedback   acknowledged /feedback per second (journal fsync before every answer)

Client and server share this machine's cores: the numbers are for the whole box.

    .venv/bin/python bench/load.py [--seconds 20] [--repeats 3] [--clients 1 8 32 64]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import header, spread, write_record  # noqa: E402
from service.core.data import load_fashion_mnist  # noqa: E402
from service.core.preprocess import ImageLimits, decode_image  # noqa: E402
from service.core.store import load_model  # noqa: E402
from bench.live import free_port  # noqa: E402

BOUNDARY = "benchboundary7d41"
TOKEN = "bench-token"
PY = sys.executable


def multipart(png: bytes, label: str | None = None) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n"]
    if label is not None:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="label"\r\n\r\n{label}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def json_body(png: bytes) -> bytes:
    return json.dumps({"image_base64": base64.b64encode(png).decode()}).encode()


def write_bodies(folder: Path, bodies: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(bodies):
        (folder / f"{i}.body").write_bytes(b)


def server_command(kind: str, port: int, model: str, state_dir: Path) -> tuple[list[str], dict, str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    if kind in ("batched", "unbatched", "batched-multipart"):
        env |= {"MODEL_NAME": model, "STATE_DIR": str(state_dir), "API_TOKEN": TOKEN, "SNAPSHOT_INTERVAL": "0",
                "MAX_BATCH_SIZE": "1" if kind == "unbatched" else "32", "MAX_BATCH_WAIT_MS": "2"}
        return [PY, "-m", "service", "serve", "--port", str(port), "--log-level", "warning"], env, "/readyz"
    if kind == "litserve":
        return [PY, "bench/litserve_server.py", "--port", str(port), "--model", model, "--max-batch-size", "32",
                "--batch-timeout", "0.002"], env, "/health"
    if kind == "plain":
        return [PY, "bench/plain_server.py", "--port", str(port), "--model", model], env, "/docs"
    raise ValueError(kind)


def start(kind: str, model: str, state_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd, env, health = server_command(kind, port, model, state_dir)
    log = open(state_dir / f"{kind}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited with {proc.returncode}; see {state_dir / f'{kind}.log'}")
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{kind} server not ready")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)  # the whole group: LitServe runs worker processes
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def wrk(url: str, clients: int, seconds: float, bodies: Path, count: int, token: str | None = None,
        content_type: str = "application/json") -> dict:
    cmd = ["wrk", "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(ROOT / "bench/wrk_post.lua")]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd += [url, "--", str(bodies), str(count), content_type]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    r = json.loads(line[len("WRKJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in r if k.startswith("errors_"))
    return r


def check_answers(url: str, pngs: list[tuple[bytes, str]]) -> float:
    """Accuracy of the server's answers on the posted images: every server runs the same model."""
    right = 0
    with httpx.Client(timeout=30) as c:
        for png, label in pngs:
            r = c.post(url + "/predict", content=json_body(png), headers={"Content-Type": "application/json"})
            r.raise_for_status()
            right += r.json()["predictions"][0]["label"] == label
    return right / len(pngs)


def ceiling(model_name: str, pngs: list[bytes], repeats: int) -> dict:
    loaded = load_model(ROOT / "model_store", model_name)
    model = loaded.model.eval()
    decoded = torch.stack([decode_image(p, loaded.input, ImageLimits()) for p in pngs])  # (N, C, H, W)
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
            runs.append(n / (time.perf_counter() - t0))
        out[bs] = spread(runs)
    best = max(out, key=lambda b: out[b]["median"])
    runs = []  # decode + predict at the best batch size: what a server must at least do
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 1.0:
            for i in range(0, len(pngs) - best + 1, best):
                model.predict(torch.stack([decode_image(p, loaded.input, ImageLimits()) for p in pngs[i:i + best]]))
                n += best
        runs.append(n / (time.perf_counter() - t0))
    return {"images_per_second_by_batch": out, "best_batch": best, "best": out[best],
            "with_decode_at_best_batch": spread(runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fashion-mnist")
    ap.add_argument("--servers", nargs="+", default=["batched", "unbatched", "litserve", "plain",
                                                      "batched-multipart"])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--feedback-clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    config = vars(args) | {"wrk": wrk_version, "load_generator": "wrk -t 1 (bench/wrk_post.lua)"}
    m = header(config)

    ds = load_fashion_mnist()
    pngs = []
    for i in range(args.images):
        buf = io.BytesIO()
        Image.fromarray(ds.test.images[i, 0].numpy()).save(buf, format="PNG")
        pngs.append((buf.getvalue(), ds.classes[int(ds.test.labels[i])]))
    results: dict = {"servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_bodies(tmp / "predict", [json_body(p) for p, _ in pngs])
        write_bodies(tmp / "multipart", [multipart(p) for p, _ in pngs])
        multipart_type = f"multipart/form-data; boundary={BOUNDARY}"
        for kind in args.servers:
            proc, url = start(kind, args.model, tmp)
            try:
                accuracy = check_answers(url, pngs)  # also the warm-up
                rows = {}
                bodies, ctype = ((tmp / "multipart", multipart_type) if kind == "batched-multipart"
                                 else (tmp / "predict", "application/json"))
                for c in args.clients:
                    wrk(url + "/predict", c, 2, bodies, len(pngs), content_type=ctype)  # warm-up
                    runs = [wrk(url + "/predict", c, args.seconds, bodies, len(pngs), content_type=ctype)
                            for _ in range(args.repeats)]
                    rows[c] = {"runs": runs, **{k: spread([r[k] for r in runs])
                                                for k in ("rps", "p50_us", "p95_us", "p99_us", "errors")}}
                    ms = {k: rows[c][f"{k}_us"]["median"] / 1e3 for k in ("p50", "p95", "p99")}
                    print(f"{kind:>17} c={c:>2}: {rows[c]['rps']['median']:8.1f} req/s  p50 {ms['p50']:6.1f} ms  "
                          f"p95 {ms['p95']:6.1f} ms  p99 {ms['p99']:6.1f} ms  errors {sum(r['errors'] for r in runs)}",
                          flush=True)
                results["servers"][kind] = {"answer_accuracy": accuracy, "clients": rows}
                if kind == "batched":
                    write_bodies(tmp / "feedback", [multipart(p, label) for p, label in pngs])
                    fb = {}
                    for c in args.feedback_clients:
                        runs = [wrk(url + "/feedback", c, args.seconds / 2, tmp / "feedback", len(pngs), TOKEN,
                                    multipart_type) for _ in range(args.repeats)]
                        fb[c] = {"runs": runs, **{k: spread([r[k] for r in runs])
                                                  for k in ("rps", "p50_us", "p99_us", "errors")}}
                        print(f" feedback c={c:>2}: {fb[c]['rps']['median']:8.1f} acknowledged/s  "
                              f"p99 {fb[c]['p99_us']['median'] / 1e3:6.1f} ms  "
                              f"errors {sum(r['errors'] for r in runs)}", flush=True)
                    results["feedback"] = fb
            finally:
                stop(proc)
    results["ceiling"] = ceiling(args.model, [p for p, _ in pngs], args.repeats)
    cl = results["ceiling"]
    print(f"  ceiling: {cl['best']['median']:.0f} images/s at batch {cl['best_batch']} (model only), "
          f"{cl['with_decode_at_best_batch']['median']:.0f} images/s with PNG decoding", flush=True)
    s = results["servers"]
    ratios = {}
    for c in args.clients:
        row = {}
        if "batched" in s and "litserve" in s:
            row["batched_over_litserve_rps"] = s["batched"]["clients"][c]["rps"]["median"] / \
                s["litserve"]["clients"][c]["rps"]["median"]
            row["batched_p99_over_litserve_p99"] = s["batched"]["clients"][c]["p99_us"]["median"] / \
                s["litserve"]["clients"][c]["p99_us"]["median"]
        if "batched" in s:
            row["batched_over_ceiling"] = s["batched"]["clients"][c]["rps"]["median"] / cl["best"]["median"]
            row["batched_over_ceiling_with_decode"] = s["batched"]["clients"][c]["rps"]["median"] / \
                cl["with_decode_at_best_batch"]["median"]
        if "batched" in s and "unbatched" in s:
            row["batched_over_unbatched_rps"] = s["batched"]["clients"][c]["rps"]["median"] / \
                s["unbatched"]["clients"][c]["rps"]["median"]
        ratios[c] = row
        print(f"  ratios c={c}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    results["ratios"] = ratios
    write_record("load", config, results, m)


if __name__ == "__main__":
    main()
