"""The feedback store: every labelled example users sent, as an ordered log in a database.

SQLite (sqlite_store.py: a file, WAL, synchronous=FULL) is the embedded default;
PostgreSQL (postgres_store.py, psycopg 3 with a bounded pool) serves several processes or
machines. One schema and one code path: the SQL here is written once with `?` placeholders;
a dialect only rewrites them, hands out connections, and differs in how a writer takes the
log's order and how a forget is erased from its files.

    log        seq (total order), kind example|forget, request_id, label (as the user
               named it, normalised), content type of the image, created, forgotten
               (tombstone time), target (forget: the example's seq)
    images     seq -> the image bytes as received and their sha256: in a table of their
               own, so that a forget deletes the row and the dialect can erase it from
               its files (nothing derived from the image stays in the log)
    requests   request_id, Idempotency-Key (unique while retained), the sha256 of the
               request it was first used with, the first answer (JSON), created
    features   (model_version, seq) -> float32 vector + crc32: stored once per model
               version, by the first process that embeds the example, so every process
               applies bit-identical vectors
    meta       store_id (a uuid: snapshots name the store they were taken from)
    review     the review queue (review_queue.py): images the model was unsure of, with
               their best guess; one row per image (sha256 unique), bounded in count and
               age, deleted on dismiss, teach and a forget of the same image

Writes go through one writer thread per process that commits whatever is queued in one
transaction (group commit): acknowledged means committed durably. Every write has a
deadline: one the writer has not started by then is cancelled (truthfully "nothing was
written"); one that lost its connection while committing is looked up by its request id
before anyone is told anything (committed, not committed, or, when the store cannot be
asked, "outcome unknown").

(One file of ~640 lines: the schema, the statements and the writer that orders and commits
them are one contract; the dialects are in sqlite_store.py and postgres_store.py.)
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
import zlib
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
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
        content_type TEXT,
        target BIGINT,
        created DOUBLE PRECISION NOT NULL,
        forgotten DOUBLE PRECISION)""",
    """CREATE INDEX IF NOT EXISTS log_request ON log (request_id)""",
    """CREATE TABLE IF NOT EXISTS images (seq BIGINT PRIMARY KEY, data {blob} NOT NULL, sha256 TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT,
        response TEXT,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS features (
        model_version TEXT NOT NULL,
        seq BIGINT NOT NULL,
        vector {blob} NOT NULL,
        crc BIGINT NOT NULL,
        PRIMARY KEY (model_version, seq))""",
    # the review queue: the image bytes as received, with the answer that put them here
    """CREATE TABLE IF NOT EXISTS review (
        id {serial} PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL,
        sha256 TEXT NOT NULL UNIQUE,
        data {blob} NOT NULL,
        content_type TEXT NOT NULL,
        label TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL,
        ood_score DOUBLE PRECISION,
        abstained INTEGER NOT NULL,
        path TEXT NOT NULL,
        model_version TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS review_created ON review (created)""",
]
# the tables a forget deletes rows of, and so erases from the database's files
FORGET_TABLES = ("images", "features", "review")
IDEMPOTENCY_RETENTION = 24 * 3600  # seconds a key stays bound to its first request
WRITE_TIMEOUT = 30.0  # seconds a write may wait in the queue before it is cancelled
RUNNING_LIMIT = 120.0  # seconds to wait for a started write (bounded by the database's own timeouts)


class FeedbackStoreError(RuntimeError):
    """The store cannot be used as it is (damaged file, damaged record): refused loudly."""


class StoreUnavailable(FeedbackStoreError):
    """The database cannot be reached right now: nothing was written."""


class OutcomeUnknown(FeedbackStoreError):
    """The connection was lost while committing and the store could not be asked since:
    the write may or may not have committed (a retry with the same Idempotency-Key is safe)."""


class IdempotencyKeyReused(ValueError):
    """An Idempotency-Key already bound to a different request."""


