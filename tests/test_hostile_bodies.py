"""Hostile request bodies, sent anonymously to a real server process: each is refused with its
4xx and error, and costs the server at most 50 ms of CPU time and 50 MB of extra resident
memory (the 7 KB Open Inference Protocol body of 2.4M empty lists: 20 MB).

The server is one `python -m service serve --workers 1` for the whole file, so the process
started is the one answering. CPU time: utime + stime of that process, all its threads, from
/proc/<pid>/stat, read before the request and after the server has gone quiet once it answered,
per request (a body is sent a few times and the total divided: the counter moves in 10 ms
ticks; a slow body, once); nothing is subtracted, and the idle server's CPU over the same wall
time is in each message. Extra memory: the peak resident size (VmHWM, reset to the resident
size through /proc/<pid>/clear_refs before the first send) less the resident size then.

HOSTILE_REPORT=path writes what each body cost (status, CPU ms, extra MB) as JSON.

The decoder's own limit for costly images (16-bit, interlaced, palette, GIF, WebP) and the JSON
bounds are checked here in-process too.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import select
import signal
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from testkit.live import Server
from service.core.preprocess import ImageLimits, ImageTooLarge, decode_pixels
from service.core.store import InputSpec
from service.web.requests import JsonBounds, JsonOutOfBounds

MODEL = "fashion-mnist"
INFER = f"/v2/models/{MODEL}/infer"
# short, so that the idle server's own CPU over a slow body's wall time stays small
BODY_TIMEOUT, BODY_DEADLINE = 0.5, 1.0
MAX_CPU_MS, MAX_EXTRA_MB = 50.0, 50.0
TICKS = os.sysconf("SC_CLK_TCK")
RECORDS: list[dict] = []


# --- the server and what it spends ---------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # one process (its pid is the one answering), with one torch thread as each process of the
    # default layout (a process per core) has: two would spin on the other core after each batch
    s = Server(tmp_path_factory.mktemp("hostile"), workers=1, SNAPSHOT_INTERVAL="0", OMP_NUM_THREADS="1",
               BODY_TIMEOUT=str(BODY_TIMEOUT), BODY_DEADLINE=str(BODY_DEADLINE)).start()
    warm_up(s)
    s.idle_cpu_ms_per_s = idle_cpu_ms_per_s(s.proc.pid)
    yield s
    s.kill(signal.SIGTERM)
    if os.environ.get("HOSTILE_REPORT"):
        Path(os.environ["HOSTILE_REPORT"]).write_text(json.dumps(
            {"idle_cpu_ms_per_s": s.idle_cpu_ms_per_s, "bodies": RECORDS}, indent=1) + "\n")


def cpu_ms(pid: int) -> float:
    """utime + stime of the process, all its threads (ended ones included), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICKS  # fields 14 and 15 of proc(5)


def status_mb(pid: int, key: str) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def quiet_cpu_ms(pid: int, settle: float = 0.05, limit: float = 1.0) -> float:
    """The process's CPU time once it has stopped spending any (work after the answer counts)."""
    end, last = time.monotonic() + limit, cpu_ms(pid)
    while time.monotonic() < end:
        time.sleep(settle)
        now = cpu_ms(pid)
        if now == last:
            return now
        last = now
    return last


def idle_cpu_ms_per_s(pid: int, seconds: float = 2.0) -> float:
    start = quiet_cpu_ms(pid)
    time.sleep(seconds)
    return (cpu_ms(pid) - start) / seconds


@dataclass
class Cost:
    status: int
    answer: dict
    cpu_ms: float
    extra_mb: float
    wall_s: float


def measured(server: Server, send: Callable[[Server], tuple[int, dict]], repeat: int) -> Cost:
    """The body sent `repeat` times: CPU per request (the clock ticks in 10 ms steps: the mean
    of several is finer), the peak of extra memory over all, the last answer."""
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the resident size now
    base_mb = status_mb(pid, "VmRSS")
    cpu0, t0 = quiet_cpu_ms(pid), time.monotonic()
    for _ in range(repeat):
        status, answer = send(server)
    wall = (time.monotonic() - t0) / repeat
    cpu = (quiet_cpu_ms(pid) - cpu0) / repeat
    return Cost(status, answer, cpu, status_mb(pid, "VmHWM") - base_mb, wall)


