"""Retraining keeps what users taught: a new model version re-embeds every stored example
(from its image) into its own memory; training can fold the examples in as data."""

import io

import pytest
import torch
from PIL import Image

from service.core.data import keep_classes, load_fashion_mnist, normalize
from service.core.model import ClassifierConfig
from service.core.routing import RoutingPolicy
from service.core.store import InputSpec, load_model
from service.core.train import TrainConfig, run_training
from service.serving.export import export_imagefolder, taught_examples
from service.serving.feedback_store import Upload
from service.serving.runtime import ModelRuntime

pytestmark = pytest.mark.slow  # trains models on Fashion-MNIST

NEW = "Bag"


def png(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data():
    return load_fashion_mnist()


def train_tiny(store, seed, ds, taught=None, name="fm", **sizes):
    """`sizes`: TrainConfig's over these (a test that reads no accuracy trains less)."""
    tc = TrainConfig(**dict(name=name, store=str(store), epochs=2, batch_size=64, progress=False, seed=seed,
                            exclude_classes=[] if taught else [NEW], limit_train=3000, limit_test=200,
                            validation_size=500, lr=0.05, choose_online=False) | sizes)
    cc = ClassifierConfig(backbone="small_resnet", memory="cached", memory_size=1500)
    # both versions teach with the same online settings (not chosen per model): what differs is the network
    policy = RoutingPolicy(class_balance=0.5, new_class_threshold=0.3)
    return run_training(tc, cc, policy, ds=ds, taught=taught)


@pytest.fixture(scope="module")
def store_a(tmp_path_factory, data):
    """The first model version (seed 0), trained once for the module's tests (read only)."""
    store = tmp_path_factory.mktemp("store-a")
    train_tiny(store, 0, data)
    return store


def recall(rt, images) -> float:
    labels = []
    for b in images.split(100):
        p = rt.predict(normalize(b, rt.loaded.input.mean, rt.loaded.input.std)).prediction
        labels += [rt.class_name(int(i)) for i in p.labels]
    return sum(lab == NEW for lab in labels) / len(labels)


def test_a_new_model_version_re_embeds_what_users_taught(tmp_path, data, store_a):
    bag = data.classes.index(NEW)
    shots = (data.train.labels == bag).nonzero().squeeze(1)[:20]
    held_out = data.test.images[data.test.labels == bag][:300]
    train_tiny(tmp_path / "b", 1, data)
    a_version, b_version = load_model(store_a, "fm").version, load_model(tmp_path / "b", "fm").version
    assert a_version != b_version

    a = ModelRuntime(store_a, "fm", tmp_path / "state")
    x = normalize(data.train.images[shots], a.loaded.input.mean, a.loaded.input.std)
    a.submit_feedback(a.embed(x), NEW, [Upload(png(im), "image/png") for im in data.train.images[shots]])
    recall_a = recall(a, held_out)
    a.close()

    b = ModelRuntime(tmp_path / "b", "fm", tmp_path / "state")  # same feedback store, another version
    assert b.stats.reembedded == 20 and b.stats.feedback_applied == 20
    taught = b.predict(normalize(data.train.images[shots], b.loaded.input.mean, b.loaded.input.std)).prediction
    assert [b.class_name(int(i)) for i in taught.labels] == [NEW] * 20 and taught.paths == ["memory"] * 20
    recall_b = recall(b, held_out)
    b.close()
    assert recall_a > 0.3, recall_a  # teaching works on the first model at all
    assert recall_b >= recall_a - 0.15, (recall_a, recall_b)


def test_training_folds_taught_examples_in_and_export_writes_them(tmp_path, data, store_a):
    rt = ModelRuntime(store_a, "fm", tmp_path / "state")
    idx = (data.train.labels == data.classes.index(NEW)).nonzero().squeeze(1)[:12]
    x = normalize(data.train.images[idx], rt.loaded.input.mean, rt.loaded.input.std)
    r = rt.submit_feedback(rt.embed(x), NEW, [Upload(png(im), "image/png") for im in data.train.images[idx]])
    rt.forget(r.outcomes[0].feedback_id)  # forgotten: neither folded in nor exported
    images, labels = taught_examples(rt.store, InputSpec(28, 1, [0.0], [1.0]))
    assert labels == [NEW] * 11 and torch.equal(images, data.train.images[idx[1:]])
    assert export_imagefolder(rt.store, tmp_path / "export") == 11
    assert len(list((tmp_path / "export" / "train" / NEW).glob("*.png"))) == 11
    rt.close()

    # what is checked is what the run folded in and saved, not how well it learnt: one short epoch
    report = train_tiny(tmp_path / "c", 0, keep_classes(data, [NEW]), taught=(images, labels), name="folded",
                        epochs=1, limit_train=1500, limit_test=100, validation_size=200)
    loaded = load_model(tmp_path / "c", "folded")
    assert NEW in loaded.classes and loaded.manifest["data"]["taught_examples"] == 11
    assert report["classifier"]["num_classes"] == 10
