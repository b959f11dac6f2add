"""One training step's arithmetic: the optimiser and its one-cycle schedule (`make_optimizer`),
and `train_step`: the loss (cross-entropy plus the memory's contrastive loss), the update, and
the batch written into the memory. train.py runs it over the epochs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import distributed
from .model import EnhancedClassifier
from .train_config import TrainConfig


def make_optimizer(model: EnhancedClassifier, tc: TrainConfig, total_steps: int):
    memory_params = [p for n, p in model.named_parameters() if n.startswith("memory.")]
    decay = [p for n, p in model.named_parameters() if not n.startswith("memory.") and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if not n.startswith("memory.") and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if memory_params:
        # no momentum: slots are rewritten every few steps, so momentum would carry over from
        # the item a slot held before; it also spares the optimiser a momentum buffer per key
        groups.append({"params": memory_params, "weight_decay": 0.0, "momentum": 0.0, "nesterov": False})
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=0.9, nesterov=True)
    no_momentum = [g["momentum"] == 0.0 for g in groups]  # OneCycleLR would otherwise cycle it in
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tc.lr, total_steps=total_steps, pct_start=0.25,
        base_momentum=[0.0 if z else 0.85 for z in no_momentum], max_momentum=[0.0 if z else 0.95 for z in no_momentum])
    return opt, sched


def train_step(model: EnhancedClassifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               memory_loss_weight: float, label_smoothing: float, bf16: bool, *,
               ddp: torch.nn.Module | None = None, comm: distributed.Comm | None = None,
               write_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step, then the batch's features are written to memory.
    Returns (cross-entropy, memory loss, correct predictions) as 0-dim tensors on x's device,
    detached: the caller sums them there and reads them once an epoch, so that a step never
    waits for the device (no .item() here, and the memory, on the model's device, is read
    and written without host synchronisation: memory.py).

    Across processes, `x, y` are this process's share of the global batch, `ddp` the
    DistributedDataParallel wrapper of `model` (gradients averaged) and `comm` gathers every
    share: each process writes the whole global batch (its first `write_rows` rows: not the
    padding of a last batch) in rank order, with similarities computed from that one gathered
    tensor, so every memory receives the same writes (distributed.py)."""
    memory = model.memory
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits, features = (ddp or model)(x)  # (B, num_classes), (B, D)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    # the CPU runs the (B, M) similarity on its bf16 units; a GPU runs it in fp32 beside the
    # autocast network (it is small there)
    sim_dtype = torch.bfloat16 if bf16 and device == "cpu" else None
    write_x, write_y = features.detach().float(), y  # what the memory is written: (B, D), (B,)
    if comm is not None and memory is not None:
        write_x, write_y = comm.gather_batch(features, y)  # (W*B, D), (W*B,)
    mem_loss, write_sims = torch.zeros((), device=x.device), None
    reads_memory = memory is not None and memory_loss_weight > 0
    if reads_memory:
        # one similarity matrix serves the loss and the write that follows; an empty memory
        # gives a zero loss (asking its size would wait for the device)
        sims = memory.similarity(features.float(), sim_dtype)  # (B, M)
        mem_loss = memory.contrastive_loss(features, y, similarity=sims)
        write_sims = sims.detach()
        if comm is not None:  # the gathered batch against the memory before this step's writes and update
            with torch.no_grad():
                write_sims = memory.similarity(write_x, sim_dtype)  # (W*B, M)
    loss = ce + memory_loss_weight * mem_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if comm is not None and reads_memory:  # the loss read the memory: on every process alike
        comm.average_gradients(list(memory.parameters()))
    opt.step()
    if memory is not None:
        n = len(write_y) if write_rows is None else write_rows
        memory.update(write_x[:n], write_y[:n], similarity=None if write_sims is None else write_sims[:n])
    correct = (logits.detach().argmax(-1) == y).sum()
    return ce.detach(), mem_loss.detach(), correct
