"""A memory replica: the served model's memory as a function of the feedback log.

Every process applies the log in sequence order, one request at a time, exactly as it
applied its own requests live, so processes that have applied the same prefix hold
bit-identical memories (`state_hash`).

    restore   the newest valid snapshot of this model version, read in place; with an IVF
              index, the newest saved one that passes its checks, made to hold that memory
              (else one trained on a sample and saved); then the log after it (examples this
              version has no vector for are re-embedded from their stored images, in order)
    apply     examples of one request taught together; a forget makes the memory what it
              would be had the example never been taught (rebuilt from the newest snapshot
              before it and the log after it)
    snapshot  the memory as of one moment (ConsistentRead), written while predictions and
              writes go on; snapshots holding a forgotten example are removed
    hash      sha256 of that state, once per change, one computation at a time

The memory lock (`lock`) guards the memory's tensors, the slot -> feedback map and the class
names; `apply_lock` lets one applier at a time read and apply the log. (One file of ~390
lines: restoring, applying, snapshotting and hashing share these invariants.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.memory import ACTION_NAMES, EMPTY
from ..core.model import EnhancedClassifier
from ..core.preprocess import ImageError, ImageLimits, decode_image
from ..core.retrieval import IndexFileError, IVFIndex
from ..core.store import LoadedModel, load_index, load_model
from ..core.tensorfile import tensor_bytes
from .consistent_read import ConsistentRead
from .feedback_store import Event, FeedbackStore, FeedbackStoreError, StoreUnavailable
from .fitter import TaughtRowFitter
from .snapshots import SnapshotError, SnapshotStore
from .vocabulary import ClassVocabulary, LabelError

log = logging.getLogger(__name__)
REEMBED_BATCH = 256
LOG_BATCH = 2000  # log events read per query (a request holds at most MAX_FILES examples)
KEEP_OUTCOMES = 50_000  # per-example outcomes kept for answers (a retried request's included)


@dataclass
class FeedbackOutcome:
    feedback_id: int
    action: str  # added / replaced / skipped / pending
    slot: int | None
    previous_label: str | None
    label: str
    label_index: int


@dataclass
class ReplicaStats:
    feedback_applied: int = 0
    reembedded: int = 0
    last_snapshot_time: float | None = None
    last_snapshot_seq: int = 0
    restored_from_seq: int = 0
    index_source: str | None = None  # where the IVF index came from: a saved file, or "trained"
    index_seconds: float = 0.0  # loading (and reconciling) or training it at start
    index_retrains: int = 0  # new indexes trained in the background since (the memory outgrew one)


class MemoryReplica:
    def __init__(self, loaded: LoadedModel, model: EnhancedClassifier, source: tuple, store: FeedbackStore,
                 snapshots: SnapshotStore, vocab: ClassVocabulary, fitter: TaughtRowFitter, lock: threading.RLock,
                 slot_feedback: torch.Tensor, protect_feedback: bool = True):
        self.loaded, self.model, self.version = loaded, model, loaded.version
        self.memory = model.memory
        self._source = source  # (model store, name): the trained memory, to rebuild from
        self.store, self.snapshots, self.vocab, self.fitter = store, snapshots, vocab, fitter
        self.lock = lock
        self.apply_lock = threading.Lock()  # one applier of the log at a time
        self.slot_feedback = slot_feedback  # (M,) slot -> feedback id (seq) that wrote it, EMPTY if none
        self.protect_feedback = protect_feedback
        self.applied_seq = 0
        self.outcomes: OrderedDict[int, FeedbackOutcome] = OrderedDict()
        self.stats = ReplicaStats()
        self._dirty = False
        self._rebuilds = 0  # memory rebuilds (forgets): a read that spans one is discarded
        self._skipped: set[int] = set()  # examples forgotten before they reached this process
        self._forgets: list[tuple[int, int]] = []  # (forget seq, example seq) applied: for snapshots in flight
        self._hash_cache: tuple[tuple, str] | None = None
        self._hash_lock = threading.Lock()  # one hash computation at a time; the others take its result
        self._retraining: threading.Thread | None = None  # a new IVF index being trained in the background

    def restore(self, ivf_nprobe: int | None = None) -> None:
        """Start: the newest valid snapshot; with `ivf_nprobe`, the IVF index (`_attach_index`),
        kept in step by every write from then on; then the whole log after the snapshot."""
        self._restore()
        self._follow_novelty()
        if ivf_nprobe is not None:
            self._attach_index(ivf_nprobe)
        self.sync(progress=True)

    def _follow_novelty(self) -> None:
        """The ood_score's class means from the memory as restored, kept in step by every
        write from then on (core/novelty.py)."""
        if self.model.novelty is not None and self.model.novelty.calibrated:
            self.model.novelty.attach(self.memory)

    # --- the IVF index ---------------------------------------------------------------------------
    def _attach_index(self, nprobe: int) -> None:
        """The newest saved index that passes its checks (beside the snapshots, then the model
        store's), made to hold exactly the restored memory; without one, an index trained now on
        a bounded sample and saved beside the snapshots for the next start."""
        t0 = time.perf_counter()
        index, source = self._saved_index(nprobe)
        fixed = 0
        if index is None:
            index, source = self.memory.attach_index(nprobe=nprobe), "trained"
            self._save_index(index)
        else:  # saved from another state of this memory (before feedback, an older snapshot)
            fixed = index.reconcile(self.memory.keys.detach(), self.memory.filled())
            self.memory.index = index
        self.stats.index_source, self.stats.index_seconds = source, time.perf_counter() - t0
        log.info("IVF index from %s in %.2f s: %d items, %d cells, nprobe %d (%d slots re-read from the memory)",
                 source, self.stats.index_seconds, len(index), index.nlist, index.nprobe, fixed)
        self._retrain_if_outgrown()

    def _save_index(self, index: IVFIndex) -> None:
        """Beside the snapshots, for the next start; a failure costs that start a training, no more."""
        try:
            self.snapshots.write_index(self.applied_seq, index)
        except OSError as e:
            log.error("the IVF index could not be saved (%s); the next start trains it again", e)

    def _saved_index(self, nprobe: int) -> tuple[IVFIndex | None, str | None]:
        """(index, where it was saved), or (None, None). A damaged or foreign file is refused
        loudly (logged as an error, never used) and the next one is tried."""
        dim = self.memory.keys.shape[1]
        candidates = [(sidecar.name, lambda s=sidecar: self.snapshots.load_index(s, dim, nprobe))
                      for sidecar in self.snapshots.index_sidecars()]
        candidates.append(("the model store", lambda: load_index(*self._source, self.loaded.manifest, dim, nprobe)))
        for source, load in candidates:
            try:
                index = load()
            except IndexFileError as e:
                log.error("%s; the memory's index is taken from elsewhere or trained again", e)
                continue
            if index is not None:
                return index, source
        return None, None

    def _retrain_if_outgrown(self) -> None:
        """A memory that outgrew its index gets a new one, trained on a thread at background
        priority: never on the request path. The caller holds the lock (or nothing runs yet)."""
        index = self.memory.index
        if index is None or self._retraining is not None or not index.outgrown(self.memory.size):
            return
        self._retraining = threading.Thread(target=self._retrain, name="ivf-retrain", daemon=True)
        self._retraining.start()

    def _retrain(self) -> None:
        """Train a new index from the keys while predictions and writes go on: the slots
        written meanwhile (the memory tells its listeners before each write) are read again
        before it replaces the old one, under the lock."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        written: list[torch.Tensor] = []
        with self.lock:
            self.memory.before_write.append(written.append)
            filled, rebuilds, nprobe = self.memory.filled(), self._rebuilds, self.memory.index.nprobe
        try:
            index = IVFIndex(self.memory.keys.detach(), filled, nprobe=nprobe)
            sidecar = self.snapshots.write_index(self.applied_seq, index)
            with self.lock:
                keys, filled = self.memory.keys.detach(), self.memory.filled()
                if rebuilds != self._rebuilds:  # a forget rebuilt the memory: the file may hold the example
                    self.snapshots.remove(sidecar)
                    index.reconcile(keys, filled)
                elif written:
                    index.refresh(torch.cat(written), keys, filled)
                self.memory.index = index
                self.stats.index_retrains += 1
            log.info("IVF index trained again in the background: %d items, %d cells", len(index), index.nlist)
        except Exception:
            log.exception("training the IVF index again failed; the old one stays")
        finally:
            with self.lock:
                self.memory.before_write.remove(written.append)
                self._retraining = None

    def sync(self, upto: int | None = None, progress: bool = False) -> int:
        """Apply every committed event after `applied_seq` (at least up to `upto`); returns
        the new applied sequence. Damaged records raise FeedbackStoreError (nothing skipped)."""
        with self.apply_lock:
            self._apply_log(progress=progress)
            applied = self.applied_seq
        self.fitter.wait()
        return applied

    def _apply_log(self, until: int | None = None, progress: bool = False) -> None:
        """Apply the log after `applied_seq`, up to `until` (None: all of it); the caller
        holds apply_lock."""
        total = self.store.last_seq() if progress else None
        started, last_log = time.perf_counter(), time.perf_counter()
        while until is None or self.applied_seq < until:
            events = self.store.events_after(self.applied_seq, self.version, LOG_BATCH)
            if until is not None:
                events = [e for e in events if e.seq <= until]
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
            # an example forgotten before it reached this process has no vector left: it is
            # applied as never taught, which is what a forget makes of it everywhere
            self._skipped.update(x.seq for x in events[i:j] if x.vector is None)
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
            self.fitter.changed()
            self._retrain_if_outgrown()

    def _apply_forget(self, e: Event) -> None:
        """Make the memory what it would be had the example never been taught: the state a
        process reaches that replays the log after the forget (the example has no vector
        left, so it skips it). An example this process applied took a slot, maybe replacing
        another item, and moved the write counters: the memory is rebuilt from the newest
        snapshot before the example (else the trained model's memory) and the log after it,
        predictions waiting meanwhile."""
        if e.target in self._skipped:  # never applied here: nothing to undo
            self._skipped.discard(e.target)
        else:
            with self.lock:
                upto = self.applied_seq
                self._reset(before=e.target)
                self._apply_log(until=upto)
                log.info("forgot example %d: memory rebuilt from seq %d (%d events replayed)",
                         e.target, self.stats.restored_from_seq, upto - self.stats.restored_from_seq)
        with self.lock:
            self.applied_seq = e.seq
            self._dirty = True
            self.fitter.changed()
            self._forgets = self._forgets[-999:] + [(e.seq, e.target)]
        # snapshots taken after the example arrived hold its features: gone with it
        self.snapshots.remove_holding(e.target)

    def _reset(self, before: int) -> None:
        """The memory as of the newest valid snapshot taken before log position `before`, or
        the trained model's own memory; the caller replays the log after it."""
        self._rebuilds += 1  # a snapshot or hash read in progress is no longer of one moment
        self.vocab.reset(list(self.loaded.classes))
        self.slot_feedback.fill_(EMPTY)
        self.outcomes.clear()
        self._skipped.clear()
        if not self._restore(before=before):
            # the stored memory whose keys this version's network made (the engine's variant: store.py)
            pristine = load_model(*self._source, keys_of=self.loaded.engine).model.memory
            self.memory.load_state_dict(pristine.state_dict())
            self.applied_seq = self.stats.restored_from_seq = 0
        if self.memory.index is not None:  # it held the memory before: made to hold the restored one
            self.memory.index.reconcile(self.memory.keys.detach(), self.memory.filled())
        self._follow_novelty()

    def _remember(self, o: FeedbackOutcome) -> None:
        self.outcomes[o.feedback_id] = o
        while len(self.outcomes) > KEEP_OUTCOMES:
            self.outcomes.popitem(last=False)

    def outcomes_of(self, seqs: list[int]) -> list[FeedbackOutcome]:
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

    def sync_after_commit(self, seq: int) -> None:
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

    def _restore(self, before: int | None = None) -> bool:
        """Newest valid snapshot of this model version (taken before log position `before`),
        read straight into the memory (no second copy: the start-up peak stays near the
        memory's own size). Everything that can be wrong with a snapshot is found before its
        first byte is copied. False when there is none."""
        last = self.store.last_seq()
        for sidecar in self.snapshots.sidecars():
            if before is not None and self.snapshots.position(sidecar) >= before:
                continue
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
            self.fitter.changed()  # the restored taught items need their rows
            self.applied_seq = self.stats.restored_from_seq = int(meta["last_seq"])
            log.info("memory restored from %s (feedback log up to seq %d)", sidecar.name, self.applied_seq)
            return True
        return False

    def _consistent_state(self):
        """(applied seq, class names, layout, pieces): the memory and its slot -> feedback map
        as of one moment, read a piece at a time while predictions and writes go on. Close
        the pieces generator (or read it to the end) to end the consistent read."""
        with self.lock:
            seq, classes = self.applied_seq, list(self.vocab.names)
            slot_feedback = self.slot_feedback.clone()  # 8 bytes a slot: copied whole
            read = ConsistentRead(self.memory, self.lock)
        layout = {**self.memory.state_layout(), "slot_feedback": (slot_feedback.dtype, tuple(slot_feedback.shape))}

        def pieces():
            yield from read.pieces()
            yield "slot_feedback", slot_feedback
        return seq, classes, layout, pieces()

    def snapshot(self) -> Path | None:
        """Write the memory atomically (safetensors, then its JSON sidecar as commit point),
        streamed a piece at a time (ConsistentRead): predictions and feedback go on while
        a 1M-item memory is written, and no second copy of it is made."""
        with self.lock:
            rebuilds = self._rebuilds
        seq, classes, layout, pieces = self._consistent_state()
        with closing(pieces):
            sidecar = self.snapshots.write(seq, layout, pieces, {
                "last_seq": seq, "classes": classes, "store_id": self.store.store_id, "model": self.loaded.name,
                "model_version": self.version})
        with self.lock:  # an example forgotten while this was written is in it: remove it again
            stale = rebuilds != self._rebuilds or any(forget_seq > seq >= target
                                                      for forget_seq, target in self._forgets)
        if stale:
            self.snapshots.remove(sidecar)
            return None
        self.stats.last_snapshot_time = time.time()
        self.stats.last_snapshot_seq = seq
        self._dirty = False
        return sidecar

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _change_key(self) -> tuple:
        # every change to the memory moves the applied sequence or the write counter
        return (self._rebuilds, self.applied_seq, int(self.memory.writes),
                len(self.vocab.names), int(self.memory.size))

    def state_hash(self) -> str:
        """sha256 of the memory state (every tensor of state_dict, the slot -> feedback map and
        the class names): equal on two processes exactly when their memories are equal. Read
        like a snapshot, a piece at a time; cached until the memory changes (the review page
        polls /memory)."""
        with self._hash_lock:  # concurrent callers wait for one computation and share it
            while True:
                digest, key = self._state_hash()
                if key[0] == self._rebuilds:  # no rebuild (forget) mixed two states into it
                    return digest

    def _state_hash(self) -> tuple[str, tuple]:
        with self.lock:
            key = self._change_key()
            if self._hash_cache is not None and self._hash_cache[0] == key:
                return self._hash_cache[1], key
        h = hashlib.sha256()
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
        return h.hexdigest(), key
