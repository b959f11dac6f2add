"""Nearest-neighbour search over memory keys: exact and chunked, or an optional FAISS index.

`exact_topk` is the memory's own search: cosine similarity as one matrix product per chunk
of keys, a running top-k merged chunk by chunk, so a 1,000,000-item memory never builds the
whole (B, M) similarity matrix (peak extra memory B x chunk floats, not B x M).

`IVFIndex` wraps faiss's IVF index (inner product on unit keys = cosine; vectors stored as
float16) for large memories: k-means cells, a query scans `nprobe` of them. It is kept in step
with the memory: every write removes the slot's old vector and adds the new one under the
slot's id. It is derived state; the memory's state_dict stays the truth:

    IVFIndex(keys, filled)        k-means on a bounded sample (POINTS_PER_CELL per cell), then
                                  every filled slot added
    save(path) / load(path, sha)  the whole trained index (cells and lists) as faiss writes it
                                  (faiss.write_index: no pickle), sha256 checked before a byte
                                  is parsed; IndexFileError names a damaged or foreign file
    reconcile(keys, filled)       make a loaded index hold exactly the memory's filled slots
                                  (it may have been saved from an older state of the memory)
    outgrown(size)                the memory has grown past what the cells were cut for

faiss is imported only when an index is asked for.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_file, sha256_file

DEFAULT_CHUNK = 65536


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, filled: torch.Tensor | None = None,
               key_scale: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of unit queries (B, D) against keys (M, D).
    `filled` (M,) bool masks empty slots to -inf; `key_scale` (M,) multiplies each column
    (1/|key| when keys are not unit). Returns (similarity (B, k), slot (B, k)), best first."""
    B, M = queries.shape[0], keys.shape[0]
    k = min(k, M)
    best_sim = torch.full((B, k), float("-inf"), device=queries.device)
    best_slot = torch.zeros(B, k, dtype=torch.int64, device=queries.device)
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        sims = queries @ keys[start:stop].T  # (B, m)
        if key_scale is not None:
            sims = sims * key_scale[start:stop]
        if filled is not None:
            sims = sims.masked_fill(~filled[start:stop], float("-inf"))
        s, i = sims.topk(min(k, stop - start), dim=-1)  # (B, k')
        if start == 0 and stop == M:  # one chunk: nothing to merge
            return s, i
        merged_sim = torch.cat([best_sim, s], dim=1)  # (B, k + k')
        merged_slot = torch.cat([best_slot, i + start], dim=1)
        best_sim, pos = merged_sim.topk(k, dim=-1)  # (B, k)
        best_slot = merged_slot.gather(1, pos)
    return best_sim, best_slot


# The defaults below were chosen by `python -m bench.perf.memory_scale --choose` (BENCHMARKS.md,
# "A 1M-item memory, served"): recall@1 >= 0.95 against exact search on one set of queries,
# checked on another.
POINTS_PER_CELL = 64  # k-means sample per cell (faiss trains well on tens of points per centroid)
MIN_POINTS_PER_CELL = 39  # faiss warns below this
CELLS_PER_SQRT = 2  # nlist = CELLS_PER_SQRT * sqrt(items), to a power of two
DEFAULT_NPROBE = 12
FP16_TOLERANCE = 1e-3  # a stored float16 vector differs from its unit key by at most ~5e-4 per component


class IndexFileError(ValueError):
    """A saved index that cannot be used; the message names the file and what is wrong."""


