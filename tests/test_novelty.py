""""None of these" (service/core/novelty.py): the ood_score is the Mahalanobis distance to the
nearest class mean of the memory's keys, the means follow every write, the threshold is chosen
on validation images, and a taught class stops abstaining."""

import json

import pytest
import torch
import torch.nn.functional as F

from service.core.novelty import Novelty
from service.core.retrofit import calibrate_novelty
from service.core.store import InputSpec, load_model, save_model
from tests.helpers import CLASSES, save_tiny_model
from tests.test_runtime import image, teach


def direct_score(memory, keys, shrink):
    """The definition, computed the long way: (B, C, D) differences, an explicit inverse."""
    filled = memory.filled().nonzero().squeeze(1)
    k, y = F.normalize(memory.keys[filled].double(), dim=-1), memory.labels[filled]
    classes = y.unique()
    means = torch.stack([k[y == c].mean(0) for c in classes])
    centred = k - means[torch.searchsorted(classes, y)]
    cov = centred.T @ centred / len(k)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    d = F.normalize(keys.double(), dim=-1).unsqueeze(1) - means  # (B, C, D)
    return torch.einsum("bcd,de,bce->bc", d, torch.linalg.inv(cov), d).min(1).values


def test_the_score_is_the_mahalanobis_distance_to_the_nearest_class_mean(tiny_model):
    m = tiny_model()
    with torch.no_grad():
        m.memory.update(torch.randn(12, m.key_dim), torch.arange(12) % 3)
    n = Novelty(m.key_dim, m.config.memory_classes)
    n.calibrate(m.memory, 0.3)
    q = torch.randn(5, m.key_dim)
    assert torch.allclose(n.score(m.memory, q).double(), direct_score(m.memory, q, 0.3), rtol=1e-3, atol=1e-3)


def test_the_class_means_follow_every_write_and_forget(tiny_model):
    m = tiny_model(memory_classes=6)
    with torch.no_grad():
        m.memory.update(torch.randn(10, m.key_dim), torch.arange(10) % 3)
        n = Novelty(m.key_dim, m.config.memory_classes)
        n.calibrate(m.memory, 0.3)
        q = torch.randn(6, m.key_dim)
        n.score(m.memory, q)  # attached: from here on it follows the writes
        m.memory.teach(torch.randn(4, m.key_dim), torch.tensor([3, 3, 1, 4]))  # new classes, and one known
        m.memory.update(torch.randn(8, m.key_dim), torch.arange(8) % 5)  # past capacity: replacements
        m.memory.teach(torch.randn(2, m.key_dim), torch.tensor([4, 4]))
        m.memory.forget(torch.tensor([0, 3]))
        followed = n.score(m.memory, q)
        fresh = Novelty(m.key_dim, m.config.memory_classes)
        fresh.load_state_dict(n.state_dict())
        assert torch.allclose(followed, fresh.score(m.memory, q), rtol=1e-4, atol=1e-4)  # means from scratch


def test_the_threshold_lets_at_most_five_percent_of_the_validation_images_abstain(tiny_model):
    m = tiny_model()
    with torch.no_grad():
        m.memory.update(m.embed(torch.randn(16, 1, 28, 28))[0], torch.arange(16) % 4)
    validation = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    threshold = calibrate_novelty(m, validation, [0.5], [0.5], shrink=0.3)
    x = (validation.float() / 255 - 0.5) / 0.5
    scores = m.novelty.score(m.memory, m.embed(x)[0])
    assert 0.0 < (scores > threshold).float().mean() <= 0.05


def calibrated_tiny_store(tmp_path):
    """A model store holding the tiny model with its ood_score calibrated on its memory."""
    store = tmp_path / "store"
    save_tiny_model(store, prefill=8)
    loaded = load_model(store, "tiny")
    loaded.model.novelty.calibrate(loaded.model.memory, 0.3)
    save_model(store, "tiny", loaded.model, CLASSES, InputSpec(28, 1, [0.5], [0.5]))
    return store


def test_an_image_unlike_the_memory_abstains_and_teaching_its_class_stops_it(tmp_path):
    from service.serving.runtime import ModelRuntime

    store = calibrated_tiny_store(tmp_path)

    probe = image(123)[0]
    rt = ModelRuntime(store, "tiny", tmp_path / "var")
    try:
        score = float(rt.predict(probe).prediction.ood_score[0])
    finally:
        rt.close()
    rt = ModelRuntime(store, "tiny", tmp_path / "var2", {"ood_threshold": score * 0.99})
    try:
        before = rt.predict(probe).prediction
        assert bool(before.abstained[0]) and before.paths == ["abstain"]
        assert 0 <= int(before.labels[0]) < len(CLASSES)  # the best guess is still given
        teach(rt, [123, 123, 123], "Novel")  # the probe's own class, taught by feedback
        after = rt.predict(probe).prediction
        assert float(after.ood_score[0]) < 0.1 * score and not bool(after.abstained[0])
        assert after.paths != ["abstain"]
    finally:
        rt.close()


def test_an_abstained_image_taught_as_a_known_class_is_known_by_its_exact_match(tmp_path):
    from service.serving.runtime import ModelRuntime

    store = calibrated_tiny_store(tmp_path)
    probe = image(77)[0]
    rt = ModelRuntime(store, "tiny", tmp_path / "var", {"ood_threshold": 0.0})  # everything abstains
    try:
        assert bool(rt.predict(probe).prediction.abstained[0])
        teach(rt, [77], "one")  # a correction: the class mean of "one" hardly moves
        after = rt.predict(probe).prediction
        assert not bool(after.abstained[0]) and after.paths == ["memory"] and int(after.labels[0]) == 1
        assert bool(rt.predict(image(78)[0]).prediction.abstained[0])  # another image still abstains
    finally:
        rt.close()


