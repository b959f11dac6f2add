import pytest
import torch

from service.backbones import BUILTIN, create_backbone
from service.memory import EMPTY, Retrieval
from service.model import MEMORY_KINDS, ClassifierConfig, route_by_confidence


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
                                      (dict(confidence_threshold=1.5), "--confidence"),
                                      (dict(memory_classes=2, num_classes=4), "--memory-classes")])
def test_config_rejects_bad_combinations(bad, flag):
    with pytest.raises(ValueError, match=flag):
        ClassifierConfig(**bad)


def retrieval(labels, conf):
    n = len(labels)
    return Retrieval(torch.tensor(labels), torch.tensor(conf), torch.zeros(n, 1, dtype=torch.long),
                     torch.zeros(n, 1), torch.zeros(n, 3))


def test_routing_at_the_threshold_boundary():
    head = torch.tensor([[0.1, 0.9, 0.0]] * 4)  # head says class 1
    r = retrieval([2, 2, 2, EMPTY], [0.85, 0.8499, 1.0, 0.0])
    labels, conf, used = route_by_confidence(r, head, 0.85)
    assert used.tolist() == [True, False, True, False]  # >= threshold uses memory
    assert labels.tolist() == [2, 1, 2, 1]
    assert conf.tolist() == pytest.approx([0.85, 0.9, 1.0, 0.9])


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


def test_threshold_override_sends_everything_to_the_network(tiny_model):
    model = tiny_model("cached")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        model.memory.update(model.backbone(x), torch.tensor([0, 1]))
    assert model.predict(x, threshold=1.01).paths == ["network", "network"]
