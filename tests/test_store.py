import json

import pytest
import torch

from service.core.routing import RoutingPolicy
from service.core.store import InputSpec, ModelStoreError, load_model, model_dir, save_model

SPEC = InputSpec(image_size=28, in_chans=1, mean=[0.5], std=[0.5])
CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(params=["cached", "trainable", "none"])
def saved(request, tmp_path, tiny_model):
    model = tiny_model(request.param)
    if model.memory is not None:
        with torch.no_grad():
            model.memory.update(model.backbone(torch.randn(6, 1, 28, 28)), torch.tensor([0, 1, 2, 3, 0, 1]))
    d = save_model(tmp_path, "m", model, CLASSES, SPEC, metrics={"test_accuracy": 0.5},
                   reports={"metrics.json": b"{}"})
    return tmp_path, d, model


def test_round_trip_gives_identical_predictions(saved):
    store, _, model = saved
    loaded = load_model(store, "m")
    x = torch.randn(8, 1, 28, 28)
    a, b = model.predict(x, RoutingPolicy(confidence_threshold=0.0)), loaded.model.predict(x, RoutingPolicy(confidence_threshold=0.0))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.confidence, b.confidence)
    assert torch.equal(a.slot, b.slot) and a.paths == b.paths
    assert loaded.classes == CLASSES and loaded.input == SPEC
    assert loaded.manifest["metrics"]["test_accuracy"] == 0.5


def test_manifest_lists_sha256_of_every_artifact(saved):
    _, d, _ = saved
    manifest = json.loads((d / "manifest.json").read_text())
    files = {p.name for p in d.iterdir() if p.name != "manifest.json"}
    assert set(manifest["artifacts"]) == files
    assert all(len(h) == 64 for h in manifest["artifacts"].values())
    assert not list(d.glob(".*.tmp"))  # no temporary files left behind


def weights_file(d):
    return next(d.glob("weights-*.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_artifact_is_refused_naming_the_file(saved, damage):
    store, d, _ = saved
    f = weights_file(d)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "tamper":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.unlink()
    with pytest.raises(ModelStoreError, match=f.name):
        load_model(store, "m")


def test_corrupt_or_missing_manifest_is_refused(saved):
    store, d, _ = saved
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ModelStoreError, match="manifest.json"):
        load_model(store, "m")
    (d / "manifest.json").unlink()
    with pytest.raises(ModelStoreError, match="manifest.json.*missing"):
        load_model(store, "m")


def test_mismatched_classifier_is_refused(saved):
    store, d, _ = saved
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["classifier"]["backbone"] = "small_resnet_wide"  # weights no longer fit
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="do not match"):
        load_model(store, "m")


def test_resave_replaces_artifacts_atomically(saved, tiny_model):
    store, d, _ = saved
    other = tiny_model("cached", memory_size=8)
    save_model(store, "m", other, CLASSES, SPEC)
    loaded = load_model(store, "m")
    assert loaded.model.memory.capacity == 8
    assert len(list(d.glob("weights-*.safetensors"))) == 1  # the superseded file is gone


@pytest.mark.parametrize("name", ["../etc", "..", "a/b", "/abs", ".hidden", "", "x" * 65, "a\x00b"])
def test_model_names_cannot_leave_the_store(tmp_path, name):
    with pytest.raises(ModelStoreError, match="invalid model name|outside"):
        model_dir(tmp_path, name)


def test_no_pickle_in_the_package():
    import pathlib
    src = pathlib.Path(__file__).parent.parent / "service"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, f


def test_early_exit_model_round_trips_with_its_exit_stage(tiny_model, tmp_path):
    model = tiny_model("cached", exit_stage="stage2", exit_dim=8)
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        model.memory.update(model(x)[1], torch.tensor([0, 1, 2, 3, 0, 1]))
    save_model(tmp_path, "ee", model, ["a", "b", "c", "d"], InputSpec(28, 1, [0.5], [0.5]))
    manifest = json.loads((tmp_path / "ee" / "manifest.json").read_text())
    assert manifest["classifier"]["exit_stage"] == "stage2"
    loaded = load_model(tmp_path, "ee").model
    a, b = model.predict(x, RoutingPolicy(confidence_threshold=0.5)), loaded.predict(x, RoutingPolicy(confidence_threshold=0.5))
    assert loaded.exit_index == 1 and torch.equal(a.labels, b.labels) and a.paths == b.paths
