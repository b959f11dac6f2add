"""The served model and its online memory, without any web framework.

The memory is a function of two things: the trained model and the feedback store's
ordered log. Every process applies the log in sequence order, one request at a time,
exactly as it applied its own requests live, so processes that have applied the same
prefix hold bit-identical memories (`state_hash`).

    start     load the model; newest valid snapshot of this model version; apply the log
              after it (examples this version has no vector for are re-embedded from their
              stored images, in order); ready once caught up
    predict   images -> backbone (outside the memory lock) -> memory read (inside) -> route
    feedback  embed (the model thread) -> commit images + vectors to the store (group commit,
              durable before the answer) -> apply the log up to them (read-your-writes)
    forget    tombstone in the store -> apply the log: the example's slot is emptied
    tail      a background thread applies what other processes committed (PostgreSQL
              LISTEN/NOTIFY, polling by sequence as the safety net)

Snapshots (snapshots.py) record the last applied sequence and the store's id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.memory import ACTION_NAMES, EMPTY, Retrieval
from ..core.model import Prediction
from ..core.preprocess import ImageError, ImageLimits, decode_image
from ..core.routing import RoutingPolicy
from ..core.store import LoadedModel, load_model
from ..core.tensorfile import tensor_bytes
from .feedback_store import AppendResult, Event, FeedbackStore, FeedbackStoreError, StoreUnavailable, Upload, open_store
from .snapshots import SnapshotError, SnapshotStore
from .vocabulary import ClassVocabulary, LabelError

log = logging.getLogger(__name__)
REEMBED_BATCH = 256
LOG_BATCH = 2000  # log events read per query (a request holds at most MAX_FILES examples)
KEEP_OUTCOMES = 50_000  # per-example outcomes kept for answers (a retried request's included)


@dataclass
class FeedbackOutcome:
    feedback_id: int
    action: str  # added / replaced / skipped
    slot: int | None
    previous_label: str | None
    label: str
    label_index: int


@dataclass
class FeedbackResult:
    request_id: str
    outcomes: list[FeedbackOutcome]
    replayed_response: str | None = None  # a retry: the first answer, as it was sent


@dataclass
class RuntimeStats:
    feedback_applied: int = 0
    forgotten_applied: int = 0
    reembedded: int = 0
    last_snapshot_time: float | None = None
    last_snapshot_seq: int = 0
    restored_from_seq: int = 0


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
                 index: str = "exact", nprobe: int = 16, protect_feedback: bool = True,
                 feedback_db: str | None = None, feedback: FeedbackStore | None = None):
        self.loaded: LoadedModel = load_model(store, name)
        self.model = self.loaded.model.for_inference()
        self.memory = self.model.memory
        self.version = self.loaded.version
        # the manifest's policy (chosen on the training run's validation split), with any
        # explicit serve-time overrides; both are shown by /memory and the model_info metric
        self.overrides = {k: v for k, v in (policy_overrides or {}).items() if v is not None}
        self.policy: RoutingPolicy = self.loaded.policy.replace(**self.overrides)
        self.protect_feedback = protect_feedback
        self.vocab = ClassVocabulary(self.loaded.classes, self.model.config.memory_classes)
        self.lock = threading.RLock()  # the memory: a prediction reads it before or after a request's writes
        self.apply_lock = threading.Lock()  # one applier of the log at a time
        self.stats = RuntimeStats()
        capacity = self.memory.capacity if self.memory is not None else 0
        self.slot_feedback = torch.full((capacity,), EMPTY, dtype=torch.int64)  # slot -> feedback id (seq)
        self.applied_seq = 0
        self.outcomes: OrderedDict[int, FeedbackOutcome] = OrderedDict()
        self.failure: str | None = None  # a damaged record stopped the tail: not ready
        self._tail_stop = threading.Event()
        self._tail: threading.Thread | None = None
        self._dirty = False
        # taught head rows: `_changes` counts applied changes, `_fitted` those the rows reflect;
        # one fitter thread refits for everything applied so far and wakes every waiter
        self._changes = self._fitted = 0
        self._fit_cond = threading.Condition()
        self._fitter: threading.Thread | None = None
        self._hash_cache: tuple[tuple, str] | None = None
        self.snapshots = SnapshotStore(Path(state_dir) / self.loaded.name / self.version)
        self.store: FeedbackStore | None = None
        if self.memory is not None:
            self.store = feedback or open_store(feedback_db, state_dir)
            self._restore()
            if index == "ivf":  # built from the restored memory, then kept in step by every write
                self.memory.attach_index(nprobe=nprobe)
            self.sync(progress=True)

    @property
    def classes(self) -> list[str]:
        return self.vocab.names

    def class_name(self, index: int) -> str:
        return self.vocab.name(index)

    def check_label(self, label: str) -> tuple[str, bool]:
        """(the name the label resolves to, True for a new class); LabelError refuses it."""
        if self.memory is None:
            raise LabelError("this model has no memory: feedback cannot teach it")
        with self.lock:
            index, name = self.vocab.lookup(label)
        return name, index is None

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
    def embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) float32: the memory keys this model version stores."""
        return self.model.embed(images)[0].float()

    def embed(self, images: torch.Tensor) -> list[np.ndarray]:
        """The same, one (D,) array per image."""
        return list(self.embed_batch(images).numpy())

    def commit_feedback(self, vectors: list[np.ndarray], label: str, uploads: list[Upload],
                        idempotency_key: str | None = None, commit_timer=None) -> FeedbackResult:
        """Commit the examples durably, then apply the log up to them. Raises LabelError or
        StoreUnavailable with nothing written. A retried Idempotency-Key writes nothing and
        returns the first request's answer."""
        name, _ = self.check_label(label)
        t = time.perf_counter()
        r: AppendResult = self.store.append(uuid.uuid4().hex, idempotency_key, name, uploads, self.version, vectors)
        if commit_timer is not None:
            commit_timer(time.perf_counter() - t)
        self._sync_after_commit(max(r.seqs))
        if r.replayed_response is not None:
            return FeedbackResult(r.request_id, self._outcomes_of(r.seqs), r.replayed_response or None)
        return FeedbackResult(r.request_id, self._outcomes_of(r.seqs))

    def _outcomes_of(self, seqs: list[int]) -> list[FeedbackOutcome]:
        out = []
        for s in seqs:
            o = self.outcomes.get(s)
            if o is None and s > self.applied_seq:  # committed, not applied yet here (store unreachable)
                o = FeedbackOutcome(s, "pending", None, None, "", -1)
            elif o is None:  # applied long ago, or skipped (label space full): say what memory holds now
                slots = (self.slot_feedback == s).nonzero().squeeze(1).tolist()
                o = FeedbackOutcome(s, "added" if slots else "skipped", slots[0] if slots else None, None, "", -1)
            out.append(o)
        return out

    def forget(self, seq: int) -> bool:
        """Forget example `seq` everywhere: tombstone it in the store, then apply the log (its
        slot empties here now, in other processes when they tail). NotFound when unknown;
        False when it was already forgotten."""
        event_seq, _ = self.store.forget(seq)
        if event_seq is not None:
            self._sync_after_commit(event_seq)
        return event_seq is not None

    def _sync_after_commit(self, seq: int) -> None:
        """Read-your-writes after a commit. The commit stands whatever happens here: if the
        store cannot be read right now, the tail thread applies it once it can, and the
        answer says so ("pending") instead of pretending nothing was written."""
        for attempt in range(3):
            try:
                self.sync(upto=seq)
                return
            except StoreUnavailable as err:
                log.warning("applying committed feedback up to seq %d failed (%s); try %d", seq, err, attempt + 1)
                time.sleep(0.2 * (attempt + 1))

    # --- applying the log ------------------------------------------------------------------------
    def sync(self, upto: int | None = None, progress: bool = False) -> int:
        """Apply every committed event after `applied_seq` (at least up to `upto`); returns
        the new applied sequence. Damaged records raise FeedbackStoreError (nothing skipped)."""
        if self.memory is None:
            return 0
        with self.apply_lock:
            total = self.store.last_seq() if progress else None
            started, last_log = time.perf_counter(), time.perf_counter()
            while True:
                events = self.store.events_after(self.applied_seq, self.version, LOG_BATCH)
                if not events:
                    break
                if len(events) == LOG_BATCH and events[-1].kind == "example":
                    # the last request may go on in the next page: apply it whole, next time
                    tail = events[-1].request_id
                    events = events[:next(i for i in range(len(events), 0, -1)
                                          if events[i - 1].kind != "example" or events[i - 1].request_id != tail)]
                    if not events:
                        raise FeedbackStoreError(f"request {tail} has more than {LOG_BATCH} examples")
                missing = [e for e in events if e.kind == "example" and e.vector is None and not e.forgotten]
                if missing:
                    cut = events.index(missing[0])
                    self._apply_events(events[:cut])
                    self._reembed(missing[:REEMBED_BATCH])
                    continue  # read again: the vectors now come from the store (first writer wins)
                self._apply_events(events)
                if progress and total and time.perf_counter() - last_log > 2:
                    last_log = time.perf_counter()
                    log.info("applying the feedback log for model version %s: seq %d of %d (%.0f s)",
                             self.version, self.applied_seq, total, last_log - started)
            if progress and total:
                log.info("feedback log applied up to seq %d in %.1f s (%d examples re-embedded)",
                         self.applied_seq, time.perf_counter() - started, self.stats.reembedded)
            applied = self.applied_seq
        self._wait_fitted()
        return applied

    def _wait_fitted(self) -> None:
        """Return once the taught head rows (core/taught.py) reflect every change applied so
        far. Fits run on one fitter thread, each on the memory as it is when the fit starts,
        so requests that arrive during a fit share the next one instead of queueing one
        each (and its megabytes of temporaries come from one malloc arena)."""
        if self.model.taught is None:  # a model without replay features has no rows
            return
        with self._fit_cond:
            target = self._changes
            if self._fitter is None:
                self._fitter = threading.Thread(target=self._fit_loop, name="taught-fit", daemon=True)
                self._fitter.start()
            self._fit_cond.notify_all()
            while self._fitted < target and not self._tail_stop.is_set():
                self._fit_cond.wait(1.0)

    def _fit_loop(self) -> None:
        while not self._tail_stop.is_set():
            with self._fit_cond:
                while self._fitted >= self._changes and not self._tail_stop.is_set():
                    self._fit_cond.wait(1.0)
            with self.lock:  # the examples as of now; the fit itself leaves predictions free to run
                target = self._changes
                examples = self.model.taught_examples((self.slot_feedback != EMPTY).nonzero().squeeze(1),
                                                      self.policy)
            try:
                self.model.fit_taught(examples, self.policy)
            except Exception:  # keep serving with the rows as they were; the error is in the log
                log.exception("fitting the taught head rows failed")
            with self._fit_cond:
                self._fitted = target
                self._fit_cond.notify_all()

    def _reembed(self, events: list[Event]) -> None:
        """Embed examples this model version has no vector for, from their stored images."""
        spec, limits = self.loaded.input, ImageLimits(max_pixels=1 << 62)
        vectors, images, seqs = {}, [], []
        for e in events:
            data, _, forgotten = self.store.image(e.seq)
            if data is None:
                if not forgotten:
                    raise FeedbackStoreError(f"{self.store.describe()}: example {e.seq} has no image and no "
                                             f"vector for model version {self.version} (damaged record)")
                continue
            try:
                images.append(decode_image(data, spec, limits))
                seqs.append(e.seq)
            except ImageError as err:  # it decoded when accepted: the stored bytes changed
                raise FeedbackStoreError(f"{self.store.describe()}: stored image of example {e.seq} no longer "
                                         f"decodes ({err})") from err
        if images:
            with torch.no_grad():
                keys = self.model.embed(torch.stack(images))[0].float().numpy()
            vectors = dict(zip(seqs, keys))
            self.store.put_vectors(self.version, vectors)
            self.stats.reembedded += len(vectors)

    def _apply_events(self, events: list[Event]) -> None:
        """Apply in order; consecutive examples of one request are taught together, as live."""
        i = 0
        while i < len(events):
            e = events[i]
            if e.kind == "forget":
                self._apply_forget(e)
                i += 1
                continue
            j = i
            while j < len(events) and events[j].kind == "example" and events[j].request_id == e.request_id:
                j += 1
            self._apply_request([x for x in events[i:j] if x.vector is not None])
            self.applied_seq = events[j - 1].seq
            i = j

    def _apply_request(self, events: list[Event]) -> None:
        if not events:
            return
        with self.lock:
            name = events[0].label
            try:
                index = self.vocab.add(name)
            except LabelError as err:  # the label space filled up since it was accepted: same everywhere
                log.warning("feedback %s skipped: %s", [e.seq for e in events], err)
                self.applied_seq = events[-1].seq
                return
            feats = torch.from_numpy(np.stack([e.vector for e in events]))  # (N, D)
            # user-taught items are never replaced by later feedback while training items remain
            protected = self.slot_feedback != EMPTY if self.protect_feedback else None
            rep = self.memory.teach(feats, torch.full((len(events),), index), protected=protected)
            for e, a, s, prev in zip(events, rep.action.tolist(), rep.slot.tolist(), rep.previous_label.tolist()):
                if s != EMPTY:
                    self.slot_feedback[s] = e.seq
                self._remember(FeedbackOutcome(e.seq, ACTION_NAMES[a], s if s != EMPTY else None,
                                               self.vocab.name(prev) if prev != EMPTY else None,
                                               self.vocab.names[index], index))
            self.applied_seq = events[-1].seq
            self.stats.feedback_applied += len(events)
            self._dirty = True
            self._changes += 1

    def _apply_forget(self, e: Event) -> None:
        with self.lock:
            slots = (self.slot_feedback == e.target).nonzero().squeeze(1)
            self.memory.forget(slots)
            self.slot_feedback[slots] = EMPTY
            self.outcomes.pop(e.target, None)
            self.applied_seq = e.seq
            self.stats.forgotten_applied += 1
            self._dirty = True
            self._changes += 1

    def _remember(self, o: FeedbackOutcome) -> None:
        self.outcomes[o.feedback_id] = o
        while len(self.outcomes) > KEEP_OUTCOMES:
            self.outcomes.popitem(last=False)

    def start_tail(self, interval: float = 0.02) -> None:
        """Apply what other processes commit, in the background."""
        if self.memory is None or self._tail is not None:
            return

        def run():
            while not self._tail_stop.is_set():
                self.store.wait_for_change(interval)
                try:
                    self.sync()
                except StoreUnavailable as err:
                    log.warning("feedback store unavailable (%s); retrying", err)
                    self._tail_stop.wait(1.0)
                except FeedbackStoreError as err:  # refuse loudly; never skip a record
                    self.failure = str(err)
                    log.error("the feedback log cannot be applied: %s", err)
                    return
                except Exception:  # keep tailing; the error is in the log
                    log.exception("applying the feedback log failed")
                    self._tail_stop.wait(1.0)

        self._tail = threading.Thread(target=run, name="feedback-tail", daemon=True)
        self._tail.start()

    # --- snapshots -------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Newest valid snapshot of this model version, read straight into the memory (no
        second copy: the start-up peak stays near the memory's own size). Everything that can
        be wrong with a snapshot is found before its first byte is copied."""
        last = self.store.last_seq()
        for sidecar in self.snapshots.sidecars():
            try:
                path, meta = self.snapshots.check(sidecar)
                if meta.get("store_id") != self.store.store_id:
                    raise SnapshotError(f"{sidecar}: taken from another feedback store")
                if int(meta["last_seq"]) > last:
                    raise SnapshotError(f"{sidecar}: ahead of the feedback store (seq {meta['last_seq']} > {last})")
                self.vocab.reset(list(meta["classes"]))
                self.snapshots.load_into(path, {**self.memory.state_dict(), "slot_feedback": self.slot_feedback})
            except (SnapshotError, KeyError, LabelError, ValueError) as e:
                log.error("snapshot %s refused (%s); trying the previous one", sidecar.name, e)
                self.vocab.reset(list(self.loaded.classes))
                continue
            self.memory._recount()
            self._changes += 1  # the restored taught items need their rows
            self.applied_seq = self.stats.restored_from_seq = int(meta["last_seq"])
            log.info("memory restored from %s (feedback log up to seq %d)", sidecar.name, self.applied_seq)
            return

    def _consistent_state(self):
        """(applied seq, class names, layout, pieces): the memory and its slot -> feedback map
        as of one moment, read a piece at a time while predictions and writes go on. Close
        the pieces generator (or read it to the end) to stop the copy-on-write."""
        with self.lock:
            seq, classes = self.applied_seq, list(self.vocab.names)
            slot_feedback = self.slot_feedback.clone()  # 8 bytes a slot: copied whole
            cow = self.memory.begin_copy_on_write()
        layout = {**self.memory.state_layout(), "slot_feedback": (slot_feedback.dtype, tuple(slot_feedback.shape))}

        def pieces():
            try:
                yield from self.memory.state_pieces(cow, self.lock)
                yield "slot_feedback", slot_feedback
            finally:
                with self.lock:
                    self.memory.end_copy_on_write(cow)
        return seq, classes, layout, pieces()

    def snapshot(self) -> Path | None:
        """Write the memory atomically (safetensors, then its JSON sidecar as commit point),
        streamed a piece at a time (Memory.state_pieces): predictions and feedback go on while
        a 1M-item memory is written, and no second copy of it is made."""
        if self.memory is None:
            return None
        seq, classes, layout, pieces = self._consistent_state()
        with closing(pieces):
            sidecar = self.snapshots.write(seq, layout, pieces, {
                "last_seq": seq, "classes": classes, "store_id": self.store.store_id, "model": self.loaded.name,
                "model_version": self.version})
        self.stats.last_snapshot_time = time.time()
        self.stats.last_snapshot_seq = seq
        self._dirty = False
        return sidecar

    @property
    def dirty(self) -> bool:
        return self._dirty

    # --- inspection --------------------------------------------------------------------------------
    def _change_key(self) -> tuple:
        # every change to the memory moves the applied sequence or the write counter
        return (self.applied_seq, int(self.memory.writes) if self.memory is not None else 0,
                len(self.vocab.names), int(self.memory.size) if self.memory is not None else 0)

    def state_hash(self) -> str:
        """sha256 of the memory state (every tensor of state_dict, the slot -> feedback map and
        the class names): equal on two processes exactly when their memories are equal. Read
        like a snapshot, a piece at a time; cached until the memory changes (the review page
        polls /memory)."""
        with self.lock:
            key = self._change_key()
            if self._hash_cache is not None and self._hash_cache[0] == key:
                return self._hash_cache[1]
        h = hashlib.sha256()
        if self.memory is None:
            h.update(self.slot_feedback.numpy().tobytes())
            h.update(json.dumps(self.vocab.names).encode())
            return h.hexdigest()
        _, classes, _, pieces = self._consistent_state()
        with closing(pieces):
            last = None
            for name, piece in pieces:
                if name != last and name != "slot_feedback":  # each tensor's name once, before its bytes
                    h.update(name.encode())
                last = name
                h.update(tensor_bytes(piece.contiguous()))  # a view: no copy of the piece
        h.update(json.dumps(classes).encode())
        with self.lock:
            if self._change_key() == key:
                self._hash_cache = (key, h.hexdigest())
        return h.hexdigest()

    def memory_info(self) -> dict:
        """What /memory shows; takes the memory lock (call it off the event loop)."""
        base = {"policy": self.policy.to_dict(), "policy_overrides": dict(self.overrides),
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
        self._tail_stop.set()
        with self._fit_cond:
            self._fit_cond.notify_all()
        if self._tail is not None:
            self._tail.join(10)
        if self.store is not None:
            self.store.close()
