"""The review queue (REVIEW_QUEUE=on): images the model was unsure of, kept for a person to
label. Off by default; off, nothing is kept.

What joins it: each image of a prediction that abstained ("none of these") or whose
confidence is below `confidence_below` (by default the routing policy's
confidence_threshold: the confidence the model itself asks of its memory before trusting
an answer), unless its request said `Review-Queue: no`. What is kept: the image bytes as
received and the answer (best guess, confidence, ood_score, path), in the feedback store's
`review` table (feedback_store.py), so every server process and replica sees one queue.

Bounded: at most `max_items` rows and none older than `max_age` seconds (the oldest are
dropped when an image joins, and by `prune`, which the app runs every PRUNE_INTERVAL); the
same image again refreshes its row rather than adding one. A prediction never waits for the
store: its images are written with the writer's next group commit, and at most MAX_PENDING
of them wait in this process at once (more are not kept: counted as `busy`).

Forgettable: a dismissal deletes the row and erases it from the database's files at once; a
taught item becomes feedback (the feedback use case) and its row is deleted; a forget of
feedback deletes the rows holding the same image (sha256); rows the bounds dropped are
erased from the files by the next prune (within PRUNE_INTERVAL).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ..core.preprocess import media_type
from .feedback_store import FeedbackStore, NotFound, ReviewChange, ReviewItem, ReviewOffer

log = logging.getLogger(__name__)

MAX_PENDING = 32  # images of this process waiting for the writer (each at most MAX_UPLOAD_BYTES)
PRUNE_INTERVAL = 60.0  # seconds between prunes: expired rows go, dropped rows leave the files

__all__ = ["NotFound", "ReviewItem", "ReviewQueue", "ReviewSettings"]


@dataclass(frozen=True)
class ReviewSettings:
    max_items: int
    max_age: float  # seconds
    confidence_below: float  # an answer less confident than this joins the queue


@dataclass(frozen=True)
class Answer:
    """What the queue keeps of one image's answer."""
    label: str
    confidence: float
    ood_score: float | None
    abstained: bool
    path: str


class ReviewQueue:
    def __init__(self, store: FeedbackStore, settings: ReviewSettings, model_version: str,
                 on_size: Callable[[int], None] | None = None,
                 on_offer: Callable[[str], None] | None = None):
        self.store = store
        self.settings = settings
        self.model_version = model_version
        self.on_size = on_size or (lambda size: None)  # the queue's size after each write (a gauge)
        self.on_offer = on_offer or (lambda outcome: None)  # each image's outcome (a counter)
        self._pending = 0
        self._lock = threading.Lock()
        self._dropped = False  # the bounds deleted rows that are not erased from the files yet

    def wants(self, answer: Answer) -> bool:
        return answer.abstained or answer.confidence < self.settings.confidence_below

    def offer(self, images: list[bytes], answers: list[Answer], opted_out: bool = False) -> int:
        """Queue the images (as received) whose answers the model was unsure of, unless their
        request opted out; returns how many were handed to the writer. Never waits for the
        store."""
        queued = 0
        for data, a in zip(images, answers):
            if not self.wants(a):
                continue
            if opted_out:  # counted, never kept
                self.on_offer("opted_out")
                continue
            with self._lock:
                if self._pending >= MAX_PENDING:  # the store is behind: keep memory bounded
                    self.on_offer("busy")
                    continue
                self._pending += 1
            offer = ReviewOffer(data, media_type(data), a.label, a.confidence, a.ood_score, a.abstained, a.path,
                                self.model_version)
            self.store.review_add_later(offer, self.settings.max_items, self.settings.max_age) \
                .add_done_callback(self._added)
            queued += 1
        return queued

    def _added(self, f: Future) -> None:
        with self._lock:
            self._pending -= 1
        err = f.exception()
        if err is not None:
            log.warning("an image was not added to the review queue (%s)", err)
            self.on_offer("failed")
            return
        change: ReviewChange = f.result()
        if change.deleted:
            self._dropped = True
        self.on_offer("queued")
        self.on_size(change.size)

    @property
    def pending(self) -> int:
        """Images of this process handed to the writer and not committed yet."""
        with self._lock:
            return self._pending

    # --- reading and acting on the queue ---------------------------------------------------------
    def _since(self) -> float:
        return time.time() - self.settings.max_age

    def items(self, limit: int) -> list[ReviewItem]:
        """Newest first."""
        return self.store.review_items(limit, self._since())

    def item(self, item_id: int) -> tuple[ReviewItem, bytes]:
        """An item and its image bytes; NotFound when it is gone."""
        return self.store.review_item(item_id, self._since())

    def dismiss(self, item_id: int) -> None:
        """Delete the item and erase it from the database's files; NotFound when it is gone."""
        self.on_size(self.store.review_delete(item_id, erase=True).size)

    def taught(self, item_id: int) -> None:
        """The item is feedback now (its image kept there): its row goes. Already gone (another
        reviewer taught or dismissed it meanwhile) is fine."""
        try:
            self.on_size(self.store.review_delete(item_id, erase=False).size)
        except NotFound:
            pass

    @staticmethod
    def teach_key(item: ReviewItem) -> str:
        """The Idempotency-Key of teaching this item: two reviewers teaching it at once make one
        feedback example (the second gets the first answer, or 422 for another label), and a
        retry of a teach whose row was not deleted writes nothing again. The row's creation
        time and image tell a refreshed or reused id apart."""
        return f"review:{item.id}:{item.created!r}:{item.sha256[:32]}"

    def prune(self) -> int:
        """Delete the rows past the bounds; erase deleted rows from the files when any were
        deleted (here or when images joined) since the last prune."""
        dropped, self._dropped = self._dropped, False
        try:
            change = self.store.review_prune(self.settings.max_items, self.settings.max_age, erase_earlier=dropped)
        except Exception:
            self._dropped = self._dropped or dropped  # erased by the next prune
            raise
        self.on_size(change.size)
        return change.deleted

    def size(self) -> int:
        return self.store.review_size()


def answers_of(prediction, names: list[str]) -> list[Answer]:
    """The queue's view of a prediction's rows (core.model.Prediction, on the CPU)."""
    out = []
    for i, path in enumerate(prediction.paths):
        ood = float(prediction.ood_score[i])
        out.append(Answer(names[i], float(prediction.confidence[i]), None if math.isnan(ood) else ood,
                          bool(prediction.abstained[i]), path))
    return out