def test_a_model_saved_before_the_score_existed_answers_without_one(tmp_path):
    from service.serving.runtime import ModelRuntime

    save_tiny_model(tmp_path / "store", novelty=False)
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    try:
        p = rt.predict(image(1)[0]).prediction
        assert torch.isnan(p.ood_score).all() and not p.abstained.any()
    finally:
        rt.close()


# --- the probe: a second part from an earlier block (backbones with one: poolnet) -------------
def poolnet_with_memory(**config):
    """An untrained poolnet whose memory holds 40 random images' keys of 4 classes."""
    from service.core.model import ClassifierConfig, EnhancedClassifier

    torch.manual_seed(0)
    m = EnhancedClassifier(ClassifierConfig(backbone="poolnet", num_classes=4, in_chans=1, image_size=28,
                                            memory_size=64, memory_classes=6, **config)).eval()
    with torch.no_grad():
        m.memory.update(m.embed(torch.randn(40, 1, 28, 28))[0], torch.arange(40) % 4)
    return m


def uint8_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


def direct_probe_score(novelty, train_probes, train_labels, probes, shrink):
    """The probe part's definition the long way: class means, (B, C, P) differences, an explicit inverse."""
    p, y = train_probes.double(), train_labels
    means = torch.stack([p[y == c].mean(0) for c in y.unique()])
    centred = p - means[y]
    cov = centred.T @ centred / len(p)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    d = probes.double().unsqueeze(1) - means
    return torch.einsum("bcd,de,bce->bc", d, torch.linalg.inv(cov), d).min(1).values


def test_the_probe_part_is_standardised_on_validation_weighted_and_added_to_the_memory_part():
    m = poolnet_with_memory()
    train = uint8_images(120, 1), torch.arange(120) % 4
    validation = uint8_images(200, 2)
    threshold = calibrate_novelty(m, validation, [0.5], [0.5], shrink=0.3, train=train, probe_weight=0.7)
    n = m.novelty
    assert n.probe_calibrated and float(n.probe_weight) == pytest.approx(0.7)
    x_train, x_val = (train[0].float() / 255 - 0.5) / 0.5, (validation.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        keys, _, probes = m.encode(x_val)
        train_probes = m.encode(x_train)[2]
    memory_part, probe_part = n.score(m.memory, keys), n.probe_score(probes)
    assert torch.allclose(probe_part.double(), direct_probe_score(n, train_probes, train[1], probes, 0.3),
                          rtol=1e-3, atol=1e-3)
    m_, s_, mp, sp = n.standard.tolist()  # each part's validation mean and standard deviation
    assert m_ == pytest.approx(float(memory_part.mean()), rel=1e-4) and sp == pytest.approx(float(probe_part.std()),
                                                                                             rel=1e-4)
    expected = (memory_part - m_) / s_ + 0.7 * (probe_part - mp) / sp
    served = m.predict(x_val).ood_score
    assert torch.allclose(served, expected, atol=1e-3)
    assert 0.0 < (served > threshold).float().mean() <= 0.05
    n.probe_weight.fill_(1.4)  # a write into a buffer (as a load makes) is read by the next score
    assert torch.allclose(m.predict(x_val).ood_score, (memory_part - m_) / s_ + 1.4 * (probe_part - mp) / sp, atol=1e-3)


def test_at_probe_weight_zero_or_without_training_images_the_score_is_the_memory_part_alone():
    validation = uint8_images(100, 2)
    x_val = (validation.float() / 255 - 0.5) / 0.5
    for kwargs in ({"train": (uint8_images(40, 1), torch.arange(40) % 4), "probe_weight": 0.0}, {"train": None}):
        m = poolnet_with_memory()
        calibrate_novelty(m, validation, [0.5], [0.5], shrink=0.3, **kwargs)
        assert m.novelty.has_probe and not m.novelty.probe_calibrated
        with torch.no_grad():
            alone = m.novelty.score(m.memory, m.embed(x_val)[0])
        assert torch.allclose(m.predict(x_val).ood_score, alone)


def test_a_model_stored_before_the_probe_loads_without_one_and_with_probe_gives_it_room(tmp_path):
    from service.core.retrofit import with_probe

    m = poolnet_with_memory(novelty_probe=False)
    assert not m.novelty.has_probe
    save_model(tmp_path, "old", m, CLASSES, InputSpec(28, 1, [0.5], [0.5]))
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["classifier"]["novelty_probe"]  # as written before the field existed
    path.write_text(json.dumps(manifest))
    loaded = load_model(tmp_path, "old")
    assert not loaded.model.novelty.has_probe
    rebuilt = with_probe(loaded.model)
    assert rebuilt.novelty.has_probe and not rebuilt.novelty.probe_calibrated
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(rebuilt.predict(x).labels, loaded.model.predict(x).labels)
    assert torch.equal(rebuilt.memory.keys, loaded.model.memory.keys)


def test_the_runtime_serves_the_probe_part_as_the_model_computes_it(tmp_path):
    from service.serving.runtime import ModelRuntime

    m = poolnet_with_memory()
    calibrate_novelty(m, uint8_images(100, 2), [0.5], [0.5], shrink=0.3, train=(uint8_images(80, 1),
                                                                                 torch.arange(80) % 4))
    save_model(tmp_path / "store", "p", m, CLASSES, InputSpec(28, 1, [0.5], [0.5]))
    x = torch.randn(3, 1, 28, 28)
    rt = ModelRuntime(tmp_path / "store", "p", tmp_path / "var")
    try:
        served = rt.predict(x).prediction.ood_score
    finally:
        rt.close()
    assert torch.allclose(served, m.predict(x).ood_score, atol=1e-4)
