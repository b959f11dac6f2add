"""Taught head rows: a few labelled examples teach through the head, not only the memory's vote.

For every label users taught (feedback), the head gets one extra row, fitted in tens of
milliseconds on the features of the taught examples the memory holds (positives) against
the model's replay features: a few training images per class, embedded in eval mode when
the model was trained (negatives; `replay_per_class` in the classifier config). The
trained rows stay frozen, so an old class's answer changes only where a taught row
outscores every trained row.

    features x (B, D) -> trained rows  W x + b          (B, num_classes)   frozen
                      -> taught rows   V x + c + bias   (B, T)             one per taught label
    a taught row has the largest logit => its label (memory path)
    otherwise                          => the usual routing (memory vote or head)

A label the head already has can have a taught row too: corrections of a known class
(rotated photographs of a shoe) get a row of their own that maps to the same label.

The fit minimises class-balanced cross-entropy over [trained logits, taught logits] plus
`l2 * |V|^2`, from zero, in float64, with a fixed number of L-BFGS iterations: the rows are
a function of (trained head, replay features, taught examples) alone, so every process that
applies the same feedback log fits the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

TAUGHT_PER_LABEL = 256  # newest taught examples of a label its row is fitted on (bounds the fit's cost)
FIT_ITERATIONS = 60  # L-BFGS iterations: converged to ~1e-4 of the loss on both data sets (BENCHMARKS.md)


@dataclass(frozen=True)
class TaughtRows:
    """Fitted rows, replaced whole by each fit: a prediction reads one consistent set."""
    weight: torch.Tensor  # (T, D)
    bias: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) the label each row answers

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, T), without the policy's bias."""
        return features.float() @ self.weight.T + self.bias


class TaughtHead(nn.Module):
    def __init__(self, feature_dim: int, replay_size: int):
        super().__init__()
        # training images' features (eval mode) and labels: what the taught rows are fitted against
        self.register_buffer("replay_features", torch.zeros(replay_size, feature_dim))
        self.register_buffer("replay_labels", torch.zeros(replay_size, dtype=torch.int64))
        # derived from the memory's taught items (refitted after every change), so not state
        self.rows = TaughtRows(torch.zeros(0, feature_dim), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    @torch.no_grad()
    def fit(self, head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, l2: float) -> None:
        """One row per distinct label of the taught examples ((N, D) features, (N,) labels),
        the trained rows of `head` frozen. No examples (or no replay) = no rows."""
        keep = features.norm(dim=-1) > 0  # a zero row: the memory does not know the feature's norm
        features, labels = features[keep], labels[keep]
        D = self.replay_features.shape[1]
        if not labels.numel() or not self.replay_labels.numel():
            self.rows = TaughtRows(torch.zeros(0, D), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
            return
        row_labels = labels.unique()  # (T,) sorted: the same order in every process
        C, T = head.out_features, row_labels.numel()
        x = torch.cat([self.replay_features, features.float()]).double()  # (N_r + N, D)
        target = torch.cat([self.replay_labels, C + torch.searchsorted(row_labels, labels)])  # (N_r + N,)
        counts = torch.bincount(target, minlength=C + T).double()
        weight = (1.0 / counts.clamp_min(1))[target]  # every trained class and every row weighs the same
        weight = weight / weight.sum()
        trained = x @ head.weight.detach().double().T + head.bias.detach().double()  # (N_r + N, C), fixed
        V = torch.zeros(T, D, dtype=torch.float64, requires_grad=True)
        c = torch.zeros(T, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([V, c], lr=1.0, max_iter=FIT_ITERATIONS, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def loss_fn():
            opt.zero_grad()
            logits = torch.cat([trained, x @ V.T + c], 1)  # (N_r + N, C + T)
            loss = (F.cross_entropy(logits, target, reduction="none") * weight).sum() + l2 * (V ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(loss_fn)
        self.rows = TaughtRows(V.detach().float(), c.detach().float(), row_labels)
