import pytest
import torch

from service.model import ClassifierConfig, EnhancedClassifier


@pytest.fixture
def tiny_config():
    """A small model on 1x28x28 images with a 32-slot memory."""
    def make(memory="cached", **kw):
        args = dict(backbone="small_resnet", num_classes=4, in_chans=1, image_size=28, memory=memory,
                    memory_size=32, confidence_threshold=0.85) | kw
        return ClassifierConfig(**args)
    return make


@pytest.fixture
def tiny_model(tiny_config):
    def make(memory="cached", **kw):
        torch.manual_seed(0)
        return EnhancedClassifier(tiny_config(memory, **kw)).eval()
    return make
