"""One training step's arithmetic: the optimiser and its schedule as the recipe says
(`make_optimizer`; recipes.py), the recipe's start (`start_recipe`), per-epoch switches
(`set_epoch`) and weight averaging (`Lookahead`), and `train_step`: the loss (cross-entropy plus the memory's contrastive loss), the update, and
the batch written into the memory. train.py runs it over the epochs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .model import EnhancedClassifier
from .train_config import TrainConfig


def make_optimizer(model: EnhancedClassifier, tc: TrainConfig, total_steps: int):
    """SGD and its schedule as the recipe of `tc` says (tc resolved: TrainConfig.resolved)."""
    tc = tc.resolved(model.config.backbone)
    recipe = tc.recipe_settings
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("memory.")]
    memory_params = [p for n, p in model.named_parameters() if n.startswith("memory.")]
    if recipe.name == "airbench":
        # every parameter decays (airbench does): per step each group shrinks by lr * weight_decay,
        # whatever its own learning rate, so the scaled groups get the weight decay divided
        bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        head = {id(p) for p in model.head.parameters()}
        scaled = [(recipe.bias_lr_scale, [p for _, p in named if id(p) in bn_biases]),
                  (recipe.head_scale ** 2, [p for _, p in named if id(p) in head]),
                  (1.0, [p for _, p in named if id(p) not in bn_biases | head])]
        groups = [{"params": ps, "lr": tc.lr * k, "weight_decay": tc.weight_decay / k} for k, ps in scaled if ps]
    else:
        decay = [p for _, p in named if p.ndim > 1]
        no_decay = [p for _, p in named if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if memory_params:
        # no momentum: slots are rewritten every few steps, so momentum would carry over from
        # the item a slot held before; it also spares the optimiser a momentum buffer per key
        groups.append({"params": memory_params, "weight_decay": 0.0, "momentum": 0.0, "nesterov": False})
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=recipe.momentum, nesterov=True)
    if recipe.schedule == "warmup_linear":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_linear(step, total_steps))
    no_momentum = [g["momentum"] == 0.0 for g in groups]  # OneCycleLR would otherwise cycle it in
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=tc.lr, total_steps=total_steps, pct_start=0.25,
        base_momentum=[0.0 if z else 0.85 for z in no_momentum], max_momentum=[0.0 if z else 0.95 for z in no_momentum])
    return opt, sched


def warmup_linear(step: int, total_steps: int, warmup: float = 0.23, start: float = 0.2, end: float = 0.07) -> float:
    """airbench's schedule, a factor of the peak learning rate: linear from `start` to 1 over
    the first `warmup` of the steps, then linear down to `end`."""
    up = int(total_steps * warmup)
    if step < up:
        return start + (1 - start) * step / up
    return 1 - (1 - end) * (step - up) / max(1, total_steps - up)


def start_recipe(model: EnhancedClassifier, tc: TrainConfig, whitening_images: torch.Tensor) -> None:
    """What the recipe sets before the first step: the first convolution whitened on
    `whitening_images` (normalised (N, C, H, W), backbones that have one), the head's initial
    weights at `head_scale` (with its learning rate at head_scale^2 in make_optimizer, the
    same training as a head whose output is multiplied by head_scale)."""
    recipe = tc.recipe_settings
    if recipe.whiten and hasattr(model.backbone, "whiten"):
        model.backbone.whiten(whitening_images.to(next(model.parameters()).device))
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(recipe.head_scale)


def set_epoch(model: EnhancedClassifier, tc: TrainConfig, epoch: int) -> None:
    """Per-epoch switches of the recipe: the whitening bias learns for its first epochs only."""
    recipe = tc.recipe_settings
    stem = getattr(model.backbone, "stem", None)
    if recipe.whiten and hasattr(stem, "whiten"):
        stem.conv.bias.requires_grad_(epoch <= recipe.whiten_bias_epochs)


class Lookahead:
    """airbench's lookahead (from hlb-cifar10): every `every` steps the network's weights and
    batch-norm statistics move to `average`, an exponential average of their own past values,
    whose decay grows with the cube of the run's progress (0 at the start: no averaging;
    0.95^5 at the end); at the last step they become the average. The memory is left out:
    its slots are data, not weights."""

    def __init__(self, model: EnhancedClassifier, total_steps: int, every: int = 5):
        state = model.state_dict(keep_vars=False)
        self.live = {k: v for k, v in state.items() if k.split(".")[0] in ("backbone", "head", "exit_proj")
                     and v.is_floating_point()}  # share the model's storage: written in place
        self.average = {k: v.detach().clone() for k, v in self.live.items()}
        self.total, self.every = total_steps, every

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """`step`: steps done so far in the run (1-based)."""
        if step == self.total:
            decay = 1.0
        elif step % self.every == 0:
            decay = 0.95 ** 5 * (step / self.total) ** 3
        else:
            return
        for k, v in self.live.items():
            self.average[k].lerp_(v, 1 - decay)
            v.copy_(self.average[k])

    def state_dict(self) -> dict:
        return dict(self.average)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.average[k].copy_(v)


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
