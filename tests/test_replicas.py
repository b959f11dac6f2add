"""Issue 11: several server processes share one feedback store and stay identical.

Everything here runs against real `python -m service serve` processes on loopback ports:
replicas on a throwaway PostgreSQL (testkit/postgres.py), and one `--workers 2` process on
the default SQLite store. Each test drives traffic from client threads for a bounded time,
then checks that the processes converge to one memory (`state_hash` at one `applied_seq`),
that a process rebuilt from the log alone holds the same memory, and that every
acknowledged, not-forgotten example is held exactly once.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from testkit.live import ROOT, Server, free_port
from testkit.postgres import Postgres, wait_until

pytestmark = [pytest.mark.server, pytest.mark.postgres]

TOKEN = "replica-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KNOWN = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NEW = ["Hat", "Scarf", "Glove", "Umbrella"]  # label space 20: room for these
LABELS = KNOWN + NEW
MIXED = {"predict": 0.45, "feedback": 0.30, "retry": 0.13, "delete": 0.12}


# --- helpers: images, requests ------------------------------------------------------------------

def random_png(rng: np.random.Generator) -> bytes:
    """A random 28x28 grey PNG (distinct images: never an exact match of another)."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post_feedback(client: httpx.Client, url: str, pngs: list[bytes], label: str, key: str | None = None):
    headers = AUTH | ({"Idempotency-Key": key} if key else {})
    return client.post(url + "/feedback", files=[("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(pngs)],
                       data={"label": label}, headers=headers)


def predict_many(url: str, pngs: list[bytes], chunk: int = 32) -> list[dict]:
    """One prediction per image, in batched requests."""
    out = []
    with httpx.Client(timeout=120) as c:
        for i in range(0, len(pngs), chunk):
            r = c.post(url + "/predict", files=[("file", (f"{j}.png", d, "image/png"))
                                                for j, d in enumerate(pngs[i:i + chunk])])
            assert r.status_code == 200, r.text
            out += r.json()["predictions"]
    return out


def memory(url: str) -> dict:
    r = httpx.get(url + "/memory", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stored_log(url: str) -> dict[int, bool]:
    """Every example in the feedback log (GET /feedback, all pages): id -> forgotten."""
    out, before = {}, None
    with httpx.Client(timeout=60) as c:
        while True:
            r = c.get(url + "/feedback", params={"limit": 500} | ({"before": before} if before else {}),
                      headers=AUTH)
            assert r.status_code == 200, r.text
            body = r.json()
            out |= {it["id"]: it["forgotten"] for it in body["items"]}
            before = body["next_before"]
            if before is None:
                return out


def log_tail(server, n: int = 3000) -> str:
    logs = sorted(Path(server.state_dir).glob("server-*.log"))
    return "".join(p.read_text(errors="replace")[-n:] for p in logs[-2:])


# --- helpers: traffic ------------------------------------------------------------------------------

class Traffic:
    """What the clients saw, shared by their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: Counter = Counter()  # (kind, status) -> count
        self.errors: list[str] = []  # connection errors and timeouts
        self.problems: list[str] = []  # answers that contradict earlier ones
        self.acked: dict[int, tuple[bytes, str]] = {}  # feedback id -> (image, label)
        self.ids: list[int] = []  # the same ids, to draw from
        self.keyed: list[tuple[str, list[bytes], str, list[int], bytes]] = []  # (key, images, label, ids, answer)
        self.forgotten: set[int] = set()
        self.replays = 0
        self.replay_body_differs = 0

    def count(self, kind: str, r: httpx.Response) -> None:
        with self.lock:
            self.status[(kind, r.status_code)] += 1

    def acknowledge(self, ids: list[int], pngs: list[bytes], label: str, key: str | None, body: bytes) -> None:
        with self.lock:
            for i, png in zip(ids, pngs):
                if i in self.acked:
                    self.problems.append(f"feedback id {i} acknowledged for two requests")
                self.acked[i] = (png, label)
                self.ids.append(i)
            if key is not None:
                self.keyed.append((key, pngs, label, ids, body))

    def fivexx(self) -> dict:
        return {k: n for k, n in self.status.items() if k[1] >= 500}

    def held(self) -> list[int]:
        return sorted(set(self.acked) - self.forgotten)


def client_loop(urls: list[str], traffic: Traffic, seed: int, deadline: float, mix: dict[str, float],
                max_requests: int = 500, stop: threading.Event | None = None, stop_on_error: bool = False,
                pause: float = 0.0) -> None:
    """Bounded mixed traffic against random `urls`: predictions (of fresh and of taught images),
    feedback (1-3 images, new and known classes, most with an Idempotency-Key), retries of
    acknowledged keyed requests (same key, same body, any replica: must answer the same ids
    and write nothing), and deletions of acknowledged ids. `pause`: seconds between one
    client's requests (a steady stream rather than as fast as the server answers)."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    kinds, weights = list(mix), list(mix.values())
    # idle connections dropped before the server closes them (serve's keep-alive: 5 s, as
    # httpx's default expiry): else a request sent as the server closes one is reset
    with httpx.Client(timeout=60, limits=httpx.Limits(keepalive_expiry=2.0)) as c:
        for n in range(max_requests):
            if n and pause:
                time.sleep(pause)
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return
            url, kind = rng.choice(urls), rng.choices(kinds, weights)[0]
            with traffic.lock:
                if kind == "retry" and not traffic.keyed or kind == "delete" and not traffic.ids:
                    kind = "feedback"
                retry = rng.choice(traffic.keyed) if kind == "retry" else None
                target = rng.choice(traffic.ids) if kind == "delete" else None
                taught = traffic.acked[rng.choice(traffic.ids)][0] if traffic.ids and rng.random() < 0.5 else None
            try:
                if kind == "predict":
                    r = c.post(url + "/predict",
                               files={"file": ("x.png", taught or random_png(nrng), "image/png")})
                    traffic.count(kind, r)
                elif kind == "feedback":
                    pngs = [random_png(nrng) for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3))]
                    label = rng.choice(LABELS)
                    key = uuid.uuid4().hex if rng.random() < 0.6 else None
                    r = post_feedback(c, url, pngs, label, key)
                    traffic.count(kind, r)
                    if r.status_code == 200:
                        ids = [it["feedback_id"] for it in r.json()["items"]]
                        if len(set(ids)) != len(pngs):
                            with traffic.lock:
                                traffic.problems.append(f"{len(pngs)} images answered ids {ids}")
                        traffic.acknowledge(ids, pngs, label, key, r.content)
                elif kind == "retry":
                    key, pngs, label, ids, body = retry
                    r = post_feedback(c, url, pngs, label, key)
                    traffic.count(kind, r)
                    if r.status_code == 200:
                        got = [it["feedback_id"] for it in r.json()["items"]]
                        with traffic.lock:
                            traffic.replays += 1
                            if got != ids:
                                traffic.problems.append(f"retry of key {key} answered ids {got}, first {ids}")
                            if r.headers.get("idempotent-replayed") == "true" and r.content != body:
                                traffic.replay_body_differs += 1
                else:  # delete
                    r = c.delete(f"{url}/feedback/{target}", headers=AUTH)
                    traffic.count(kind, r)
                    if r.status_code == 200:
                        with traffic.lock:
                            traffic.forgotten.add(target)
            except httpx.HTTPError as e:
                with traffic.lock:
                    traffic.errors.append(f"{kind} {url}: {e!r}")
                if stop_on_error:
                    return


def run_clients(n: int, urls: list[str], traffic: Traffic, seconds: float, mix: dict[str, float],
                seed: int = 0) -> None:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(urls, traffic, seed * 1000 + i, deadline, mix))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 180)
    assert not any(t.is_alive() for t in threads), "a client thread hung"