# --- how bodies are sent -------------------------------------------------------------------------
def post(path: str, body: bytes, **headers) -> Callable[[Server], tuple[int, dict]]:
    def send(server: Server) -> tuple[int, dict]:
        with httpx.Client(timeout=30) as c:  # a connection of its own, closed after
            r = c.post(server.url + path, content=body, headers=headers)
        return r.status_code, r.json()
    return send


def trickle(path: str, ctype: str, length: int, first: bytes, every: float | None, give_up: float = 8.0):
    """Sends the request head and `first`, then one byte every `every` seconds (None: nothing
    more) until the server answers or `give_up` seconds pass."""
    def send(server: Server) -> tuple[int, dict]:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=give_up)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n"
                     .encode() + first)
        reply, end, sent = b"", time.monotonic() + give_up, len(first)
        try:
            while time.monotonic() < end:
                ready, _, _ = select.select([sock], [], [], every if every is not None else end - time.monotonic())
                if ready:
                    data = sock.recv(65536)
                    if not data:
                        break
                    reply += data
                    if complete_reply(reply):
                        break
                elif every is not None and sent < length:
                    sock.sendall(b" ")
                    sent += 1
        finally:
            sock.close()
        if not reply:
            return 0, {"error": f"no answer within {give_up} s"}
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)
    return send


