"""The served model and its online memory, without any web framework.

`ModelRuntime` loads a model from the store, restores its memory (latest good snapshot +
the feedback journal after it), answers predictions and applies feedback. Durable state
lives in `<state_dir>/<model name>/<model version>/`, never beside the trained model:
`journal.log` (journal.py) and the snapshots (snapshots.py).

Each call is one hop onto the model thread: `predict` (images -> routed answers) and
`feedback` (images + label -> journalled, applied). One lock guards the memory: a
prediction reads it before or after a feedback, never during.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.memory import ACTION_NAMES, EMPTY, Retrieval
from ..core.model import Prediction
from ..core.routing import RoutingPolicy
from ..core.store import LoadedModel, load_model
from .journal import FeedbackJournal, FeedbackRecord
from .snapshots import SnapshotError, SnapshotStore
from .vocabulary import ClassVocabulary, LabelError

log = logging.getLogger(__name__)


@dataclass
class FeedbackOutcome:
    feedback_id: int
    action: str  # added / replaced / skipped
    slot: int | None
    previous_label: str | None
    label: str
    label_index: int


@dataclass
class RuntimeStats:
    feedback_applied: int = 0
    last_snapshot_time: float | None = None
    last_snapshot_id: int = 0
    replayed: int = 0


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
                 index: str = "exact", nprobe: int = 16, protect_feedback: bool = True):
        self.loaded: LoadedModel = load_model(store, name)
        self.model = self.loaded.model.eval()
        self.memory = self.model.memory
        # the manifest's policy (chosen on the training run's validation split), with any
        # explicit serve-time overrides; both are shown by /memory and the model_info metric
        self.overrides = {k: v for k, v in (policy_overrides or {}).items() if v is not None}
        self.policy: RoutingPolicy = self.loaded.policy.replace(**self.overrides)
        self.protect_feedback = protect_feedback
        self.vocab = ClassVocabulary(self.loaded.classes, self.model.config.memory_classes)
        self.lock = threading.RLock()
        self.stats = RuntimeStats()
        capacity = self.memory.capacity if self.memory is not None else 0
        self.slot_feedback = torch.full((capacity,), EMPTY, dtype=torch.int64)  # slot -> feedback id
        self.snapshots = SnapshotStore(Path(state_dir) / self.loaded.name / self.loaded.version)
        self.state_dir = self.snapshots.folder
        if self.memory is not None:
            self._restore()
            if index == "ivf":  # built from the restored memory, then kept in step by every write
                self.memory.attach_index(nprobe=nprobe)
        self._dirty = False

    @property
    def classes(self) -> list[str]:
        return self.vocab.names

    def class_name(self, index: int) -> str:
        return self.vocab.name(index)

    def check_label(self, label: str) -> bool:
        """Refuse a label early (LabelError, nothing changed); True when it names a new class."""
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        with self.lock:
            return self.vocab.lookup(label)[0] is None

    # --- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Served:
        """(B, C, H, W) normalised images -> routed predictions. The backbone runs outside the
        memory lock; only the memory read (and the names it needs) runs inside it."""
        names: dict[str, list] = {}

        def read_memory(keys: torch.Tensor, policy: RoutingPolicy) -> Retrieval:
            with self.lock:
                r = self.model.retrieve(keys, policy)
                slots = r.slots[:, 0].tolist()
                names["fids"] = [int(self.slot_feedback[s]) if s != EMPTY and self.slot_feedback[s] != EMPTY
                                 else None for s in slots]
                names["nearest"] = [self.vocab.name(int(self.memory.labels[s])) if s != EMPTY else None
                                    for s in slots]
            return r

        p = self.model.predict(images, self.policy, read_memory)
        return Served(p, names["fids"], names["nearest"])

    # --- feedback ------------------------------------------------------------------------------
    @torch.no_grad()
    def feedback(self, images: torch.Tensor, label: str, journal_timer=None) -> list[FeedbackOutcome]:
        """Embed, journal (fsync), then apply. Raises LabelError (nothing changed) or
        JournalError (nothing acknowledged, nothing changed)."""
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        features = self.model.embed(images)[0].float()  # (B, D) memory keys, outside the lock
        with self.lock:
            index, name = self.vocab.lookup(label)
            if index is None:
                index = len(self.vocab)
            first = self.journal.last_id + 1
            now = time.time()
            records = [FeedbackRecord(first + i, index, name, f.clone(), now) for i, f in enumerate(features)]
            t = time.perf_counter()
            self.journal.append(records)  # raises JournalError before anything changes
            if journal_timer is not None:
                journal_timer(time.perf_counter() - t)
            return self._apply(records)

    def _apply(self, records: list[FeedbackRecord]) -> list[FeedbackOutcome]:
        index, name = records[0].label, records[0].class_name
        if index == len(self.vocab):
            self.vocab.add(name)
        elif index > len(self.vocab) or self.vocab.names[index] != name:
            raise RuntimeError(f"journal record {records[0].id} names class {index}={name!r}, "
                               f"memory knows {self.vocab.names}")
        feats = torch.stack([r.features for r in records])  # (N, D)
        # user-taught items are never replaced by later feedback while training items remain
        protected = self.slot_feedback != EMPTY if self.protect_feedback else None
        rep = self.memory.teach(feats, torch.full((len(records),), index), protected=protected)
        out = []
        for r, a, s, prev in zip(records, rep.action.tolist(), rep.slot.tolist(), rep.previous_label.tolist()):
            if s != EMPTY:
                self.slot_feedback[s] = r.id
            out.append(FeedbackOutcome(r.id, ACTION_NAMES[a], s if s != EMPTY else None,
                                       self.vocab.name(prev) if prev != EMPTY else None, name, index))
        self.stats.feedback_applied += len(records)
        self._dirty = True
        return out

    # --- durability ----------------------------------------------------------------------------
    def _restore(self) -> None:
        after = 0
        trained = {k: v.clone() for k, v in self.memory.state_dict().items()}
        for sidecar in self.snapshots.sidecars():
            try:
                tensors, meta = self.snapshots.load(sidecar)
                slot_feedback = tensors.pop("slot_feedback")
                self.memory.load_state_dict(tensors)  # strict: shapes and keys must match
                self.slot_feedback = slot_feedback
                self.vocab.reset(list(meta["classes"]))
                after = int(meta["last_feedback_id"])
                log.info("memory restored from %s (feedback up to id %d)", sidecar.name, after)
                break
            except (SnapshotError, RuntimeError, KeyError, LabelError) as e:  # fall back to the previous one
                log.error("snapshot %s refused (%s); trying the previous one", sidecar.name, e)
                self.memory.load_state_dict(trained)  # undo a partial load
                self.slot_feedback.fill_(EMPTY)
                self.vocab.reset(list(self.loaded.classes))
        self.journal = FeedbackJournal(self.state_dir / "journal.log")
        replay = [r for r in self.journal.records if r.id > after]
        for r in replay:
            self._apply([r])
        self.journal.records = []
        self.stats.replayed = len(replay)
        self.stats.last_snapshot_id = after
        if replay:
            log.info("replayed %d feedback records from the journal", len(replay))

    def snapshot(self) -> Path | None:
        """Write the memory atomically (safetensors, then its JSON sidecar as commit point)."""
        if self.memory is None:
            return None
        with self.lock:
            tensors = {k: v.detach().clone() for k, v in self.memory.state_dict().items()}
            tensors["slot_feedback"] = self.slot_feedback.clone()
            last_id = self.journal.last_id
            classes = list(self.vocab.names)
        sidecar = self.snapshots.write(last_id, tensors, {
            "last_feedback_id": last_id, "classes": classes, "model": self.loaded.name,
            "model_version": self.loaded.version})
        self.stats.last_snapshot_time = time.time()
        self.stats.last_snapshot_id = last_id
        self._dirty = False
        return sidecar

    def state_hash(self) -> str:
        """sha256 of the memory state (every tensor of state_dict, the slot -> feedback map and
        the class names): equal on two processes exactly when their memories are equal."""
        h = hashlib.sha256()
        with self.lock:
            if self.memory is not None:
                for k, v in sorted(self.memory.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().contiguous().numpy().tobytes())
            h.update(self.slot_feedback.numpy().tobytes())
            h.update(json.dumps(self.vocab.names).encode())
        return h.hexdigest()

    @property
    def dirty(self) -> bool:
        return self._dirty

    def memory_info(self) -> dict:
        """What /memory shows; takes the memory lock (call it off the event loop)."""
        base = {"policy": self.policy.to_dict(), "policy_overrides": dict(self.overrides),
                "state_hash": self.state_hash()}
        with self.lock:
            if self.memory is None:
                return {"kind": "none", "capacity": 0, "size": 0, "per_class": {}, "replacements": 0, **base}
            counts = self.memory.class_counts().tolist()
            return {
                "kind": self.model.config.memory,
                "capacity": self.memory.capacity,
                "size": self.memory.size,
                "per_class": {self.vocab.name(i): c for i, c in enumerate(counts) if c},
                "replacements": int(self.memory.replacements),
                "feedback_items": int((self.slot_feedback != EMPTY).sum()),
                "classes": list(self.vocab.names),
                "label_space": self.vocab.capacity,
                "last_snapshot_time": self.stats.last_snapshot_time,
                "last_feedback_id": self.journal.last_id,
                **base,
            }

    def close(self) -> None:
        if self.memory is not None:
            self.journal.close()