def assert_clean(traffic: Traffic, kinds: tuple[str, ...]) -> None:
    """No 5xx, no connection error, nothing but 200, no contradicting answers, every kind ran."""
    assert not traffic.fivexx(), traffic.status
    assert not traffic.errors, traffic.errors[:5]
    assert not traffic.problems, traffic.problems[:5]
    assert {code for _, code in traffic.status} == {200}, traffic.status
    for kind in kinds:
        assert sum(n for (k, _), n in traffic.status.items() if k == kind) > 0, (kind, traffic.status)


# --- helpers: convergence and what the memory holds ------------------------------------------------

def wait_converged(urls: list[str], timeout: float = 90) -> list[dict]:
    """Poll /memory until every process has applied the same (the highest) sequence."""
    deadline = time.monotonic() + timeout
    while True:
        mems = [memory(u) for u in urls]
        seqs = [m["applied_seq"] for m in mems]
        if len(set(seqs)) == 1:
            return mems
        if time.monotonic() > deadline:
            pytest.fail(f"not converged within {timeout} s: applied_seq {seqs}")
        time.sleep(0.1)


def assert_same_state(mems: list[dict]) -> None:
    hashes = {m["state_hash"] for m in mems}
    assert len(hashes) == 1, [(m["applied_seq"], m["state_hash"][:12], m["feedback_items"]) for m in mems]
    assert len({json.dumps(m["per_class"], sort_keys=True) for m in mems}) == 1
    assert len({tuple(m["classes"]) for m in mems}) == 1