def complete_reply(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    length = next((int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")),
                  None)
    return bool(sep) and length is not None and len(body) >= length


# --- the bodies ----------------------------------------------------------------------------------
def oip_json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def empty_lists(n: int) -> bytes:
    """An inference request whose BYTES data is n empty lists (`[[],[],...]`)."""
    return b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","data":[' + b"[]," * (n - 1) + b"[]]}]}"


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of parts given as (Content-Disposition parameters, content)."""
    b = "hostileboundary"
    body = b"".join(f"--{b}\r\nContent-Disposition: form-data{disposition}\r\n\r\n".encode() + content + b"\r\n"
                    for disposition, content in parts)
    return body + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def predict_parts(parts: list[tuple[str, bytes]]) -> Callable[[Server], tuple[int, dict]]:
    body, ctype = multipart(parts)
    return post("/predict", body, **{"content-type": ctype})


def predict_files(*files: bytes) -> Callable[[Server], tuple[int, dict]]:
    return predict_parts([('; name="file"; filename="x.png"', f) for f in files])


def binary_request(data: bytes, compress: bool = False) -> Callable[[Server], tuple[int, dict]]:
    """An `image` input of shape [1] sent in the binary extension: the JSON header, then
    `data` as the tensor's bytes."""
    header = oip_json([{"name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(data)}}])
    headers = {"inference-header-content-length": str(len(header))}
    if compress:
        return post(INFER, gzip.compress(header + data, 9), **headers, **{"content-encoding": "gzip"})
    return post(INFER, header + data, **headers)


def element(data: bytes) -> bytes:
    """One BYTES element in the binary extension: its length (4 bytes, little-endian), its bytes."""
    return struct.pack("<I", len(data)) + data


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def png16(side: int) -> bytes:
    """A 16-bit grey PNG: black, a bright block and a patch of noise (about 200 kB at 4096)."""
    a = np.zeros((side, side), dtype=np.uint16)
    a[side // 40:side // 20, side // 40:side // 13] = 40000
    n = min(side, 280)
    a[-n:, -n:] = np.random.default_rng(0).integers(0, 65535, (n, n), dtype=np.uint16)
    return png(Image.fromarray(a))


def interlaced_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """An Adam7-interlaced PNG of zeros (Pillow writes no interlaced PNG): each of the seven
    passes is its rows, each a filter byte and the pass's pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bytes_per_pixel = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type] * bit_depth // 8
    raw = bytearray()
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)]:
        cols, rows = max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)
        if cols and rows:
            raw += bytes(1 + cols * bytes_per_pixel) * rows
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
            + chunk(b"IEND", b""))


def palette_image(side: int) -> Image.Image:
    im = Image.new("P", (side, side), 0)
    im.putpalette([0, 0, 0, 255, 255, 255, 200, 30, 30] + [0] * 759)
    im.paste(1, (side // 8, side // 8, side // 4, side // 4))
    return im


@dataclass
class Hostile:
    name: str
    send: Callable[[], Callable[[Server], tuple[int, dict]]]  # built when its test runs
    status: int
    error: str  # /predict: the error code; the protocol ({"error": message}): words of the message
    max_cpu_ms: float = MAX_CPU_MS
    max_extra_mb: float = MAX_EXTRA_MB
    repeat: int = 4  # a slow body: once


GZIP = {"content-encoding": "gzip", "content-type": "application/json"}
JSON = {"content-type": "application/json"}
DIGITS = b"9" * 4000  # what a parser turns into a big integer, at a cost that grows faster than its length

HOSTILE = [
    # the Open Inference Protocol: anonymous, and it inflates gzip
    Hostile("oip: 7 kB gzip of 2.4M empty lists as BYTES data",
            lambda: post(INFER, gzip.compress(empty_lists(2_400_000), 9), **GZIP), 400, "values",
            max_extra_mb=20),
    Hostile("oip: 0.9 MB JSON of 300k empty lists", lambda: post(INFER, empty_lists(300_000), **JSON), 400, "values"),
    Hostile("oip: 3.3M empty strings as BYTES data, gzip",
            lambda: post(INFER, gzip.compress(empty_lists(3_300_000).replace(b"[],", b'"",'), 9), **GZIP), 400,
            "values"),
    Hostile("oip: 250k zero-length BYTES elements, binary extension",
            lambda: binary_request(element(b"") * 250_000), 400, "holds 1 images, the data more than 1"),
    Hostile("oip: 10 kB gzip of 2.5M zero-length BYTES elements, binary extension",
            lambda: binary_request(element(b"") * 2_500_000, compress=True), 413,
            "inflate"),
    Hostile("oip: JSON nested 9M lists deep, gzip",
            lambda: post(INFER, gzip.compress(b'{"inputs":[{"name":"pixels","shape":[1,1,28,28],"datatype":"UINT8",'
                                              b'"data":' + b"[" * 9_000_000 + b"]}]}", 9), **GZIP), 400, "values"),
    Hostile("oip: shape of 3M dimensions, gzip",
            lambda: post(INFER, gzip.compress(b'{"inputs":[{"name":"image","datatype":"BYTES","data":[],"shape":['
                                              + b"1," * 3_000_000 + b'1]}]}', 9), **GZIP), 400, "values"),
    Hostile("oip: integers of 4000 digits, gzip",
            lambda: post(INFER, gzip.compress(b'{"inputs":[{"name":"pixels","shape":[1,1,28,28],"datatype":"UINT8",'
                                              b'"data":[' + b",".join([DIGITS] * 2400) + b"]}]}", 9), **GZIP),
            400, "integer of more than 20 digits"),
    Hostile("oip: declared batch of 2^62 images",
            lambda: post(INFER, oip_json([{"name": "pixels", "shape": [2 ** 62, 1, 28, 28], "datatype": "UINT8",
                                           "data": [0]}]), **JSON), 413, "at most 64 images"),
    Hostile("oip: declared batch of 2^62 images, binary extension",
            lambda: post(INFER, oip_json([{"name": "image", "shape": [2 ** 62], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": 0}}]), **JSON), 413,
            "at most 64 images"),
    Hostile("oip: 40 kB gzip bomb of white space",
            lambda: post(INFER, gzip.compress(b"{" + b" " * 40_000_000 + b"}", 9), **GZIP), 413,
            "inflate"),
    Hostile("oip: 16-bit PNG 4096x4096 as BYTES data", lambda: binary_request(element(png16(4096))), 413,
            "for 16-bit, interlaced, palette, GIF or WebP images"),
    # /predict, JSON and multipart
    Hostile("predict: JSON of 300k empty lists as image_base64",
            lambda: post("/predict", b'{"image_base64":[' + b"[]," * 300_000 + b"[]]}", **JSON), 422,
            "invalid_json"),
    Hostile("predict: JSON nested 1M lists deep",
            lambda: post("/predict", b'{"image_base64":' + b"[" * 1_000_000 + b"}", **JSON), 422, "invalid_json"),
    Hostile("predict: multipart of 5000 files", lambda: predict_files(*[b"\x89PNG"] * 5000), 413, "too_many_files"),
    Hostile("predict: multipart of 5000 text fields",
            lambda: predict_parts([('; name="note"', b"x")] * 5000), 413, "too_many_fields"),
    Hostile("predict: multipart of 5000 parts without a name",
            lambda: predict_parts([("", b"x")] * 5000), 422, "bad_multipart"),
    # images whose decoding costs more per pixel
    Hostile("predict: 16-bit PNG 4096x4096", lambda: predict_files(png16(4096)), 413, "image_too_large"),
    Hostile("predict: interlaced 8-bit PNG 4096x4096", lambda: predict_files(interlaced_png(4096, 4096)), 413,
            "image_too_large"),
    Hostile("predict: palette PNG 4096x4096 (a palette bomb)", lambda: predict_files(png(palette_image(4096))), 413,
            "image_too_large"),
    Hostile("predict: GIF 4096x4096 (a palette bomb)",
            lambda: predict_files(png(palette_image(4096), format="GIF")), 413, "image_too_large"),
    Hostile("predict: lossless WebP 4096x4096",
            lambda: predict_files(png(palette_image(4096).convert("RGB"), format="WEBP", lossless=True)), 413,
            "image_too_large"),
    # slow bodies
    Hostile("predict: a body that stops after its first bytes (BODY_TIMEOUT)",
            lambda: trickle("/predict", "application/json", 1000, b'{"image_base64": "', None), 408, "body_timeout",
            repeat=1),
    Hostile("predict: a body trickling a byte every 0.2 s (BODY_DEADLINE)",
            lambda: trickle("/predict", "application/json", 1000, b'{"image_base64": "', 0.2), 408, "body_timeout",
            repeat=1),
    Hostile("oip: a body that stops after its first bytes (BODY_TIMEOUT)",
            lambda: trickle(INFER, "application/json", 1000, b'{"inputs": ', None), 408, "BODY_TIMEOUT", repeat=1),
    Hostile("oip: a body trickling a byte every 0.2 s (BODY_DEADLINE)",
            lambda: trickle(INFER, "application/json", 1000, b'{"inputs": ', 0.2), 408, "BODY_DEADLINE", repeat=1),
]


def warm_up(server: Server) -> None:
    """One valid request of each kind first: the first ones load what a process loads once
    (Pillow's plugins and codecs, the multipart parser, worker threads)."""
    a = np.zeros((28, 28), dtype=np.uint8)
    a[8:20, 8:20] = 200
    grey, deep = png(Image.fromarray(a)), png(Image.fromarray(a.astype(np.uint16) * 250))
    others = [png(Image.fromarray(a), format=f) for f in ("JPEG", "WEBP", "GIF", "BMP", "TIFF")]
    with httpx.Client(timeout=60) as c:
        for data in (grey, deep, png(palette_image(28)), interlaced_png(28, 28), *others):
            r = c.post(server.url + "/predict", files={"file": ("x.png", data, "image/png")})
            assert r.status_code == 200, r.text
        import base64
        r = c.post(server.url + "/predict", json={"image_base64": base64.b64encode(grey).decode()})
        assert r.status_code == 200, r.text
        request = oip_json([{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                             "data": a.reshape(-1).tolist()}])
        for body, headers in ((request, JSON), (gzip.compress(request), GZIP)):
            r = c.post(server.url + INFER, content=body, headers=headers)
            assert r.status_code == 200, r.text
    status, answer = binary_request(element(grey))(server)
    assert status == 200, answer


@pytest.mark.server
@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
def test_each_hostile_body_gets_its_4xx_within_its_cpu_and_memory_bound(live, case):
    send = case.send()
    cost = measured(live, send, case.repeat)
    idle_ms = live.idle_cpu_ms_per_s * cost.wall_s
    RECORDS.append({"body": case.name, "status": cost.status, "error": str(cost.answer.get("error"))[:120],
                    "cpu_ms": round(cost.cpu_ms, 1), "extra_mb": round(cost.extra_mb, 1),
                    "wall_s": round(cost.wall_s, 2), "idle_cpu_ms_same_wall": round(idle_ms, 1)})
    said = f"{case.name}: {cost.status} {str(cost.answer)[:300]}"
    assert cost.status == case.status, said
    if case.name.startswith("oip"):  # the protocol's own form: {"error": message}
        assert list(cost.answer) == ["error"] and case.error in cost.answer["error"], said
    else:  # the service's: {"error": code, "detail": ...}
        assert cost.answer["error"] == case.error and cost.answer["detail"], said
    assert cost.cpu_ms <= case.max_cpu_ms, \
        f"{said}: {cost.cpu_ms:.0f} ms of server CPU (the idle server spends {idle_ms:.0f} ms in the same " \
        f"{cost.wall_s:.2f} s), over {case.max_cpu_ms:.0f} ms"
    assert cost.extra_mb <= case.max_extra_mb, \
        f"{said}: {cost.extra_mb:.0f} MB of extra resident memory, over {case.max_extra_mb:.0f} MB"


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with some grain: compresses like a photograph."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = np.random.default_rng(0).normal(0, 2, (height, width))
    a = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1) + grain[..., None]
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def noise(side: int, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(side)
    return Image.fromarray(rng.integers(0, 256, (side, side, channels), dtype=np.uint8).squeeze())


# the dearest requests the default limits accept (MAX_UPLOAD_BYTES, MAX_PIXELS,
# MAX_REQUEST_PIXELS): answered, and still within the bound; one step past them: refused
LARGEST = [
    ("predict: 8-bit RGB PNG 1024x1024 (MAX_PIXELS)",
     lambda: predict_files(png(Image.new("RGB", (1024, 1024), (90, 40, 200)))), 200),
    ("predict: 8-bit RGB PNG 2048x2048", lambda: predict_files(png(Image.new("RGB", (2048, 2048)))), 413),
    ("predict: a 12 MP photo-like JPEG 4000x3000",
     lambda: predict_files(png(photo(4000, 3000), format="JPEG", quality=85)), 200),
    ("predict: noise JPEG 850x850 of 1.0 MB (MAX_UPLOAD_BYTES)",
     lambda: predict_files(png(noise(850), format="JPEG", quality=97)), 200),
    ("predict: 5 costly 512x512 images in one request (MAX_REQUEST_PIXELS)",
     lambda: predict_files(*[png(palette_image(512))] * 5), 413),
    ("predict: JSON, a 480x480 noise PNG as base64 (0.9 MB)",
     lambda: post("/predict", json.dumps({"image_base64": base64.b64encode(png(noise(480))).decode()}).encode(),
                  **JSON), 200),
]


@pytest.mark.server
@pytest.mark.parametrize("name,make,status", LARGEST, ids=[x[0] for x in LARGEST])
def test_the_dearest_requests_the_limits_accept_stay_within_the_bound(live, name, make, status):
    cost = measured(live, make(), 4)
    RECORDS.append({"body": name, "status": cost.status, "cpu_ms": round(cost.cpu_ms, 1),
                    "extra_mb": round(cost.extra_mb, 1), "wall_s": round(cost.wall_s, 2)})
    assert cost.status == status, f"{name}: {cost.status} {str(cost.answer)[:300]}"
    assert cost.cpu_ms <= MAX_CPU_MS, f"{name}: {cost.cpu_ms:.0f} ms of server CPU, over {MAX_CPU_MS} ms"
    assert cost.extra_mb <= MAX_EXTRA_MB, f"{name}: {cost.extra_mb:.0f} MB of extra resident memory"


@pytest.mark.server
def test_the_server_still_answers_after_the_hostile_bodies(live):
    a = np.zeros((28, 28), dtype=np.uint8)
    r = httpx.post(live.url + "/predict", files={"file": ("x.png", png(Image.fromarray(a)), "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"]


# --- in-process: the decoder's limit for costly images, and the JSON bounds --------------------
GREY28 = InputSpec(image_size=28, in_chans=1, mean=[0.0], std=[1.0])
CAP = 1024 * 1024


def costly_images(width: int, height: int) -> dict[str, bytes]:
    a = np.zeros((height, width), dtype=np.uint8)
    a[: height // 2] = 180
    return {"16-bit": png(Image.fromarray(a.astype(np.uint16) * 300)),
            "interlaced": interlaced_png(width, height),
            "interlaced 16-bit RGBA": interlaced_png(width, height, 16, 6),
            "palette": png(Image.fromarray(a).convert("P")),
            "1-bit": png(Image.fromarray(a).convert("1")),
            "GIF": png(Image.fromarray(a).convert("P"), format="GIF"),
            "WebP": png(Image.fromarray(np.stack([a] * 3, -1)), format="WEBP", lossless=True)}


@pytest.mark.parametrize("kind", list(costly_images(2, 2)))
def test_a_costly_image_over_its_pixel_cap_is_refused_naming_the_cap(kind):
    data = costly_images(1025, 1024)[kind]
    with pytest.raises(ImageTooLarge) as e:
        decode_pixels(data, GREY28, ImageLimits(max_costly_pixels=CAP))
    assert e.value.code == "image_too_large"
    assert f"{CAP} pixels for 16-bit, interlaced, palette, GIF or WebP images" in e.value.message


@pytest.mark.parametrize("kind", list(costly_images(2, 2)))
def test_a_costly_image_at_the_cap_or_at_the_models_size_still_decodes(kind):
    for w, h in ((1024, 1024), (28, 28), (32, 32)):
        x = decode_pixels(costly_images(w, h)[kind], GREY28, ImageLimits(max_costly_pixels=CAP))
        assert x.shape == (1, 28, 28)


def test_an_8_bit_image_over_the_costly_cap_is_not_held_to_it():
    a = np.zeros((1100, 1100), dtype=np.uint8)
    for data in (png(Image.fromarray(a)), png(Image.fromarray(np.stack([a] * 3, -1))),
                 png(Image.fromarray(a), format="JPEG")):
        assert decode_pixels(data, GREY28, ImageLimits(max_costly_pixels=CAP)).shape == (1, 28, 28)


def test_without_a_costly_cap_only_max_pixels_applies():
    # stored feedback images are re-decoded with no limit (`ImageLimits(max_pixels=1 << 62)`)
    assert decode_pixels(costly_images(1100, 1000)["16-bit"], GREY28, ImageLimits()).shape == (1, 28, 28)


def bounds_error(text: bytes, max_values: int = 100) -> str | None:
    try:
        JsonBounds(max_values).feed(text)
    except JsonOutOfBounds as e:
        return str(e)
    return None


def test_json_bounds_count_values_and_refuse_long_integers_but_not_digits_inside_base64():
    import base64
    all_digits = base64.b64encode(b"\xd3\x4d\x34" * 200)  # "0000...": base64 of bytes that encode as digits
    assert set(all_digits) == {ord("0")}
    assert bounds_error(b'{"image_base64": "' + all_digits + b'"}') is None
    assert bounds_error(b"[" + b"1," * 99 + b"1]") is None
    assert "more than 100 values" in bounds_error(b"[" + b"1," * 100 + b"1]")
    assert "more than 100 values" in bounds_error(b"[" * 101)
    assert bounds_error(b'{"a": [-' + b"9" * 20 + b"]}") is None
    for long in (b'{"a":' + b"9" * 21 + b"}", b'{"a": -' + b"9" * 21 + b"}", b"[1, " + b"9" * 21 + b"]", b"9" * 21):
        assert "integer of more than 20 digits" in bounds_error(long), long


def test_json_bounds_see_an_integer_across_the_edge_of_two_pieces():
    for offset in range(-25, 3):  # the digits start just before, at and after the edge of the first piece
        text = b"[" + b" " * (JsonBounds.STEP + offset) + b"9" * 30 + b"]"
        assert "integer of more than 20 digits" in bounds_error(text), offset
