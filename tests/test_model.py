import pytest
import torch

from service.core.backbones import BUILTIN, create_backbone
from service.core.memory import EMPTY, Retrieval
from service.core.model import MEMORY_KINDS, ClassifierConfig
from service.core.routing import RoutingPolicy, route


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("chans,size", [(1, 28), (3, 32)])
def test_builtin_backbones_give_features(name, chans, size):
    b = create_backbone(name, chans)
    assert b(torch.randn(2, chans, size, size)).shape == (2, b.num_features)


def test_timm_backbone_by_name_without_network():
    b = create_backbone("timm:resnet10t", 3)
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, b.num_features)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="small_resnet.*timm:"):
        create_backbone("resnet9000", 1)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("timm:not_a_model", 1)


@pytest.mark.parametrize("bad,flag", [(dict(memory="lru"), "--memory"),
                                      (dict(memory_classes=2, num_classes=4), "--memory-classes")])
def test_config_rejects_bad_combinations(bad, flag):
    with pytest.raises(ValueError, match=flag):
        ClassifierConfig(**bad)


def retrieval(labels, conf):
    n = len(labels)
    return Retrieval(torch.tensor(labels), torch.tensor(conf), torch.zeros(n, 1, dtype=torch.long),
                     torch.zeros(n, 1), torch.zeros(n, 3))


def test_routing_at_the_threshold_boundary():
    used = route(torch.tensor([2, 2, 2, EMPTY]), torch.tensor([0.85, 0.8499, 1.0, 0.0]), RoutingPolicy(), 3)
    assert used.tolist() == [True, False, True, False]  # >= threshold uses memory; an empty answer never


@pytest.mark.parametrize("bad,flag", [(dict(confidence_threshold=1.5), "--confidence-threshold"),
                                      (dict(new_class_threshold=-0.1), "--new-class-threshold"),
                                      (dict(class_balance=-1.0), "--class-balance"), (dict(neighbours=0), "--neighbours")])
def test_policy_rejects_bad_settings_naming_the_flag(bad, flag):
    with pytest.raises(ValueError, match=flag):
        RoutingPolicy(**bad)


def test_finish_takes_memory_answers_where_routed_and_head_answers_elsewhere(tiny_model):
    model = tiny_model("cached")
    r = retrieval([2, 2, EMPTY], [0.9, 0.5, 0.0])
    r.class_scores = torch.zeros(3, 4)
    hidden = torch.randn(3, model.feature_dim)
    p = model.finish(r, hidden, RoutingPolicy(confidence_threshold=0.85))
    head = torch.softmax(model.head(hidden), -1)  # (3, 4)
    assert p.paths == ["memory", "network", "network"]
    assert p.labels[0] == 2 and p.confidence[0] == pytest.approx(0.9)
    assert p.labels[1:].tolist() == head[1:].argmax(-1).tolist()
    assert p.confidence[1:].tolist() == pytest.approx(head[1:].max(-1).values.tolist(), abs=1e-6)


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_forward_and_predict_for_every_memory_kind(tiny_model, memory):
    model = tiny_model(memory)
    x = torch.randn(5, 1, 28, 28)
    logits, features = model(x)
    assert logits.shape == (5, 4) and features.shape == (5, model.feature_dim)
    p = model.predict(x)
    assert p.labels.shape == (5,) and p.paths == ["network"] * 5  # empty memory: network path
    assert (p.slot == EMPTY).all()
    assert set(p.timings_ms) == {"features", "memory", "head"}


@pytest.mark.parametrize("memory", ["cached", "trainable"])
def test_stored_image_comes_back_from_memory(tiny_model, memory):
    model = tiny_model(memory, memory_classes=6)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        model.memory.update(model.backbone(x), torch.tensor([5, 4, 5]))  # classes the head lacks
    p = model.predict(x)
    assert p.paths == ["memory"] * 3
    assert p.labels.tolist() == [5, 4, 5]
    assert p.slot.tolist() == [0, 1, 2]
    assert p.confidence.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert p.class_scores.shape == (3, 6)


def test_a_policy_passed_to_predict_overrides_the_models_own(tiny_model):
    model = tiny_model("cached")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model.memory.update(model.backbone(x), torch.tensor([0, 1]))
    near = torch.randn(2, 1, 28, 28)  # other images: not exact matches of the stored items
    model.policy = RoutingPolicy(confidence_threshold=0.0)
    p = model.predict(near)
    assert p.paths == ["memory", "memory"] and (p.confidence < 1).all()
    assert model.predict(near, RoutingPolicy(confidence_threshold=1.0)).paths == ["network", "network"]


# --- early exit -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_stage_list_then_pool_is_the_backbone(name):
    b = create_backbone(name, 1).eval()
    x = torch.randn(2, 1, 28, 28)
    h = x
    for stage in b.stage_list():
        h = stage(h)
    assert torch.allclose(b.pool(h), b(x), atol=1e-6)


