""""None of these": how unlike everything the model knows an image is (its `ood_score`).

The score is the squared Mahalanobis distance (Lee et al. 2018) of the image's unit-length
memory key to the nearest class mean of the keys the memory holds, under one covariance
shared by the classes (Gaussian class-conditionals fitted on the memory):

    q = key / |key|                                   (B, D)
    ood_score = min over held classes c of (q - mu_c)^T P (q - mu_c)
              = q^T P q - 2 q^T (P mu_c) + mu_c^T P mu_c      (no (B, C, D) temporary)

P, the precision, is fitted once (`calibrate`) on the memory's training items at the end of
training or by `python -m service retrofit`, with the covariance shrunk towards its mean
variance (`shrink`, chosen on the validation split: bench/experiments/ood.py). The class means
follow the memory: every write to it updates per-class sums of its keys, so a class taught by
feedback gets a mean of its own and its images stop looking new. `abstained` = ood_score above
the routing policy's `ood_threshold` (chosen so that at most 5% of the validation images
abstain). The distances to every class also weigh taught classes' answers (model.finish,
the policy's `taught_distance_weight`): a new class answers more readily where the image is
nearer its taught examples than any trained class.

Derived state (sums, counts) is rebuilt from the memory when attached; the precision and the
shrink are buffers, saved with the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory import Memory
from .routing import EMPTY


class Novelty(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.register_buffer("precision", torch.zeros(dim, dim))  # (D, D); zeros = not calibrated
        self.register_buffer("shrink", torch.zeros(()))
        self.classes = classes
        self._follow(None)
        self._sums = torch.zeros(classes, dim, dtype=torch.float64)  # (C, D) unit keys summed per class
        self._counts = torch.zeros(classes, dtype=torch.float64)  # (C,)
        self._pending: list[torch.Tensor] = []  # slots written since the last score: added then
        self._terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # P mu, mu^T P mu, held

    @property
    def calibrated(self) -> bool:
        return bool(self.precision.any())

    @torch.no_grad()
    def calibrate(self, memory: Memory, shrink: float) -> None:
        """Fit the shared precision on the keys the memory holds now (its training items)."""
        keys, labels = self._filled(memory, memory.filled().nonzero().squeeze(1))
        classes = labels.unique()
        means = torch.stack([keys[labels == c].mean(0) for c in classes])  # (C', D)
        centred = keys - means[torch.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(keys)  # (D, D): post-ReLU features leave it near rank-deficient
        cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        self.precision.copy_(torch.linalg.inv(cov).to(self.precision))
        self.shrink.fill_(shrink)
        self._follow(None)  # attach again: the terms depend on P

    def _follow(self, memory: Memory | None) -> None:
        # not a submodule: the memory's state is the model's, not this module's (state_dict)
        object.__setattr__(self, "_memory", memory)

    @staticmethod
    def _filled(memory: Memory, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit keys (N, D) float64, labels (N,)) of these slots, on the host."""
        keys = F.normalize(memory.keys.detach()[slots].double().cpu(), dim=-1)
        return keys, memory.labels[slots].cpu()

    @torch.no_grad()
    def attach(self, memory: Memory) -> None:
        """Sum the memory's keys per class, and follow its writes from now on."""
        self._sums.zero_()
        self._counts.zero_()
        self._pending.clear()
        self._add(memory, memory.filled().nonzero().squeeze(1), +1.0)
        if self._before_write not in memory.before_write:
            memory.before_write.append(self._before_write)
        self._follow(memory)
        self._terms = None

    def detach_from(self, memory: Memory) -> None:
        if self._before_write in memory.before_write:
            memory.before_write.remove(self._before_write)
        self._follow(None)

    def _add(self, memory: Memory, slots: torch.Tensor, sign: float) -> None:
        slots = slots[memory.labels[slots].cpu() != EMPTY] if slots.numel() else slots
        if not slots.numel():
            return
        keys, labels = self._filled(memory, slots)
        self._sums.index_add_(0, labels, sign * keys)
        self._counts.index_add_(0, labels, torch.full((len(labels),), sign, dtype=torch.float64))

    def _before_write(self, slots: torch.Tensor) -> None:
        """The memory is about to write `slots` (under the caller's lock): take their old keys
        out now, add the new ones at the next score."""
        self._flush(self._memory)  # the previous write is done: its keys count from now
        slots = slots.cpu().unique()
        self._add(self._memory, slots, -1.0)
        self._pending.append(slots)
        self._terms = None

    def _flush(self, memory: Memory) -> None:
        if self._pending:
            slots = torch.cat(self._pending).unique()
            self._pending.clear()
            self._add(memory, slots, +1.0)

    @torch.no_grad()
    def score(self, memory: Memory, keys: torch.Tensor) -> torch.Tensor:
        """(B, D) keys -> (B,) ood_score, on the keys' device. Call under the memory's lock."""
        return self.distances(memory, keys).min(1).values

    @torch.no_grad()
    def distances(self, memory: Memory, keys: torch.Tensor) -> torch.Tensor:
        """(B, D) keys -> (B, C) squared Mahalanobis distance to every class mean, inf for a
        class the memory does not hold; on the keys' device. Call under the memory's lock."""
        if self._memory is not memory:
            self.attach(memory)
        self._flush(memory)
        if self._terms is None:
            held = self._counts > 0.5  # (C,)
            means = self._sums / self._counts.clamp_min(1).unsqueeze(1)  # (C, D)
            p = self.precision.double().cpu()
            pm = means @ p  # (C, D)
            self._terms = tuple(t.to(keys.device) for t in (pm.float(), (pm * means).sum(1).float(), held))
        pm, mpm, held = self._terms  # (C, D), (C,), (C,) on the keys' device
        q = F.normalize(keys.float(), dim=-1)  # (B, D)
        qpq = ((q @ self.precision) * q).sum(1, keepdim=True)  # (B, 1)
        d = qpq - 2 * q @ pm.T + mpm  # (B, C)
        return d.masked_fill(~held, float("inf"))
