"""Data-parallel training across processes (`torchrun --nproc_per_node N -m service train ...`):
the process group, each process's share of a batch, and the collectives that keep one memory.

Without WORLD_SIZE (or with WORLD_SIZE=1) `setup` returns None and training runs in one
process exactly as before; no process group is made.

- Global batches. Every process draws the same seeded permutation and augments the same
  global batch of --batch-size images with the shared generator, then takes its contiguous
  share (`Comm.share`; the last batch is padded by repeating its first images, as
  DistributedSampler pads, so every share has the same size). Steps, learning-rate schedule
  and the order of memory writes are those of one process, whatever the number of processes.
- The network's gradients are averaged by DistributedDataParallel. The memory is not DDP's:
  its parameters and buffers are on DDP's ignore list (`wrap`), so DDP does not broadcast the
  (M, D) memory from rank 0 before every forward (the gather below moves only the batch's
  B x (D + 1) floats a step). forward_sync_buffers (once broadcast_buffers)
  stays on for the few kilobytes of batch-norm statistics. A trainable memory's parameters are
  averaged like the network's, by `average_gradients`.
- One memory. Each step every process's features and labels are gathered (`gather_batch`: one
  (B, D + 1) all_gather) and every process writes the whole batch in rank order, with the
  similarity computed from that same tensor: the same writes on every copy, so the copies stay
  tensor-equal. `check_same_memory` compares their sha256 after every epoch and stops the run
  (MemoryDiverged) if any differs, e.g. across machines whose float kernels round differently.
- Where things run. The memory lives on the training device, so its per-step collectives
  (`gather_batch`, `average_gradients`) run there, on the default group: gloo on the CPU,
  NCCL between GPUs, packed tensors on the device (no copy to the host a step). What is read
  on the host (epoch sums, evaluation answers, memory digests, barriers) goes through a gloo
  group (`Comm.group`; the default group itself on the CPU).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .memory import Memory
from .tensorfile import tensor_bytes


class MemoryDiverged(RuntimeError):
    """The processes' memories differ: the run cannot save one model."""


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Comm:
    """This process's place in the group, and the collectives training needs."""
    rank: int
    world_size: int
    local_rank: int
    group: dist.ProcessGroup  # gloo, CPU tensors: metrics, evaluation, digests, barriers
    device_group: dist.ProcessGroup  # the training device's backend, its tensors: the memory's per-step collectives
    # seconds spent in the per-step collectives of the memory since `reset_timings` (on a GPU
    # the time to queue them: the collectives run asynchronously)
    timings: dict[str, float] = field(default_factory=lambda: {"gather": 0.0, "memory_grads": 0.0})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reset_timings(self) -> None:
        self.timings = {k: 0.0 for k in self.timings}

    # --- splitting work ------------------------------------------------------------------------
    def share(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Positions in a global batch of n that this process trains on, on `device` (the
        batch's): contiguous, equal sizes for every process (positions past n wrap around to
        the batch's start)."""
        per = math.ceil(n / self.world_size)
        positions = torch.arange(per * self.world_size, device=device) % n
        return positions.view(self.world_size, per)[self.rank]

    def part(self, n: int) -> slice:
        """This process's contiguous part of n rows (evaluation); the last parts may be shorter or empty."""
        per = math.ceil(n / self.world_size)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    # --- collectives ---------------------------------------------------------------------------
    def _all_gather(self, t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        out = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.all_gather_single(out, t.contiguous(), group=self.group if group is None else group)
        return out

    def gather_batch(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's (features (b, D), labels (b,)), b equal on all, concatenated in rank
        order: ((W*b, D) float32, (W*b,) int64), on the features' device. One collective:
        labels ride as a float column (exact below 2**24)."""
        t0 = time.perf_counter()
        packed = torch.cat([features.detach().float(), labels.float().unsqueeze(1)], 1)  # (b, D + 1)
        out = self._all_gather(packed, self.device_group)  # (W*b, D + 1)
        self.timings["gather"] += time.perf_counter() - t0
        return out[:, :-1], out[:, -1].long()

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The whole (n, ...) tensor from every process's `part(n)` of it, in order."""
        per = math.ceil(n / self.world_size)
        padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype)
        padded[:t.shape[0]] = t
        return self._all_gather(padded)[:n]

    def values_by_rank(self, value: int) -> list[int]:
        return self._all_gather(torch.tensor([value], dtype=torch.int64)).tolist()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average these parameters' gradients over the processes, in one all_reduce. A missing
        gradient counts as zero (a process whose batch held no class of the memory's gets none)."""
        if not params:
            return
        t0 = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.device_group)
        flat /= self.world_size
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)
        self.timings["memory_grads"] += time.perf_counter() - t0

    def broadcast_buffers(self, module: nn.Module, skip: str = "memory.") -> None:
        """Rank 0's buffers (batch-norm statistics) on every process, before evaluation: each
        process's last forward updated them from its own share."""
        for name, b in module.named_buffers():
            if not name.startswith(skip):
                dist.broadcast(b, src=0)  # default group: the device's backend

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def check_same_memory(self, memory: Memory) -> list[str]:
        """sha256 of every process's memory, by rank; MemoryDiverged when they differ."""
        mine = torch.frombuffer(bytearray(memory_digest(memory)), dtype=torch.uint8)
        digests = [bytes(row.tolist()).hex() for row in self._all_gather(mine).view(self.world_size, -1)]
        compare_digests(digests)
        return digests


def compare_digests(digests: list[str]) -> None:
    if len(set(digests)) > 1:
        by_rank = ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests))
        raise MemoryDiverged(f"the processes' memories differ ({by_rank}); the run stops rather than save one "
                             "process's memory as the model's")


def memory_digest(memory: nn.Module) -> bytes:
    """sha256 of every tensor of the memory's state_dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(memory.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(tensor_bytes(t.detach().cpu().contiguous()))
    return h.digest()


def backend_for(device: str) -> str:
    """The network's backend: NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device == "cuda" else "gloo"


def setup(device: str, timeout_s: float) -> Comm | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
    None in a single process. A process that waits longer than `timeout_s` on the others (a
    peer that died where torchrun cannot see it, on another machine) fails with a timeout."""
    world = world_size_from_env()
    if world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend_for(device), timeout=timeout, device_id=torch.device("cuda", local_rank))
        group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group(backend_for(device), timeout=timeout)
        group = dist.group.WORLD
    return Comm(dist.get_rank(), dist.get_world_size(), local_rank, group, dist.group.WORLD)


def shutdown(comm: Comm | None) -> None:
    if comm is not None and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, comm: Comm, device: str) -> DistributedDataParallel:
    """DDP over the network only: the memory's parameters and buffers are left out (see the
    module docstring). The private setter is PyTorch's documented workaround for this
    (pytorch/pytorch#43690) until the ignore list gets a public argument."""
    ignored: list[str] = []
    memory = getattr(model, "memory", None)
    if memory is not None:
        ignored = [f"memory.{n}" for n, _ in memory.named_parameters()] + \
                  [f"memory.{n}" for n, _ in memory.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=[comm.local_rank] if device == "cuda" else None,
                                   forward_sync_buffers=True)
