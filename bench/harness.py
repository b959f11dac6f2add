"""The benchmark harness: everything the benchmarks under bench/ share, in one module.

    records      machine(), header(config), write_record(name, config, results, machine), record_path(name)
    statistics   spread(xs), percentile(xs, q), percentiles(xs, qs, ...), cpu_per_call(fn, ...)
    test images  png(image), fashion_mnist_pngs(n, ...), test_pngs(n), hostile_files(folder), CIFAR_ZIP
    bodies       json_body(png), multipart(files, fields), write_bodies(folder, bodies)
    CPU, memory  cpu_seconds(pid), group_cpu_seconds(sid), vm_kb(pid, field)
    servers      Server (testkit.live), launch(kind, model, state_dir): this service, LitServe, plain FastAPI
    load         wrk(...), hey(...), hey_get(...): the load generators (Debian's wrk and hey)

Every benchmark runs as a module from the repository root, e.g.
`.venv/bin/python -m bench.perf.load --help`. Its record goes to bench/results/<name>.json,
which bench/report.py turns into the tables of BENCHMARKS.md and README.md; with
BENCH_RESULTS=<folder> records go there instead (a smoke run leaves the committed ones alone).
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from testkit.live import ROOT, Server, free_port

__all__ = ["ROOT", "RESULTS", "CIFAR_ZIP", "TOKEN", "SERVER_KINDS", "Server", "free_port", "machine", "header",
           "write_record", "record_path", "spread", "percentile", "percentiles", "cpu_per_call", "png",
           "fashion_mnist_pngs", "test_pngs", "hostile_files", "json_body", "multipart", "write_bodies",
           "cpu_seconds", "group_cpu_seconds", "vm_kb", "launch", "wrk", "hey", "hey_get"]

RESULTS = Path(__file__).resolve().parent / "results"  # the committed records (bench/report.py reads them)
CIFAR_ZIP = ROOT / "../shared/data/cifar10-jpeg.zip"  # CIFAR-10 as JPEG files (service.core.data reads it)
TOKEN = "bench-token"  # API_TOKEN of the servers the benchmarks start
PY = sys.executable


# --- records ------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    spec = getattr(sys.modules["__main__"], "__spec__", None)  # run as `python -m <module>`: its name
    argv0 = f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable), argv0] + sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def header(config: dict) -> dict:
    """Prints the machine and the run's settings; returns the machine for write_record."""
    m = machine()
    print("machine:", json.dumps(m))
    print("config: ", json.dumps(config))
    return m


def output_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS") or RESULTS)


def record_path(name: str) -> Path:
    """Where a benchmark reads another's record: this run's output folder if it holds one, else
    bench/results."""
    own = output_dir() / f"{name}.json"
    return own if own.exists() else RESULTS / f"{name}.json"


def write_record(name: str, config: dict, results: dict, machine_info: dict) -> Path:
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info, "config": config, "results": results}, indent=2))
    print(f"wrote {path}")
    return path


# --- statistics ---------------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    """Median with min, max and quartiles of the repeats."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2], "n": len(xs)}


