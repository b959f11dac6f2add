"""The routing policy: when the memory answers instead of the network head.

One rule, `route`, used by everything that routes: training's evaluation and threshold
sweep, the benchmarks, and the service. Training chooses the policy on its validation split
and saves it in the model's manifest; the service routes with the manifest's policy unless
a setting overrides it explicitly (shown in `/memory` and the `model_info` metric).

    memory path  <=>  memory answered (label != EMPTY)
                      and confidence >= threshold for its label
    threshold for a label = new_class_threshold if the head lacks that class (taught by
                            feedback) and new_class_threshold is set, else confidence_threshold

Before that rule, taught head rows (service/core/taught.py; `taught_rows`): where a row
fitted on the taught examples outscores every trained row of the head (its logit plus
`taught_bias` for a class the head lacks, `correction_bias` for one it has; a new class's row
also plus `taught_distance_weight` x how much nearer, in Mahalanobis distance, the image is to
that class's taught examples than to any trained class), its label answers, on the memory
path; only an exact match in memory (the taught image itself) comes first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

EMPTY = -1  # label of an empty memory answer (and of a free memory slot)


@dataclass(frozen=True)
class RoutingPolicy:
    # defaults: those chosen on Fashion-MNIST's validation data: class_balance by an earlier
    # round's policy grid (BENCHMARKS.md); new_class_threshold and the taught rows' by
    # bench/experiments/few_shot.py choose (two classes the model never saw); correction_bias by
    # shift-choose (BENCHMARKS.md: both data sets chose -2.0 with the current recipe). Training chooses the online-learning ones again for its own
    # model (--choose-online, core/online_choice.py) and the threshold (--choose-threshold).
    confidence_threshold: float = 0.85
    """Memory path when the memory's confidence reaches this."""
    new_class_threshold: float | None = None
    """Confidence enough when the memory answers a class the head lacks (taught by feedback); unset = the same."""
    class_balance: float = 0.5
    """Each neighbour's vote x (mean items per held class / items of its class) ** this (0 = plain vote)."""
    neighbours: int = 5
    """Memory items that vote on each answer."""
    taught_rows: bool = True
    """Fit a head row per taught label on the taught examples (needs the model's replay features)."""
    taught_bias: float = 2.5
    """Added to the logits of taught rows for classes the head lacks: higher answers them more often."""
    correction_bias: float = -2.0
    """Added to the logits of taught rows for classes the head has (corrections, e.g. under a shift)."""
    taught_l2: float = 1e-2
    """L2 penalty on the taught rows' weights when they are fitted."""
    taught_distance_weight: float = 0.01
    """Weight of local evidence in a new class's taught row: + this x (Mahalanobis distance to the nearest trained class - to the taught class)."""
    ood_threshold: float | None = None
    """Abstain ("none of these", path abstain, the best guess still in label) when ood_score exceeds this; unset = never."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.new_class_threshold is not None and not 0.0 <= self.new_class_threshold <= 1.0:
            raise ValueError(f"--new-class-threshold must be in [0, 1], got {self.new_class_threshold}")
        if self.class_balance < 0:
            raise ValueError(f"--class-balance must be >= 0, got {self.class_balance}")
        if self.neighbours < 1:
            raise ValueError(f"--neighbours must be >= 1, got {self.neighbours}")
        if self.taught_distance_weight < 0:
            raise ValueError(f"--taught-distance-weight must be >= 0, got {self.taught_distance_weight}")
        if self.taught_l2 < 0:
            raise ValueError(f"--taught-l2 must be >= 0, got {self.taught_l2}")

    def replace(self, **changes) -> "RoutingPolicy":
        """A copy with these fields changed (None values are ignored: 'no override')."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown routing policy fields {unknown}; valid: {sorted(names)}")
        return cls(**d)


def route(memory_labels: torch.Tensor, memory_confidence: torch.Tensor, policy: RoutingPolicy,
          head_classes: int) -> torch.Tensor:
    """(B,) labels and confidences of the memory's answers -> (B,) bool, True = memory path.
    Classes >= `head_classes` are those the head cannot answer (taught by feedback)."""
    threshold = torch.full_like(memory_confidence, policy.confidence_threshold)  # (B,)
    if policy.new_class_threshold is not None:
        threshold = torch.where(memory_labels >= head_classes, policy.new_class_threshold, threshold)
    return (memory_confidence >= threshold) & (memory_labels != EMPTY)
