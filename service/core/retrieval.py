"""Nearest-neighbour search over memory keys: exact and chunked, or an optional FAISS index.

`exact_topk` is the memory's own search: cosine similarity as one matrix product per chunk
of keys, a running top-k merged chunk by chunk, so a 1,000,000-item memory never builds the
whole (B, M) similarity matrix (peak extra memory B x chunk floats, not B x M).

`IVFIndex` wraps faiss's IndexIVFFlat (inner product on unit keys = cosine) for large
memories: k-means cells, a query scans `nprobe` of them. It is kept in step with the memory:
every write removes the slot's old vector and adds the new one under the slot's id. It is
derived state, rebuilt from the keys on load; the memory's state_dict stays the truth.
faiss is imported only when an index is asked for.
"""

from __future__ import annotations

import torch

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
    """faiss IndexIVFFlat over the filled slots, ids = slot numbers."""

    def __init__(self, keys: torch.Tensor, filled: torch.Tensor, nlist: int | None = None, nprobe: int = 16,
                 train_size: int = 100_000, seed: int = 0):
        import faiss

        self.faiss = faiss
        slots = filled.nonzero().squeeze(1)
        n, d = len(slots), keys.shape[1]
        if n < 2:
            raise ValueError("an IVF index needs at least 2 filled slots to train")
        self.nlist = nlist or max(1, min(4 * int(n ** 0.5), n // 39))  # faiss wants >= 39 points per cell
        self.quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(self.quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        g = torch.Generator().manual_seed(seed)
        sample = slots[torch.randperm(n, generator=g)[:train_size]]
        self.index.train(self._np(keys[sample]))
        self.index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids by slot id
        self.index.nprobe = nprobe
        self.index.add_with_ids(self._np(keys[slots]), slots.numpy().astype("int64"))

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
