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

The probe (backbones with one: PoolNet's second block averaged over the image) adds a second
part, for images of another kind altogether (photos sent to a clothes model): the final
features are trained to tell the known classes apart and place such images near some class;
the earlier block's statistics are not (Lee et al. 2018 combine every layer's score):

    p_score   = min over trained classes c of (p - nu_c)^T Q (p - nu_c)       (B,)
    ood_score = (score - m) / s + probe_weight * (p_score - m_p) / s_p

with nu_c, Q fitted at calibration on training images of the trained classes (same shrink),
m, s, m_p, s_p each part's mean and standard deviation on the validation images, and
probe_weight chosen on validation (bench/experiments/ood.py). The probe's Gaussians are fixed:
a taught class moves the first part only, so images of a new kind of thing keep part of their
score after teaching (the exact image taught is always known: model.finish).

Derived state (sums, counts) is rebuilt from the memory when attached; the precision, the
shrink and the probe's Gaussians are buffers, saved with the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory import Memory
from .routing import EMPTY


class Novelty(nn.Module):
    def __init__(self, dim: int, classes: int, probe_dim: int = 0, probe_classes: int = 0):
        super().__init__()
        self.register_buffer("precision", torch.zeros(dim, dim))  # (D, D); zeros = not calibrated
        self.register_buffer("shrink", torch.zeros(()))
        self.has_probe = probe_dim > 0
        if self.has_probe:
            self.register_buffer("probe_means", torch.zeros(probe_classes, probe_dim))  # (Ct, P)
            self.register_buffer("probe_precision", torch.zeros(probe_dim, probe_dim))  # (P, P); zeros = unused
            self.register_buffer("standard", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # m, s, m_p, s_p
            self.register_buffer("probe_weight", torch.zeros(()))
        self._probe_terms: tuple | None = None  # (buffer versions, terms): see _probe
        self.classes = classes
        self._follow(None)
        self._sums = torch.zeros(classes, dim, dtype=torch.float64)  # (C, D) unit keys summed per class
        self._counts = torch.zeros(classes, dtype=torch.float64)  # (C,)
        self._pending: list[torch.Tensor] = []  # slots written since the last score: added then
        self._terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # P mu, mu^T P mu, held

    @property
    def calibrated(self) -> bool:
        return bool(self.precision.any())

    @property
    def probe_calibrated(self) -> bool:
        return self.has_probe and self._probe()["weight"] > 0

    def _probe(self) -> dict:
        """What every score reads of the probe's buffers, computed once per change of them
        (a tensor's _version counts its in-place writes: calibration, a load into it; a move
        to another device makes new tensors)."""
        versions = tuple((b.data_ptr(), b._version)
                         for b in (self.probe_means, self.probe_precision, self.standard, self.probe_weight))
        if self._probe_terms is None or self._probe_terms[0] != versions:
            held = self.probe_means.any(1)  # (Ct,) classes the calibration saw
            mu = self.probe_means[held].float()  # (Ct', P)
            mq = mu @ self.probe_precision  # (Ct', P)
            m, s, mp, sp = self.standard.tolist()
            weight = float(self.probe_weight) if self.probe_precision.any() else 0.0
            self._probe_terms = versions, {"mq": mq, "mqm": (mq * mu).sum(1), "m": m, "s": s, "mp": mp, "sp": sp,
                                           "weight": weight}
        return self._probe_terms[1]

    @torch.no_grad()
    def calibrate_probe(self, probes: torch.Tensor, labels: torch.Tensor, shrink: float) -> None:
        """Fit the probe's Gaussians on training images' probes (N, P) of the trained classes (N,)."""
        p, classes = probes.double().cpu(), labels.cpu().unique()
        means = torch.stack([p[labels.cpu() == c].mean(0) for c in classes])  # (Ct', P)
        self.probe_means.zero_()
        self.probe_means[classes] = means.to(self.probe_means)
        self.probe_precision.copy_(_shrunk_inverse(p - means[torch.searchsorted(classes, labels.cpu())], shrink))

    @torch.no_grad()
    def probe_score(self, probes: torch.Tensor) -> torch.Tensor:
        """(B, P) probes -> (B,) squared Mahalanobis distance to the nearest trained class's probe mean."""
        return self._probe_distance(self._probe(), probes)

    def _probe_distance(self, t: dict, probes: torch.Tensor) -> torch.Tensor:
        q = probes.float()  # (B, P)
        qq = ((q @ self.probe_precision) * q).sum(1, keepdim=True)  # (B, 1)
        d = qq - 2 * q @ t["mq"].T + t["mqm"]  # (B, Ct'): the precision is symmetric
        return d.min(1).values

    def combine(self, score: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
        """The ood_score: `score` (the memory part) alone without a calibrated probe, else both
        parts standardised and summed (module docstring)."""
        if probes is None or not self.has_probe:
            return score
        t = self._probe()  # read once per batch
        if t["weight"] <= 0:
            return score
        return (score - t["m"]) / t["s"] + t["weight"] * (self._probe_distance(t, probes) - t["mp"]) / t["sp"]

    def set_standard(self, score: torch.Tensor, probe_score: torch.Tensor, weight: float) -> None:
        """Each part's mean and standard deviation on the validation images, and the probe's weight."""
        self.standard.copy_(torch.tensor([score.mean(), score.std(), probe_score.mean(), probe_score.std()]))
        self.probe_weight.fill_(weight)

    @torch.no_grad()
    def calibrate(self, memory: Memory, shrink: float) -> None:
        """Fit the shared precision on the keys the memory holds now (its training items)."""
        keys, labels = self._filled(memory, memory.filled().nonzero().squeeze(1))
        classes = labels.unique()
        means = torch.stack([keys[labels == c].mean(0) for c in classes])  # (C', D)
        self.precision.copy_(_shrunk_inverse(keys - means[torch.searchsorted(classes, labels)], shrink))
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


def _shrunk_inverse(centred: torch.Tensor, shrink: float) -> torch.Tensor:
    """The precision of (N, D) centred vectors: their covariance shrunk by `shrink` towards its
    mean variance, inverted (post-activation features leave the covariance near rank-deficient)."""
    cov = centred.T @ centred / len(centred)  # (D, D)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.inv(cov)
