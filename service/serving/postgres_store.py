"""The PostgreSQL dialect of the feedback store (psycopg 3), for several processes or machines.

- Connections come from a bounded pool (psycopg_pool): at most `pool_size` per process, plus
  one listening connection for NOTIFY. A deployment needs replicas x workers x
  (pool_size + 1) connections below the server's max_connections (docs/operations.md).
- Every connection carries a statement, lock and idle-in-transaction timeout and TCP
  keepalives, so one stuck lock holder or a dead network cannot stall a writer forever.
- A lost connection, a server shutting down, or a server that turned read-only (a failover)
  is "unavailable": the connection is dropped and the pool opens a new one.
- Writers serialise on an advisory lock held until commit, so commit order is sequence
  order and a reader that sees seq N has seen every seq below it; each commit NOTIFYs
  `feedback_log`, and readers also poll by sequence as a safety net.
- Forgetting erases: the image's row (bytes and sha256) and its vectors are deleted, and
  the images, features and review tables rewritten (VACUUM FULL: a plain VACUUM leaves the
  deleted bytes in the table's pages; the rewrite costs time in proportion to those tables,
  taken once per forget; a review queue dismissal rewrites the review table alone) and,
  where the role may,
  the write-ahead log is switched and checkpointed so that the segments holding the image
  are removed (with the server's `wal_recycle = off`; a recycled segment keeps its bytes).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from .feedback_store import FeedbackStore, StoreUnavailable

log = logging.getLogger(__name__)


class PostgresStore(FeedbackStore):
    placeholder = "%s"
    serial = "BIGINT GENERATED ALWAYS AS IDENTITY"
    blob = "BYTEA"
    LOCK = 7_351_001  # advisory lock key of the log's order

    def __init__(self, url: str, pool_size: int = 4, pool_timeout: float = 5.0, statement_timeout: float = 10.0,
                 lock_timeout: float = 5.0, **options):
        import psycopg
        import psycopg_pool

        self._psycopg = psycopg
        self.unavailable_errors = (psycopg.OperationalError, psycopg.InterfaceError,
                                   psycopg.errors.ReadOnlySqlTransaction)
        self._listener = None
        self._warned_wal = False
        self.pool_size = pool_size
        self.connect_kwargs = {
            "connect_timeout": 3,
            # a peer that vanished (network cut, machine gone) is noticed in seconds, not hours
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
            "options": f"-c statement_timeout={int(statement_timeout * 1000)} "
                       f"-c lock_timeout={int(lock_timeout * 1000)} "
                       f"-c idle_in_transaction_session_timeout=60000",
        }
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=self.connect_kwargs, open=False, timeout=pool_timeout,
            check=psycopg_pool.ConnectionPool.check_connection, name="feedback-store", reconnect_timeout=30)
        self._pool.open(wait=False)
        self._pool_timeout_error = psycopg_pool.PoolTimeout
        try:
            super().__init__(url, **options)
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def connection(self):
        try:
            conn = self._pool.getconn()
        except (self._pool_timeout_error, self._psycopg.OperationalError) as e:
            raise StoreUnavailable(f"feedback store unreachable: no connection within the pool's timeout ({e})") \
                from e
        try:
            yield conn
        finally:
            self._pool.putconn(conn)  # a closed (discarded) connection is replaced by the pool

    def discard(self, conn) -> None:
        try:
            conn.close()
        except Exception:  # already broken
            pass

    def begin_write(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))

    def columns(self, cur, table: str) -> set[str]:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND table_name = %s", (table,))
        return {r[0] for r in cur.fetchall()}

    def notify(self, cur) -> None:
        cur.execute("NOTIFY feedback_log")

    def wait_for_change(self, timeout: float) -> None:
        try:
            if self._listener is None:
                self._listener = self._psycopg.connect(self.url, autocommit=True, **self.connect_kwargs)
                self._listener.execute("LISTEN feedback_log")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except self.unavailable_errors:
            self._close_listener()
            time.sleep(timeout)

    def erase_deleted(self, tables: tuple[str, ...]) -> None:
        psycopg = self._psycopg
        with self.connection() as conn:
            conn.autocommit = True
            try:
                conn.execute("SET statement_timeout = '5min'")  # the rewrite grows with the table
                # the names come from feedback_store (FORGET_TABLES, "review"), never from a request
                conn.execute(f"VACUUM (FULL) {', '.join(tables)}")
                try:
                    conn.execute("SELECT pg_switch_wal()")
                    conn.execute("CHECKPOINT")
                except psycopg.errors.InsufficientPrivilege:
                    if not self._warned_wal:
                        self._warned_wal = True
                        log.warning("feedback store %s: this role may not switch and checkpoint the write-ahead "
                                    "log: a forgotten image stays in the server's WAL until its next checkpoint "
                                    "(docs/operations.md)", self.describe())
            except self.unavailable_errors:
                self.discard(conn)
                raise
            finally:
                if not conn.closed:
                    conn.execute("RESET statement_timeout")
                    conn.autocommit = False

    def describe(self) -> str:
        return self.url.split("@")[-1]  # no password in messages

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:  # already broken
                pass
        self._listener = None

    def close(self) -> None:
        super().close()
        self._close_listener()
        self._pool.close()
