"""Exact chunked search and the faiss IVF index, against a plain full top-k."""

import pytest
import torch
import torch.nn.functional as F

from service.core.memory import create_memory
from service.core.retrieval import DEFAULT_NPROBE, IVFIndex, default_nlist, exact_topk


def clustered(n, d, centers=50, seed=0):
    """Unit vectors around random centres: the shape of real class-structured features."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(centers, d, generator=g), dim=-1)
    x = c[torch.randint(0, centers, (n,), generator=g)] + 0.35 * torch.randn(n, d, generator=g) / d ** 0.5
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_exact_search_equals_the_full_matrix(chunk):
    keys, q = clustered(500, 16), clustered(9, 16, seed=1)
    filled = torch.rand(500, generator=torch.Generator().manual_seed(2)) > 0.3
    scale = torch.rand(500) + 0.5
    full = (q @ keys.T * scale).masked_fill(~filled, float("-inf"))
    want_sim, want_slot = full.topk(5, dim=-1)
    sim, slot = exact_topk(q, keys, 5, filled, scale, chunk=chunk)
    assert torch.equal(slot, want_slot) and torch.allclose(sim, want_sim)


def test_exact_search_with_fewer_filled_than_k_pads_with_minus_inf():
    keys = clustered(100, 8)
    filled = torch.zeros(100, dtype=torch.bool)
    filled[[3, 50]] = True
    sim, slot = exact_topk(keys[:2], keys, 4, filled, chunk=16)
    assert set(slot[0, :2].tolist()) == {3, 50} and torch.isinf(sim[:, 2:]).all()


def test_ivf_index_recall_at_1_against_exact_search_with_the_default_cells_and_probes():
    memory = create_memory("cached", capacity=20000, feature_dim=32, num_classes=10)
    keys = clustered(20000, 32, centers=200)
    for start in range(0, 20000, 1000):  # a batch is compared with every slot: (batch, 20000)
        memory.update(keys[start:start + 1000], torch.arange(start, start + 1000) % 10)
    q = clustered(300, 32, centers=200, seed=5)
    exact = memory.search(q, 1)[1]
    memory.index = index = IVFIndex(memory.keys, memory.filled())
    assert (index.nlist, index.nprobe) == (default_nlist(20000), DEFAULT_NPROBE)
    approx = memory.search(q, 1)[1]
    assert (approx == exact).float().mean() >= 0.95


@pytest.mark.parametrize("kind", ["cached", "trainable"])
def test_ivf_index_follows_every_write(kind):
    memory = create_memory(kind, capacity=400, feature_dim=16, num_classes=4)
    memory.update(clustered(400, 16), torch.arange(400) % 4)
    index = memory.attach_index(nlist=4, nprobe=4)  # every cell probed: must equal exact search
    new = clustered(3, 16, seed=9)
    memory.teach(new, torch.tensor([1, 2, 3]))  # replaces three slots
    r = memory.retrieve(new)
    assert len(index) == 400 and r.labels.tolist() == [1, 2, 3] and (r.confidence == 1).all()
    q = clustered(50, 16, seed=11)
    approx = memory.search(q, 5)
    memory.index = None
    exact = memory.search(q, 5)
    assert torch.equal(approx[1], exact[1]) and torch.allclose(approx[0], exact[0], atol=1e-5)
