"""Taught head rows: a few labelled examples teach through the head, not only the memory's vote.

For every label users taught (feedback), the head gets one extra row, fitted on the
features of the taught examples the memory holds (positives) against
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
`l2 * |V|^2`, in float64, by scipy's L-BFGS-B with its analytic gradient. With l2 > 0 the
loss is strictly convex: it has one minimum, a function of (trained head, replay features,
taught examples) alone, and the rows are that minimum to within FIT_GTOL (the largest
gradient component). A fit may stop early (`iterations`, `stop`) and be continued later from
the rows it left (`warm=True`: each row starts where the row of its label is, a new label at
zero): the service bounds the fit a request waits for this way and finishes it on its fitter
thread (serving/fitter.py). Two processes that applied the same log hold the same minimum once their
fits converged; their rows differ by the tolerance, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import minimize

TAUGHT_PER_LABEL = 256  # newest taught examples of a label its row is fitted on (bounds the fit's cost)
FIT_ITERATIONS = 3000  # L-BFGS-B's limit for a whole fit: far beyond what convergence takes
FIT_GTOL = 1e-5  # converged: every component of the loss's gradient below this


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
    def fit(self, head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, l2: float,
            iterations: int = FIT_ITERATIONS, warm: bool = False,
            stop: Callable[[int], bool] | None = None) -> bool:
        """One row per distinct label of the taught examples ((N, D) features, (N,) labels),
        the trained rows of `head` frozen. No examples (or no replay) = no rows. At most
        `iterations` L-BFGS-B steps, from zero or (`warm`) from the current rows, and fewer
        when `stop(iterations done)` says so; returns False when it stopped before the minimum
        (FIT_GTOL): another call continues."""
        # the fit runs on the host (scipy drives it); the rows live where the model does
        device = self.replay_features.device
        features, labels = features.float().cpu(), labels.cpu()
        keep = features.norm(dim=-1) > 0  # a zero row: the memory does not know the feature's norm
        features, labels = features[keep], labels[keep]
        D = self.replay_features.shape[1]
        if not labels.numel() or not self.replay_labels.numel():
            self.rows = TaughtRows(torch.zeros(0, D, device=device), torch.zeros(0, device=device),
                                   torch.zeros(0, dtype=torch.int64, device=device))
            return True
        row_labels = labels.unique()  # (T,) sorted: the same order in every process
        C, T = head.out_features, row_labels.numel()
        # float64 torch (its own thread pool, as the model's) for the loss; scipy drives L-BFGS-B
        x = torch.cat([self.replay_features.cpu(), features]).double()  # (N, D)
        xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (N, D + 1): bias as an input
        target = torch.cat([self.replay_labels.cpu(), C + torch.searchsorted(row_labels, labels)])  # (N,)
        weight = (1.0 / torch.bincount(target, minlength=C + T).double().clamp_min(1))[target]
        weight = weight / weight.sum()  # every trained class and every row weighs the same
        trained = x @ head.weight.detach().cpu().double().T + head.bias.detach().cpu().double()  # (N, C), fixed
        # the trained logits never change during the fit: their log-sum-exp and each example's
        # own trained logit are computed once, and each step works on the (N, T) taught logits alone
        trained_lse = torch.logsumexp(trained, 1)  # (N,)
        is_taught = target >= C  # (N,)
        own_trained = trained.gather(1, target.clamp_max(C - 1).unsqueeze(1)).squeeze(1)  # (N,) unused where taught
        own = torch.zeros(len(x), T, dtype=torch.float64)  # (N, T) one-hot of each example's own row
        taught_ex = is_taught.nonzero().squeeze(1)
        own[taught_ex, target[taught_ex] - C] = 1.0
        decay = torch.ones(T, D + 1, dtype=torch.float64)
        decay[:, D] = 0.0  # the bias is not penalised

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            V = torch.from_numpy(theta).view(T, D + 1)
            z = xb @ V.T  # (N, T) taught logits
            lse = torch.logaddexp(trained_lse, torch.logsumexp(z, 1))  # (N,) over [trained, taught]
            own_logit = torch.where(is_taught, (z * own).sum(1), own_trained)  # (N,)
            loss = (weight * (lse - own_logit)).sum() + l2 * (decay * V * V).sum()
            g = (torch.exp(z - lse.unsqueeze(1)) - own) * weight.unsqueeze(1)  # (N, T): d loss / d taught logits
            return float(loss), (g.T @ xb + 2 * l2 * decay * V).numpy().ravel()

        start = self._start(row_labels, D) if warm else torch.zeros(T, D + 1, dtype=torch.float64)  # (T, D + 1)
        done = [0]

        def interrupt(_) -> None:  # scipy ends the fit, keeping its last point, on StopIteration
            done[0] += 1
            if stop is not None and stop(done[0]):
                raise StopIteration

        # ftol 0: stop on the gradient (the minimum), not on a stalled loss
        fit = minimize(loss_and_grad, start.numpy().ravel(), jac=True, method="L-BFGS-B", callback=interrupt,
                       options={"maxiter": iterations, "ftol": 0.0, "gtol": FIT_GTOL})
        V = torch.from_numpy(fit.x).view(T, D + 1).float()
        self.rows = TaughtRows(V[:, :D].contiguous().to(device), V[:, D].contiguous().to(device), row_labels.to(device))
        # 1: stopped at `iterations`, 99: by `stop`; else at the minimum (or as near as float64 gets)
        return fit.status not in (1, 99)

    def _start(self, row_labels: torch.Tensor, D: int) -> torch.Tensor:
        """(T, D + 1) float64: each label's current row (weight, bias), zeros for a new label."""
        start = torch.zeros(len(row_labels), D + 1, dtype=torch.float64)
        old = self.rows
        if old.labels.numel():
            at = torch.searchsorted(row_labels, old.labels.cpu()).clamp_max(len(row_labels) - 1)  # (T_old,)
            kept = row_labels[at] == old.labels.cpu()  # old rows whose label still has examples
            start[at[kept], :D] = old.weight.cpu().double()[kept]
            start[at[kept], D] = old.bias.cpu().double()[kept]
        return start
