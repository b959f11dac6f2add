"""Memory lookups per second at scale: this project's exact search (CachedMemory.search,
chunked) against faiss IndexFlatIP (exact) and the approximate IVF index the service can
attach (MEMORY_INDEX=ivf), at 10k / 100k / 1M items, D = 128 and 512, batch 1 and 64.

Keys are unit vectors around 1,000 random centres (class-structured, like real features;
uniform random vectors have no neighbours worth finding). For IVF, nprobe is the smallest
of NPROBES whose recall@1 against exact search reaches 0.95 on held-out queries.

    .venv/bin/python -m bench.perf.retrieval_scale [--sizes 10000 100000 1000000] [--dims 128 512]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.harness import header, spread, write_record
from service.core.memory import create_memory

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
K = 5  # neighbours per lookup: the memory's top_k


def clustered(n: int, d: int, centers: torch.Tensor, g: torch.Generator, chunk: int = 100_000) -> torch.Tensor:
    out = torch.empty(n, d)
    for s in range(0, n, chunk):  # in chunks: the noise for 1M x 512 at once would double peak memory
        m = min(chunk, n - s)
        c = centers[torch.randint(0, len(centers), (m,), generator=g)]
        out[s:s + m] = F.normalize(c + 0.5 * torch.randn(m, d, generator=g) / d ** 0.5, dim=-1)
    return out


def filled_memory(keys: torch.Tensor):
    """A cached memory holding these unit keys (one class), written in place: `update` would
    compare the batch with every slot, an (n, n) matrix."""
    memory = create_memory("cached", capacity=len(keys), feature_dim=keys.shape[1], num_classes=10)
    with torch.no_grad():
        memory.keys.copy_(keys)
        memory.labels.zero_()
        memory._recount()
    return memory


def rate(fn, queries: torch.Tensor, batch: int, min_seconds: float, repeats: int, warmup: int = 2) -> dict:
    """Lookups per second over `repeats` timed runs (each >= min_seconds of work), after warm-up."""
    batches = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    for b in batches[:warmup]:
        fn(b)
    runs = []
    for _ in range(repeats):
        n, t0, i = 0, time.perf_counter(), 0
        while True:
            fn(batches[i % len(batches)])
            n += batch
            i += 1
            if time.perf_counter() - t0 >= min_seconds:
                break
        runs.append(n / (time.perf_counter() - t0))
    return spread(runs)


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    ap.add_argument("--recall-queries", type=int, default=500)
    args = ap.parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    config = vars(args) | {"k": K, "nprobes": NPROBES, "faiss": faiss.__version__,
                           "faiss_threads": faiss.omp_get_max_threads()}
    m = header(config)
    rows = []
    for d in args.dims:
        g = torch.Generator().manual_seed(d)
        centers = F.normalize(torch.randn(1000, d, generator=g), dim=-1)
        queries = clustered(max(640, args.recall_queries), d, centers, g)
        for n in args.sizes:
            memory = filled_memory(clustered(n, d, centers, g))
            flat = faiss.IndexFlatIP(d)
            flat.add(memory.keys.numpy())
            t0 = time.perf_counter()
            index = memory.attach_index()
            build_s = time.perf_counter() - t0
            memory.index = None
            exact_top1 = memory.search(queries[:args.recall_queries], 1)[1][:, 0]
            nprobe, recall = None, 0.0
            for p in NPROBES:
                index.nprobe = p
                got = index.search(F.normalize(queries[:args.recall_queries], dim=-1), 1)[1][:, 0]
                recall = (got == exact_top1).float().mean().item()
                if recall >= 0.95:
                    nprobe = p
                    break
            nprobe = nprobe or NPROBES[-1]
            index.nprobe = nprobe

            def ours(b):
                return memory.search(b, K)

            def faiss_flat(b):
                return flat.search(F.normalize(b, dim=-1).numpy(), K)

            def ivf(b):
                return index.search(F.normalize(b, dim=-1), K)
            for batch in args.batches:
                r = {"items": n, "dim": d, "batch": batch, "ivf_nlist": index.nlist, "ivf_nprobe": nprobe,
                     "ivf_recall_at_1": recall, "ivf_build_seconds": build_s}
                for name, fn in (("exact", ours), ("faiss_flat", faiss_flat), ("ivf", ivf)):
                    r[name] = rate(fn, queries, batch, args.min_seconds, args.repeats)
                r["faiss_flat_over_exact"] = r["faiss_flat"]["median"] / r["exact"]["median"]
                r["ivf_over_exact"] = r["ivf"]["median"] / r["exact"]["median"]
                rows.append(r)
                print(f"n={n:>8} d={d} batch={batch:>2}: exact {r['exact']['median']:>10.0f}/s  "
                      f"faiss flat {r['faiss_flat']['median']:>10.0f}/s ({r['faiss_flat_over_exact']:.2f}x)  "
                      f"ivf {r['ivf']['median']:>10.0f}/s ({r['ivf_over_exact']:.1f}x, nprobe {nprobe}, "
                      f"recall@1 {recall:.3f}, nlist {index.nlist}, build {build_s:.1f} s)", flush=True)
    write_record("retrieval_scale", config, {"rows": rows}, m)


if __name__ == "__main__":
    main()
