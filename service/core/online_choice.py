"""Training chooses the online-learning settings (how feedback teaches) on its validation split.

A trained model meets, in service, classes it never saw: a user teaches them with a few
labelled examples (feedback). How strongly those examples answer (the routing policy's taught_*
fields, new_class_threshold, ...) is a trade between the new classes' recall and the old
classes' accuracy. Training cannot see the classes users will teach, so it plays the part
with its own classes (pseudo-new classes, as in the episodic training of few-shot incremental
learners):

    for each episode: two of the model's classes leave it (`without_classes`: their head rows,
        memory items and replay features removed, the rest relabelled 0..C-3; the network is
        unchanged), K validation images of each are taught as new classes, the other
        validation images answer under every candidate policy of the grid
    chosen: the policy with the best mean(old accuracy, new recall) over the episodes among
        those whose old classes lose at most MAX_OLD_DROP; the best mean if none does

The network has seen the pseudo-new classes in training, so their recall here is higher than a
truly new class's (BENCHMARKS.md "Few examples teach a new class" measures the chosen settings on
classes a model never saw). Everything runs on validation features computed once.

`predictions_after_teaching` is also what the few-shot and online-learning benchmarks call.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time

import torch
import torch.nn as nn

from .routing import EMPTY, RoutingPolicy

MAX_OLD_DROP = 0.01  # the goal: teaching costs the old classes at most one point
SHOTS = 10  # examples taught per pseudo-new class (a user's "few")
EPISODES = 3  # pairs of pseudo-new classes
DRAWS = 2  # draws of the shots per episode
ONLINE_GRID = {"taught_bias": [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0], "taught_l2": [1e-3, 1e-2],
               "new_class_threshold": [0.3, 1.0], "taught_distance_weight": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]}
MIN_CLASSES = 6  # two leave per episode and at least four stay


@torch.no_grad()
def predictions_after_teaching(model, lessons: list[tuple[torch.Tensor, int]], xs: list[torch.Tensor],
                               policies: list[RoutingPolicy]) -> list[list[torch.Tensor]]:
    """In-process, the runtime's core calls: teach each lesson ((N, D) features, label: one
    feedback request), fit the taught rows, then predict every `xs` (features) under each
    policy. Returns [policy][x] labels; the memory is left as it was."""
    memory = model.memory
    saved = {k: v.clone() for k, v in memory.state_dict().items()}
    try:
        taught = torch.zeros(memory.capacity, dtype=torch.bool)
        for feats, label in lessons:
            rep = memory.teach(feats, torch.full((len(feats),), label), protected=taught.clone())
            taught[rep.slot[rep.slot >= 0]] = True
        # the memory's vote depends on neighbours and class balance only: read once per pair
        reads = {}
        out, fitted = [], {}
        for policy in policies:
            vote = (policy.neighbours, policy.class_balance)
            if vote not in reads:
                reads[vote] = [[(b, model.retrieve(b, policy)) for b in x.split(2000)] for x in xs]
            key = (policy.taught_l2, policy.taught_rows)
            if key not in fitted:
                model.fit_taught(model.taught_examples(taught.nonzero().squeeze(1), policy), policy)
                fitted[key] = model.taught.rows
            model.taught.rows = fitted[key]
            out.append([torch.cat([model.finish(r, b, policy).labels for b, r in chunks]) for chunks in reads[vote]])
        return out
    finally:
        memory.load_state_dict(saved)
        model.fit_taught(model.taught_examples(torch.zeros(0, dtype=torch.int64)))


@torch.no_grad()
def without_classes(model, leaving: list[int]):
    """A copy of `model` that never knew the classes `leaving`: their head rows, memory items and
    replay features removed, the other classes relabelled 0..C-1-len(leaving) in order, the
    leaving ones given the labels right after them (the first labels a user's teaching would
    take). Returns (copy, relabel: (memory_classes,) old label -> new label)."""
    C, Cm = model.config.num_classes, model.config.memory_classes
    kept = [c for c in range(C) if c not in leaving]
    order = kept + list(leaving) + list(range(C, Cm))  # new label i <- old label order[i]
    relabel = torch.empty(Cm, dtype=torch.int64)
    relabel[torch.tensor(order)] = torch.arange(Cm)
    novelty, memory = model.novelty, model.memory
    if novelty is not None:
        novelty.detach_from(memory)  # the copy's novelty follows the copy's memory
    small = copy.deepcopy(model)
    small.config = dataclasses.replace(model.config, num_classes=len(kept))
    small.head = nn.Linear(model.head.in_features, len(kept))
    small.head.weight.copy_(model.head.weight[kept])
    small.head.bias.copy_(model.head.bias[kept])
    m = small.memory
    gone = torch.isin(m.labels, torch.tensor(leaving, device=m.labels.device))
    m.labels.copy_(torch.where(m.labels == EMPTY, EMPTY, relabel.to(m.labels.device)[m.labels.clamp_min(0)]))
    m.labels[gone] = EMPTY
    if hasattr(m, "values"):  # a trainable memory's class distributions follow the labels
        m.values.data = m.values.data[:, torch.tensor(order, device=m.values.device)]
        m.values.data[gone] = 0.0
    m._recount()
    if small.taught is not None:
        keep = torch.isin(small.taught.replay_labels, torch.tensor(kept))
        small.taught.replay_features = small.taught.replay_features[keep].clone()
        small.taught.replay_labels = relabel[small.taught.replay_labels[keep]].clone()
    small.policy = model.policy
    return small, relabel


@torch.no_grad()
def choose_on_images(model, images: torch.Tensor, labels: torch.Tensor, mean, std, base: RoutingPolicy,
                     seed: int = 0, batch: int = 500) -> tuple[RoutingPolicy, dict]:
    """`choose_online_settings` on uint8 validation images (N, C, H, W), embedded by the model
    as it serves (eval mode). A model without taught rows or with fewer than MIN_CLASSES classes
    keeps `base` (report: chosen_on "given")."""
    if model.taught is None or model.config.num_classes < MIN_CLASSES or not len(labels):
        return base, {"chosen_on": "given (the model has no taught rows, too few classes or no validation split)"}
    from .data import normalize  # data.py reads data sets: only when choosing
    model.eval()
    features = torch.cat([model.embed(normalize(images[i:i + batch], mean, std))[0].float()
                          for i in range(0, len(labels), batch)])  # (N, D)
    return choose_online_settings(model, features, labels, base, seed=seed)


def grid_policies(base: RoutingPolicy, grid: dict) -> list[RoutingPolicy]:
    """Every combination of the grid's values on `base` (a value None sets the field to None)."""
    return [RoutingPolicy(**{**base.to_dict(), **dict(zip(grid, values))}) for values in itertools.product(*grid.values())]


