"""The log tail: a background thread that applies what other processes commit, supervised.

Any failure of it sets `error` (the replica answers not ready, and `listener` hears of it
for the metrics) and the tail goes on with back-off, 0.1 s doubling to 5 s, until a pass
succeeds; a damaged record stops it for good (`failure`: refused loudly, nothing skipped).
An unreachable store is not a failure of the tail: predictions go on, and feedback answers
503 by itself.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .feedback_store import FeedbackStore, FeedbackStoreError, StoreUnavailable

log = logging.getLogger(__name__)


class LogTail:
    def __init__(self, store: FeedbackStore, sync: Callable[[], int], interval: float = 0.02):
        self.store, self.sync, self.interval = store, sync, interval
        self.error: str | None = None  # failed and retrying: not ready until it recovers
        self.failure: str | None = None  # a damaged record: stopped for good
        self.failures = 0
        self.listener: Callable[[str | None], None] | None = None  # hears every change of `error`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="feedback-tail", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            self.error = error
            if error is not None:
                self.failures += 1
            if self.listener is not None:
                self.listener(error)

    def _loop(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.store.wait_for_change(self.interval)
                self.sync()
                self._set_error(None)
                backoff = 0.1
            except StoreUnavailable as err:
                log.warning("feedback store unavailable (%s); retrying", err)
                self._stop.wait(1.0)
            except FeedbackStoreError as err:
                self.failure = str(err)
                log.error("the feedback log cannot be applied: %s", err)
                return
            except BaseException as err:  # anything else: not ready, and try again
                log.exception("applying the feedback log failed; retrying in %.1f s", backoff)
                self._set_error(f"the feedback log tail failed: {type(err).__name__}: {err}")
                self._stop.wait(backoff)
                backoff = min(2 * backoff, 5.0)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