def assert_held_exactly_once(urls: list[str], mems: list[dict], traffic: Traffic, sample: int = 40,
                             seed: int = 0) -> None:
    """The log holds exactly the acknowledged examples (retries wrote nothing) with the
    forgotten ones marked; each memory holds every acknowledged, not-forgotten example once;
    taught images answer from memory with their id and label; forgotten ones never do."""
    log = stored_log(urls[0])
    assert set(log) == set(traffic.acked), (sorted(set(log) - set(traffic.acked))[:10],
                                            sorted(set(traffic.acked) - set(log))[:10])
    assert {i for i, f in log.items() if f} == traffic.forgotten
    held = traffic.held()
    assert max(m["applied_seq"] for m in mems) >= max(traffic.acked)
    for m in mems:
        assert m["feedback_items"] == len(held), (m["feedback_items"], len(held))
    rng = random.Random(seed)
    picks = rng.sample(held, min(sample, len(held)))
    gone = rng.sample(sorted(traffic.forgotten), min(sample, len(traffic.forgotten)))
    for k, url in enumerate(urls):
        mine = picks[k::len(urls)] if len(picks) >= len(urls) else picks
        for fid, p in zip(mine, predict_many(url, [traffic.acked[i][0] for i in mine])):
            assert p["path"] == "memory" and p["nearest"] and p["nearest"]["feedback_id"] == fid \
                and p["label"] == traffic.acked[fid][1], (url, fid, traffic.acked[fid][1], p)
        for fid, p in zip(gone, predict_many(url, [traffic.acked[i][0] for i in gone])):
            assert p["nearest"] is None or p["nearest"]["feedback_id"] != fid, (url, fid, p)


# --- fixtures --------------------------------------------------------------------------------------