def _scores(pred: torch.Tensor, y: torch.Tensor, H: int) -> tuple[float, float]:
    new = y >= H
    right = (pred == y).float()
    return right[~new].mean().item(), right[new].mean().item()


@torch.no_grad()
def choose_online_settings(model, features: torch.Tensor, labels: torch.Tensor, base: RoutingPolicy,
                           grid: dict | None = None, shots: int = SHOTS, episodes: int = EPISODES,
                           draws: int = DRAWS, seed: int = 0) -> tuple[RoutingPolicy, dict]:
    """The grid's best policy for teaching new classes, judged on pseudo-new classes of the
    validation split ((N, D) features by `model`, (N,) labels); see the module docstring.
    Returns (the chosen policy, a report for metrics.json)."""
    grid = ONLINE_GRID if grid is None else grid
    t0 = time.perf_counter()
    C = model.config.num_classes
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(C, generator=g).tolist()
    pairs = [sorted(classes[2 * e:2 * e + 2]) for e in range(min(episodes, C // 2 - 1))]  # 2+ classes stay
    policies = grid_policies(base, grid)
    sums = torch.zeros(len(policies), 2, dtype=torch.float64)  # (P, [old drop, mean]) summed over runs
    runs = 0
    for pair in pairs:
        small, relabel = without_classes(model, pair)
        H = small.config.num_classes
        y = relabel[labels]  # (N,) in the copy's labels: pseudo-new ones are H, H + 1
        before = predictions_after_teaching(small, [], [features], [base])[0][0]
        old_before = _scores(before, y, H)[0]
        for draw in range(draws):
            shot_idx, lessons = [], []
            for j in range(len(pair)):
                idx = (y == H + j).nonzero().squeeze(1)
                pick = idx[torch.randperm(len(idx), generator=g)[:shots]]
                shot_idx.append(pick)
                lessons.append((features[pick], H + j))
            rest = torch.ones(len(y), dtype=torch.bool)
            rest[torch.cat(shot_idx)] = False  # the taught images are not asked again
            preds = predictions_after_teaching(small, lessons, [features[rest]], policies)
            for i, (pred,) in enumerate(preds):
                old, new = _scores(pred, y[rest], H)
                sums[i, 0] += old_before - old
                sums[i, 1] += (old + new) / 2
            runs += 1
    mean = sums / runs
    table = [{**{k: getattr(p, k) for k in grid}, "old_drop": float(mean[i, 0]), "mean_old_new": float(mean[i, 1])}
             for i, p in enumerate(policies)]
    ok = [i for i in range(len(policies)) if mean[i, 0] <= MAX_OLD_DROP]
    best = max(ok or range(len(policies)), key=lambda i: float(mean[i, 1]))
    report = {"chosen": {k: getattr(policies[best], k) for k in grid}, "chosen_on": "validation (pseudo-new classes)",
              "old_drop": float(mean[best, 0]), "mean_old_new": float(mean[best, 1]),
              "met_max_old_drop": bool(ok), "max_old_drop": MAX_OLD_DROP, "pseudo_new_pairs": pairs,
              "shots": shots, "draws": draws, "seconds": time.perf_counter() - t0, "table": table}
    return policies[best], report