class NotFound(LookupError):
    """No example with that id."""


class _CommitLost(StoreUnavailable):
    """The commit itself failed on a lost connection: it may have committed (resolved by lookup)."""


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
class ReviewOffer:
    """An image the model was unsure of, with its answer, for the review queue."""
    data: bytes
    content_type: str
    label: str  # the best guess, by name
    confidence: float
    ood_score: float | None
    abstained: bool
    path: str
    model_version: str


@dataclass
class ReviewItem:
    """A review queue entry as listed (its image bytes are read on their own: `review_item`)."""
    id: int
    created: float
    sha256: str
    content_type: str
    label: str
    confidence: float
    ood_score: float | None
    abstained: bool
    path: str
    model_version: str


@dataclass
class ReviewChange:
    """What a review queue write did: the rows it added or deleted, and the queue's size after."""
    id: int | None = None  # the row added (or refreshed: the same image again)
    deleted: int = 0
    size: int = 0


REVIEW_COLUMNS = "id, created, sha256, content_type, label, confidence, ood_score, abstained, path, model_version"


@dataclass
class AppendResult:
    request_id: str
    seqs: list[int]
    replayed: bool = False  # the Idempotency-Key was seen before: nothing was written
    response: str | None = None  # the first request's answer, once it was recorded


@dataclass
class _Write:
    kind: str  # append | forget | response | review_add | review_delete | review_prune
    args: tuple
    request_id: str | None = None  # what a lost commit is looked up by
    future: Future = field(default_factory=Future)


def vector_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