def _intact(d: Path) -> bool:
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        return all(hashlib.sha256((d / f).read_bytes()).hexdigest() == h for f, h in manifest["artifacts"].items())
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A private copy of model_store/fashion-mnist: a training run may rewrite the shared store
    meanwhile, and a replica started after that would load another model version."""
    for _ in range(10):
        dest = tmp_path_factory.mktemp("model_store")
        try:
            shutil.copytree(ROOT / "model_store" / "fashion-mnist", dest / "fashion-mnist")
        except (OSError, shutil.Error):
            pass
        if _intact(dest / "fashion-mnist"):
            return dest
        time.sleep(1)
    pytest.fail("could not copy an intact model_store/fashion-mnist")


@pytest.fixture
def servers(model_store):
    """make(state_dir, **env) -> a Server (not started) on the private model store; all killed
    at the end."""
    made = []

    def make(state_dir: Path, **env) -> Server:
        s = Server(state_dir, TOKEN, MODEL_STORE=str(model_store), SNAPSHOT_INTERVAL="0", **env)
        made.append(s)
        return s
    yield make
    for s in made:
        if s.alive():
            s.kill(signal.SIGKILL)


def start_all(servers: list[Server]) -> None:
    """Start together, as replicas do (their schema set-up races on the same database)."""
    with ThreadPoolExecutor(len(servers)) as ex:
        list(ex.map(lambda s: s.start(), servers))


def _postgres():
    folder = tempfile.mkdtemp(prefix="test-replicas-pg-")  # not under pytest's 0700 folder: postgres reads it
    try:
        with Postgres(folder) as pg:
            yield pg
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    """One PostgreSQL cluster for the module; each test takes a database of its own."""
    yield from _postgres()


@pytest.fixture
def own_pg():
    """A PostgreSQL cluster for one test (it stops and restarts it)."""
    yield from _postgres()


def database(pg: Postgres, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + "/" + name


class Workers:
    """`python -m service serve --workers N`: N processes behind one port (testkit.live.Server
    starts one). Its own session, so that stop() ends the whole process group."""

    def __init__(self, state_dir: Path, model_store: Path, workers: int = 2, **env):
        self.state_dir, self.workers = Path(state_dir), workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"API_TOKEN": TOKEN, "STATE_DIR": str(self.state_dir), "MODEL_STORE": str(model_store),
                    "MODEL_NAME": "fashion-mnist", "PYTHONPATH": str(ROOT), "SNAPSHOT_INTERVAL": "0"} | env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "Workers":
        env = {k: v for k, v in os.environ.items() if k not in ("FEEDBACK_DB", "WEB_CONCURRENCY")} | self.env
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / f"server-{time.time_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(self.port),
                                      "--log-level", "warning", "--workers", str(self.workers)],
                                     env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, pids = time.monotonic() + timeout, set()
        while time.monotonic() < deadline:  # ready once every worker has answered
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            pids |= {m["pid"] for m in self.memories()}
            if len(pids) >= self.workers:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"workers not ready (answered: {pids})")

    def memories(self, n: int = 8) -> list[dict]:
        """/memory from n concurrent requests, each on its own connection, so that several
        workers answer; answers other than 200 are left out."""
        def one(_):
            try:
                r = httpx.get(self.url + "/memory", timeout=30)
                return r.json() if r.status_code == 200 else None
            except httpx.HTTPError:
                return None
        with ThreadPoolExecutor(n) as ex:
            return [m for m in ex.map(one, range(n)) if m]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)


# --- the tests ---------------------------------------------------------------------------------------

def test_three_replicas_on_postgresql_converge_under_mixed_traffic(servers, pg, tmp_path):
    url = database(pg, "mixed")
    replicas = [servers(tmp_path / f"r{i}", FEEDBACK_DB=url) for i in range(3)]
    start_all(replicas)
    urls = [r.url for r in replicas]
    traffic = Traffic()
    run_clients(32, urls, traffic, seconds=6, mix=MIXED, seed=1)
    assert_clean(traffic, tuple(MIXED))
    assert traffic.replays > 0 and traffic.forgotten and len(traffic.acked) > 20, traffic.status
    assert traffic.replay_body_differs == 0  # a retry gets the first answer byte for byte
    assert all(r.alive() for r in replicas)

    mems = wait_converged(urls)
    assert_same_state(mems)
    # a fourth process on the same log and an empty STATE_DIR: the memory from the log alone
    fresh = servers(tmp_path / "fresh", FEEDBACK_DB=url).start()
    assert not list((tmp_path / "fresh").rglob("snapshot-*.json"))
    mems = wait_converged(urls + [fresh.url])
    assert_same_state(mems)
    assert_held_exactly_once(urls + [fresh.url], mems, traffic)
    assert set(mems[0]["classes"][10:]) <= set(NEW)
    print(json.dumps({"status": {f"{k} {c}": n for (k, c), n in sorted(traffic.status.items())},
                      "acked": len(traffic.acked), "forgotten": len(traffic.forgotten), "replays": traffic.replays,
                      "replay_body_differs": traffic.replay_body_differs, "applied_seq": mems[0]["applied_seq"]}))


def test_two_workers_on_sqlite_converge(model_store, tmp_path):
    w = Workers(tmp_path / "state", model_store, workers=2)
    try:
        w.start()
        traffic = Traffic()
        run_clients(16, [w.url], traffic, seconds=5, mix=MIXED, seed=2)
        assert_clean(traffic, ("predict", "feedback"))
        assert w.proc.poll() is None

        latest: dict[int, dict] = {}
        deadline = time.monotonic() + 90
        while True:
            for m in w.memories():
                latest[m["pid"]] = m
            seqs = {m["applied_seq"] for m in latest.values()}
            if len(latest) == 2 and len(seqs) == 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not converge: {[(p, m['applied_seq']) for p, m in latest.items()]}")
            time.sleep(0.1)
        mems = list(latest.values())
        assert w.proc.pid not in latest  # the answers came from the two workers
        assert all(m["feedback_store"].endswith(str(tmp_path / "state" / "feedback.db")) for m in mems)
        assert_same_state(mems)
        # one scrape, whichever worker answers it, counts both workers' requests
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(w.url + "/metrics").text)}
        counted = sum(s.value for s in fams["http_requests"].samples
                      if s.name == "http_requests_total" and s.labels["endpoint"] == "/predict")
        assert counted == sum(n for (kind, _), n in traffic.status.items() if kind == "predict")
        assert {s.labels["pid"] for s in fams["memory_size"].samples} == {str(m["pid"]) for m in mems}
        assert_held_exactly_once([w.url], mems, traffic, sample=30)
    finally:
        w.stop()


def test_a_replica_killed_mid_stream_catches_up_after_restart(servers, pg, tmp_path):
    url = database(pg, "killed")
    a, b = servers(tmp_path / "a", FEEDBACK_DB=url), servers(tmp_path / "b", FEEDBACK_DB=url)
    start_all([a, b])
    to_a, to_b = Traffic(), Traffic()
    stop_a, stop_b = threading.Event(), threading.Event()
    deadline = time.monotonic() + 120
    # A's streams are steady (a request every 0.2 s a client), not as fast as A answers: the log
    # moves while B is down and while B2 starts all the same, and how much it moves meanwhile
    # (all of which B2 replays and the test reads back) does not grow with how slow the machine
    # is. B's go as fast as B answers, so that the kill most likely lands mid-request.
    streams = [threading.Thread(target=client_loop, args=([a.url], to_a, 300 + i, deadline, {"feedback": 1}, 2000,
                                                          stop_a, False, 0.2)) for i in range(2)]
    streams += [threading.Thread(target=client_loop, args=([b.url], to_b, 400 + i, deadline, {"feedback": 1}, 2000,
                                                           stop_b, True)) for i in range(2)]
    for t in streams:
        t.start()
    try:
        assert wait_until(lambda: len(to_b.acked) >= 8, 60)
        r = httpx.post(b.url + "/memory/snapshot", headers=AUTH, timeout=60)  # B restarts from it, then the log
        assert r.status_code == 200, r.text
        assert wait_until(lambda: len(to_b.acked) >= 20, 60)
        time.sleep(random.Random(3).uniform(0, 0.05))  # a random moment, likely mid-request
        b.kill(signal.SIGKILL)
        stop_b.set()
        n = len(to_a.acked)
        assert wait_until(lambda: len(to_a.acked) >= n + 10, 60)  # A goes on alone
        b2 = servers(b.state_dir, FEEDBACK_DB=url).start()  # while A keeps taking feedback
        n = len(to_a.acked)
        assert wait_until(lambda: len(to_a.acked) >= n + 5, 60)
    finally:
        stop_a.set()
        stop_b.set()
        for t in streams:
            t.join(120)
    assert not any(t.is_alive() for t in streams)
    assert list(b.state_dir.rglob("snapshot-*.json"))
    assert_clean(to_a, ("feedback",))
    assert not to_b.fivexx() and not to_b.problems and len(to_b.errors) <= 2, (to_b.status, to_b.errors)

    mems = wait_converged([a.url, b2.url])
    assert_same_state(mems)
    acked = to_a.acked | to_b.acked
    assert len(acked) == len(to_a.acked) + len(to_b.acked)
    log = stored_log(a.url)
    assert set(acked) <= set(log) and not any(log.values())
    unanswered = sorted(set(log) - set(acked))  # committed as B died, never answered: <= 3 images a request
    assert len(unanswered) <= 3 * len(to_b.errors), (unanswered, to_b.errors)
    for m in mems:
        assert m["feedback_items"] == len(log)
    ids = sorted(acked)
    for server in (b2, a):
        for fid, p in zip(ids, predict_many(server.url, [acked[i][0] for i in ids])):
            assert p["path"] == "memory" and p["nearest"]["feedback_id"] == fid and p["label"] == acked[fid][1], \
                (server.url, fid, acked[fid][1], p)


def test_postgresql_outage_refuses_feedback_with_503_and_keeps_predicting(servers, own_pg, tmp_path):
    s = servers(tmp_path / "a", FEEDBACK_DB=own_pg.url).start()
    rng = np.random.default_rng(4)
    acked: dict[int, tuple[bytes, str]] = {}

    def teach(c, label):
        png = random_png(rng)
        r = post_feedback(c, s.url, [png], label)
        if r.status_code == 200:
            acked[r.json()["items"][0]["feedback_id"]] = (png, label)
        return r

    def unavailable(r):
        return r.status_code == 503 and r.json().get("error") == "feedback_store_unavailable"

    with httpx.Client(timeout=60) as c:
        for i in range(6):
            r = teach(c, LABELS[i * 2])
            assert r.status_code == 200, r.text
        before = dict(acked)
        own_pg.stop()
        try:
            for i in range(2):  # each refusal waits out the store's connection timeout (5 s)
                r = teach(c, LABELS[i])
                assert unavailable(r), (r.status_code, r.text)
                r = c.post(s.url + "/predict", files={"file": ("x.png", random_png(rng), "image/png")})
                assert r.status_code == 200, r.text
            fid, (png, label) = next(iter(before.items()))
            r = c.post(s.url + "/predict", files={"file": ("x.png", png, "image/png")})
            assert r.status_code == 200 and r.json()["predictions"][0]["nearest"]["feedback_id"] == fid, r.text
            r = c.delete(f"{s.url}/feedback/{fid}", headers=AUTH)
            assert unavailable(r), (r.status_code, r.text)
            assert memory(s.url)["applied_seq"] == max(before)
        finally:
            own_pg.start()
        assert acked == before  # nothing acknowledged during the outage
        answers = []
        assert wait_until(lambda: answers.append(teach(c, "Hat")) or answers[-1].status_code == 200, 60, 0.2), \
            (answers[-1].status_code, answers[-1].text)
        assert all(unavailable(r) for r in answers[:-1])
        for i in range(5):
            r = teach(c, LABELS[i * 3 % len(LABELS)])
            assert r.status_code == 200, r.text
    assert len(acked) == len(before) + 6

    ids = sorted(acked)
    for fid, p in zip(ids, predict_many(s.url, [acked[i][0] for i in ids])):
        assert p["path"] == "memory" and p["nearest"]["feedback_id"] == fid and p["label"] == acked[fid][1], \
            (fid, acked[fid][1], p)
    log = stored_log(s.url)  # the refused requests wrote nothing
    assert log == {i: False for i in ids}, (f"in the log, never acknowledged: {sorted(set(log) - set(ids))}; "
                                            f"answers after the restart: {[(r.status_code, r.text[:150]) for r in answers]}")
    fresh = servers(tmp_path / "fresh", FEEDBACK_DB=own_pg.url).start()
    mems = wait_converged([s.url, fresh.url])
    assert_same_state(mems)
    assert all(m["feedback_items"] == len(acked) for m in mems)
    assert mems[0]["applied_seq"] == max(ids)


def test_a_10_s_postgresql_outage_under_load_loses_no_acknowledged_feedback_and_applies_none_twice(
        servers, own_pg, tmp_path):
    """Clients keep teaching through a 10 s outage and retry what failed: keyed requests with
    their key until answered; unkeyed ones only when the answer said nothing was written.
    Afterwards every acknowledged example is in the log and held, and no image is in the
    log twice."""
    s = servers(tmp_path / "a", FEEDBACK_DB=own_pg.url).start()
    lock, acked, unknown = threading.Lock(), {}, []
    status: Counter = Counter()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                png, label = random_png(nrng), rng.choice(LABELS)
                key = uuid.uuid4().hex if rng.random() < 0.5 else None
                for attempt in range(200):
                    try:
                        r = post_feedback(c, s.url, [png], label, key)
                    except httpx.HTTPError:
                        r = None
                    with lock:
                        status[r.status_code if r is not None else "error"] += 1
                    if r is not None and r.status_code == 200:
                        with lock:
                            acked[r.json()["items"][0]["feedback_id"]] = (png, label)
                        break
                    nothing_written = r is not None and r.status_code == 503 and \
                        r.json()["error"] == "feedback_store_unavailable"
                    if key is None and not nothing_written:  # the outcome is unknown: not safe to resend
                        with lock:
                            unknown.append(png)
                        break
                    time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(500 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: status[200] >= 24, 60), status  # taught before the outage
        own_pg.stop()
        time.sleep(10)
        own_pg.start()
        n = len(acked)
        assert wait_until(lambda: len(acked) >= n + len(threads), 60), status  # taught again after it
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert status[503] > 0 and status[200] > 20, status
    import psycopg

    with psycopg.connect(own_pg.url) as conn:
        rows = conn.execute("SELECT l.seq, i.sha256 FROM log l JOIN images i ON i.seq = l.seq "
                            "WHERE l.kind = 'example'").fetchall()
    shas = Counter(sha for _, sha in rows)
    assert max(shas.values()) == 1, [sha for sha, n in shas.items() if n > 1]  # nothing applied twice
    in_log = {seq for seq, _ in rows}
    assert set(acked) <= in_log, sorted(set(acked) - in_log)
    unacked = in_log - set(acked)  # committed, never acknowledged: only outcome-unknown requests
    assert len(unacked) <= len(unknown), (len(unacked), len(unknown), status)
    mems = wait_converged([s.url])
    assert mems[0]["feedback_items"] == len(in_log)
    ids = sorted(acked)
    for fid, p in zip(ids, predict_many(s.url, [acked[i][0] for i in ids])):
        assert p["path"] == "memory" and p["nearest"]["feedback_id"] == fid, (fid, p)
    print(json.dumps({"status": {str(k): n for k, n in status.items()}, "acked": len(acked),
                      "unknown": len(unknown), "committed_unacked": len(unacked)}))


def test_two_replicas_of_two_workers_stay_within_30_postgresql_connections_under_32_clients(model_store, tmp_path):
    folder = tempfile.mkdtemp(prefix="test-replicas-pg30-")
    try:
        with Postgres(folder, settings={"max_connections": "30"}) as pg:
            url = database(pg, "bounded")
            replicas = [Workers(tmp_path / f"r{i}", model_store, workers=2, FEEDBACK_DB=url) for i in range(2)]
            try:
                with ThreadPoolExecutor(2) as ex:
                    list(ex.map(lambda w: w.start(), replicas))
                traffic = Traffic()
                peak = {"n": 0}
                done = threading.Event()

                def watch():
                    import psycopg
                    with psycopg.connect(pg.url, autocommit=True) as conn:
                        while not done.is_set():
                            n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'bounded'")
                            peak["n"] = max(peak["n"], n.fetchone()[0])
                            time.sleep(0.1)
                watcher = threading.Thread(target=watch)
                watcher.start()
                try:
                    run_clients(32, [w.url for w in replicas], traffic, seconds=6, mix=MIXED, seed=7)
                finally:
                    done.set()
                    watcher.join(10)
                assert_clean(traffic, tuple(MIXED))
                assert peak["n"] <= 2 * 2 * (4 + 1), peak  # replicas x workers x (pool + listener)
                print(json.dumps({"status": {f"{k} {c}": n for (k, c), n in sorted(traffic.status.items())},
                                  "peak_connections": peak["n"]}))
            finally:
                for w in replicas:
                    w.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_bursts_of_keep_alive_connections(model_store, tmp_path):
    # each process listens on its own SO_REUSEPORT socket: the kernel hands every new
    # connection to one of them, so a burst is not taken whole by the first to wake.
    # Three bursts of 32 connections, opened back to back before any is answered; the
    # hash spreads them like coin flips (more than 2/3 of 96 on one: p < 0.001)
    w = Workers(tmp_path / "state", model_store, workers=2).start()
    try:
        holders = Counter()
        for _ in range(3):
            conns = [http.client.HTTPConnection("127.0.0.1", w.port, timeout=30) for _ in range(32)]
            for c in conns:
                c.connect()

            def ask(c: http.client.HTTPConnection) -> int:
                c.request("GET", "/memory")
                r = c.getresponse()
                assert r.getheader("connection") != "close"  # nothing moves connections around
                return json.loads(r.read())["pid"]
            try:
                with ThreadPoolExecutor(len(conns)) as pool:
                    holders.update(pool.map(ask, conns))
            finally:
                for c in conns:
                    c.close()
        assert len(holders) == 2 and max(holders.values()) <= 64, holders
    finally:
        w.stop()


def test_a_worker_that_dies_is_replaced_and_the_port_keeps_answering(model_store, tmp_path):
    w = Workers(tmp_path / "state", model_store, workers=2).start()
    try:
        first = {m["pid"] for m in w.memories()}
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline, pids = time.monotonic() + 120, set()
        while time.monotonic() < deadline and not (len(pids - {victim}) == 2):
            pids = {m["pid"] for m in w.memories()}  # only ready processes listen: all answer 200
            time.sleep(0.2)
        assert victim not in pids and len(pids) == 2, pids
    finally:
        w.stop()
