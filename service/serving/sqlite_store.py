"""The SQLite dialect of the feedback store: a file under STATE_DIR, WAL with
synchronous=FULL (a commit is on disk before the answer). Several processes on one machine
share it (SQLite's locks order the writers); each thread keeps a connection of its own.

Forgetting erases: every connection runs with `secure_delete` (freed pages and cells are
overwritten with zeros), and after a forget (or a review queue dismissal) the write-ahead log, which still holds the
page images written when the example arrived, is checkpointed into the main file and
truncated to nothing.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .feedback_store import FeedbackStore, FeedbackStoreError, StoreUnavailable

log = logging.getLogger(__name__)
BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another process's write lock


class SqliteStore(FeedbackStore):
    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(self, path: str | Path, **options):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # processes starting together (serve --workers N) take turns to check, create and
        # switch the file to WAL: that switch needs the file alone and SQLite answers
        # "database is locked" at once, without waiting, when another process is doing it
        with open(self.path.with_name(self.path.name + ".open-lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():  # inside the lock too: a reader would make another's WAL switch fail
                self._check_file()
            try:
                super().__init__(f"sqlite:///{self.path}", **options)
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

    def _connect(self) -> "_SqliteConn":
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return _SqliteConn(conn)

    @contextmanager
    def connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._local.conn = self._connect()
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"feedback store unreachable: {e}") from e
        yield conn

    def discard(self, conn) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except Exception:  # already broken
            pass

    def begin_write(self, cur) -> None:
        cur.execute("BEGIN IMMEDIATE")  # the write lock, taken now: commit order = seq order

    def columns(self, cur, table: str) -> set[str]:
        return {row[1] for row in cur.execute(f"PRAGMA table_info({table})").fetchall()}

    def erase_deleted(self, tables: tuple[str, ...]) -> None:
        """Fold the WAL into the main file (where secure_delete zeroed the deleted rows, of any
        table) and truncate it; readers of other processes hold it for milliseconds, so a busy
        checkpoint is tried again."""
        with self.connection() as conn:
            for attempt in range(50):
                busy, _, _ = conn.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    return
                time.sleep(0.02)
        log.warning("feedback store %s: the write-ahead log could not be truncated after a forget (busy); "
                    "the next forget or a clean shutdown truncates it", self.path)

    def close(self) -> None:
        super().close()
        # fold the write-ahead log into the main file on a clean shutdown, so that the file
        # alone is the whole store (a copy of it, a backup, another version of SQLite)
        try:
            with self._transaction() as cur:
                cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (FeedbackStoreError, sqlite3.Error) as e:
            log.warning("feedback store %s: checkpoint at shutdown failed (%s)", self.path, e)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self.discard(conn)


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