class FeedbackStore:
    """The shared interface and SQL; `open_store` picks the dialect from the URL."""

    placeholder = "?"
    serial = "INTEGER"
    blob = "BLOB"
    unavailable_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, idempotency_retention: float = IDEMPOTENCY_RETENTION,
                 write_timeout: float = WRITE_TIMEOUT):
        self.url = url
        self.idempotency_retention = idempotency_retention
        self.write_timeout = write_timeout
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        with self._transaction(write=True) as cur:
            for stmt in SCHEMA:
                cur.execute(stmt.format(serial=self.serial, blob=self.blob))
            self.migrate(cur)
            cur.execute(self.sql("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"),
                        ("store_id", uuid.uuid4().hex))
        self.store_id = self._one("SELECT value FROM meta WHERE key = ?", ("store_id",))[0]

    # --- dialect hooks ---------------------------------------------------------------------
    @contextmanager
    def connection(self):
        """A connection for one transaction (StoreUnavailable when none can be had)."""
        raise NotImplementedError
        yield

    def discard(self, conn) -> None:
        """A connection that failed: never hand it out again."""
        raise NotImplementedError

    def begin_write(self, cur) -> None:
        """Start a write transaction that holds the log's order until commit."""
        raise NotImplementedError

    def columns(self, cur, table: str) -> set[str]:
        raise NotImplementedError

    def notify(self, cur) -> None:
        """Tell other processes the log grew (PostgreSQL NOTIFY; SQLite readers poll)."""

    def wait_for_change(self, timeout: float) -> None:
        time.sleep(timeout)

    def erase_deleted(self, tables: tuple[str, ...]) -> None:
        """After a committed forget or dismissal: erase the deleted rows of `tables` from the
        database's files."""

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def migrate(self, cur) -> None:
        """Stores written before images had a table of their own: move them there."""
        if "image" in self.columns(cur, "log"):
            cur.execute("INSERT INTO images (seq, data, sha256) SELECT seq, image, image_sha256 FROM log "
                        "WHERE image IS NOT NULL ON CONFLICT (seq) DO NOTHING")
            cur.execute("ALTER TABLE log DROP COLUMN image")
            cur.execute("ALTER TABLE log DROP COLUMN image_sha256")
        if "request_hash" not in self.columns(cur, "requests"):
            cur.execute("ALTER TABLE requests ADD COLUMN request_hash TEXT")

    # --- transactions ------------------------------------------------------------------------
    @contextmanager
    def _transaction(self, write: bool = False):
        """One transaction: committed when the block ends, rolled back when it raises. A lost
        connection becomes StoreUnavailable (nothing committed) or, when the commit itself
        failed, _CommitLost (it may have committed); the connection is replaced."""
        with self.connection() as conn:
            try:
                cur = conn.cursor()
                if write:
                    self.begin_write(cur)
                yield cur
            except self.unavailable_errors as e:
                self.discard(conn)
                raise StoreUnavailable(f"feedback store unreachable: {e}") from e
            except BaseException:
                _rollback_quietly(conn)
                raise
            try:
                conn.commit()
            except self.unavailable_errors as e:
                self.discard(conn)
                raise _CommitLost(f"feedback store commit failed: {e}") from e

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

    # --- writes: one writer thread, group commit, a deadline each ------------------------------
    def start(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="feedback-writer", daemon=True)
            self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(30)
            self._writer = None

    def _write(self, kind: str, *args, request_id: str | None = None, timeout: float | None = None):
        """Queue a write and wait for its truthful outcome: the result once committed;
        StoreUnavailable when it was not written (cancelled before it started, or refused);
        OutcomeUnknown only when a lost commit could not be looked up."""
        if self._writer is None:
            self.start()
        w = _Write(kind, args, request_id)
        self._writes.put(w)
        try:
            return w.future.result(self.write_timeout if timeout is None else timeout)
        except FutureTimeout:
            if w.future.cancel():  # the writer never started it: it never will
                raise StoreUnavailable(f"the feedback store did not take the write within "
                                       f"{self.write_timeout:g} s") from None
        # started: its transaction is bounded by the database's own timeouts (lock, statement)
        try:
            return w.future.result(RUNNING_LIMIT)
        except FutureTimeout:
            raise OutcomeUnknown(f"the feedback store took over {RUNNING_LIMIT:g} s to commit; the write may "
                                 "still complete (retry with the same Idempotency-Key)") from None

    def append(self, request_id: str, idempotency_key: str | None, request_hash: str | None, label: str,
               uploads: list[Upload], model_version: str, vectors: list[np.ndarray]) -> AppendResult:
        """Commit one request's examples (and their vectors for `model_version`) durably.
        With an Idempotency-Key seen before for the same request (`request_hash`): writes
        nothing and returns the first request's result; for another request:
        IdempotencyKeyReused."""
        return self._write("append", request_id, idempotency_key, request_hash, label, uploads, model_version,
                           vectors, request_id=request_id)

    def forget(self, seq: int) -> int | None:
        """Tombstone example `seq`, delete its image, sha256 and vectors, log a forget event
        and erase the image from the database's files. Returns the event's seq, or None when
        it was already forgotten. NotFound for no such example."""
        request_id = uuid.uuid4().hex
        return self._write("forget", seq, request_id, request_id=request_id)

    def record_response(self, request_id: str, response: str) -> str:
        """Keep a request's answer for retries with its Idempotency-Key; returns the answer
        kept (the first one recorded, if another process recorded one already)."""
        return self._write("response", request_id, response)

    def record_response_later(self, request_id: str, response: str) -> None:
        """The same without waiting: written with the next group commit (a failure is logged;
        a retry of that request then renders its answer from the log)."""
        f = self._write_later("response", request_id, response)
        f.add_done_callback(lambda f: f.exception() and log.warning(
            "the answer of request %s was not recorded for retries (%s)", request_id, f.exception()))

    def _write_later(self, kind: str, *args) -> Future:
        """Queue a write without waiting for it: its future says how it went."""
        if self._writer is None:
            self.start()
        w = _Write(kind, args, request_id=None)
        self._writes.put(w)
        return w.future

    # --- the review queue: one table, written by the same writer ---------------------------------
    def review_add_later(self, offer: ReviewOffer, max_items: int, max_age: float) -> Future:
        """Queue an image for review without waiting (a prediction never waits for the store):
        committed with the next group commit, the same image again refreshes its row, and
        rows past `max_age` seconds or beyond the newest `max_items` are deleted in the same
        transaction. The future's result is a ReviewChange."""
        return self._write_later("review_add", offer, max_items, max_age)

    def review_delete(self, item_id: int, erase: bool = True) -> ReviewChange:
        """Delete review item `item_id` (NotFound when there is none); with `erase`, also from
        the database's files (a dismissal; a taught item's image lives on as feedback)."""
        return self._write("review_delete", item_id, erase)

    def review_prune(self, max_items: int, max_age: float, erase_earlier: bool) -> ReviewChange:
        """Delete the rows past the bounds and erase them from the database's files; with
        `erase_earlier`, erase the files even when none are past the bounds now (rows the
        bounds dropped when images joined are deleted but not yet erased)."""
        return self._write("review_prune", max_items, max_age, erase_earlier)

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
            batch = [w for w in batch if w.future.set_running_or_notify_cancel()]  # cancelled: never written
            if batch:
                self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Write]) -> None:
        results: list = []
        try:
            with self._transaction(write=True) as cur:
                seen: dict[str, tuple[str | None, AppendResult]] = {}
                for w in batch:
                    results.append(getattr(self, f"_do_{w.kind}")(cur, *w.args, seen=seen))
                if any(w.kind in ("append", "forget") for w in batch):
                    self.notify(cur)  # the log grew (the review queue is not in the log)
        except _CommitLost as lost:
            self._resolve_lost_commit(batch, lost)
            return
        except BaseException as e:  # nothing of the batch is committed: every write gets the error
            for w in batch:
                w.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            return
        # feedback is answered before the erasure (it waits for no one); review queue writes
        # after it, so that a dismissal is answered once the image has left the files
        waits = [w.kind.startswith("review") for w in batch]
        for w, r, wait in zip(batch, results, waits):
            if not wait:
                _settle(w.future, r)
        erase = self._tables_to_erase(batch, results)
        if erase:
            try:
                self.erase_deleted(erase)
            except Exception:  # the rows are gone; the files are erased by the next forget or checkpoint
                log.exception("erasing deleted images from the database files failed")
        for w, r, wait in zip(batch, results, waits):
            if wait:
                _settle(w.future, r)

    @staticmethod
    def _tables_to_erase(batch: list[_Write], results: list) -> tuple[str, ...]:
        """The tables whose deleted rows this batch must erase from the files: a forget's, a
        dismissal's, and a prune's that deleted rows or was asked to (its last argument)."""
        tables: set[str] = set()
        for w, r in zip(batch, results):
            if isinstance(r, Exception):
                continue
            if w.kind == "forget" and r is not None:
                tables.update(FORGET_TABLES)
            elif w.kind == "review_delete" and w.args[-1] or w.kind == "review_prune" and (r.deleted or w.args[-1]):
                tables.add("review")
        return tuple(sorted(tables))

    def _resolve_lost_commit(self, batch: list[_Write], lost: _CommitLost) -> None:
        """The commit was sent and the connection died: ask the store (on a fresh connection)
        whether each write's request id is in the log before telling its caller anything."""
        for attempt in range(5):
            try:
                found = {w.request_id: self._all("SELECT seq FROM log WHERE request_id = ? ORDER BY seq",
                                                 (w.request_id,)) for w in batch if w.request_id}
                break
            except StoreUnavailable:
                time.sleep(0.2 * (attempt + 1))
        else:
            for w in batch:
                w.future.set_exception(OutcomeUnknown(
                    f"the connection to the feedback store was lost while committing and the store cannot be "
                    f"asked whether it committed ({lost}); retry with the same Idempotency-Key"))
            return
        committed = any(found.values())  # one transaction: all of the batch or none of it
        for w in batch:
            if not committed:
                w.future.set_exception(StoreUnavailable(f"the commit did not complete ({lost})"))
            elif w.kind == "append":
                w.future.set_result(AppendResult(w.request_id, [r[0] for r in found[w.request_id]]))
            elif w.kind == "forget":
                w.future.set_result(found[w.request_id][0][0] if found[w.request_id] else None)
            elif w.kind.startswith("review"):  # committed with the rest; its own result is not known
                w.future.set_exception(OutcomeUnknown(f"the review queue write committed but its result was "
                                                      f"lost ({lost}); list the queue to see it"))
            else:
                w.future.set_result(self.response_of(w.args[0]))

    def request_hash(self, method: str, path: str, label: str, uploads: list[Upload]) -> str:
        """What an Idempotency-Key is bound to: the request as the server understood it (the
        multipart boundary a client picks anew on a retry does not count)."""
        h = hashlib.sha256(f"{method} {path}\n{label}\n".encode())
        for u in uploads:
            h.update(f"{u.content_type} {len(u.data)}\n".encode())
            h.update(hashlib.sha256(u.data).digest())
        return h.hexdigest()

    def _do_append(self, cur, request_id, idempotency_key, request_hash, label, uploads, model_version, vectors,
                   seen):
        now = time.time()
        if idempotency_key is not None:
            if idempotency_key in seen:  # the same key twice in one batch
                first_hash, first = seen[idempotency_key]
                if first_hash != request_hash:
                    return IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request")
                return AppendResult(first.request_id, first.seqs, replayed=True)
            cur.execute(self.sql("SELECT request_id, request_hash, response, created FROM requests "
                                 "WHERE idempotency_key = ?"), (idempotency_key,))
            row = cur.fetchone()
            if row is not None and row[3] >= now - self.idempotency_retention:
                if row[1] is not None and row[1] != request_hash:
                    return IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request")
                cur.execute(self.sql("SELECT seq FROM log WHERE request_id = ? AND kind = 'example' ORDER BY seq"),
                            (row[0],))
                return AppendResult(row[0], [r[0] for r in cur.fetchall()], replayed=True, response=row[2])
            if row is not None:  # expired: the key is free again
                cur.execute(self.sql("UPDATE requests SET idempotency_key = NULL WHERE request_id = ?"), (row[0],))
        cur.execute(self.sql("INSERT INTO requests (request_id, idempotency_key, request_hash, created) "
                             "VALUES (?, ?, ?, ?)"), (request_id, idempotency_key, request_hash, now))
        seqs = []
        for i, (u, v) in enumerate(zip(uploads, vectors)):
            cur.execute(self.sql(
                "INSERT INTO log (kind, request_id, position, label, content_type, created) "
                "VALUES ('example', ?, ?, ?, ?, ?) RETURNING seq"),
                (request_id, i, label, u.content_type, now))
            seq = cur.fetchone()[0]
            seqs.append(seq)
            cur.execute(self.sql("INSERT INTO images (seq, data, sha256) VALUES (?, ?, ?)"),
                        (seq, u.data, hashlib.sha256(u.data).hexdigest()))
            data = vector_bytes(v)
            cur.execute(self.sql("INSERT INTO features (model_version, seq, vector, crc) VALUES (?, ?, ?, ?)"),
                        (model_version, seq, data, zlib.crc32(data)))
        result = AppendResult(request_id, seqs)
        if idempotency_key is not None:
            seen[idempotency_key] = (request_hash, result)
        return result

    def _do_forget(self, cur, seq, request_id, seen):
        cur.execute(self.sql("SELECT forgotten FROM log WHERE seq = ? AND kind = 'example'"), (seq,))
        row = cur.fetchone()
        if row is None:
            return NotFound(f"no feedback example with id {seq}")
        if row[0] is not None:
            return None
        now = time.time()
        cur.execute(self.sql("UPDATE log SET forgotten = ? WHERE seq = ?"), (now, seq))
        # the same image waiting in the review queue is forgotten with it
        cur.execute(self.sql("DELETE FROM review WHERE sha256 IN (SELECT sha256 FROM images WHERE seq = ?)"), (seq,))
        cur.execute(self.sql("DELETE FROM images WHERE seq = ?"), (seq,))
        cur.execute(self.sql("DELETE FROM features WHERE seq = ?"), (seq,))
        cur.execute(self.sql("INSERT INTO log (kind, request_id, position, target, created) "
                             "VALUES ('forget', ?, 0, ?, ?) RETURNING seq"), (request_id, seq, now))
        return cur.fetchone()[0]

    def _do_review_add(self, cur, offer: ReviewOffer, max_items, max_age, seen):
        # in a savepoint: a row the database refuses must not fail the feedback committed with it
        cur.execute("SAVEPOINT review_add")
        try:
            change = self._review_insert(cur, offer, max_items, max_age)
        except self.unavailable_errors:
            raise
        except Exception as e:
            cur.execute("ROLLBACK TO SAVEPOINT review_add")
            return FeedbackStoreError(f"the review queue refused an image: {e}")
        cur.execute("RELEASE SAVEPOINT review_add")
        return change

    def _review_insert(self, cur, offer: ReviewOffer, max_items: int, max_age: float) -> ReviewChange:
        now = time.time()
        cur.execute(self.sql(
            "INSERT INTO review (created, sha256, data, content_type, label, confidence, ood_score, abstained, "
            "path, model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sha256) DO UPDATE SET created = excluded.created, label = excluded.label, "
            "confidence = excluded.confidence, ood_score = excluded.ood_score, abstained = excluded.abstained, "
            "path = excluded.path, model_version = excluded.model_version RETURNING id"),
            (now, hashlib.sha256(offer.data).hexdigest(), offer.data, offer.content_type, offer.label,
             offer.confidence, offer.ood_score, int(offer.abstained), offer.path, offer.model_version))
        item_id = cur.fetchone()[0]
        deleted = self._review_bound(cur, max_items, max_age, now)
        return ReviewChange(item_id, deleted, self._review_size(cur))

    def _do_review_delete(self, cur, item_id, erase, seen):
        cur.execute(self.sql("DELETE FROM review WHERE id = ?"), (item_id,))
        if cur.rowcount == 0:
            return NotFound(f"no review item with id {item_id} (taught, dismissed, dropped or forgotten already)")
        return ReviewChange(item_id, 1, self._review_size(cur))

    def _do_review_prune(self, cur, max_items, max_age, erase_earlier, seen):
        deleted = self._review_bound(cur, max_items, max_age, time.time())
        return ReviewChange(None, deleted, self._review_size(cur))

    def _review_bound(self, cur, max_items: int, max_age: float, now: float) -> int:
        """Delete the rows older than `max_age` and those beyond the newest `max_items`."""
        cur.execute(self.sql("DELETE FROM review WHERE created < ?"), (now - max_age,))
        deleted = cur.rowcount
        cur.execute(self.sql("DELETE FROM review WHERE id NOT IN "
                             "(SELECT id FROM review ORDER BY created DESC, id DESC LIMIT ?)"), (max_items,))
        return deleted + cur.rowcount

    def _review_size(self, cur) -> int:
        cur.execute("SELECT COUNT(*) FROM review")
        return int(cur.fetchone()[0])

    def _do_response(self, cur, request_id, response, seen):
        cur.execute(self.sql("UPDATE requests SET response = ? WHERE request_id = ? AND response IS NULL"),
                    (response, request_id))
        cur.execute(self.sql("SELECT response FROM requests WHERE request_id = ?"), (request_id,))
        row = cur.fetchone()
        return row[0] if row is not None else response

    # --- reads -------------------------------------------------------------------------------------
    def last_seq(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM log")[0])

    def response_of(self, request_id: str) -> str | None:
        row = self._one("SELECT response FROM requests WHERE request_id = ?", (request_id,))
        return None if row is None else row[0]

    def request_age(self, request_id: str) -> float | None:
        row = self._one("SELECT created FROM requests WHERE request_id = ?", (request_id,))
        return None if row is None else time.time() - row[0]

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
        row = self._one("SELECT i.data, l.content_type, l.forgotten, i.sha256 FROM log l "
                        "LEFT JOIN images i ON i.seq = l.seq WHERE l.seq = ? AND l.kind = 'example'", (seq,))
        if row is None:
            raise NotFound(f"no feedback example with id {seq}")
        data = None if row[0] is None else bytes(row[0])
        if data is not None and hashlib.sha256(data).hexdigest() != row[3]:
            raise FeedbackStoreError(f"{self.describe()}: image of example {seq} fails its sha256")
        return data, row[1], row[2] is not None

    def examples(self, limit: int = 50, before: int | None = None, include_forgotten: bool = True) -> list[Example]:
        """Examples newest first, `before` a seq (pagination)."""
        where = "l.kind = 'example'" + ("" if before is None else " AND l.seq < ?") + \
            ("" if include_forgotten else " AND l.forgotten IS NULL")
        args = (() if before is None else (before,)) + (limit,)
        rows = self._all(f"SELECT l.seq, l.request_id, l.label, l.created, l.forgotten, i.sha256, l.content_type "
                         f"FROM log l LEFT JOIN images i ON i.seq = l.seq WHERE {where} ORDER BY l.seq DESC LIMIT ?",
                         args)
        return [Example(*r) for r in rows]

    def review_items(self, limit: int, since: float) -> list[ReviewItem]:
        """The review queue newest first, none created before `since` (older ones wait for the
        next prune)."""
        rows = self._all(f"SELECT {REVIEW_COLUMNS} FROM review WHERE created >= ? "
                         f"ORDER BY created DESC, id DESC LIMIT ?", (since, limit))
        return [_review_item(r) for r in rows]

    def review_item(self, item_id: int, since: float) -> tuple[ReviewItem, bytes]:
        """One review item and its image bytes; NotFound when there is none (or it expired)."""
        row = self._one(f"SELECT {REVIEW_COLUMNS}, data FROM review WHERE id = ? AND created >= ?", (item_id, since))
        if row is None:
            raise NotFound(f"no review item with id {item_id} (taught, dismissed, dropped or forgotten already)")
        item, data = _review_item(row[:-1]), bytes(row[-1])
        if hashlib.sha256(data).hexdigest() != item.sha256:
            raise FeedbackStoreError(f"{self.describe()}: image of review item {item_id} fails its sha256")
        return item, data

    def review_size(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM review")[0])

    def describe(self) -> str:
        return self.url


def _settle(future: Future, result) -> None:
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _review_item(row) -> ReviewItem:
    r = list(row)
    r[7] = bool(r[7])  # abstained: an integer in both databases
    return ReviewItem(*r)


def _rollback_quietly(conn) -> None:
    try:
        conn.rollback()
    except Exception:  # the connection is already broken; it is discarded
        pass


def open_store(url: str | None, state_dir: str | Path, **options) -> FeedbackStore:
    """`postgresql://...` or `sqlite:///path`; unset: SQLite at <state_dir>/feedback.db."""
    if not url:
        from .sqlite_store import SqliteStore
        return SqliteStore(Path(state_dir) / "feedback.db", **options)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_store import PostgresStore
        return PostgresStore(url, **options)
    if url.startswith("sqlite:///"):
        from .sqlite_store import SqliteStore
        return SqliteStore(url[len("sqlite:///"):], **options)
    raise ValueError(f"FEEDBACK_DB must be postgresql://... or sqlite:///path, got {url.split(':')[0]}:...")
