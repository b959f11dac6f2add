"""DEVICE: where the served model and its memory live (serving/runtime.py), shown by /memory."""

import pytest
import torch

from service.serving.runtime import ModelRuntime, resolve_device


def test_auto_picks_the_gpu_only_when_torch_sees_one():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is valid here")
def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(RuntimeError, match="DEVICE=cuda"):
        resolve_device("cuda")


def test_the_runtime_reports_its_device_and_answers_on_the_host(tmp_path):
    from tests.helpers import save_tiny_model

    save_tiny_model(tmp_path / "store")
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", device="auto")
    try:
        assert rt.memory_info()["device"] == str(resolve_device("auto"))
        spec = rt.loaded.input
        p = rt.predict(torch.zeros(3, spec.in_chans, spec.image_size, spec.image_size)).prediction
        assert p.labels.device.type == "cpu" and p.labels.shape == (3,)
        assert rt.embed_batch(torch.zeros(2, spec.in_chans, spec.image_size, spec.image_size)).device.type == "cpu"
    finally:
        rt.close()


def test_a_replica_on_the_accelerator_and_one_on_the_cpu_hold_the_same_memory(tmp_path):
    # here both run on the CPU (the same code path); on a GPU machine (bench/gpu_check.sh)
    # the second is on the GPU: the memory holds the stored feature vectors, so applying one
    # log gives both the same state, whatever computed the queries
    from tests.helpers import save_tiny_model
    from tests.test_runtime import teach

    other = "cuda" if torch.cuda.is_available() else "cpu"
    save_tiny_model(tmp_path / "store")
    a = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", device="cpu")
    b = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", device=other)
    try:
        teach(a, [1, 2, 3], "Novel")
        teach(b, [4], "one")
        a.sync()
        b.sync()
        assert a.applied_seq == b.applied_seq == 4
        assert a.state_hash() == b.state_hash()
    finally:
        a.close()
        b.close()
