"""Nearest-neighbour search over memory keys: exact and chunked, or an optional FAISS index.

`exact_topk` is the memory's own search: cosine similarity as one matrix product per chunk
of keys, a running top-k merged chunk by chunk, so a 1,000,000-item memory never builds the
whole (B, M) similarity matrix (peak extra memory B x chunk floats, not B x M).

`IVFIndex` wraps faiss's IVF index (inner product on unit keys = cosine; vectors stored as
float16) for large memories: k-means cells, a query scans `nprobe` of them. It is kept in step with the memory:
every write removes the slot's old vector and adds the new one under the slot's id. It is
derived state, rebuilt from the keys on load; the memory's state_dict stays the truth.
faiss is imported only when an index is asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 65536


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, filled: torch.Tensor | None = None,
               key_scale: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of unit queries (B, D) against keys (M, D).
    `filled` (M,) bool masks empty slots to -inf; `key_scale` (M,) multiplies each column
    (1/|key| when keys are not unit). Returns (similarity (B, k), slot (B, k)), best first."""
    B, M = queries.shape[0], keys.shape[0]
    k = min(k, M)
    best_sim = torch.full((B, k), float("-inf"))
    best_slot = torch.zeros(B, k, dtype=torch.int64)
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


class IVFIndex:
    """faiss IVF (float16 vectors) over the filled slots (keys normalised here), ids = slot numbers."""

    def __init__(self, keys: torch.Tensor, filled: torch.Tensor, nlist: int | None = None, nprobe: int = 16,
                 train_size: int = 100_000, seed: int = 0):
        import faiss

        self.faiss = faiss
        # a request's few queries scan a few cells: one thread. faiss's own OpenMP pool beside
        # torch's spins for the cores and made a single lookup 30x slower on 2 cores
        faiss.omp_set_num_threads(1)
        slots = filled.nonzero().squeeze(1)
        n, d = len(slots), keys.shape[1]
        if n < 2:
            raise ValueError("an IVF index needs at least 2 filled slots to train")
        self.nlist = nlist or max(1, min(4 * int(n ** 0.5), n // 39))  # faiss wants >= 39 points per cell
        self.quantizer = faiss.IndexFlatIP(d)
        # vectors kept as float16: half the index's memory (its copy of the keys would
        # otherwise double a large memory's footprint). The candidates it returns are
        # re-scored exactly from the memory's own float32 keys (Memory.search).
        self.index = faiss.IndexIVFScalarQuantizer(self.quantizer, d, self.nlist, faiss.ScalarQuantizer.QT_fp16,
                                                   faiss.METRIC_INNER_PRODUCT)
        g = torch.Generator().manual_seed(seed)
        sample = slots[torch.randperm(n, generator=g)[:train_size]]
        self.index.train(self._np(F.normalize(keys[sample].float(), dim=-1)))
        self.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by slot id
        self.index.nprobe = nprobe
        for start in range(0, n, DEFAULT_CHUNK):  # a chunk at a time: the index's copy is the only large one
            chunk = slots[start:start + DEFAULT_CHUNK]
            self.index.add_with_ids(self._np(F.normalize(keys[chunk].float(), dim=-1)), chunk.numpy().astype("int64"))

    @staticmethod
    def _np(x: torch.Tensor):
        return x.detach().float().contiguous().numpy()

    @property
    def nprobe(self) -> int:
        return self.index.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = value

    def __len__(self) -> int:
        return self.index.ntotal

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """The slots now hold these (unit) keys."""
        ids = slots.numpy().astype("int64")
        self.index.remove_ids(ids)
        self.index.add_with_ids(self._np(keys), ids)

    def remove(self, slots: torch.Tensor) -> None:
        """The slots are empty now."""
        self.index.remove_ids(slots.numpy().astype("int64"))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity (B, k), slot (B, k)); missing neighbours are -inf / -1."""
        sims, ids = self.index.search(self._np(queries), k)
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        return sims.masked_fill(ids < 0, float("-inf")), ids
