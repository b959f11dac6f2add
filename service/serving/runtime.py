"""The served model and its online memory, without any web framework: a thin facade.

    predict   images -> backbone (outside the memory lock) -> memory read and the names it
              needs (inside) -> routed answer (outside)
    feedback  `submit_feedback`, the one use case: label check, durable commit of the images
              and their vectors (group commit), apply the log up to them (read-your-writes),
              the answer rendered and, with an Idempotency-Key, recorded for retries
    forget    tombstone and erase in the store, then apply the log

The parts, one job each: the memory replica (replica.py: restore, apply the log, snapshot,
hash), the log tail (tail.py: what other processes commit, supervised), the taught-row
fitter (fitter.py), the feedback store (feedback_store.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.engine import load_engine_model
from ..core.model import Prediction
from ..core.retrieval import DEFAULT_NPROBE
from ..core.routing import EMPTY, RoutingPolicy
from ..core.store import LoadedModel
from .feedback_store import AppendResult, FeedbackStore, FeedbackStoreError, Upload, open_store
from .fitter import TaughtRowFitter
from .replica import FeedbackOutcome, MemoryReplica
from .snapshots import SnapshotStore
from .tail import LogTail
from .vocabulary import ClassVocabulary, LabelError

log = logging.getLogger(__name__)
FIRST_ANSWER_WAIT = 10.0  # seconds a retry waits for the first request with its key to answer
ORPHAN_AGE = 30.0  # a keyed request committed this long ago with no answer recorded: its process died

__all__ = ["FeedbackOutcome", "FeedbackResult", "IdempotencyInFlight", "ModelRuntime", "Served"]


def resolve_device(name: str) -> torch.device:
    """cpu, cuda (refused loudly when torch sees no GPU) or auto (cuda when it sees one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but torch sees no GPU (DEVICE=auto falls back to the CPU)")
    return torch.device(name)


class IdempotencyInFlight(RuntimeError):
    """The first request with this Idempotency-Key is still being answered."""


@dataclass
class FeedbackResult:
    request_id: str
    outcomes: list[FeedbackOutcome]
    new_class: bool = False
    body: str | None = None  # the answer as rendered (and, with a key, as recorded)
    replayed: bool = False  # a retry: `body` is the first answer, byte for byte; nothing written


@dataclass
class Served:
    """A prediction with the names the API shows."""
    prediction: Prediction
    feedback_ids: list[int | None] = field(default_factory=list)
    nearest_labels: list[str | None] = field(default_factory=list)

    def select(self, rows: slice) -> "Served":
        """One request's rows of a batch."""
        return Served(self.prediction.select(rows), self.feedback_ids[rows], self.nearest_labels[rows])


class ModelRuntime:
    def __init__(self, store: str | Path, name: str, state_dir: str | Path, policy_overrides: dict | None = None,
                 index: str = "exact", nprobe: int = DEFAULT_NPROBE, protect_feedback: bool = True,
                 feedback_db: str | None = None, feedback: FeedbackStore | None = None,
                 store_options: dict | None = None, device: str = "cpu", engine: str = "auto"):
        self.device = resolve_device(device)
        # the network the model runs on (core/engine.py; auto: the manifest's) and the memory
        # keys, thresholds and served version that go with it: feedback vectors and snapshots
        # are kept per served version, so one engine's never reach another
        self.loaded: LoadedModel = load_engine_model(store, name, engine, self.device)
        self.engine = self.loaded.engine
        self.model = self.loaded.model.for_inference().to(self.device)  # the memory's buffers go with it
        self.memory = self.model.memory
        self.version = self.loaded.version
        # the manifest's policy (chosen on the training run's validation split), with any
        # explicit serve-time overrides; both are shown by /memory and the model_info metric
        self.overrides = {k: v for k, v in (policy_overrides or {}).items() if v is not None}
        self.policy: RoutingPolicy = self.loaded.policy.replace(**self.overrides)
        self.vocab = ClassVocabulary(self.loaded.classes, self.model.config.memory_classes)
        self.lock = threading.RLock()  # the memory: a prediction reads it before or after a request's writes
        capacity = self.memory.capacity if self.memory is not None else 0
        self.slot_feedback = torch.full((capacity,), EMPTY, dtype=torch.int64)  # slot -> feedback id (seq)
        self.snapshots = SnapshotStore(Path(state_dir) / self.loaded.name / self.version)
        self.fitter = TaughtRowFitter(self.model, self.policy, self.lock, self.slot_feedback)
        self.store: FeedbackStore | None = None
        self.replica: MemoryReplica | None = None
        self.tail: LogTail | None = None
        if self.memory is not None:
            self.store = feedback or open_store(feedback_db, state_dir, **(store_options or {}))
            self.replica = MemoryReplica(self.loaded, self.model, (store, name), self.store, self.snapshots,
                                         self.vocab, self.fitter, self.lock, self.slot_feedback, protect_feedback)
            self.replica.restore(ivf_nprobe=nprobe if index == "ivf" else None)

    # --- what the replica holds ----------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.vocab.names

    def class_name(self, index: int) -> str:
        return self.vocab.name(index)

    @property
    def applied_seq(self) -> int:
        return self.replica.applied_seq if self.replica is not None else 0

    @property
    def stats(self):
        return self.replica.stats

    def sync(self, upto: int | None = None) -> int:
        return self.replica.sync(upto) if self.replica is not None else 0

    def snapshot(self) -> Path | None:
        return self.replica.snapshot() if self.replica is not None else None

    @property
    def dirty(self) -> bool:
        return self.replica is not None and self.replica.dirty

    def state_hash(self) -> str:
        if self.replica is not None:
            return self.replica.state_hash()
        return hashlib.sha256(json.dumps(self.vocab.names).encode()).hexdigest()

    def check_label(self, label: str) -> tuple[str, bool]:
        """(the name the label resolves to, True for a new class); LabelError refuses it."""
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        index, name = self.vocab.lookup(label)  # the vocabulary's own lock: microseconds
        return name, index is None

    # --- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Served:
        """(B, C, H, W) normalised images (on the CPU) -> routed predictions (on the CPU)."""
        t0 = time.perf_counter()
        # (B, D) memory keys, the exit's activations, the ood_score's probes (or None): no lock
        keys, hidden, probes = self.model.encode(images.to(self.device, non_blocking=True))
        t1 = time.perf_counter()
        with self.lock:  # the memory read, and the names of what it found, as of one moment
            r = self.model.retrieve(keys.float(), self.policy)
            slots = r.slots[:, 0].tolist()  # (B,) nearest slot of each image, EMPTY when none
            fids = [int(self.slot_feedback[s]) if s != EMPTY and self.slot_feedback[s] != EMPTY else None
                    for s in slots]
            nearest = [self.vocab.name(int(self.memory.labels[s])) if s != EMPTY else None for s in slots]
        t2 = time.perf_counter()
        p = self.model.finish(r, hidden, self.policy, probes).cpu()
        p.timings_ms.update(features=1e3 * (t1 - t0), memory=1e3 * (t2 - t1))
        return Served(p, fids, nearest)

    # --- feedback ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) float32 on the CPU: the memory keys this model version stores."""
        return self.model.embed(images.to(self.device, non_blocking=True))[0].float().cpu()

    def embed(self, images: torch.Tensor) -> list[np.ndarray]:
        """The same, one (D,) array per image."""
        return list(self.embed_batch(images).numpy())

    def submit_feedback(self, vectors: list[np.ndarray], label: str, uploads: list[Upload],
                        idempotency_key: str | None = None, render=None, commit_timer=None) -> FeedbackResult:
        """The feedback use case: check the label, commit the examples durably, apply the log up
        to them (read-your-writes), render the answer and, with an Idempotency-Key, record it.

        A key is bound to the request it was first used with (its label and images): the same
        request again writes nothing and gets the first answer byte for byte (waiting for it
        while the first is still being answered; IdempotencyInFlight after FIRST_ANSWER_WAIT);
        another request with it is refused (IdempotencyKeyReused). Raises LabelError or
        StoreUnavailable with nothing written."""
        name, is_new = self.check_label(label)
        request_hash = self.store.request_hash("POST", "/feedback", label, uploads) if idempotency_key else None
        t = time.perf_counter()
        r: AppendResult = self.store.append(uuid.uuid4().hex, idempotency_key, request_hash, name, uploads,
                                            self.version, vectors)
        if commit_timer is not None:
            commit_timer(time.perf_counter() - t)
        if r.replayed:
            body = r.response or (self._first_answer(r, render) if render is not None else None)
            return FeedbackResult(r.request_id, self.replica.outcomes_of(r.seqs), body=body, replayed=True)
        self.replica.sync_after_commit(max(r.seqs))
        result = FeedbackResult(r.request_id, self.replica.outcomes_of(r.seqs), new_class=is_new)
        if render is not None:
            result.body = render(result)
            if idempotency_key is not None:  # with the next group commit; a retry meanwhile waits for it
                self.store.record_response_later(r.request_id, result.body)
        return result

    def _record_answer(self, request_id: str, body: str) -> str:
        try:
            return self.store.record_response(request_id, body)
        except FeedbackStoreError as err:  # committed all the same: the answer stands
            log.warning("the answer of request %s was not recorded for retries (%s)", request_id, err)
            return body

    def _first_answer(self, r: AppendResult, render) -> str:
        """A retry of a keyed request whose answer is not recorded yet: wait for the first
        request to record it; when it never will (its process died after the commit),
        render it from the log and record it."""
        deadline = time.monotonic() + FIRST_ANSWER_WAIT
        while time.monotonic() < deadline:
            body = self.store.response_of(r.request_id)
            if body is not None:
                return body
            age = self.store.request_age(r.request_id)
            if age is not None and age > ORPHAN_AGE:
                self.replica.sync_after_commit(max(r.seqs))
                return self._record_answer(r.request_id, render(FeedbackResult(
                    r.request_id, self.replica.outcomes_of(r.seqs))))
            time.sleep(0.02)
        raise IdempotencyInFlight(f"the first request with this Idempotency-Key ({r.request_id}) is still being "
                                  "answered; retry later")

    def forget(self, seq: int) -> bool:
        """Forget example `seq` everywhere: tombstone and erase it in the store, then apply the
        log (here now, in other processes when they tail). NotFound when unknown; False when
        it was already forgotten."""
        event_seq = self.store.forget(seq)
        if event_seq is not None:
            self.replica.sync_after_commit(event_seq)
        return event_seq is not None

    # --- the log tail ----------------------------------------------------------------------------
    def start_tail(self, interval: float = 0.02, listener=None) -> None:
        """Apply what other processes commit, in the background (tail.py); `listener` hears
        each failure and recovery (metrics)."""
        if self.replica is None or self.tail is not None:
            return
        self.tail = LogTail(self.store, lambda: self.replica.sync(), interval)
        self.tail.listener = listener
        self.tail.start()

    def not_ready_reason(self) -> str | None:
        """Why this replica should not take traffic (None: ready)."""
        if self.tail is None:
            return None
        return self.tail.failure or self.tail.error

    @property
    def failure(self) -> str | None:
        """A damaged record stopped the tail: refused loudly."""
        return self.tail.failure if self.tail is not None else None

    # --- inspection --------------------------------------------------------------------------------
    def memory_info(self) -> dict:
        """What /memory shows; takes the memory lock (call it off the event loop)."""
        base = {"policy": self.policy.to_dict(), "policy_overrides": dict(self.overrides),
                "device": str(self.device), "engine": self.engine,
                "state_hash": self.state_hash(), "model_version": self.version, "pid": os.getpid()}
        if self.memory is None:
            return {"kind": "none", "capacity": 0, "size": 0, "per_class": {}, "replacements": 0, **base}
        with self.lock:
            counts = self.memory.class_counts().tolist()
            return {
                "kind": self.model.config.memory,
                "capacity": self.memory.capacity,
                "size": self.memory.size,
                "per_class": {self.vocab.name(i): c for i, c in enumerate(counts) if c},
                "replacements": int(self.memory.replacements),
                "feedback_items": int((self.slot_feedback != EMPTY).sum()),
                # labels with a taught head row (none without replay features or with taught_rows off)
                "taught_rows": [self.vocab.name(int(i)) for i in self.model.taught.rows.labels]
                if self.model.taught is not None else [],
                "classes": list(self.vocab.names),
                "label_space": self.vocab.capacity,
                "last_snapshot_time": self.stats.last_snapshot_time,
                "applied_seq": self.applied_seq,
                "feedback_store": self.store.describe(),
                **base,
            }

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
        self.fitter.close()
        if self.store is not None:
            self.store.close()
