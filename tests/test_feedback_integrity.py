"""Issue 20: feedback that cannot be lost, duplicated, half-written or kept after a forget.

- Idempotency-Key bound to the request it was first used with: another request with it is
  refused (422), the same request again gets the first answer byte for byte and is counted
  once, a concurrent duplicate waits for the first answer.
- Writes with a deadline and a truthful answer: a write the store never started is cancelled
  (503, nothing written); a commit whose connection dies after committing is looked up
  before the answer (200); one that did not commit answers 503 and wrote nothing.
- Forgetting erases: no byte of the image, its sha256 or its feature vector in the SQLite
  files (main, WAL) or in any snapshot once the forget is applied; PostgreSQL's data
  directory likewise (tests/test_replicas.py has the cluster-level checks).
- A supervised log tail: a failing tail makes /readyz answer 503 with the reason within a
  second and it recovers by itself.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from testkit.postgres import Postgres
from service.serving.feedback_store import StoreUnavailable, Upload
from service.serving.runtime import ModelRuntime
from tests.helpers import save_tiny_model
from tests.test_app import AUTH, make_client  # noqa: F401 (a fixture)
from tests.test_runtime import make_runtime  # noqa: F401 (a fixture)



def noise_png(seed: int, size: int = 64) -> bytes:
    """A PNG of random pixels: its bytes are incompressible, so a window of them found in a
    file can only be the image itself."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def tensor_of(png: bytes) -> torch.Tensor:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((28, 28)), dtype=np.float32)
    return ((torch.from_numpy(a) / 255 - 0.5) / 0.5).view(1, 1, 28, 28)


def windows(data: bytes, width: int = 32, step: int = 97) -> list[bytes]:
    return [data[i:i + width] for i in range(0, len(data) - width, step)]


