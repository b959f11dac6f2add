"""The training recipes (service/core/recipes.py): what each fills in, and the airbench
recipe's parts one by one: the whitening stem, identity start, batch norm, optimiser groups,
schedule, lookahead, alternating flips, and a short run that uses all of them and resumes."""

import pytest
import torch

from service.core.backbones import PoolNet
from service.core.data import augment
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.optimisation import Lookahead, make_optimizer, set_epoch, start_recipe, warmup_linear
from service.core.recipes import RECIPES, recipe_for
from service.core.train import WHITENING_IMAGES, TrainConfig, run_training, whitening_sample
from tests.test_train import synthetic


def test_auto_recipe_is_airbench_for_poolnet_and_onecycle_for_the_others():
    assert recipe_for("auto", "poolnet").name == "airbench"
    assert recipe_for("auto", "small_resnet_wide").name == "onecycle"
    with pytest.raises(ValueError, match="airbench"):
        recipe_for("adam", "poolnet")


def test_resolved_config_takes_the_recipes_values_and_keeps_given_flags():
    tc = TrainConfig().resolved("poolnet")
    assert (tc.recipe, tc.epochs, tc.batch_size, tc.label_smoothing, tc.augment_pad) == (
        "airbench", RECIPES["airbench"].epochs, 1024, 0.2, 2)
    assert tc.lr == pytest.approx(1.5, rel=1e-3)  # airbench's 11.5 per 1024 examples, momentum-decoupled
    given = TrainConfig(epochs=3, batch_size=512, label_smoothing=0.0).resolved("poolnet")
    assert (given.epochs, given.batch_size, given.label_smoothing) == (3, 512, 0.0)
    assert given.lr == pytest.approx(0.75, rel=1e-3)  # the learning rate is per example: half the batch, half
    old = TrainConfig().resolved("small_resnet")
    assert (old.recipe, old.epochs, old.batch_size, old.lr, old.augment_pad) == ("onecycle", 5, 128, 0.1, None)
    assert TrainConfig(lr=0.3).resolved("poolnet").lr == 0.3


def test_whitening_stem_makes_patches_uncorrelated_with_unit_variance():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 16, 16, generator=g)
    images = base + 0.8 * base.roll(1, dims=1) + 0.5 * base.roll(1, dims=3)  # correlated channels and pixels
    net = PoolNet(3)
    net.whiten(images)
    k = net.stem.conv.kernel_size[0]
    half = net.stem.conv.weight[:3 * k * k].reshape(3 * k * k, -1)  # the eigenvector half (the rest: negatives)
    patches = images.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
    cov = (patches @ half.T).T @ (patches @ half.T) / len(patches)
    assert torch.allclose(cov, torch.eye(3 * k * k), atol=0.02)
    assert torch.equal(net.stem.conv.weight[3 * k * k:], -net.stem.conv.weight[:3 * k * k])
    assert not net.stem.conv.weight.requires_grad


def test_whitening_sample_draws_every_class_of_a_class_ordered_split_reproducibly_by_seed():
    labels = torch.arange(10).repeat_interleave(4500)  # stored class by class, like the CIFAR-10 zip
    idx = whitening_sample(len(labels), seed=0)
    assert len(idx) == WHITENING_IMAGES and len(idx.unique()) == WHITENING_IMAGES
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # ~500 per class, not 4,500 of the first
    assert torch.equal(idx, whitening_sample(len(labels), seed=0))
    assert not torch.equal(idx, whitening_sample(len(labels), seed=1))


def test_poolnet_convolutions_start_as_identities_and_batch_norm_learns_no_scale():
    net = PoolNet(3)
    conv = net.blocks[1].conv2
    x = torch.randn(2, conv.in_channels, 8, 8)
    assert torch.allclose(conv(x), x, atol=1e-6)
    for bn in (net.blocks[0].bn1, net.blocks[2].bn2):
        assert not bn.weight.requires_grad and bn.bias.requires_grad and bn.momentum == 0.4


def test_airbench_optimiser_groups_keep_the_per_step_decay_and_scale_the_learning_rates():
    torch.manual_seed(0)
    model = EnhancedClassifier(ClassifierConfig(backbone="poolnet", in_chans=3, image_size=32, memory="cached",
                                                memory_size=32))
    tc = TrainConfig().resolved("poolnet")
    opt, _ = make_optimizer(model, tc, 100)
    groups = {len(g["params"]): g for g in opt.param_groups}
    bn_biases = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    head = groups[2]  # weight and bias
    assert head["initial_lr"] == pytest.approx(tc.lr / 81)  # (the schedule starts lr at 0.2x)
    assert groups[bn_biases]["initial_lr"] == pytest.approx(tc.lr * 64)
    for g in opt.param_groups[:3]:
        assert g["initial_lr"] * g["weight_decay"] == pytest.approx(tc.lr * tc.weight_decay)
        assert g["momentum"] == 0.85 and g["nesterov"]


def test_warmup_linear_rises_from_a_fifth_to_one_then_falls_to_seven_hundredths():
    assert warmup_linear(0, 100) == pytest.approx(0.2)
    assert warmup_linear(23, 100) == pytest.approx(1.0)
    assert warmup_linear(100, 100) == pytest.approx(0.07)
    values = [warmup_linear(s, 100) for s in range(101)]
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 23