@pytest.mark.parametrize("memory", ["cached", "trainable"])
@pytest.mark.parametrize("exit_stage", ["stage1", "stage2"])
def test_early_exit_keys_train_and_route(tiny_model, memory, exit_stage):
    model = tiny_model(memory, exit_stage=exit_stage, exit_dim=16)
    x = torch.randn(6, 1, 28, 28)
    logits, keys = model(x)
    assert logits.shape == (6, 4) and keys.shape == (6, 16) and model.memory.keys.shape[1] == 16
    with torch.no_grad():
        model.memory.update(keys[:3], torch.tensor([0, 1, 2]))
    _, keys = model(x)
    model.memory.contrastive_loss(keys, torch.arange(6) % 4).backward()
    assert model.exit_proj.proj.weight.grad.abs().sum() > 0  # the contrastive loss trains the projection
    p = model.predict(x, RoutingPolicy(confidence_threshold=0.9))
    assert p.paths[:3] == ["memory"] * 3  # stored images exit early, with their stored labels
    assert p.labels[:3].tolist() == [0, 1, 2]


def test_early_exit_batch_split_matches_one_at_a_time(tiny_model):
    """A batch splits into the two paths; each sample's answer is what it gets alone."""
    model = tiny_model("cached", exit_stage="stage1", exit_dim=16)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        model.memory.update(model(x[::2])[1], torch.tensor([0, 1, 2, 3]))
    batch = model.predict(x, RoutingPolicy(confidence_threshold=0.9))
    assert batch.paths == ["memory", "network"] * 4
    for i in range(8):
        one = model.predict(x[i:i + 1], RoutingPolicy(confidence_threshold=0.9))
        assert one.labels.item() == batch.labels[i].item() and one.paths[0] == batch.paths[i]
        assert one.confidence.item() == pytest.approx(batch.confidence[i].item(), abs=1e-5)


def test_network_path_after_an_early_exit_equals_the_full_network(tiny_model):
    model = tiny_model("cached", exit_stage="stage1", exit_dim=16)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        p = model.predict(x)  # empty memory: every sample continues through the network
        full = torch.softmax(model.head(model.backbone(x)), -1)
    assert p.paths == ["network"] * 3
    assert torch.allclose(p.class_scores[:, :4], full, atol=1e-5)


@pytest.mark.parametrize("bad,match", [(dict(exit_stage="middle"), "--exit-stage"),
                                       (dict(exit_stage="stage3"), "--exit-stage stage3.*stage1..stage2"),
                                       (dict(exit_stage="stage1", memory="none"), "--exit-stage needs a memory"),
                                       (dict(exit_stage="stage1", backbone="timm:resnet10t", in_chans=3,
                                             image_size=32), "no stages")])
def test_bad_exit_stage_names_the_flag(tiny_model, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**bad)


def test_new_class_threshold_applies_only_to_classes_the_head_lacks(tiny_model):
    model = tiny_model("cached", memory_classes=6)  # head: 4 classes; memory: room for 2 more
    r = retrieval([5, 1], [0.6, 0.6])
    r.class_scores = torch.zeros(2, 6)
    hidden = torch.randn(2, model.feature_dim)
    p = model.finish(r, hidden, RoutingPolicy(confidence_threshold=0.85, new_class_threshold=0.5))
    assert p.paths == ["memory", "network"] and p.labels[0] == 5
    unset = RoutingPolicy(confidence_threshold=0.85, new_class_threshold=None)  # the same threshold for all
    assert model.finish(r, hidden, unset).paths == ["network", "network"]


def test_taught_distance_weight_answers_a_new_class_where_the_image_is_nearer_its_taught_examples(tiny_model):
    from service.core.taught import TaughtRows

    model = tiny_model("cached", memory_classes=6)  # head: 4 classes; label 4 taught
    D = model.feature_dim
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()  # every trained logit 0
    model.taught.rows = TaughtRows(torch.zeros(1, D), torch.tensor([-1.0]), torch.tensor([4]))  # row logit -1
    r = retrieval([0, 0], [0.0, 0.0])
    r.class_scores = torch.zeros(2, 6)
    inf = float("inf")
    r.class_distance = torch.tensor([[10.0, 10, 10, 10, 2, inf],  # nearer the taught class by 8
                                     [2.0, 10, 10, 10, 10, inf]])  # nearer a trained class by 8
    hidden = torch.zeros(2, D)
    plain = RoutingPolicy(taught_bias=0.0, taught_distance_weight=0.0)
    assert model.finish(r, hidden, plain).labels[0] != 4  # -1 < 0: the trained rows answer
    p = model.finish(r, hidden, plain.replace(taught_distance_weight=0.5))  # -1 + 0.5 x 8 = 3 > 0
    assert p.labels.tolist()[0] == 4 and p.paths[0] == "memory"
    assert p.labels[1] != 4  # -1 - 4 < 0
    with pytest.raises(ValueError, match="--taught-distance-weight"):
        RoutingPolicy(taught_distance_weight=-1.0)
