"""Feature memories: stored (feature, label) items answered by cosine similarity.

Two kinds, built by name through `create_memory`:

- `CachedMemory`: plain buffers of L2-normalised keys and int64 labels. Nothing is learnt;
  it is a write-through cache of features seen in training or taught through feedback.
- `TrainableMemory`: keys and values are `nn.Parameter`s trained by the contrastive loss.
  A written slot gets the normalised feature as key and a one-hot value row.

Both share retrieval, the contrastive loss and the bookkeeping; they differ only in how a
slot's key and class distribution are read and in the replacement rule when full. (One file
of ~500 lines: the shared logic and the two kinds read best side by side.)

Definitions (also in the README):
- A slot's *class distribution* is its value row clamped at 0 and normalised to sum 1
  (cached: the one-hot of its label).
- Retrieval takes the `k` most similar filled slots (the routing policy's `neighbours`), weights them by
  softmax(similarity / temperature) and sums their class distributions into a vote.
  `confidence = vote[winner] * max(0, similarity of the nearest slot)`: agreement of the
  neighbours times how close the nearest one is, so a far-away query is never confident.
  An exact match (similarity >= `EXACT_MATCH`) is decisive: its label with confidence 1.
- A trainable slot's *slot confidence* is the largest share of its class distribution: 1
  when its value is still the one-hot that was written, lower as training spreads it.

Devices: all state is in buffers and parameters, so `memory.to(device)` moves all of it; every
tensor made here is made on the memory's device. The training path (`similarity`,
`contrastive_loss`, `update`) never waits for the device: no data-dependent Python branch, no
boolean indexing, fixed-size writes (see `update` and `_commit`), so a CUDA step queues its
kernels and runs on. Serving's writes (`teach`, `forget`) and searches may read results back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .retrieval import DEFAULT_NPROBE, IVFIndex, exact_topk
from .routing import EMPTY
EXACT_MATCH = 0.9999  # cosine similarity above which a stored item is the query itself

# actions in UpdateReport.action
SKIPPED, ADDED, REPLACED = 0, 1, 2
ACTION_NAMES = {SKIPPED: "skipped", ADDED: "added", REPLACED: "replaced"}


@dataclass
class MemoryConfig:
    capacity: int = 10000
    """Number of slots (items) the memory holds."""
    feature_dim: int = 128
    """Length of each stored feature vector."""
    num_classes: int = 10
    """Size of the memory's label space (may exceed the network head's classes)."""
    similarity_threshold: float = 1.0
    """When full, an example whose best similarity is below this replaces a slot; others are skipped
    (1.0: only exact duplicates are skipped, which keeps the memory fresh as training moves features)."""
    temperature: float = 0.1
    """Softmax temperature of retrieval weights and of the contrastive loss."""

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"--memory-size must be >= 1, got {self.capacity}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {self.feature_dim}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"--similarity-threshold must be in [-1, 1], got {self.similarity_threshold}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")


@dataclass
class Retrieval:
    labels: torch.Tensor  # (B,) int64, EMPTY when the memory is empty
    confidence: torch.Tensor  # (B,) in [0, 1]
    slots: torch.Tensor  # (B, k) int64 nearest slots, EMPTY where fewer than k are filled
    similarity: torch.Tensor  # (B, k) cosine similarity of those slots (-inf where EMPTY)
    class_scores: torch.Tensor  # (B, C) the neighbours' vote
    ood_score: torch.Tensor | None = None  # (B,) how unlike everything known (core/novelty.py); None: not scored
    class_distance: torch.Tensor | None = None  # (B, C) Mahalanobis distance to each class's mean (novelty.py)


@dataclass
class UpdateReport:
    action: torch.Tensor  # (B,) SKIPPED / ADDED / REPLACED
    slot: torch.Tensor  # (B,) slot written, EMPTY when skipped
    previous_label: torch.Tensor  # (B,) label the slot held before (EMPTY if it was empty)


class Memory(nn.Module):
    """Shared state and logic. Subclasses define keys, class distributions and replacement."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.config = config
        M = config.capacity
        # label written into each slot; EMPTY marks a free slot
        self.register_buffer("labels", torch.full((M,), EMPTY, dtype=torch.int64))
        # write counter at the time each slot was written: ties in replacement go to the oldest
        self.register_buffer("written_at", torch.zeros(M, dtype=torch.int64))
        # L2 norm of the feature each slot was written from (keys are stored unit-length):
        # key * norm gives back the head's input, which the taught head rows are fitted on.
        # 0 = unknown (memories saved before the norm was kept: see OPTIONAL_STATE)
        self.register_buffer("norms", torch.zeros(M))
        self.register_buffer("writes", torch.zeros((), dtype=torch.int64))
        self.register_buffer("replacements", torch.zeros((), dtype=torch.int64))
        # items per class, kept by every write: derived from `labels` (recounted on load, not
        # saved), so that size and the class-balanced vote never scan a 1M-slot memory
        self.register_buffer("held_per_class", torch.zeros(config.num_classes, dtype=torch.int64), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._recount())
        self.index: IVFIndex | None = None  # optional approximate search; derived, never saved
        # called with the slots about to be written, before any write (serving's consistent
        # reads save the rows they still need)
        self.before_write: list = []

    # state_dict entries a memory saved by an earlier version may lack (left at their default)
    OPTIONAL_STATE = frozenset({"norms"})

    # --- what subclasses provide -------------------------------------------------------
    keys: torch.Tensor  # (M, D): a buffer (cached, stored unit-length) or a parameter (trainable)
    keys_are_unit: bool = False  # True when keys are stored L2-normalised

    def class_distribution(self, slots: torch.Tensor) -> torch.Tensor:  # (..., C)
        raise NotImplementedError

    def _slot_rows(self, keys: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The kind's own per-slot state for (N, D) unit keys and (N,) labels: {name: (N, ...)}."""
        raise NotImplementedError

    def _choose_replacements(self, sims: torch.Tensor, labels: torch.Tensor, wants: torch.Tensor,
                             available: torch.Tensor) -> torch.Tensor:
        """The slot each row that `wants` ((N,) bool) replaces, among the `available` slots
        ((M,) bool), from sims (N, M) and labels (N,): (N,) distinct slots, EMPTY = skip.
        Fixed work: sorts and masked reductions, no data-dependent loop."""
        raise NotImplementedError

    # --- bookkeeping ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def size(self) -> int:
        return int(self.held_per_class.sum())

    def filled(self) -> torch.Tensor:  # (M,) bool
        return self.labels != EMPTY

    def class_counts(self) -> torch.Tensor:  # (C,)
        return self.held_per_class.clone()

    def _recount(self) -> None:
        held = self.labels[self.labels != EMPTY]
        self.held_per_class.copy_(torch.bincount(held, minlength=self.config.num_classes))

    def _count_change(self, slots: torch.Tensor, new_labels: torch.Tensor | None) -> None:
        """Keep held_per_class in step with labels[slots] becoming new_labels (None = emptied)."""
        old = self.labels[slots]
        old = old[old != EMPTY]
        self.held_per_class.sub_(torch.bincount(old, minlength=self.config.num_classes))
        if new_labels is not None:
            self.held_per_class.add_(torch.bincount(new_labels, minlength=self.config.num_classes))

    # --- the state, for readers of it (snapshots, state hashes) -------------------------------
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """The state_dict entries with one row per slot (keys, labels, written_at, values)."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items()
                if v.dim() >= 1 and v.shape[0] == self.capacity}

    def state_layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of every state_dict entry, in name order."""
        return {k: (v.dtype, tuple(v.shape)) for k, v in sorted(self.state_dict().items())}

    def _notify_before_write(self, slots: torch.Tensor) -> None:
        for listener in self.before_write:
            listener(slots)

    def similarity(self, features: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Cosine similarity of each query to every slot, (B, M), -inf for empty slots.
        One matrix product; `dtype=torch.bfloat16` runs it on the CPU's bf16 units (training)."""
        q = F.normalize(features, dim=-1)  # (B, D)
        keys = self.keys  # (M, D)
        if dtype is not None:
            q, keys = q.to(dtype), keys.to(dtype)
        sims = (q @ keys.T).float()  # (B, M)
        if not self.keys_are_unit:  # scale columns by 1/|key|: cheaper than normalising (M, D)
            sims = sims * self.keys.norm(dim=-1).clamp_min(1e-12).reciprocal()
        # masked even when full (a no-op then): asking `size` would wait for the device
        return sims.masked_fill(~self.filled(), float("-inf"))

    def similarity_to(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`similarity` restricted to these (filled) slots: (B, S)."""
        keys = self.keys[slots]  # (S, D)
        sims = F.normalize(features, dim=-1) @ keys.T  # (B, S)
        return sims if self.keys_are_unit else sims / keys.norm(dim=-1).clamp_min(1e-12)

    # --- retrieval -------------------------------------------------------------------------
    def search(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most similar filled slots: (similarity (B, k), slot (B, k)), -inf where
        fewer are filled. Exact and chunked (retrieval.exact_topk), or the attached index."""
        q = F.normalize(features.float(), dim=-1)  # (B, D)
        if self.index is not None:  # candidates from the index, similarities exact from the keys
            _, slots = self.index.search(q, k)  # (B, k), -1 where fewer were found
            keys = self.keys.detach()[slots.clamp_min(0)]  # (B, k, D)
            sims = torch.einsum("bd,bkd->bk", q, keys)
            if not self.keys_are_unit:
                sims = sims / keys.norm(dim=-1).clamp_min(1e-12)
            sims = sims.masked_fill(slots < 0, float("-inf"))
            sims, order = sims.sort(dim=-1, descending=True)
            return sims, slots.gather(1, order)
        scale = None if self.keys_are_unit else self.keys.detach().norm(dim=-1).clamp_min(1e-12).reciprocal()
        return exact_topk(q, self.keys.detach(), k, None if self.size == self.capacity else self.filled(), scale)

    def features_of(self, slots: torch.Tensor) -> torch.Tensor:
        """(N,) slots -> (N, D) the features they were written from: unit key * norm (zero
        rows where the norm is unknown)."""
        keys = F.normalize(self.keys.detach()[slots], dim=-1)
        return keys * self.norms[slots].unsqueeze(-1)

    @torch.no_grad()
    def attach_index(self, nlist: int | None = None, nprobe: int = DEFAULT_NPROBE) -> IVFIndex:
        """Search through a faiss IVF index from now on, kept in step with every write.
        For serving: a trainable memory's keys also move by gradient steps, which the index
        would not see, so attach it only to a memory that is no longer trained."""
        self.index = IVFIndex(self.keys.detach(), self.filled(), nlist=nlist, nprobe=nprobe)
        return self.index

    def retrieve(self, features: torch.Tensor, k: int = 5, class_balance: float = 0.0) -> Retrieval:
        """Nearest filled slots of each query and the neighbours' vote; see module docstring.
        `class_balance` > 0 weighs each neighbour by (mean items per held class / items of its
        class) ** class_balance, so a class taught with a few examples can outvote one held
        thousands of times (both come from the RoutingPolicy)."""
        k = min(k, self.capacity)
        top_sim, top_slot = self.search(features, k)  # (B, k)
        valid = torch.isfinite(top_sim)  # (B, k) False where fewer than k slots are filled
        top_slot = top_slot.masked_fill(~valid, EMPTY)

        weights = torch.softmax(top_sim / self.config.temperature, dim=-1)  # (B, k)
        weights = torch.nan_to_num(weights, nan=0.0)  # a row of all -inf (empty memory) gives NaN
        dist = self.class_distribution(top_slot.clamp_min(0))  # (B, k, C)
        if class_balance > 0:
            counts = self.class_counts().float()  # (C,)
            prior = (counts[counts > 0].mean() / counts.clamp_min(1)) ** class_balance  # (C,)
            weights = weights * (dist @ prior)  # (B, k): each neighbour by its class's weight
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        votes = (weights.unsqueeze(-1) * dist).sum(1)  # (B, C)

        exact = valid[:, 0] & (top_sim[:, 0] >= EXACT_MATCH)  # (B,)
        votes = torch.where(exact.unsqueeze(-1), dist[:, 0], votes)
        share, labels = votes.max(-1)  # (B,)
        nearest = torch.where(valid[:, 0], top_sim[:, 0], torch.zeros_like(share)).clamp(0, 1)
        confidence = torch.where(exact, torch.ones_like(share), share * nearest)
        labels = labels.masked_fill(~valid[:, 0], EMPTY)
        confidence = confidence.masked_fill(~valid[:, 0], 0.0).clamp(0, 1)
        return Retrieval(labels, confidence, top_slot, top_sim, votes)

    # --- loss ------------------------------------------------------------------------------
    def contrastive_loss(self, features: torch.Tensor, labels: torch.Tensor,
                         similarity: torch.Tensor | None = None) -> torch.Tensor:
        """Supervised contrastive loss of queries against memory items (NCA form).

        p = softmax(cos(query, item) / temperature) over filled items; the loss of a query is
        -log(sum_m p_m * dist_m[label]), the probability mass on items of its class, computed
        for all classes at once as p @ dist. Queries whose class the memory does not hold add
        nothing; with none left (an empty memory included) the loss is a differentiable zero.
        `similarity` (B, M) may be passed when already computed. No host synchronisation.
        """
        sims = self.similarity(features) if similarity is None else similarity  # (B, M), -inf on empty
        dist = self.slot_distribution()  # (M, C), zero rows for empty slots
        has_positive = (dist.sum(0) > 0)[labels]  # (B,) the memory holds the query's class
        # -inf (empty slots) -> a finite floor: exp underflows to exactly 0 either way, but a
        # row with every slot empty gives a uniform p instead of NaN (whose gradient would be
        # NaN even where it is masked out below)
        p = torch.softmax((sims / self.config.temperature).clamp_min(-1e4), dim=-1)  # (B, M)
        class_mass = p @ dist  # (B, C)
        mass = class_mass.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B,)
        per_query = -torch.log(torch.where(has_positive, mass, 1.0).clamp_min(1e-30))  # (B,) 0 without positives
        # the mean over the queries with positives, as masked sum / count: no boolean indexing
        # (its size would have to be read from the device); equal to .mean() when all have one
        return per_query.sum() / has_positive.sum().clamp_min(1)

    def slot_distribution(self) -> torch.Tensor:
        """(M, C) class distribution of every slot, zero rows for empty slots."""
        slots = torch.arange(self.capacity, device=self.labels.device)
        return self.class_distribution(slots) * self.filled().unsqueeze(-1)

    # --- writes ----------------------------------------------------------------------------
    def _check_labels(self, labels: torch.Tensor) -> None:
        """Labels must lie in the label space. On the CPU a ValueError; on an accelerator an
        asynchronous device assert, so that a training step does not wait to read the check."""
        C = self.config.num_classes
        if labels.device.type == "cpu":
            if labels.numel() and (labels.min() < 0 or labels.max() >= C):
                raise ValueError(f"labels must be in [0, {C}), got {labels.tolist()}")
        else:
            torch._assert_async(((labels >= 0) & (labels < C)).all(), f"labels must be in [0, {C})")

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor,
               similarity: torch.Tensor | None = None) -> UpdateReport:
        """Write a batch: fill empty slots in order, then apply the replacement rule.
        `similarity` (B, M), the batch against the memory before this call, may be passed
        when already computed (training computes it for the loss).

        Fixed work, no host synchronisation: every row goes through every stage under masks
        (rows that fill, rows that replace, rows skipped), so the same kernels run whatever
        the batch holds. The report's tensors are on the memory's device."""
        B, M = features.shape[0], self.capacity
        dev = self.labels.device
        features = features.detach().to(dev, torch.float32)
        labels = labels.to(dev, torch.int64)
        self._check_labels(labels)
        rows = torch.arange(B, device=dev)  # (B,)

        # the first rows fill the empty slots, in slot order: row i takes the (i+1)-th empty
        # slot, M where fewer are empty
        free_seen = (~self.filled()).cumsum(0)  # (M,) empty slots up to each slot
        fill = torch.searchsorted(free_seen, rows + 1)  # (B,)
        fills = fill < M  # (B,)
        taken = torch.zeros(M + 1, dtype=torch.bool, device=dev)  # column M: rows that fill nothing
        taken[torch.where(fills, fill, M)] = True
        taken = taken[:M]  # (M,) slots this batch fills

        # the other rows: compared with the memory as it is before this batch's own fills
        sims = self.similarity(features) if similarity is None else similarity.detach()  # (B, M)
        wants = ~fills & (sims.max(-1).values < self.config.similarity_threshold)  # (B,)
        chosen = self._choose_replacements(sims, labels, wants, ~taken)  # (B,) EMPTY = skip

        slot = torch.where(fills, fill, chosen)  # (B,)
        replaced = ~fills & (chosen != EMPTY)  # (B,)
        action = torch.where(fills, ADDED, torch.where(replaced, REPLACED, SKIPPED))  # (B,)
        previous = torch.where(replaced, self.labels[slot.clamp_min(0)], EMPTY)  # (B,)
        self._commit(slot, features, labels, slot != EMPTY, replaced)
        return UpdateReport(action, slot, previous)

    def _commit(self, slot: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, write: torch.Tensor,
                replaced: torch.Tensor) -> None:
        """Write rows `write` ((B,) bool) of the batch into their slots ((B,), distinct where
        written) and keep the counters: the one place a slot changes.

        The write has the batch's size whatever is written, so it never waits for the device
        to say how many rows are written: a row not written is sent to the slot of the first
        written row with that row's values (or, when nothing is written, to slot 0 with what
        slot 0 holds). Every index that repeats carries identical values, so the result does not
        depend on the order the device applies them in."""
        if self.before_write or self.index is not None:  # serving: these read the written slots on the host
            written = slot[write]
            self._notify_before_write(written)
        new = {"labels": labels, "norms": features.norm(dim=-1),
               "written_at": self.writes + write.long().cumsum(0),  # the write counter, in row order
               **self._slot_rows(F.normalize(features, dim=-1), labels)}  # {name: (B, ...)}
        self._count_change(slot, labels, write)
        any_written = write.any()  # () bool
        # the first written row (0 when none), as a 1-element index: a 0-dim tensor index
        # would be read on the host
        first = write.long().argmax().view(1)  # (1,)
        target = torch.where(write, slot, torch.where(any_written, slot[first], 0))  # (B,)
        for name, rows in new.items():
            state = getattr(self, name).data  # (M, ...)
            donor = torch.where(any_written, rows[first], state[:1])  # (1, ...) what the target ends up holding
            mask = write.view(-1, *[1] * (rows.dim() - 1))
            state.index_put_((target,), torch.where(mask, rows.to(state.dtype), donor))
        if self.index is not None:
            self.index.update(written.cpu(), new["keys"][write].cpu())
        self.writes += write.sum()
        self.replacements += replaced.sum()

    def _count_change(self, slots: torch.Tensor, new_labels: torch.Tensor | None,
                      write: torch.Tensor | None = None) -> None:
        """Keep held_per_class in step with labels[slots] becoming new_labels (None = emptied),
        for the rows `write` ((B,) bool; None = all). index_add_, not bincount: bincount reads
        its size from the device."""
        write = torch.ones_like(slots, dtype=torch.bool) if write is None else write
        old = self.labels[slots.clamp_min(0)]  # (B,)
        gone = write & (old != EMPTY)
        self.held_per_class.index_add_(0, old.clamp_min(0), -gone.long())
        if new_labels is not None:
            self.held_per_class.index_add_(0, new_labels, write.long())

    @torch.no_grad()
    def forget(self, slots: torch.Tensor) -> None:
        """Empty these slots (a user withdrew the examples they held): they are never returned
        again and the next write may fill them. Every row they had (key, value, norm, age) is
        zeroed, so no trace of the example stays in the state or in a snapshot of it."""
        slots = slots.to(self.labels.device, torch.int64).unique()
        if not slots.numel():
            return
        self._notify_before_write(slots)
        self._count_change(slots, None)
        if self.index is not None:
            self.index.remove(slots.cpu())
        for name, rows in self.slot_tensors().items():
            rows.data[slots] = EMPTY if name == "labels" else 0

    @torch.no_grad()
    def teach(self, features: torch.Tensor, labels: torch.Tensor,
              protected: torch.Tensor | None = None) -> UpdateReport:
        """Write user corrections (feedback), one example after another.

        Unlike `update`, a correction is never swallowed by the similarity rule: it is skipped
        only when the memory already holds this very feature (an exact match) with this label.
        An exact match with another label is overwritten; otherwise the example fills an empty
        slot, or, when full, the slot the replacement rule picks (without the skip test) among
        the slots not `protected` ((M,) bool: the service protects user-taught items, so that
        ten examples of a new class are ten items, not one rewritten ten times). When every
        slot is protected, the rule picks among all of them. Serving's path: it reads each
        decision back to the host (a handful of examples a request). The report is on the
        memory's device.
        """
        dev = self.labels.device
        protected = (torch.zeros(self.capacity, dtype=torch.bool, device=dev) if protected is None
                     else protected.to(dev, torch.bool, copy=True))
        features = features.detach().to(dev, torch.float32)
        labels = labels.to(dev, torch.int64)
        self._check_labels(labels)
        B = features.shape[0]
        action = torch.full((B,), SKIPPED, dtype=torch.int64, device=dev)
        slot = torch.full((B,), EMPTY, dtype=torch.int64, device=dev)
        previous = torch.full((B,), EMPTY, dtype=torch.int64, device=dev)
        one = torch.ones(1, dtype=torch.bool, device=dev)
        # a feedback request carries a handful of images: a loop keeps each one seeing the
        # writes of those before it. The memory is read once for all of them (one matrix
        # product); each example then sees the slots written before it, recomputed.
        all_sims = self.similarity(features)  # (B, M) the memory as it was
        written: list[int] = []
        for i in range(B):
            f, y = features[i:i + 1], labels[i:i + 1]
            sims = all_sims[i:i + 1]  # (1, M)
            if written:  # those slots now hold this request's earlier examples
                cols = torch.tensor(written, device=dev)
                sims = sims.clone()
                sims[:, cols] = self.similarity_to(f, cols)
            best_sim, best = sims.max(-1)
            if bool(torch.isfinite(best_sim)) and float(best_sim) >= EXACT_MATCH:
                if int(self.labels[best]) == int(y):
                    continue
                target = best
            elif self.size < self.capacity:
                target = (~self.filled()).nonzero()[0]
            else:
                guard = protected if not bool(protected.all()) else torch.zeros_like(protected)
                target = self._choose_replacements(sims, y, one, ~guard)
            target = int(target)
            protected[target] = True
            previous[i] = self.labels[target]
            action[i] = ADDED if int(previous[i]) == EMPTY else REPLACED
            slot[i] = target
            self._commit(slot[i:i + 1], f, y, one, action[i:i + 1] == REPLACED)
            written.append(target)
        return UpdateReport(action, slot, previous)


def _rank_among(rows: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N,) bool rows, (N,) group of each -> (N,) how many earlier `rows` share the row's group."""
    onehot = F.one_hot(groups, num_groups) * rows.unsqueeze(1)  # (N, G)
    return (onehot.cumsum(0) - onehot).gather(1, groups.unsqueeze(1)).squeeze(1)


def _take_in_order(order: torch.Tensor, available: torch.Tensor, wants: torch.Tensor) -> torch.Tensor:
    """The wanting rows, in row order, take the `available` columns in `order` (available ones
    first), one each: (N,) column, EMPTY for rows that want none or find none left."""
    rank = wants.long().cumsum(0) - 1  # (N,) place among the wanting rows
    ok = wants & (rank < available.sum())
    return torch.where(ok, order[rank.clamp(0, order.numel() - 1)], EMPTY)


class CachedMemory(Memory):
    """Stored features and labels. When full, the examples of a batch that want a slot
    replace, among the slots of their own class, those least similar to them: the slots of
    the class ranked by their lowest similarity to any of the batch's examples of the class,
    the k-th example of the class (in batch order) taking the k-th slot. Examples left
    without one (their class absent, or holding fewer slots than the batch brings) take, in
    batch order, the slots least similar to any of them overall. One example alone (feedback)
    takes the slot of its class least similar to it."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        self.register_buffer("keys", torch.zeros(config.capacity, config.feature_dim))

    keys_are_unit = True  # written normalised, never trained

    def class_distribution(self, slots: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.labels[slots].clamp_min(0), self.config.num_classes).float()

    def _slot_rows(self, keys, labels) -> dict[str, torch.Tensor]:
        return {"keys": keys}

    def _choose_replacements(self, sims, labels, wants, available) -> torch.Tensor:
        if sims.shape[0] == 1:  # one example (feedback): the same rule without the sorts below
            return self._replace_for_one(sims[0], labels[0], wants, available)
        M, C, inf = self.capacity, self.config.num_classes, float("inf")
        # own class: each slot's lowest similarity to the wanting examples of its class
        own = (self.labels.unsqueeze(0) == labels.unsqueeze(1)) & available & wants.unsqueeze(1)  # (N, M)
        score = torch.where(own, sims, inf).amin(0)  # (M,) inf: no such example
        group = torch.where(torch.isfinite(score), self.labels, C)  # (M,) candidates by class, others last
        order = torch.argsort(score, stable=True)  # (M,) least similar first ...
        order = order[torch.argsort(group[order], stable=True)]  # ... within each class, classes in order
        per_class = torch.zeros(C + 1, dtype=torch.int64, device=sims.device).index_add_(
            0, group, torch.ones_like(group))  # (C + 1,) candidate slots of each class
        start = per_class.cumsum(0) - per_class  # (C + 1,) where each class begins in `order`
        rank = _rank_among(wants, labels, C)  # (N,) the example's place among its class's
        placed = wants & (rank < per_class[labels])  # (N,)
        chosen = torch.where(placed, order[(start[labels] + rank).clamp(max=M - 1)], EMPTY)  # (N,)
        # the rest: the least similar slots overall, of those not just chosen
        just_chosen = torch.zeros(M + 1, dtype=torch.bool, device=sims.device)  # column M: rows not placed
        just_chosen[torch.where(placed, chosen, M)] = True
        free = available & ~just_chosen[:M]  # (M,)
        rest = wants & ~placed
        score = torch.where(rest.unsqueeze(1) & free, sims, inf).amin(0)  # (M,)
        fallback = _take_in_order(torch.argsort(score, stable=True), torch.isfinite(score), rest)
        return torch.where(placed, chosen, fallback)


    def _replace_for_one(self, sims: torch.Tensor, label: torch.Tensor, wants: torch.Tensor,
                         available: torch.Tensor) -> torch.Tensor:
        """(M,) sims of one example: the available slot of its class least similar to it, else
        the available slot least similar to it overall (the first among equals, as the sorts
        give); (1,) slot, EMPTY when it wants none or none is available."""
        inf = float("inf")
        own = available & (self.labels == label)  # (M,)
        pool = own if bool(own.any()) else available
        scored = torch.where(pool, sims, inf)  # (M,)
        slot = scored.argmin().view(1)  # the first minimum
        ok = wants & pool.any()
        return torch.where(ok, slot, EMPTY)


class TrainableMemory(Memory):
    """Learnt keys (M, D) and values (M, C). When full: replace the least confident slot
    (lowest largest class share of its value row; oldest first among equals)."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        self.keys = nn.Parameter(torch.zeros(config.capacity, config.feature_dim))
        self.values = nn.Parameter(torch.zeros(config.capacity, config.num_classes))

    def class_distribution(self, slots: torch.Tensor) -> torch.Tensor:
        v = self.values[slots]  # (..., C)
        # clamp at 0 in the forward pass only: a plain clamp would stop the gradient that
        # lets a zero entry of a one-hot value grow
        v = v + (v.clamp_min(0) - v).detach()
        return v / v.sum(-1, keepdim=True).clamp_min(1e-12)

    def slot_confidence(self) -> torch.Tensor:  # (M,)
        return self.class_distribution(torch.arange(self.capacity, device=self.values.device)).max(-1).values

    def _slot_rows(self, keys, labels) -> dict[str, torch.Tensor]:
        return {"keys": keys, "values": F.one_hot(labels, self.config.num_classes).float()}

    def _choose_replacements(self, sims, labels, wants, available) -> torch.Tensor:
        by_age = torch.argsort(self.written_at, stable=True)  # (M,) oldest first, then by slot
        conf = torch.where(available, self.slot_confidence(), float("inf"))[by_age]  # unavailable last
        order = by_age[torch.argsort(conf, stable=True)]  # least confident, then oldest
        return _take_in_order(order, available, wants)


MEMORIES: dict[str, type[Memory]] = {"cached": CachedMemory, "trainable": TrainableMemory}


def create_memory(kind: str, **kwargs) -> Memory:
    """Build a memory by name: one of MEMORIES (keywords are MemoryConfig fields)."""
    if kind not in MEMORIES:
        raise ValueError(f"unknown memory kind {kind!r}; valid choices: {sorted(MEMORIES)}")
    return MEMORIES[kind](MemoryConfig(**kwargs))
