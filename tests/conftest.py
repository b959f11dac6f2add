import gc
import io

import pytest
import torch

from service.core.model import ClassifierConfig, EnhancedClassifier


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