def files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    """Files under `folder` that contain any of the needles (read raw)."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            try:
                data = p.read_bytes()
            except OSError:  # a file the server removed meanwhile
                continue
            if any(n in data for n in needles):
                found.append(str(p.relative_to(folder)))
    return found


def feedback(client, pngs: list[bytes], label: str, key: str | None = None):
    headers = AUTH | ({"Idempotency-Key": key} if key else {})
    return client.post("/feedback", files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)],
                       data={"label": label}, headers=headers)


def feedback_counted(client) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return sum(s.value for s in fams["feedback"].samples if s.name == "feedback_total")


def log_rows(client) -> list[dict]:
    return client.get("/feedback", params={"limit": 500}, headers=AUTH).json()["items"]


# --- idempotency -------------------------------------------------------------------------------

def test_a_key_reused_for_another_request_is_refused_with_422_and_writes_nothing(make_client):
    c = make_client()
    first = feedback(c, [noise_png(1)], "Hat", key="k-1")
    assert first.status_code == 200, first.text
    for pngs, label in (([noise_png(1)], "Scarf"), ([noise_png(1), noise_png(2)], "Hat"), ([noise_png(3)], "Hat")):
        r = feedback(c, pngs, label, key="k-1")
        assert r.status_code == 422 and r.json()["error"] == "idempotency_key_reused", r.text
    assert [it["id"] for it in log_rows(c)] == [first.json()["items"][0]["feedback_id"]]


def test_a_retried_request_gets_the_first_answer_byte_for_byte_and_is_counted_once(make_client):
    c = make_client()
    first = feedback(c, [noise_png(1), noise_png(2)], "Hat", key="k-2")
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    counted = feedback_counted(c)
    again = feedback(c, [noise_png(1), noise_png(2)], "Hat", key="k-2")
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert feedback_counted(c) == counted == 2
    assert len(log_rows(c)) == 2


def test_concurrent_duplicates_of_a_keyed_request_write_once_and_answer_alike(make_client):
    c = make_client()
    pngs = [noise_png(5)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: feedback(c, pngs, "Hat", key="k-3"), range(6)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len({r.content for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 5
    assert feedback_counted(c) == 1 and len(log_rows(c)) == 1


def test_a_key_past_its_retention_is_free_for_a_new_request(make_client):
    c = make_client(idempotency_retention=0.5)
    a = feedback(c, [noise_png(1)], "Hat", key="k-4")
    time.sleep(0.6)
    b = feedback(c, [noise_png(2)], "Scarf", key="k-4")
    assert a.status_code == b.status_code == 200 and "idempotent-replayed" not in b.headers
    assert len(log_rows(c)) == 2


# --- writes: deadline and truthful answers --------------------------------------------------------

@pytest.fixture
def runtime(make_runtime):  # tests/test_runtime.py's: a tiny model, its store under tmp_path
    return make_runtime


def teach(rt, png: bytes, label: str = "Hat", key: str | None = None):
    return rt.submit_feedback(rt.embed(tensor_of(png)), label, [Upload(png, "image/png")], key)


def test_a_write_the_store_never_started_is_cancelled_and_never_lands(runtime):
    rt = runtime(store_options={"write_timeout": 0.3})
    release = threading.Event()
    real = rt.store._commit_batch

    def stuck(batch):  # the writer is held by an earlier write that takes long
        release.wait(10)
        real(batch)
    rt.store._commit_batch = stuck
    first = {}
    blocker = threading.Thread(target=lambda: first.setdefault("result", teach(rt, noise_png(1))))
    blocker.start()
    time.sleep(0.1)
    with pytest.raises(StoreUnavailable, match="did not take the write"):
        teach(rt, noise_png(2))  # queued behind it: cancelled at its deadline
    release.set()
    blocker.join(10)
    # the started write landed and was acknowledged; the cancelled one never lands
    assert [o.feedback_id for o in first["result"].outcomes] == [1]
    time.sleep(0.3)
    assert rt.store.last_seq() == 1


class CommitThenLoseConnection:
    """A connection whose commit reaches the database and then reports a lost connection."""

    def __init__(self, conn):
        self.inner = conn

    def cursor(self):
        return self.inner.cursor()

    def commit(self):
        self.inner.commit()
        raise sqlite3.OperationalError("connection lost after the commit was sent")

    def rollback(self):
        self.inner.rollback()

    def close(self):
        pass


def test_a_commit_whose_connection_dies_after_committing_is_acknowledged(runtime):
    rt = runtime()
    teach(rt, noise_png(1))
    real = rt.store.connection
    armed = {"left": 1}

    @contextmanager
    def connection():
        with real() as conn:
            if armed["left"] and threading.current_thread().name == "feedback-writer":
                armed["left"] -= 1
                conn = CommitThenLoseConnection(conn)
            yield conn
    rt.store.connection = connection
    r = teach(rt, noise_png(2))  # committed: the answer says so, with its id (looked up by request id)
    assert armed["left"] == 0
    assert [o.feedback_id for o in r.outcomes] == [2] and r.outcomes[0].action == "added"
    assert rt.store.last_seq() == 2


def test_a_commit_that_failed_before_committing_answers_unavailable_and_wrote_nothing(runtime, monkeypatch):
    rt = runtime()
    teach(rt, noise_png(1))

    def failing(cur, *a, **k):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(rt.store, "_do_append", failing)
    with pytest.raises(StoreUnavailable):
        teach(rt, noise_png(2))
    monkeypatch.undo()
    assert rt.store.last_seq() == 1


# --- forgetting erases ------------------------------------------------------------------------------

def test_forget_erases_the_image_its_hash_and_vector_from_the_sqlite_files_and_snapshots(runtime, tmp_path):
    rt = runtime()
    png = noise_png(7, size=96)
    vector = rt.embed(tensor_of(png))[0]
    r = teach(rt, png)
    for i in range(3):
        teach(rt, noise_png(100 + i), "Scarf")
    fid = r.outcomes[0].feedback_id
    sha = hashlib.sha256(png).hexdigest().encode()
    key_bytes = (vector / np.linalg.norm(vector)).astype("<f4").tobytes()
    needles = windows(png) + [sha, vector.astype("<f4").tobytes()[:64], key_bytes[:64]]
    rt.snapshot()
    var = tmp_path / "var"
    assert files_holding(var, needles), "the test must see the image before the forget"
    assert rt.forget(fid)
    # other processes keep reading the file; the erase still happened
    assert files_holding(var, needles) == []
    assert rt.store.image(fid) == (None, None, True) or rt.store.image(fid)[0] is None
    rt.snapshot()
    assert files_holding(var, needles) == []


def test_forget_makes_the_memory_what_it_would_be_had_the_example_never_been_taught(runtime, tmp_path):
    rt = runtime(protect_feedback=False)
    for i in range(10):  # past the free slots: examples replace training items
        teach(rt, noise_png(200 + i), ["Hat", "Scarf"][i % 2])
    rt.forget(3)
    rt.forget(7)
    live = rt.state_hash()
    # the same log with those two never sent
    other = tmp_path / "other"
    save_tiny_model(other / "store")
    never = ModelRuntime(other / "store", "tiny", other / "var", protect_feedback=False)
    try:
        for i in range(10):
            if i + 1 not in (3, 7):
                teach(never, noise_png(200 + i), ["Hat", "Scarf"][i % 2])
        memory = rt.memory.state_dict()
        for k, v in never.memory.state_dict().items():
            assert torch.equal(memory[k], v), k
    finally:
        never.close()
    rt.close()
    restarted = runtime(protect_feedback=False)
    assert restarted.state_hash() == live


def test_a_snapshot_written_while_its_example_is_forgotten_is_removed(runtime, monkeypatch):
    from service.serving import snapshots

    rt = runtime()
    teach(rt, noise_png(1))
    paused, resume = threading.Event(), threading.Event()
    real_write = snapshots.write_streaming

    def slow_write(path, layout, pieces, *a, **kw):
        def held():
            for i, piece in enumerate(pieces):
                if i == 1:
                    paused.set()
                    resume.wait(30)
                yield piece
        return real_write(path, layout, held(), *a, **kw)
    monkeypatch.setattr(snapshots, "write_streaming", slow_write)
    result = {}
    writer = threading.Thread(target=lambda: result.setdefault("sidecar", rt.snapshot()))
    writer.start()
    assert paused.wait(30)
    rt.forget(1)
    resume.set()
    writer.join(30)
    assert result["sidecar"] is None and rt.snapshots.sidecars() == []


@pytest.mark.postgres
def test_forget_erases_the_image_from_the_postgresql_data_directory(tmp_path):
    folder = tempfile.mkdtemp(prefix="test-erase-pg-")  # postgres must read it: not under pytest's 0700 folder
    try:
        pg = Postgres(folder, settings={"wal_recycle": "off"})
        with pg:
            save_tiny_model(tmp_path / "store")
            rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", feedback_db=pg.url)
            try:
                png = noise_png(9, size=96)
                vector = rt.embed(tensor_of(png))[0].astype("<f4").tobytes()
                fid = teach(rt, png).outcomes[0].feedback_id
                for i in range(3):
                    teach(rt, noise_png(300 + i), "Scarf")
                needles = windows(png) + [hashlib.sha256(png).hexdigest().encode(), vector[:64]]
                assert files_holding(pg.data, needles), "the test must see the image before the forget"
                assert rt.forget(fid)
                found = files_holding(pg.data, needles)
                assert found == [], found
                for i in range(3):  # the others are untouched
                    assert rt.store.image(2 + i)[0] == noise_png(300 + i)
            finally:
                rt.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the log tail is supervised --------------------------------------------------------------------

def test_a_failing_log_tail_makes_the_replica_unready_within_a_second_and_it_recovers(make_client):
    c = make_client()
    rt = c.app.state.service.runtime
    assert c.get("/readyz").status_code == 200
    real, failures = rt.replica.sync, {"left": 3}

    def broken(*a, **k):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("injected tail failure")
        return real(*a, **k)
    rt.replica.sync = broken
    t0 = time.monotonic()
    while c.get("/readyz").status_code == 200:
        assert time.monotonic() - t0 < 1.0, "still ready a second after the tail failed"
        time.sleep(0.02)
    r = c.get("/readyz")
    assert r.status_code == 503 and "injected tail failure" in r.json()["detail"], r.text
    assert c.get("/v2/health/ready").status_code == 400  # the inference protocol's readiness says the same
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert fams["feedback_tail_failures"].samples[0].value >= 1
    deadline = time.monotonic() + 10
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the tail did not recover"
        time.sleep(0.05)
    assert failures["left"] == 0
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert fams["feedback_tail_healthy"].samples[0].value == 1


def test_a_store_written_before_images_had_their_own_table_keeps_every_image(tmp_path):
    from service.serving.sqlite_store import SqliteStore

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE log (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, request_id TEXT NOT NULL,
            position INTEGER NOT NULL, label TEXT, image BLOB, image_sha256 TEXT, content_type TEXT,
            target BIGINT, created DOUBLE PRECISION NOT NULL, forgotten DOUBLE PRECISION);
        CREATE TABLE requests (request_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, response TEXT,
            created DOUBLE PRECISION NOT NULL);""")
    png = noise_png(11)
    db.execute("INSERT INTO log VALUES (1, 'example', 'r1', 0, 'Hat', ?, ?, 'image/png', NULL, 1.0, NULL)",
               (png, hashlib.sha256(png).hexdigest()))
    db.execute("INSERT INTO log VALUES (2, 'example', 'r1', 1, 'Hat', NULL, NULL, 'image/png', NULL, 1.0, 2.0)")
    db.execute("INSERT INTO requests VALUES ('r1', 'key', NULL, 1.0)")
    db.commit()
    db.close()
    store = SqliteStore(path)
    try:
        assert store.image(1) == (png, "image/png", False)
        assert store.image(2) == (None, "image/png", True)
        assert [e.image_sha256 for e in store.examples()] == [None, hashlib.sha256(png).hexdigest()]
    finally:
        store.close()


def test_concurrent_state_hash_readers_after_a_change_share_one_computation(runtime, monkeypatch):
    from service.serving import replica

    rt = runtime()
    teach(rt, noise_png(1))
    rt.state_hash()
    teach(rt, noise_png(2))  # a change: the next reader computes, the others wait and share it
    reads = []

    class CountedRead(replica.ConsistentRead):
        def __init__(self, *a, **k):
            reads.append(1)
            time.sleep(0.05)  # long enough for every other reader to queue behind this one
            super().__init__(*a, **k)
    monkeypatch.setattr(replica, "ConsistentRead", CountedRead)
    with ThreadPoolExecutor(8) as pool:
        hashes = set(pool.map(lambda _: rt.state_hash(), range(8)))
    assert len(hashes) == 1
    assert len(reads) == 1  # one pass over the memory for eight readers
