
import pytest
import torch

from service.cli import main
from service.core.data import Dataset, Split, augment, carve_validation, keep_classes, load_dataset, stratified_indices
from service.core.evaluation import choose_threshold, collect_predictions, evaluate, threshold_sweep
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.routing import RoutingPolicy
from service.core.store import load_model
from service.core.train import TrainConfig, classifier_for, make_optimizer, run_training, train_step


def synthetic(n=256, classes=4, seed=0) -> Dataset:
    """Images whose class is a bright square in one of four corners: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(classes):
        r, col = divmod(c, 2)
        x[labels == c, :, r * 14:r * 14 + 10, col * 14:col * 14 + 10] = 250
    split = Split(x, labels)
    return Dataset("synthetic", split, Split(x[:64].clone(), labels[:64].clone()), [f"c{i}" for i in range(classes)])


@pytest.mark.parametrize("memory", ["none", "cached", "trainable"])
def test_a_few_steps_lower_the_loss(memory):
    torch.manual_seed(0)
    ds = synthetic()
    tc = TrainConfig(batch_size=32, lr=0.05, precision="fp32")
    model = EnhancedClassifier(classifier_for(ClassifierConfig(memory=memory, memory_size=64), ds,
                                              tc.extra_memory_classes))
    opt, _ = make_optimizer(model, tc, total_steps=100)
    x = (ds.train.images[:32].float() / 255 - 0.3) / 0.3
    y = ds.train.labels[:32]
    first = [train_step(model, opt, x, y, 0.4, 0.0, False) for _ in range(1)][0]
    for _ in range(15):
        last = train_step(model, opt, x, y, 0.4, 0.0, False)
    assert last[0] < first[0]  # cross-entropy falls
    if memory != "none":
        assert model.memory.size == 64  # every batch written, memory full
        assert last[1] > 0 or memory == "cached"


@pytest.mark.slow  # a training run
def test_run_training_writes_model_and_reports(tmp_path):
    ds = synthetic()
    tc = TrainConfig(name="syn", store=str(tmp_path), epochs=3, batch_size=32, progress=False, precision="fp32",
                     flip=False, augment_pad=0, lr=0.1, validation_size=64)
    report = run_training(tc, ClassifierConfig(memory="cached", memory_size=64), ds=ds)
    assert len(report["history"]) == 3
    assert report["final"]["test_accuracy"] > 0.5
    assert [s["threshold"] for s in report["threshold_sweep"]][0] == 0.5
    assert report["inference_speed"]["features_ms"] > 0
    d = tmp_path / "syn"
    for f in ("manifest.json", "metrics.json", "metrics.csv", "training.png", "threshold_sweep.png",
              "threshold_sweep.json"):
        assert (d / f).exists(), f
    assert report["model_dir"] == str(d.resolve())
    loaded = load_model(tmp_path, "syn")
    assert loaded.classes == ds.classes
    # the saved model is the one the report measured: the same test figures, evaluated as
    # training evaluated them (its weights in channels_last, as they were then)
    model = loaded.model.to(memory_format=torch.channels_last)
    test = evaluate(collect_predictions(model, ds.test.images, loaded.input.mean, loaded.input.std,
                                        loaded.policy), ds.test.labels, loaded.policy, len(ds.classes))
    assert (test.accuracy, test.head_accuracy, test.memory_usage) == \
        (report["final"]["test_accuracy"], report["final"]["test_head_accuracy"], report["final"]["memory_usage"])


def test_threshold_sweep_usage_falls_as_threshold_rises():
    preds = {"head": torch.tensor([0, 0, 0, 0]), "mem_label": torch.tensor([1, 1, 0, 1]),
             "mem_conf": torch.tensor([0.55, 0.75, 0.95, 0.99])}
    sweep = threshold_sweep(preds, torch.tensor([1, 0, 0, 1]), RoutingPolicy(), 4, [0.5, 0.7, 0.9, 0.999])
    assert [s["memory_usage"] for s in sweep] == [1.0, 0.75, 0.5, 0.0]
    assert sweep[0]["memory_path_accuracy"] == 0.75
    assert sweep[2]["memory_path_accuracy"] == 1.0


def test_choose_threshold_takes_the_most_accurate_and_the_lowest_among_equals():
    sweep = [{"threshold": 0.5, "accuracy": 0.8}, {"threshold": 0.6, "accuracy": 0.9},
             {"threshold": 0.7, "accuracy": 0.9}, {"threshold": 0.8, "accuracy": 0.85}]
    assert choose_threshold(sweep) == 0.6


def test_stratified_subset_of_class_ordered_data_holds_every_class_in_proportion():
    labels = torch.arange(10).repeat_interleave(100)  # stored class by class, like the CIFAR-10 zip
    idx = stratified_indices(labels, 50, seed=1)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert not torch.equal(idx, stratified_indices(labels, 50, seed=2))  # seeded: another seed, another draw
    assert torch.equal(idx, stratified_indices(labels, 50, seed=1))


def test_validation_split_is_disjoint_from_training_and_reproducible():
    labels = torch.arange(4).repeat(25)
    split = Split(torch.arange(100).view(100, 1, 1, 1).to(torch.uint8), labels)
    train, val, val_idx = carve_validation(split, 20, seed=0)
    assert len(train.labels) == 80 and len(val.labels) == 20
    assert not set(train.images.flatten().tolist()) & set(val.images.flatten().tolist())
    assert torch.bincount(val.labels).tolist() == [5, 5, 5, 5]
    assert torch.equal(val_idx, carve_validation(split, 20, seed=0)[2])


@pytest.mark.slow  # a training run
def test_training_chooses_the_threshold_on_validation_and_saves_the_policy(tmp_path):
    ds = synthetic()
    tc = TrainConfig(name="syn", store=str(tmp_path), epochs=1, batch_size=32, progress=False, precision="fp32",
                     validation_size=100)
    report = run_training(tc, ClassifierConfig(memory="cached", memory_size=64),
                          RoutingPolicy(class_balance=0.5, new_class_threshold=0.4), ds=ds)
    sweep = report["threshold_sweep"]
    chosen = report["routing"]["confidence_threshold"]
    assert chosen == choose_threshold(sweep)
    loaded = load_model(tmp_path, "syn")
    ood = loaded.policy.ood_threshold  # "none of these": chosen on the same validation split
    assert ood is not None and report["routing"]["ood_threshold"] == ood and loaded.model.novelty.calibrated
    assert loaded.policy == RoutingPolicy(confidence_threshold=chosen, class_balance=0.5, new_class_threshold=0.4,
                                          ood_threshold=ood)
    assert loaded.manifest["data"]["validation_size"] == 100
    assert loaded.manifest["data"]["train_size"] == len(ds.train.labels) - 100


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    assert torch.equal(augment(x, 0, False), x)
    y = augment(x, 1, True, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_keep_classes_renumbers():
    ds = keep_classes(synthetic(), ["c1"])
    assert ds.classes == ["c0", "c2", "c3"]
    assert set(ds.train.labels.tolist()) == {0, 1, 2}


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("imagefolder", None)


def test_cli_rejects_bad_flag_values(capsys):
    assert main(["train", "--epochs", "0", "--no-progress"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert main(["train", "--memory", "lru", "--no-progress"]) == 2


def test_cifar10_binary_batches_are_read_without_pickle(tmp_path):
    import numpy as np

    from service.core.data import load_cifar10

    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (4, 3073), dtype=np.uint8)
        rec[:, 0] = [0, 3, 9, 1]
        rec.tofile(folder / name)
    ds = load_cifar10(str(tmp_path))
    assert ds.train.images.shape == (20, 3, 32, 32) and ds.test.labels.tolist() == [0, 3, 9, 1]
    assert ds.classes[9] == "truck"
    with pytest.raises(FileNotFoundError, match="--download"):
        load_cifar10(str(tmp_path / "empty"))


@pytest.mark.slow  # a training run
def test_training_keeps_replay_features_and_retrofit_gives_an_older_model_the_same(tmp_path):
    from service.core.retrofit import retrofit_model

    ds = synthetic()
    kw = dict(store=str(tmp_path), epochs=1, batch_size=32, progress=False, precision="fp32", flip=False,
              augment_pad=0, lr=0.1, validation_size=64)
    run_training(TrainConfig(name="new", **kw), ClassifierConfig(memory="cached", memory_size=64, replay_per_class=8),
                 ds=ds)
    run_training(TrainConfig(name="old", **kw), ClassifierConfig(memory="cached", memory_size=64, replay_per_class=0),
                 ds=ds)
    new, old = load_model(tmp_path, "new"), load_model(tmp_path, "old")
    assert old.model.taught is None
    assert new.model.taught.replay_labels.tolist() == [c for c in range(4) for _ in range(8)]
    retrofit_model(tmp_path, "old", 8, policy={"taught_bias": 1.5}, ds=ds)
    fitted = load_model(tmp_path, "old")
    assert fitted.policy.taught_bias == 1.5 and fitted.version != old.version
    assert fitted.manifest["metrics"] == old.manifest["metrics"] and fitted.manifest["data"] == old.manifest["data"]
    # same seed, same split, same weights (both runs trained alike): the replay training would have kept
    assert torch.allclose(fitted.model.taught.replay_features, new.model.taught.replay_features, atol=1e-5)
    assert torch.equal(fitted.model.taught.replay_labels, new.model.taught.replay_labels)