def test_lookahead_pulls_weights_to_their_average_and_ends_on_it():
    model = EnhancedClassifier(ClassifierConfig(memory="cached", memory_size=16))
    la = Lookahead(model, total_steps=10, every=5)
    w = model.head.weight
    start = w.detach().clone()
    memory_before = model.memory.keys.clone()
    with torch.no_grad():
        w.add_(1.0)
        model.memory.keys.add_(1.0)
    la.after_step(4)  # not a lookahead step: nothing moves
    assert torch.equal(w, start + 1.0)
    la.after_step(5)  # decay 0.95^5 * 0.5^3: mostly the new weights
    d = 0.95 ** 5 * 0.5 ** 3
    assert torch.allclose(w, start + (1 - d), atol=1e-6)
    with torch.no_grad():
        w.add_(1.0)
    la.after_step(10)  # the last step: the weights become the average, not moved towards the live ones
    assert torch.allclose(w, start + (1 - d), atol=1e-6)
    assert torch.equal(model.memory.keys, memory_before + 1.0)  # the memory is data: left alone


def test_alternating_flips_are_given_per_image_and_reflect_fills_the_border():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    flips = torch.tensor([True, False])
    y = augment(x, 0, True, flips=flips)
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1])
    z = augment(x, 2, False, torch.Generator().manual_seed(3), reflect=True)
    assert set(z.unique().tolist()) <= set(x.unique().tolist())  # reflected pixels, no zero fill
    assert not (z == 0).all(-1).any()


def test_whitening_bias_learns_for_the_first_epochs_only():
    model = EnhancedClassifier(ClassifierConfig(backbone="poolnet", in_chans=1, image_size=28, memory="none"))
    tc = TrainConfig().resolved("poolnet")
    start_recipe(model, tc, torch.randn(16, 1, 28, 28))
    set_epoch(model, tc, 3)
    assert model.backbone.stem.conv.bias.requires_grad
    set_epoch(model, tc, 4)
    assert not model.backbone.stem.conv.bias.requires_grad


@pytest.mark.slow  # three short training runs
def test_airbench_run_learns_and_a_resume_after_a_crash_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """The recipe's own state crosses a resume: lookahead's average, the whitening bias's
    switch, the alternating flips drawn from the seed."""
    import service.core.train as train

    ds = synthetic(n=256)
    cc = ClassifierConfig(backbone="poolnet", memory="cached", memory_size=64)

    def config(where, **kw):
        return TrainConfig(name="syn", store=str(where / "store"), checkpoint_dir=str(where / "ck"), epochs=4,
                           batch_size=64, progress=False, precision="fp32", validation_size=64, **kw)

    clean = run_training(config(tmp_path / "clean"), cc, ds=ds)
    assert clean["train_config"]["recipe"] == "airbench" and clean["train_config"]["batch_size"] == 64
    assert clean["final"]["test_accuracy"] > 0.5

    real_save = train.save_checkpoint

    class Crash(Exception):
        pass

    def crash_after_epoch_3(folder, epoch, state):
        real_save(folder, epoch, state)
        if epoch == 3:
            raise Crash  # after the whitening bias froze, with lookahead averaging

    monkeypatch.setattr(train, "save_checkpoint", crash_after_epoch_3)
    with pytest.raises(Crash):
        run_training(config(tmp_path / "cut"), cc, ds=ds)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = run_training(config(tmp_path / "cut", resume=True), cc, ds=ds)
    assert resumed["resumed_after_epoch"] == 3
    assert resumed["final"] == pytest.approx(clean["final"], abs=1e-6)


def test_flip_tta_averages_the_two_views_at_inference_only():
    torch.manual_seed(0)
    model = EnhancedClassifier(ClassifierConfig(backbone="poolnet", in_chans=1, image_size=28, memory="none",
                                                tta="flip"))
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    keys, _ = model.embed(x)
    both = 0.5 * (model.backbone(x) + model.backbone(x.flip(-1)))
    assert torch.allclose(keys, both, atol=1e-6)
    logits, _ = model(x)
    assert torch.allclose(logits, model.head(both), atol=1e-5)  # = the mean of the two views' logits
    model.train()
    assert torch.allclose(model.embed(x)[0], model.backbone(x), atol=1e-6)  # training sees one view
    with pytest.raises(ValueError, match="exit-stage final"):
        ClassifierConfig(backbone="poolnet", tta="flip", exit_stage="stage1")


def test_training_keeps_flip_tta_only_when_it_pays_on_validation(tmp_path, monkeypatch):
    import service.core.train as train

    ds = synthetic(n=128)
    kw = dict(store=str(tmp_path), epochs=1, batch_size=64, progress=False, precision="fp32", validation_size=64)
    monkeypatch.setattr(train, "TTA_MIN_GAIN", -1.0)  # any change pays
    report = run_training(TrainConfig(name="a", **kw), ClassifierConfig(backbone="poolnet", memory="cached",
                                                                       memory_size=64), ds=ds, save=False)
    assert report["tta_choice"]["chosen"] == "flip" and report["classifier"]["tta"] == "flip"
    assert set(report["tta_choice"]["validation_accuracy"]) == {"none", "flip"}
    monkeypatch.setattr(train, "TTA_MIN_GAIN", 2.0)  # nothing can pay
    report = run_training(TrainConfig(name="b", **kw), ClassifierConfig(backbone="poolnet", memory="cached",
                                                                       memory_size=64), ds=ds, save=False)
    assert report["tta_choice"]["chosen"] == "none" and report["classifier"]["tta"] == "none"
    given = run_training(TrainConfig(name="c", choose_tta=False, **kw),
                         ClassifierConfig(backbone="poolnet", memory="cached", memory_size=64, tta="flip"),
                         ds=ds, save=False)
    assert given["tta_choice"] == {"chosen": "flip", "chosen_on": "given (--tta)"}
