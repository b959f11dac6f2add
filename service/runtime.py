"""The served model and its online memory, without any web framework.

`ModelRuntime` loads a model from the store, restores its memory (latest good snapshot +
the feedback journal after it), answers predictions and applies feedback. Durable state
lives in `<state_dir>/<model name>/<model version>/`, never beside the trained model:

    journal.log                    every acknowledged feedback (see journal.py)
    snapshot-<last id>.safetensors memory state + slot -> feedback id, after feedback <last id>
    snapshot-<last id>.json        its sha256 and metadata (written last: the commit point)

One lock guards the memory: a prediction reads it before or after a feedback, never during.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .journal import FeedbackJournal, FeedbackRecord
from .memory import ACTION_NAMES, EMPTY
from .model import Prediction
from .store import LoadedModel, atomic_write, load_model, sha256_bytes

log = logging.getLogger("service.runtime")
KEEP_SNAPSHOTS = 3
MAX_CLASS_NAME = 64


class LabelError(ValueError):
    """A feedback label that cannot be used (HTTP 422)."""


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
    def __init__(self, store: str | Path, name: str, state_dir: str | Path, threshold: float | None = None,
                 index: str = "exact", nprobe: int = 16, new_class_threshold: float | None = None,
                 class_balance: float = 0.0, protect_feedback: bool = True):
        self.loaded: LoadedModel = load_model(store, name)
        self.model = self.loaded.model.eval()
        self.memory = self.model.memory
        self.threshold = self.model.config.confidence_threshold if threshold is None else threshold
        self.new_class_threshold = new_class_threshold
        self.protect_feedback = protect_feedback
        if self.memory is not None:
            self.memory.config.class_balance = class_balance
        self.classes: list[str] = list(self.loaded.classes)  # grows with classes taught by feedback
        self.lock = threading.RLock()
        self.stats = RuntimeStats()
        capacity = self.memory.capacity if self.memory is not None else 0
        self.slot_feedback = torch.full((capacity,), EMPTY, dtype=torch.int64)  # slot -> feedback id
        self.state_dir = Path(state_dir) / self.loaded.name / self.loaded.version
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.memory is not None:
            self._restore()
            if index == "ivf":  # built from the restored memory, then kept in step by every write
                self.memory.attach_index(nprobe=nprobe)
        self._dirty = False

    # --- names -----------------------------------------------------------------------------
    @property
    def label_space(self) -> int:
        return self.model.config.memory_classes

    def resolve_label(self, label: str) -> tuple[int, str, bool]:
        """Feedback label (class name or index) -> (index, name, is_new). Raises LabelError."""
        text = label.strip()
        if not text:
            raise LabelError("label is empty")
        if len(text) > MAX_CLASS_NAME:
            raise LabelError(f"label is longer than {MAX_CLASS_NAME} characters")
        if any(unicodedata.category(c).startswith("C") for c in text):
            raise LabelError("label contains control or unprintable characters")
        if text in self.classes:
            return self.classes.index(text), text, False
        if re.fullmatch(r"-?[0-9]+", text):  # str.isdigit() also accepts "³" and other digits int() refuses
            i = int(text)
            if not 0 <= i < len(self.classes):
                raise LabelError(f"label index {i} is out of range [0, {len(self.classes)})")
            return i, self.classes[i], False
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        if len(self.classes) >= self.label_space:
            raise LabelError(f"unknown label {text!r} and no room for a new class (label space "
                             f"{self.label_space} is full); known: {self.classes}")
        return len(self.classes), text, True

    # --- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Served:
        """(B, C, H, W) normalised images -> routed predictions."""
        t0 = time.perf_counter()
        keys, hidden = self.model.embed(images)  # outside the lock: (B, D), exit activations
        t1 = time.perf_counter()
        with self.lock:  # the memory read only; the rest of the network runs after it
            r = self.model.retrieve(keys.float())
            slots = r.slots[:, 0].tolist()
            fids = [int(self.slot_feedback[s]) if s != EMPTY and self.slot_feedback[s] != EMPTY else None
                    for s in slots]
            nearest = [self.classes[int(self.memory.labels[s])] if s != EMPTY else None for s in slots]
        t2 = time.perf_counter()
        p = self.model.route(r, hidden, self.threshold, self.new_class_threshold)
        p.timings_ms["features"] = 1e3 * (t1 - t0)
        p.timings_ms["memory"] = 1e3 * (t2 - t1)
        return Served(p, fids, nearest)

    def class_name(self, index: int) -> str:
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)

    # --- feedback ------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)[0].float()  # (B, D) memory keys

    def feedback(self, features: torch.Tensor, label: str, journal_timer=None) -> list[FeedbackOutcome]:
        """Journal (fsync) then apply. Raises LabelError (nothing changed) or JournalError
        (nothing acknowledged, nothing changed)."""
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        with self.lock:
            index, name, _ = self.resolve_label(label)
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
        if index == len(self.classes):
            self.classes.append(name)
        elif index > len(self.classes) or self.classes[index] != name:
            raise RuntimeError(f"journal record {records[0].id} names class {index}={name!r}, "
                               f"memory knows {self.classes}")
        feats = torch.stack([r.features for r in records])  # (N, D)
        # user-taught items are never replaced by later feedback while training items remain
        protected = self.slot_feedback != EMPTY if self.protect_feedback else None
        rep = self.memory.teach(feats, torch.full((len(records),), index), protected=protected)
        out = []
        for r, a, s, prev in zip(records, rep.action.tolist(), rep.slot.tolist(), rep.previous_label.tolist()):
            if s != EMPTY:
                self.slot_feedback[s] = r.id
            out.append(FeedbackOutcome(r.id, ACTION_NAMES[a], s if s != EMPTY else None,
                                       self.class_name(prev) if prev != EMPTY else None, name, index))
        self.stats.feedback_applied += len(records)
        self._dirty = True
        return out

    # --- durability ----------------------------------------------------------------------------
    def _snapshots(self) -> list[Path]:
        return sorted(self.state_dir.glob("snapshot-*.json"), reverse=True)

    def _load_snapshot(self, meta_path: Path) -> int:
        meta = json.loads(meta_path.read_text())
        if meta["file"] != meta_path.name.replace(".json", ".safetensors"):  # a sidecar names only its twin
            raise ValueError(f"sidecar names {meta['file']!r}")
        data = (self.state_dir / meta["file"]).read_bytes()
        if sha256_bytes(data) != meta["sha256"]:
            raise ValueError("sha256 mismatch")
        tensors = st_load(data)
        slot_feedback = tensors.pop("slot_feedback")
        self.memory.load_state_dict(tensors)  # strict: shapes and keys must match
        self.slot_feedback = slot_feedback
        self.classes = list(meta["classes"])
        return int(meta["last_feedback_id"])

    def _restore(self) -> None:
        after = 0
        trained = {k: v.clone() for k, v in self.memory.state_dict().items()}
        for meta_path in self._snapshots():
            try:
                after = self._load_snapshot(meta_path)
                log.info("memory restored from %s (feedback up to id %d)", meta_path.name, after)
                break
            except Exception as e:  # any damage: fall back to the previous snapshot
                log.error("snapshot %s refused (%s); trying the previous one", meta_path.name, e)
                self.memory.load_state_dict(trained)  # undo a partial load
                self.slot_feedback.fill_(EMPTY)
                self.classes = list(self.loaded.classes)
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
            tensors = {k: v.detach().clone().contiguous() for k, v in self.memory.state_dict().items()}
            tensors["slot_feedback"] = self.slot_feedback.clone()
            last_id = self.journal.last_id
            classes = list(self.classes)
        data = st_save(tensors)
        stem = f"snapshot-{last_id:012d}"
        atomic_write(self.state_dir / f"{stem}.safetensors", data)
        meta = {"file": f"{stem}.safetensors", "sha256": sha256_bytes(data), "last_feedback_id": last_id,
                "classes": classes, "model": self.loaded.name, "model_version": self.loaded.version,
                "time": time.time()}
        atomic_write(self.state_dir / f"{stem}.json", json.dumps(meta).encode())
        for old in self._snapshots()[KEEP_SNAPSHOTS:]:
            (self.state_dir / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        self.stats.last_snapshot_time = meta["time"]
        self.stats.last_snapshot_id = last_id
        self._dirty = False
        return self.state_dir / f"{stem}.json"

    @property
    def dirty(self) -> bool:
        return self._dirty

    def memory_info(self) -> dict:
        with self.lock:
            if self.memory is None:
                return {"kind": "none", "capacity": 0, "size": 0, "per_class": {}, "replacements": 0}
            counts = self.memory.class_counts().tolist()
            return {
                "kind": self.model.config.memory,
                "capacity": self.memory.capacity,
                "size": self.memory.size,
                "per_class": {self.class_name(i): c for i, c in enumerate(counts) if c},
                "replacements": int(self.memory.replacements),
                "feedback_items": int((self.slot_feedback != EMPTY).sum()),
                "classes": list(self.classes),
                "label_space": self.label_space,
                "last_snapshot_time": self.stats.last_snapshot_time,
                "last_feedback_id": self.journal.last_id,
            }

    def close(self) -> None:
        if self.memory is not None:
            self.journal.close()