def default_nlist(n: int) -> int:
    """Cells for n items: CELLS_PER_SQRT * sqrt(n) to the nearest power of two, with at least
    MIN_POINTS_PER_CELL items each."""
    cells = 2 ** round(math.log2(max(1.0, CELLS_PER_SQRT * n ** 0.5)))
    return max(1, min(cells, n // MIN_POINTS_PER_CELL))


def training_sample(filled: torch.Tensor, nlist: int, points_per_cell: int = POINTS_PER_CELL,
                    seed: int = 0) -> torch.Tensor:
    """The filled slots k-means trains on: points_per_cell x nlist of them at most, drawn at random."""
    slots = filled.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    return slots[torch.randperm(len(slots), generator=g)[:points_per_cell * nlist]]


def _faiss():
    import faiss

    # a request's few queries scan a few cells: one thread. faiss's own OpenMP pool beside
    # torch's spins for the cores. The setting is per thread: the server builds or loads its
    # index on the model thread, which then searches it
    faiss.omp_set_num_threads(1)
    return faiss


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.detach().float(), dim=-1).contiguous().numpy()


class IVFIndex:
    """faiss IVF (float16 vectors) over the filled slots (keys normalised here), ids = slot numbers."""

    def __init__(self, keys: torch.Tensor, filled: torch.Tensor, nlist: int | None = None,
                 nprobe: int = DEFAULT_NPROBE, points_per_cell: int = POINTS_PER_CELL, seed: int = 0):
        faiss = _faiss()
        slots = filled.nonzero().squeeze(1)
        n, d = len(slots), keys.shape[1]
        if n < 2:
            raise ValueError("an IVF index needs at least 2 filled slots to train")
        nlist = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        # vectors kept as float16 (half the memory a float32 copy of the keys would add), not as
        # residuals from their cell's centre: a stored vector is then the key itself, which
        # `reconcile` compares. The candidates are re-scored exactly from the memory's keys.
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)
        sample = training_sample(filled, nlist, points_per_cell, seed)
        index.cp.max_points_per_centroid = points_per_cell  # (faiss's k-means is spherical for inner product)
        index.train(_unit(keys[sample]))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by slot id
        self._wrap(index, nprobe, quantizer)
        self._add(slots, keys)

    def _wrap(self, index, nprobe: int, quantizer=None) -> None:
        self.index = index
        self._quantizer = quantizer  # a quantizer passed to faiss must outlive the index
        self.index.nprobe = nprobe

    def _add(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Add these slots' keys (normalised here), a chunk at a time: the index's copy is the only large one."""
        for start in range(0, len(slots), DEFAULT_CHUNK):
            chunk = slots[start:start + DEFAULT_CHUNK]
            self.index.add_with_ids(_unit(keys[chunk]), chunk.numpy().astype("int64"))

    @property
    def nprobe(self) -> int:
        return self.index.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = value

    @property
    def nlist(self) -> int:
        return self.index.nlist

    def __len__(self) -> int:
        return self.index.ntotal

    def outgrown(self, size: int) -> bool:
        """True when `size` items want at least twice the cells this index has: each probed
        cell then holds twice the items it was cut for (time to re-train, off the request path)."""
        return default_nlist(size) >= 2 * self.nlist

    # --- kept in step with the memory ------------------------------------------------------
    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """The slots now hold these (unit) keys."""
        ids = slots.numpy().astype("int64")
        self.index.remove_ids(ids)
        self.index.add_with_ids(keys.detach().float().contiguous().numpy(), ids)

    def remove(self, slots: torch.Tensor) -> None:
        """The slots are empty now."""
        self.index.remove_ids(slots.numpy().astype("int64"))

    def refresh(self, slots: torch.Tensor, keys: torch.Tensor, filled: torch.Tensor) -> None:
        """These slots may have changed (written or emptied): read them again from the memory's
        keys (M, D) and filled (M,) mask."""
        slots = slots.unique()
        self.remove(slots)
        self._add(slots[filled[slots]], keys)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity (B, k), slot (B, k)); missing neighbours are -inf / -1."""
        sims, ids = self.index.search(queries.detach().float().contiguous().numpy(), k)
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        return sims.masked_fill(ids < 0, float("-inf")), ids

    # --- saved and loaded ------------------------------------------------------------------
    def save(self, path: str | Path) -> str:
        """Write the whole index (faiss's own format) atomically; returns the file's sha256,
        hashed as it is written (no second copy of the index in memory)."""
        faiss = _faiss()
        sha = hashlib.sha256()
        with atomic_file(path) as f:
            def write(chunk: bytes) -> None:
                f.write(chunk)
                sha.update(chunk)
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(write))
        return sha.hexdigest()

    @classmethod
    def load(cls, path: str | Path, sha256: str, dim: int, nprobe: int | None = None) -> IVFIndex:
        """The index saved at `path`, read straight into faiss's lists (one copy). Refused with
        IndexFileError when the file is missing, its sha256 is not `sha256` (checked before
        faiss parses a byte: faiss reads a damaged file without noticing), or it is not an
        IVF float16 inner-product index over `dim`-float keys."""
        faiss = _faiss()
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"saved IVF index {path}: missing")
        if sha256_file(path) != sha256:
            raise IndexFileError(f"saved IVF index {path}: sha256 mismatch (truncated or modified); refused")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFileError(f"saved IVF index {path}: faiss cannot read it ({e})") from e
        if not isinstance(index, faiss.IndexIVFScalarQuantizer) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
                or index.by_residual or index.code_size != 2 * index.d:
            raise IndexFileError(f"saved IVF index {path}: not an IVF float16 inner-product index")
        if index.d != dim:
            raise IndexFileError(f"saved IVF index {path}: holds {index.d}-float keys, the memory {dim}")
        if index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        loaded = cls.__new__(cls)
        loaded._wrap(index, index.nprobe if nprobe is None else nprobe)
        return loaded

    @staticmethod
    def _differing(ids: torch.Tensor, stored: torch.Tensor, keys: torch.Tensor, rows: int = 8192) -> torch.Tensor:
        """The ids whose stored float16 vector (n, D) is not their unit key; `rows` at a time, so
        that one crowded cell costs megabytes of temporaries, not a sizeable part of the keys."""
        out = []
        for start in range(0, len(ids), rows):
            i, near = ids[start:start + rows], stored[start:start + rows].float()  # (r,), (r, D)
            off = (near - keys[i].detach()).abs().amax(1) > FP16_TOLERANCE  # unit keys (a cached memory's) pass here
            if off.any():  # keys stored at any length (a trainable memory's): compare their unit vectors
                unit = F.normalize(keys[i[off]].detach().float(), dim=-1)
                off[off.clone()] = (near[off] - unit).abs().amax(1) > FP16_TOLERANCE
            out.append(i[off])
        return torch.cat(out) if out else ids[:0]

    def reconcile(self, keys: torch.Tensor, filled: torch.Tensor) -> int:
        """Make the index hold exactly the filled slots with their keys (an index saved from
        another state of the memory: an older snapshot, the model store's memory before
        feedback). Reads every list once, comparing each stored vector with its slot's key;
        re-adds what differs, removes what is no longer filled. Returns the slots fixed."""
        faiss = _faiss()
        M, d = keys.shape
        held = torch.zeros(M, dtype=torch.bool)
        foreign, stale = [], []  # ids that are no slot; slots whose stored vector is not their key
        lists = self.index.invlists
        for cell in range(self.nlist):
            n = lists.list_size(cell)
            if not n:
                continue
            ids = torch.from_numpy(faiss.rev_swig_ptr(lists.get_ids(cell), n).copy())  # (n,)
            codes = faiss.rev_swig_ptr(lists.get_codes(cell), n * self.index.code_size)
            stored = torch.from_numpy(codes.view(np.float16).reshape(n, d))  # (n, D), a view
            slot = (ids >= 0) & (ids < M)
            if not slot.all():  # (a copy of the cell's vectors: only when some ids are no slot)
                foreign.append(ids[~slot])
                ids, stored = ids[slot], stored[slot]
            stale.append(self._differing(ids, stored, keys))
            held[ids] = True
        stale = torch.cat(stale + [torch.zeros(0, dtype=torch.int64)]).unique()
        extra = (held & ~filled).nonzero().squeeze(1)
        drop = torch.cat(foreign + [stale, extra]).unique()
        if drop.numel():
            self.remove(drop)
        add = torch.cat([stale[filled[stale]], (filled & ~held).nonzero().squeeze(1)])
        if add.numel():
            self._add(add, keys)
        return int(torch.cat([drop, add]).unique().numel())
