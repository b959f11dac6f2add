"""The feedback store: every labelled example users sent, as an ordered log in a database.

SQLite (a file, WAL, synchronous=FULL) is the embedded default; PostgreSQL (psycopg 3)
serves several processes or machines. One schema and one code path: the SQL below is
written once with `?` placeholders; the PostgreSQL dialect only rewrites them and differs
in how a writer takes the log's order (an advisory lock held to commit, so commit order
is sequence order and a reader that sees seq N has seen every seq below it).

    log        seq (total order), kind example|forget, request_id, label (as the user
               named it, normalised), image bytes as received + sha256 + content type,
               created, forgotten (tombstone time; a forgotten example's image is erased),
               target (forget: the example's seq)
    requests   request_id, Idempotency-Key (unique), the first answer (JSON)
    features   (model_version, seq) -> float32 vector + crc32: stored once per model
               version, by the first process that embeds the example, so every process
               applies bit-identical vectors
    meta       store_id (a uuid: snapshots name the store they were taken from)

Writes go through one writer thread per process that commits whatever is queued in one
transaction (group commit): acknowledged means committed durably.
"""

from __future__ import annotations

import fcntl
import logging
import queue
import sqlite3
import threading
import time
import uuid
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS log (
        seq {serial} PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('example', 'forget')),
        request_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        label TEXT,
        image {blob},
        image_sha256 TEXT,
        content_type TEXT,
        target BIGINT,
        created DOUBLE PRECISION NOT NULL,
        forgotten DOUBLE PRECISION)""",
    """CREATE INDEX IF NOT EXISTS log_request ON log (request_id)""",
    """CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY,
        idempotency_key TEXT UNIQUE,
        response TEXT,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS features (
        model_version TEXT NOT NULL,
        seq BIGINT NOT NULL,
        vector {blob} NOT NULL,
        crc BIGINT NOT NULL,
        PRIMARY KEY (model_version, seq))""",
]


class FeedbackStoreError(RuntimeError):
    """The store cannot be used as it is (damaged file, damaged record): refused loudly."""


class StoreUnavailable(FeedbackStoreError):
    """The database cannot be reached right now: nothing was written."""


class NotFound(LookupError):
    """No example with that id."""


@dataclass
class Upload:
    data: bytes
    content_type: str


@dataclass
class Event:
    """One log entry as a runtime applies it."""
    seq: int
    kind: str  # example | forget
    request_id: str
    label: str | None
    target: int | None
    vector: np.ndarray | None  # (D,) float32 for this model version, None when not embedded yet
    forgotten: bool


@dataclass
class Example:
    seq: int
    request_id: str
    label: str
    created: float
    forgotten: float | None
    image_sha256: str | None
    content_type: str | None


@dataclass
class AppendResult:
    request_id: str
    seqs: list[int]
    replayed_response: str | None = None  # set when the Idempotency-Key was seen before


@dataclass
class _Write:
    kind: str  # append | forget | response
    args: tuple
    future: Future = field(default_factory=Future)


def vector_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


class FeedbackStore:
    """The shared interface; `open_store` picks the dialect from the URL."""

    placeholder = "?"
    serial = "INTEGER"
    blob = "BLOB"
    unavailable_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        with self._transaction(write=True) as cur:
            for stmt in SCHEMA:
                cur.execute(stmt.format(serial=self.serial, blob=self.blob))
            cur.execute(self.sql("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"),
                        ("store_id", uuid.uuid4().hex))
        self.store_id = self._one("SELECT value FROM meta WHERE key = ?", ("store_id",))[0]

    # --- dialect hooks ---------------------------------------------------------------------
    def connect(self):
        raise NotImplementedError

    def begin_write(self, cur) -> None:
        """Start a write transaction that holds the log's order until commit."""
        raise NotImplementedError

    def notify(self, cur) -> None:
        """Tell other processes the log grew (PostgreSQL NOTIFY; SQLite readers poll)."""

    def wait_for_change(self, timeout: float) -> None:
        time.sleep(timeout)

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    # --- connections -------------------------------------------------------------------------
    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken
                pass

    class _Tx:
        def __init__(self, store: "FeedbackStore", write: bool):
            self.store, self.write = store, write

        def __enter__(self):
            try:
                self.conn = self.store._conn()
                self.cur = self.conn.cursor()
                if self.write:
                    self.store.begin_write(self.cur)
            except self.store.unavailable_errors as e:
                self.store._drop_conn()
                raise StoreUnavailable(f"feedback store unreachable: {e}") from e
            return self.cur

        def __exit__(self, kind, exc, tb):
            try:
                if kind is None:
                    self.conn.commit()
                else:
                    self.conn.rollback()
            except self.store.unavailable_errors as e:
                self.store._drop_conn()
                if kind is None:
                    raise StoreUnavailable(f"feedback store commit failed: {e}") from e
            if kind is not None and issubclass(kind, self.store.unavailable_errors):
                self.store._drop_conn()
                raise StoreUnavailable(f"feedback store unreachable: {exc}") from exc
            return False

    def _transaction(self, write: bool = False) -> "_Tx":
        return self._Tx(self, write)

    def _read(self, text: str, args: tuple, fetch: str):
        # a read on a connection that went stale (the server restarted) fails once: one more
        # try on a fresh connection before saying the store is unavailable
        for attempt in (1, 2):
            try:
                with self._transaction() as cur:
                    cur.execute(self.sql(text), args)
                    return getattr(cur, fetch)()
            except StoreUnavailable:
                if attempt == 2:
                    raise

    def _one(self, text: str, args: tuple = ()):
        return self._read(text, args, "fetchone")

    def _all(self, text: str, args: tuple = ()):
        return self._read(text, args, "fetchall")

    # --- writes: one writer thread, group commit ------------------------------------------------
    def start(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="feedback-writer", daemon=True)
            self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(30)
            self._writer = None
        self._drop_conn()

    def _submit(self, kind: str, *args) -> Future:
        if self._writer is None:
            self.start()
        w = _Write(kind, args)
        self._writes.put(w)
        return w.future

    def append(self, request_id: str, idempotency_key: str | None, label: str, uploads: list[Upload],
               model_version: str, vectors: list[np.ndarray], timeout: float = 60) -> AppendResult:
        """Commit one request's examples (and their vectors for `model_version`) durably.
        With an Idempotency-Key seen before: writes nothing, returns the first request's result."""
        return self._submit("append", request_id, idempotency_key, label, uploads, model_version,
                            vectors).result(timeout)

    def forget(self, seq: int, timeout: float = 60) -> tuple[int | None, bool]:
        """Tombstone example `seq` (its image erased) and log a forget event. Returns (the
        event's seq or None when it was already forgotten, True). NotFound for no such example."""
        return self._submit("forget", seq).result(timeout)

    def set_response(self, request_id: str, response: str) -> None:
        """Remember a request's answer, for a retry with the same Idempotency-Key (best effort)."""
        self._submit("response", request_id, response)

    def _write_loop(self) -> None:
        while True:
            first = self._writes.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 256:
                try:
                    w = self._writes.get_nowait()
                except queue.Empty:
                    break
                if w is None:
                    self._writes.put(None)  # stop after this batch
                    break
                batch.append(w)
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Write]) -> None:
        results: list = []
        try:
            with self._transaction(write=True) as cur:
                seen_keys: dict[str, AppendResult] = {}
                for w in batch:
                    results.append(getattr(self, f"_do_{w.kind}")(cur, *w.args, seen_keys=seen_keys))
                if any(w.kind in ("append", "forget") for w in batch):
                    self.notify(cur)
        except BaseException as e:  # nothing of the batch is committed: every write gets the error
            for w in batch:
                w.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            return
        for w, r in zip(batch, results):
            if isinstance(r, Exception):
                w.future.set_exception(r)
            else:
                w.future.set_result(r)

    def _do_append(self, cur, request_id, idempotency_key, label, uploads, model_version, vectors, seen_keys):
        if idempotency_key is not None:
            if idempotency_key in seen_keys:  # the same key twice in one batch
                first = seen_keys[idempotency_key]
                return AppendResult(first.request_id, first.seqs, replayed_response="")
            cur.execute(self.sql("SELECT request_id, response FROM requests WHERE idempotency_key = ?"),
                        (idempotency_key,))
            row = cur.fetchone()
            if row is not None:
                cur.execute(self.sql("SELECT seq FROM log WHERE request_id = ? AND kind = 'example' ORDER BY seq"),
                            (row[0],))
                return AppendResult(row[0], [r[0] for r in cur.fetchall()], replayed_response=row[1] or "")
        now = time.time()
        cur.execute(self.sql("INSERT INTO requests (request_id, idempotency_key, created) VALUES (?, ?, ?)"),
                    (request_id, idempotency_key, now))
        seqs = []
        import hashlib
        for i, (u, v) in enumerate(zip(uploads, vectors)):
            cur.execute(self.sql(
                "INSERT INTO log (kind, request_id, position, label, image, image_sha256, content_type, created) "
                "VALUES ('example', ?, ?, ?, ?, ?, ?, ?) RETURNING seq"),
                (request_id, i, label, u.data, hashlib.sha256(u.data).hexdigest(), u.content_type, now))
            seq = cur.fetchone()[0]
            seqs.append(seq)
            data = vector_bytes(v)
            cur.execute(self.sql("INSERT INTO features (model_version, seq, vector, crc) VALUES (?, ?, ?, ?)"),
                        (model_version, seq, data, zlib.crc32(data)))
        result = AppendResult(request_id, seqs)
        if idempotency_key is not None:
            seen_keys[idempotency_key] = result
        return result

    def _do_forget(self, cur, seq, seen_keys):
        cur.execute(self.sql("SELECT forgotten FROM log WHERE seq = ? AND kind = 'example'"), (seq,))
        row = cur.fetchone()
        if row is None:
            return NotFound(f"no feedback example with id {seq}")
        if row[0] is not None:
            return (None, True)
        now = time.time()
        cur.execute(self.sql("UPDATE log SET forgotten = ?, image = NULL WHERE seq = ?"), (now, seq))
        cur.execute(self.sql("INSERT INTO log (kind, request_id, position, target, created) "
                             "VALUES ('forget', ?, 0, ?, ?) RETURNING seq"), (uuid.uuid4().hex, seq, now))
        return (cur.fetchone()[0], True)

    def _do_response(self, cur, request_id, response, seen_keys):
        cur.execute(self.sql("UPDATE requests SET response = ? WHERE request_id = ?"), (response, request_id))
        return None

    # --- reads -------------------------------------------------------------------------------------
    def last_seq(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM log")[0])

    def events_after(self, seq: int, model_version: str, limit: int = 2000) -> list[Event]:
        """The log after `seq` in order, with this model version's vectors where stored. A
        vector whose checksum fails is refused loudly: it would make replicas diverge."""
        rows = self._all(
            "SELECT l.seq, l.kind, l.request_id, l.label, l.target, l.forgotten, f.vector, f.crc FROM log l "
            "LEFT JOIN features f ON f.seq = l.seq AND f.model_version = ? WHERE l.seq > ? ORDER BY l.seq LIMIT ?",
            (model_version, seq, limit))
        out = []
        for s, kind, rid, label, target, forgotten, vec, crc in rows:
            vector = None
            if vec is not None:
                vec = bytes(vec)
                if zlib.crc32(vec) != crc:
                    raise FeedbackStoreError(f"{self.describe()}: stored feature vector of example {s} for model "
                                             f"version {model_version} fails its checksum (damaged record)")
                vector = np.frombuffer(vec, dtype="<f4").copy()
            out.append(Event(s, kind, rid, label, target, vector, forgotten is not None))
        return out

    def put_vectors(self, model_version: str, vectors: dict[int, np.ndarray]) -> None:
        """Store vectors computed by re-embedding, unless another process stored them first or
        the example was forgotten meanwhile (then it stays unembedded for this version)."""
        with self._transaction(write=True) as cur:
            for seq, v in vectors.items():
                data = vector_bytes(v)
                cur.execute(self.sql(
                    "INSERT INTO features (model_version, seq, vector, crc) SELECT ?, ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM log WHERE seq = ? AND forgotten IS NULL) "
                    "ON CONFLICT (model_version, seq) DO NOTHING"), (model_version, seq, data, zlib.crc32(data), seq))

    def image(self, seq: int) -> tuple[bytes | None, str | None, bool]:
        """(bytes, content type, forgotten) of example `seq`; NotFound when there is none."""
        row = self._one("SELECT image, content_type, forgotten, image_sha256 FROM log "
                        "WHERE seq = ? AND kind = 'example'", (seq,))
        if row is None:
            raise NotFound(f"no feedback example with id {seq}")
        data = None if row[0] is None else bytes(row[0])
        if data is not None:
            import hashlib
            if hashlib.sha256(data).hexdigest() != row[3]:
                raise FeedbackStoreError(f"{self.describe()}: image of example {seq} fails its sha256")
        return data, row[1], row[2] is not None

    def examples(self, limit: int = 50, before: int | None = None, include_forgotten: bool = True) -> list[Example]:
        """Examples newest first, `before` a seq (pagination)."""
        where = "kind = 'example'" + ("" if before is None else " AND seq < ?") + \
            ("" if include_forgotten else " AND forgotten IS NULL")
        args = (() if before is None else (before,)) + (limit,)
        rows = self._all(f"SELECT seq, request_id, label, created, forgotten, image_sha256, content_type FROM log "
                         f"WHERE {where} ORDER BY seq DESC LIMIT ?", args)
        return [Example(*r) for r in rows]

    def request_seqs(self, request_id: str) -> list[int]:
        return [r[0] for r in self._all("SELECT seq FROM log WHERE request_id = ? AND kind = 'example' ORDER BY seq",
                                        (request_id,))]

    def describe(self) -> str:
        return self.url


class SqliteStore(FeedbackStore):
    """A file under STATE_DIR; WAL with synchronous=FULL: a commit is on disk before the
    answer. Several processes on one machine share it (SQLite's locks order the writers)."""

    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # processes starting together (serve --workers N) take turns to check, create and
        # switch the file to WAL: that switch needs the file alone and SQLite answers
        # "database is locked" at once, without waiting, when another process is doing it
        with open(self.path.with_name(self.path.name + ".open-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():  # inside the lock too: a reader would make another's WAL switch fail
                self._check_file()
            try:
                super().__init__(f"sqlite:///{self.path}")
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):
                    raise
                raise FeedbackStoreError(f"feedback store {self.path} is damaged ({e}); refusing to start. "
                                         "Restore it from a backup, or move it away to start empty.") from e

    def _check_file(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=30)
            try:
                result = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise FeedbackStoreError(f"feedback store {self.path} is damaged ({e}); refusing to start. "
                                     "Restore it from a backup, or move it away to start empty.") from e
        if result != [("ok",)]:
            raise FeedbackStoreError(f"feedback store {self.path} fails its integrity check ({result[:3]}); "
                                     "refusing to start. Restore it from a backup, or move it away to start empty.")

    def connect(self):
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return _SqliteConn(conn)

    def begin_write(self, cur) -> None:
        cur.execute("BEGIN IMMEDIATE")  # the write lock, taken now: commit order = seq order

    def close(self) -> None:
        # fold the write-ahead log into the main file on a clean shutdown, so that the file
        # alone is the whole store (a copy of it, a backup, another version of SQLite)
        try:
            with self._transaction() as cur:
                cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (FeedbackStoreError, sqlite3.Error) as e:
            log.warning("feedback store %s: checkpoint at shutdown failed (%s)", self.path, e)
        super().close()


class _SqliteConn:
    """sqlite3 in autocommit mode with explicit BEGIN: reads outside a write see the latest commit."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def cursor(self):
        return self.conn.cursor()

    def commit(self):
        if self.conn.in_transaction:
            self.conn.commit()

    def rollback(self):
        if self.conn.in_transaction:
            self.conn.rollback()

    def close(self):
        self.conn.close()


class PostgresStore(FeedbackStore):
    """PostgreSQL through psycopg 3. Writers serialise on an advisory lock held until commit;
    each commit NOTIFYs `feedback_log`, and readers also poll by sequence as a safety net."""

    placeholder = "%s"
    serial = "BIGINT GENERATED ALWAYS AS IDENTITY"
    blob = "BYTEA"
    LOCK = 7_351_001  # advisory lock key of the log's order

    def __init__(self, url: str):
        import psycopg

        self._psycopg = psycopg
        self.unavailable_errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self._listener = None
        super().__init__(url)

    def connect(self):
        return self._psycopg.connect(self.url, connect_timeout=3)

    def begin_write(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))

    def notify(self, cur) -> None:
        cur.execute("NOTIFY feedback_log")

    def wait_for_change(self, timeout: float) -> None:
        try:
            if self._listener is None:
                self._listener = self._psycopg.connect(self.url, autocommit=True, connect_timeout=3)
                self._listener.execute("LISTEN feedback_log")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except self.unavailable_errors:
            self._listener = None
            time.sleep(timeout)

    def describe(self) -> str:
        return self.url.split("@")[-1]  # no password in messages

    def close(self) -> None:
        super().close()
        if self._listener is not None:
            self._listener.close()


def open_store(url: str | None, state_dir: str | Path) -> FeedbackStore:
    """`postgresql://...` or `sqlite:///path`; unset: SQLite at <state_dir>/feedback.db."""
    if not url:
        return SqliteStore(Path(state_dir) / "feedback.db")
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///"):])
    raise ValueError(f"FEEDBACK_DB must be postgresql://... or sqlite:///path, got {url.split(':')[0]}:...")