def percentile(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def percentiles(xs, qs=(50, 90, 99), *, scale: float = 1.0, suffix: str = "", extra=("mean",),
                count: bool = True) -> dict:
    """{"p50<suffix>": ..., ...} of xs times `scale`, then each of `extra` ("max", "mean") and,
    with `count`, "n"; {"n": 0} for no samples."""
    if not len(xs):
        return {"n": 0}
    a = np.asarray(xs, dtype=float) * scale
    out = {f"p{q}{suffix}": float(np.percentile(a, q)) for q in qs}
    out |= {k: float(getattr(a, k)()) for k in extra}
    if count:
        out["n"] = len(xs)
    return out


def cpu_per_call(fn: Callable[[], object], calls: int = 1, repeats: int = 5, warmup: int = 1,
                 scale: float = 1e6) -> dict:
    """CPU time of this process per call of fn (seconds x scale: 1e6 us, 1e3 ms): the spread of
    `repeats` timed loops of `calls` calls, after `warmup` discarded calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(calls):
            fn()
        runs.append((time.process_time() - t) / calls * scale)
    return spread(runs)


# --- test images --------------------------------------------------------------------------------
def png(image) -> bytes:
    """PNG bytes of a uint8 image: a (H, W) or (H, W, C) array, or a (C, H, W) or (H, W) tensor."""
    from PIL import Image

    a = image
    if hasattr(a, "permute"):  # a torch tensor, channels first
        a = (a.permute(1, 2, 0) if a.ndim == 3 else a).numpy()
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def fashion_mnist_pngs(n: int | None = None, split: str = "test", mirror: bool = False
                       ) -> tuple[list[bytes], np.ndarray, list[str]]:
    """The first n (default: all) Fashion-MNIST images of `split` ("test" or "train") as PNG
    files, what a client posts; their class indices; the class names. Past the split's end it
    starts again: with the same images, or mirrored ones (`mirror`: every image distinct)."""
    from service.core.data import load_fashion_mnist

    ds = load_fashion_mnist()
    part = getattr(ds, split)
    images, labels = part.images[:, 0].numpy(), part.labels.numpy()
    n = len(images) if n is None else n
    out, lab = [], []
    for i in range(n):
        a = images[i % len(images)]
        if mirror and (i // len(images)) % 2 == 1:
            a = np.ascontiguousarray(a[:, ::-1])
        out.append(png(a))
        lab.append(labels[i % len(images)])
    return out, np.asarray(lab), list(ds.classes)


def test_pngs(n: int) -> list[bytes]:
    """The first n Fashion-MNIST test images as PNG files."""
    return fashion_mnist_pngs(n)[0]


def hostile_files(folder: Path) -> dict[str, Path]:
    """Images dear to decode, written to folder: a 32 KB 4096x4096 16-bit PNG (zeros with one
    bright block), a 4096x4096 8-bit PNG, a 4096x4096 JPEG of noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    a16 = np.zeros((4096, 4096), dtype=np.uint16)
    a16[100:200, 100:300] = 40000
    out["png16_4096"] = folder / "png16_4096.png"
    Image.fromarray(a16).save(out["png16_4096"], optimize=True)
    a8 = np.zeros((4096, 4096), dtype=np.uint8)
    a8[100:200] = 200
    out["png8_4096"] = folder / "png8_4096.png"
    Image.fromarray(a8).save(out["png8_4096"])
    out["jpeg_noise_4096"] = folder / "jpeg_noise_4096.jpg"
    Image.fromarray(rng.integers(0, 256, (4096, 4096, 3), dtype=np.uint8)).save(out["jpeg_noise_4096"], quality=90)
    return out


# --- request bodies -----------------------------------------------------------------------------
BOUNDARY = "benchboundary7d41"


def json_body(png_bytes: bytes) -> bytes:
    """/predict's JSON form, {"image_base64": ...} (every server of the load benchmark takes it)."""
    return json.dumps({"image_base64": base64.b64encode(png_bytes).decode()}).encode()


def multipart(files: list[bytes], fields: dict[str, str] | None = None, boundary: str = BOUNDARY
              ) -> tuple[bytes, str]:
    """A multipart/form-data body, one `file` part per image (then the `fields`), and its
    Content-Type."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for f in files]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in (fields or {}).items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def write_bodies(folder: Path, bodies: list[bytes]) -> None:
    """<folder>/<i>.body for each body: what bench/wrk_post.lua posts, rotating over them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(bodies):
        (folder / f"{i}.body").write_bytes(b)


# --- CPU and memory readers ---------------------------------------------------------------------
def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name: field 3 (state) first."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process `pid`, or by this process."""
    if pid is None:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def group_cpu_seconds(sid: int) -> float:
    """User + system CPU seconds of every live process in session `sid` (a server started with
    new_session=True: its pid)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = _stat_fields(d.name)
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def vm_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status in kB: VmRSS (resident now), VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# --- servers ------------------------------------------------------------------------------------
SERVER_KINDS = {
    "ours": "this service with default settings (serve: one process per core, adaptive batching)",
    "ours-1proc": "the same in one process (--workers 1)",
    "ours-unbatched": "the default with MAX_BATCH_SIZE 1",
    "litserve-w1": "LitServe with its own batching (bench/servers/litserve_server.py), workers_per_device 1",
    "litserve-w2": "the same with workers_per_device 2",
    "plain": "a plain FastAPI endpoint calling the model per request (bench/servers/plain_server.py), 1 thread",
}


def launch(kind: str, model: str, state_dir: Path, token: str = TOKEN, timeout: float = 180,
           device: str = "cpu", store: Path = ROOT / "model_store", engine: str = "eager") -> Server:
    """A fresh server of `kind` (SERVER_KINDS) serving <store>/<model> on `device` with the
    network `engine` (eager, or openvino-int8 for a model retrofitted with it: always named,
    since this service would otherwise take the manifest's engine and a comparison with
    LitServe would mix engines), in a process group of its own; returned once every one of
    its processes can answer. End it with .stop()."""
    if kind.startswith("ours"):
        env = {"MODEL_STORE": str(store), "MODEL_NAME": model, "SNAPSHOT_INTERVAL": "0", "DEVICE": device,
               "ENGINE": engine} | ({"MAX_BATCH_SIZE": "1"} if kind == "ours-unbatched" else {})
        s = Server(state_dir, token, workers=1 if kind == "ours-1proc" else None, new_session=True, **env)
        return s.start(timeout, all_workers=True)
    if kind.startswith("litserve"):  # its /health answers 200 once every inference worker is set up
        cmd = [PY, "-m", "bench.servers.litserve_server", "--port", "{port}", "--store", str(store), "--model", model,
               "--max-batch-size", "32", "--batch-timeout", "0.002", "--workers", kind[-1], "--accelerator", device,
               "--engine", engine]
        return Server(state_dir, token, command=cmd, health="/health", new_session=True).start(timeout)
    if kind == "plain":
        if engine != "eager":
            raise ValueError("the plain server runs the eager network only")
        cmd = [PY, "-m", "bench.servers.plain_server", "--port", "{port}", "--store", str(store), "--model", model]
        return Server(state_dir, token, command=cmd, health="/docs", new_session=True,
                      OMP_NUM_THREADS="1").start(timeout)
    raise ValueError(kind)


# --- load generators ----------------------------------------------------------------------------
def wrk(url: str, clients: int, seconds: float, bodies: Path, count: int, token: str | None = None,
        content_type: str = "application/json") -> dict:
    """wrk, one thread, `clients` connections, posting <bodies>/0..count-1.body in turn."""
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


def hey(url: str, clients: int, seconds: float, body: Path, content_type: str) -> dict:
    """hey's per-request CSV: latency percentiles and the request rate computed here."""
    cmd = ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(clients), "-m", "POST", "-T", content_type,
           "-D", str(body), "-t", "10", "-o", "csv", url]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - t0
    rows = [ln.split(",") for ln in out.splitlines()[1:] if ln and ln[0].isdigit()]
    lat = np.array([float(r[0]) for r in rows]) * 1e6  # response-time, seconds -> us
    ends = np.array([float(r[7]) + float(r[0]) for r in rows])  # offset from the start + response time
    errors = sum(r[6] != "200" for r in rows)
    return {"requests": len(rows), "errors": errors, "rps": len(rows) / max(ends.max(), 1e-9) if len(rows) else 0.0,
            "elapsed_s": elapsed, **percentiles(lat, (50, 95, 99), suffix="_us", extra=(), count=False)}


def hey_get(url: str, clients: int, seconds: float) -> dict:
    """hey GETting url: the 200 answers and hey's own request rate."""
    out = subprocess.run(["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(clients), url],
                         capture_output=True, text=True, check=True).stdout
    n = sum(int(ln.split()[1]) for ln in out.splitlines() if ln.strip().startswith("[200]"))
    rps = float(next(ln.split()[-1] for ln in out.splitlines() if "Requests/sec" in ln))
    return {"requests": n, "rps": rps}
