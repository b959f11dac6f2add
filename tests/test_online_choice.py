"""Training chooses how feedback teaches (service/core/online_choice.py): pseudo-new classes
carved out of a trained model, the grid judged on them, the old classes' drop bounded."""

import torch

from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.online_choice import MAX_OLD_DROP, choose_online_settings, without_classes
from service.core.routing import EMPTY, RoutingPolicy

C = 6


def clusters(model, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C * per_class, D) features around one axis per class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    D = model.feature_dim
    y = torch.arange(C).repeat_interleave(per_class)
    x = 0.4 * torch.rand(len(y), D, generator=g)
    x[torch.arange(len(y)), y] += 3.0
    return x, y


def synthetic_model() -> EnhancedClassifier:
    """A 6-class model whose head, memory, replay features and novelty know the clusters."""
    torch.manual_seed(0)
    model = EnhancedClassifier(ClassifierConfig(backbone="small_resnet", num_classes=C, memory_classes=C + 2,
                                                memory_size=300, replay_per_class=10)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[:, :C] = 2.0 * torch.eye(C)
        model.head.bias.zero_()
        x, y = clusters(model, 40, 1)
        model.memory.update(x, y)
        rx, ry = clusters(model, 10, 2)
        model.taught.replay_features.copy_(rx)
        model.taught.replay_labels.copy_(ry)
    model.novelty.calibrate(model.memory, 0.01)
    return model


def test_without_classes_removes_their_rows_items_and_replay_and_relabels_the_rest():
    model = synthetic_model()
    held = model.memory.class_counts().clone()
    small, relabel = without_classes(model, [1, 3])
    assert small.config.num_classes == 4 and small.head.out_features == 4
    assert torch.equal(small.head.weight, model.head.weight[[0, 2, 4, 5]])
    assert relabel[:C].tolist() == [0, 4, 1, 5, 2, 3]  # kept classes first, the leaving ones after them
    counts = small.memory.class_counts()
    assert counts[:4].tolist() == held[[0, 2, 4, 5]].tolist()
    assert counts[4:].sum() == 0  # the leaving classes' items are gone
    assert small.memory.size == int(held.sum() - held[1] - held[3])
    assert set(small.taught.replay_labels.tolist()) == {0, 1, 2, 3}
    assert len(small.taught.replay_labels) == 40
    # the model itself is untouched
    assert model.head.out_features == C and torch.equal(model.memory.class_counts(), held)
    assert (model.memory.labels != EMPTY).sum() == held.sum()


def test_choose_online_settings_keeps_the_best_mean_among_settings_within_the_old_drop():
    model = synthetic_model()
    x, y = clusters(model, 60, 3)
    grid = {"taught_bias": [0.0, 2.0, 8.0], "taught_l2": [1e-3], "new_class_threshold": [0.3, 1.0]}
    chosen, report = choose_online_settings(model, x, y, RoutingPolicy(), grid, shots=5, episodes=2, draws=1)
    table = report["table"]
    assert len(table) == 6 and report["pseudo_new_pairs"] and len(report["pseudo_new_pairs"]) == 2
    ok = [t for t in table if t["old_drop"] <= MAX_OLD_DROP]
    assert ok and report["met_max_old_drop"]
    best = max(ok, key=lambda t: t["mean_old_new"])
    assert report["mean_old_new"] == best["mean_old_new"]
    assert {k: getattr(chosen, k) for k in grid} == report["chosen"]
    assert report["mean_old_new"] > 0.9  # well-separated clusters: the taught classes are learnt
    # the model is left as it was: no taught item, no taught row
    assert model.memory.class_counts()[C:].sum() == 0 and model.taught.rows.labels.numel() == 0


def test_choose_online_settings_falls_back_to_the_best_mean_when_no_setting_keeps_the_old_classes():
    model = synthetic_model()
    x, y = clusters(model, 60, 3)
    x_new = x.clone()
    # every validation image sits between two classes: whatever is taught costs the old ones
    x_new[:, :C] = x[:, :C] + 2.9 * torch.roll(torch.nn.functional.one_hot(y, C).float(), 1, 1)
    grid = {"taught_bias": [8.0, 12.0], "taught_l2": [1e-3], "new_class_threshold": [0.0]}
    _, report = choose_online_settings(model, x_new, y, RoutingPolicy(), grid, shots=5, episodes=2, draws=1)
    assert not report["met_max_old_drop"]
    assert report["mean_old_new"] == max(t["mean_old_new"] for t in report["table"])
