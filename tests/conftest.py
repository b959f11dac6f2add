import atexit
import copy
import gc
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import tests.helpers
from service.core.model import ClassifierConfig, EnhancedClassifier

_save_tiny_model = tests.helpers.save_tiny_model
_tiny_models: dict = {}  # save_tiny_model's arguments -> (its saved folder, torch's RNG state after, the model)
_tiny_folder = Path(tempfile.mkdtemp(prefix="tiny-models-"))
atexit.register(shutil.rmtree, _tiny_folder, True)


def _save_tiny_model_once(store, name="tiny", *args, **kw):
    """tests.helpers.save_tiny_model, run once per set of arguments and then copied: embedding
    its prefill and replay images costs ~0.8 s, and most in-process API tests save one. The
    same files land in `store`, and torch's random state is left as the call leaves it."""
    try:
        key = (name, args, tuple(sorted(kw.items())))
        hash(key)
    except TypeError:  # an argument that cannot be a key: the call itself
        return _save_tiny_model(store, name, *args, **kw)
    if key not in _tiny_models:
        model = _save_tiny_model(store, name, *args, **kw)
        saved = _tiny_folder / str(len(_tiny_models))
        shutil.copytree(Path(store) / name, saved)
        _tiny_models[key] = (saved, torch.get_rng_state(), model)
        return model
    saved, rng, model = _tiny_models[key]
    shutil.copytree(saved, Path(store) / name, dirs_exist_ok=True)
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


tests.helpers.save_tiny_model = _save_tiny_model_once  # before the test modules import it


def _share_the_cores() -> None:
    """Under pytest-xdist (`make test`: a test process per core) each test process, and every
    server or training process it starts, takes its share of the cores, as `serve --workers N`
    gives each of its processes (service.cli.prepare_worker_environment): torch's threads of
    two processes that each take every core spin against each other and a training run takes
    2-3 times as long. OMP_NUM_THREADS already set (by the user) is left as it is."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))  # the processes tests start
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # this one (torch is imported already)


_share_the_cores()


@pytest.fixture
def tiny_config():
    """A small model on 1x28x28 images with a 32-slot memory."""
    def make(memory="cached", **kw):
        args = dict(backbone="small_resnet", num_classes=4, in_chans=1, image_size=28, memory=memory,
                    memory_size=32) | kw
        return ClassifierConfig(**args)
    return make


@pytest.fixture
def tiny_model(tiny_config):
    def make(memory="cached", **kw):
        torch.manual_seed(0)
        return EnhancedClassifier(tiny_config(memory, **kw)).eval()
    return make


@pytest.fixture(scope="session")
def images():
    """The first 200 Fashion-MNIST test images as PNG bytes, with their class names."""
    from PIL import Image

    from service.core.data import load_fashion_mnist

    ds = load_fashion_mnist()
    out = []
    for i in range(200):
        buf = io.BytesIO()
        Image.fromarray(ds.test.images[i, 0].numpy()).save(buf, format="PNG")
        out.append((buf.getvalue(), ds.classes[int(ds.test.labels[i])]))
    return out


@pytest.fixture(autouse=True)
def _collectable_after_each_test():
    """An app started in this process freezes every object alive at its start-up out of the
    garbage collector's reach (right for a server process); in the test process that would
    keep earlier tests' apps, stores and connections forever. Undone after each test."""
    yield
    gc.unfreeze()
