"""Training and inference are device-agnostic, checked on the CPU:

- no step of training reads a value back from the device: the steps run on the `meta`
  device, whose tensors hold no values, so any read (.item(), bool(), a 0-dim index,
  boolean indexing, bincount's size) raises;
- every tensor the core makes on the way names its device: factory calls (torch.zeros,
  torch.arange, ...) from service/core without `device=` are caught by a TorchFunctionMode
  while training steps, writes and predictions run;
- the CPU path stays deterministic for a seed, and a model moved with `.to()` answers as before.

One test needs a GPU and is skipped without one; everything else runs here.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from service.core.data import augment, normalize
from service.core.memory import create_memory
from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.train import (Run, TrainConfig, classifier_for, make_optimizer, prepare_data, train_epoch,
                                train_step, train_steps)
from tests.test_train import synthetic

CORE = Path(__file__).resolve().parent.parent / "service" / "core"
# files of service/core whose tensors this check covers (taught.py fits on the host; retrieval.py
# and the others are not on the device paths checked here)
CHECKED = {"memory.py", "model.py", "routing.py", "optimisation.py", "train.py", "data.py", "evaluation.py",
           "distributed.py", "retrofit.py"}
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}


class DevicelessFactories(TorchFunctionMode):
    """Records (file:line) of every factory call from CHECKED core files that names no device."""

    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            path = Path(frame.f_code.co_filename) if frame is not None else None
            if path is not None and path.parent == CORE and path.name in CHECKED:
                self.found.add(f"{path.name}:{frame.f_lineno}")
        return func(*args, **kwargs)


def tiny_model(memory: str, **kw) -> EnhancedClassifier:
    torch.manual_seed(0)
    return EnhancedClassifier(ClassifierConfig(memory=memory, memory_size=48, num_classes=4, memory_classes=6,
                                               replay_per_class=4, **kw))


@pytest.mark.parametrize("memory", ["cached", "trainable", "none"])
def test_training_steps_never_read_the_device(memory):
    """An epoch's steps (batches drawn by index, augmented, normalised, the step, the memory's
    loss and writes, the sums) on the meta device: a read of any value would raise."""
    ds = synthetic(n=200)
    tc = TrainConfig(batch_size=32, precision="fp32", augment_pad=2, validation_size=0,
                     choose_threshold=False).resolved("small_resnet")
    data = prepare_data(tc, ds, None)
    model = EnhancedClassifier(classifier_for(ClassifierConfig(memory=memory, memory_size=48), ds, 2)).to("meta")
    opt, sched = make_optimizer(model, tc, total_steps=20)
    steps = 7  # 200 images: the memory fills, then replaces; the last batch is short
    run = Run(tc, data, None, pad=2, bf16=False, steps_per_epoch=steps,
              images=data.train.images.to("meta"), labels=data.train.labels.to("meta"))
    perm = torch.randperm(len(data.train.labels), device="meta")
    totals, n = train_steps(run, model, opt, sched, None, None, perm, range(steps))
    assert totals.device.type == "meta" and totals.shape == (3,) and n == 200


def test_memory_writes_and_loss_never_read_the_device():
    for kind in ("cached", "trainable"):
        m = create_memory(kind, capacity=16, feature_dim=8, num_classes=3).to("meta")
        for _ in range(4):  # fills, then full: replacements with the similarity given and not
            f, y = torch.empty(10, 8, device="meta"), torch.empty(10, dtype=torch.int64, device="meta")
            m.contrastive_loss(f, y)
            m.update(f, y, similarity=m.similarity(f))
            m.update(f, y)


def test_the_core_makes_every_tensor_on_a_named_device():
    ds = synthetic(n=96)
    for memory in ("cached", "trainable"):
        model = tiny_model(memory)
        tc = TrainConfig(precision="fp32")
        opt, _ = make_optimizer(model, tc, total_steps=10)
        x = normalize(augment(ds.train.images[:24], 2, True, torch.Generator().manual_seed(0)), [0.3], [0.3])
        y = ds.train.labels[:24]
        with DevicelessFactories() as mode:
            for _ in range(3):
                train_step(model, opt, x, y, 0.4, 0.0, False)
            model.eval()
            model.predict(x)
            model.memory.teach(model.embed(x[:3])[0], torch.tensor([5, 5, 1]))
            model.memory.forget(torch.tensor([0, 1]))
            model.retrieve(torch.zeros(2, model.key_dim))
        assert not mode.found, sorted(mode.found)
    empty = tiny_model("cached").eval()
    with DevicelessFactories() as mode:
        empty.predict(x[:4])  # the empty memory's answer
    assert not mode.found, sorted(mode.found)


def test_predictions_with_taught_rows_are_the_same_after_to():
    """`.to()` carries the memory (buffers) along and the taught rows are brought to the
    features where read: a copy moved with .to() answers exactly as the original."""
    ds = synthetic(n=96)
    model = tiny_model("cached")
    x = normalize(ds.train.images[:64], [0.3], [0.3])
    model.train()
    with torch.no_grad():
        _, feats = model(x)
        model.memory.update(feats[:40], ds.train.labels[:40])
    model.eval()
    with torch.no_grad():
        model.taught.replay_features.copy_(model.embed(x[40:56])[1])
        model.taught.replay_labels.copy_(ds.train.labels[40:56])
        taught = model.memory.teach(model.embed(x[56:60])[0], torch.tensor([5, 5, 4, 4]))
    model.fit_taught(model.taught_examples(taught.slot))
    assert model.taught.rows.labels.tolist() == [4, 5]
    moved = copy.deepcopy(model).to("cpu")
    a, b = model.predict(x), moved.predict(x)
    for field in ("labels", "confidence", "used_memory", "class_scores", "slot", "similarity"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.cpu().labels.device.type == "cpu" and torch.equal(a.cpu().labels, a.labels)


def test_cpu_training_is_deterministic_for_a_seed():
    """Two epochs of the training loop twice from one seed: the same model, bit for bit,
    memory included (the cached memory's fixed-work replacement rule: docs/training.md)."""
    ds = synthetic(n=160)
    tc = TrainConfig(epochs=2, batch_size=32, progress=False, precision="fp32", augment_pad=2,
                     validation_size=32).resolved("small_resnet")
    states = []
    for _ in range(2):
        torch.manual_seed(tc.seed)
        data = prepare_data(tc, ds, None)
        run = Run(tc, data, None, pad=2, bf16=False, steps_per_epoch=4, images=data.train.images,
                  labels=data.train.labels)
        model = EnhancedClassifier(classifier_for(ClassifierConfig(memory="cached", memory_size=48), ds, 2))
        opt, sched = make_optimizer(model, tc, total_steps=8)
        gen = torch.Generator().manual_seed(tc.seed)
        sums = [train_epoch(run, model, opt, sched, gen, None, epoch)[0] for epoch in (1, 2)]
        states.append((model.state_dict(), sums))
    (a, sums_a), (b, sums_b) = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sums_a == sums_b and sums_a[0]["n"] == 128
    assert int(a["memory.replacements"]) > 0  # the replacement rule ran


def test_resume_refuses_a_data_order_drawn_on_another_device():
    """The data order's generator lives on the training device, and a CUDA generator draws
    another stream than the CPU's: a checkpoint says where it drew, and a resume elsewhere is refused."""
    from service.core.checkpoint import CheckpointError, restore_checkpoint

    model = tiny_model("cached")
    opt, sched = make_optimizer(model, TrainConfig(precision="fp32"), total_steps=10)
    gen = torch.Generator().manual_seed(0)
    state = {"fingerprint": {}, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state(),
                                                      "generator_device": "cuda"}}
    with pytest.raises(CheckpointError, match="--device cuda"):
        restore_checkpoint(state, {}, model, opt, sched, gen, "ck")
    state["rng"]["generator_device"] = "cpu"
    restore_checkpoint(state, {}, model, opt, sched, gen, "ck")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_steps_do_not_synchronise_and_predictions_match_the_cpu():
    ds = synthetic(n=256)
    model = tiny_model("cached").cuda()
    tc = TrainConfig(precision="fp32")
    opt, _ = make_optimizer(model, tc, total_steps=20)
    images, labels = ds.train.images.cuda(), ds.train.labels.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    train_step(model, opt, normalize(images[:32], [0.3], [0.3]), labels[:32], 0.4, 0.0, False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 6):
            idx = torch.arange(step * 32, (step + 1) * 32, device="cuda")
            x = normalize(augment(images[idx], 2, True, gen), [0.3], [0.3])
            train_step(model, opt, x, labels[idx], 0.4, 0.0, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.eval()
    cpu = copy.deepcopy(model).to("cpu")
    x = normalize(ds.test.images, [0.3], [0.3])
    a, b = model.predict(x.cuda()).cpu(), cpu.predict(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.used_memory, b.used_memory)
    assert torch.allclose(a.confidence, b.confidence, atol=1e-4)
