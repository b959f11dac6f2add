"""The IVF index saved and loaded: in the model store and beside the snapshots, checked by
sha256, made to hold the memory it is loaded for, trained on a bounded sample, trained again
in the background when the memory outgrows it."""

import logging
import threading

import pytest
import torch

import service.serving.replica as replica_module
from service.core.memory import create_memory
from service.core.retrieval import IndexFileError, IVFIndex, default_nlist, training_sample
from service.core.store import load_index, load_model, read_manifest, save_index
from tests.helpers import save_tiny_model
from tests.test_retrieval import clustered
from tests.test_runtime import image, make_runtime, teach  # noqa: F401 (make_runtime: a fixture used here)


def filled_memory(n=600, capacity=800, d=16):
    memory = create_memory("cached", capacity=capacity, feature_dim=d, num_classes=4)
    memory.update(clustered(n, d, centers=20), torch.arange(n) % 4)
    return memory


def exact(memory, q, k=5):
    index, memory.index = memory.index, None
    try:
        return memory.search(q, k)
    finally:
        memory.index = index


def flip_a_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


# --- the index alone --------------------------------------------------------------------------
def test_a_saved_index_loads_with_its_lists_and_answers_alike(tmp_path):
    memory = filled_memory()
    index = memory.attach_index(nlist=8, nprobe=3)
    digest = index.save(tmp_path / "i.faiss")
    loaded = IVFIndex.load(tmp_path / "i.faiss", digest, dim=16)
    q = clustered(40, 16, centers=20, seed=3)
    assert (len(loaded), loaded.nlist, loaded.nprobe) == (600, 8, 3)
    assert torch.equal(loaded.search(q, 5)[1], index.search(q, 5)[1])


def test_a_damaged_index_file_is_refused_with_a_message_naming_it(tmp_path):
    index = filled_memory().attach_index(nlist=8)
    path = tmp_path / "i.faiss"
    digest = index.save(path)
    flip_a_byte(path)  # faiss itself reads such a file without complaint
    with pytest.raises(IndexFileError, match=rf"{path}: sha256 mismatch"):
        IVFIndex.load(path, digest, dim=16)


def test_an_index_over_other_keys_is_refused(tmp_path):
    index = filled_memory().attach_index(nlist=8)
    digest = index.save(tmp_path / "i.faiss")
    with pytest.raises(IndexFileError, match="16-float keys, the memory 32"):
        IVFIndex.load(tmp_path / "i.faiss", digest, dim=32)


def test_reconcile_makes_an_index_of_an_older_memory_hold_the_current_one(tmp_path):
    memory = filled_memory()
    digest = memory.attach_index(nlist=8).save(tmp_path / "i.faiss")
    memory.teach(clustered(5, 16, centers=20, seed=7), torch.tensor([1, 2, 3, 0, 1]))  # 5 new slots
    memory.forget(torch.tensor([3, 4, 5]))
    memory.update(clustered(300, 16, centers=20, seed=8), torch.arange(300) % 4)  # fills, then replaces
    loaded = IVFIndex.load(tmp_path / "i.faiss", digest, dim=16, nprobe=8)  # every cell: exact
    assert loaded.reconcile(memory.keys, memory.filled()) > 0
    memory.index = loaded
    q = clustered(50, 16, centers=20, seed=9)
    assert len(loaded) == memory.size
    assert torch.equal(memory.search(q, 5)[1], exact(memory, q)[1])
    assert loaded.reconcile(memory.keys, memory.filled()) == 0  # nothing left to fix


def test_reconcile_compares_keys_stored_at_any_length_by_direction(tmp_path):
    memory = create_memory("trainable", capacity=300, feature_dim=16, num_classes=4)
    memory.update(clustered(300, 16, centers=20), torch.arange(300) % 4)
    digest = memory.attach_index(nlist=4).save(tmp_path / "i.faiss")
    with torch.no_grad():
        memory.keys.mul_(3.0)  # training moves a trainable memory's key lengths
        memory.keys[7] = memory.keys[8]  # and, here, one key's direction
    loaded = IVFIndex.load(tmp_path / "i.faiss", digest, dim=16)
    assert loaded.reconcile(memory.keys, memory.filled()) == 1


def test_k_means_trains_on_a_bounded_sample_of_the_filled_slots():
    filled = torch.zeros(10_000, dtype=torch.bool)
    filled[::2] = True
    sample = training_sample(filled, nlist=20, points_per_cell=64)
    assert len(sample) == 20 * 64 and filled[sample].all() and len(sample.unique()) == len(sample)
    assert len(training_sample(filled, nlist=200, points_per_cell=64)) == 5000  # all there is


def test_an_index_is_outgrown_once_the_memory_wants_twice_its_cells():
    index = filled_memory(n=600).attach_index()
    assert index.nlist == default_nlist(600)
    assert not index.outgrown(600)
    grown = next(n for n in range(600, 10**7, 50) if default_nlist(n) >= 2 * index.nlist)
    assert index.outgrown(grown) and not index.outgrown(grown - 50)


# --- the model store ----------------------------------------------------------------------------
def test_the_model_store_keeps_an_attached_index_without_changing_the_model_version(tmp_path):
    model = save_tiny_model(tmp_path / "store")
    version = read_manifest(tmp_path / "store" / "tiny")["version"]
    index = model.memory.attach_index(nprobe=1)
    path = save_index(tmp_path / "store", "tiny", index)
    loaded = load_model(tmp_path / "store", "tiny")
    assert loaded.version == version and loaded.manifest["index"]["file"] == path.name
    got = load_index(tmp_path / "store", "tiny", loaded.manifest, dim=model.memory.keys.shape[1])
    q = torch.randn(4, model.memory.keys.shape[1])
    assert torch.equal(got.search(q, 3)[1], index.search(q, 3)[1])


def test_a_damaged_index_in_the_model_store_is_refused_and_a_missing_one_is_none(tmp_path):
    model = save_tiny_model(tmp_path / "store")
    path = save_index(tmp_path / "store", "tiny", model.memory.attach_index())
    manifest = read_manifest(tmp_path / "store" / "tiny")
    flip_a_byte(path)
    with pytest.raises(IndexFileError, match=rf"{path}: sha256 mismatch"):
        load_index(tmp_path / "store", "tiny", manifest, dim=model.memory.keys.shape[1])
    path.unlink()
    assert load_index(tmp_path / "store", "tiny", manifest, dim=model.memory.keys.shape[1]) is None


# --- the served memory ----------------------------------------------------------------------------
@pytest.fixture
def runtimes(request):
    make = request.getfixturevalue("make_runtime")  # test_runtime's, closing what it made
    return lambda: make(index="ivf", nprobe=1)


def consistent(rt):
    """The served index holds exactly the memory's filled slots with their keys."""
    return rt.memory.index.reconcile(rt.memory.keys, rt.memory.filled()) == 0 and len(rt.memory.index) == rt.memory.size


def test_an_index_trained_at_start_is_saved_and_loaded_at_the_next(runtimes):
    first = runtimes()
    assert first.stats.index_source == "trained" and len(first.snapshots.index_sidecars()) == 1
    first.close()
    second = runtimes()
    assert second.stats.index_source == first.snapshots.index_sidecars()[0].name
    assert consistent(second)


def test_the_next_start_makes_the_saved_index_hold_the_feedback_taught_since(runtimes):
    rt = runtimes()
    teach(rt, [1, 2], "one")
    rt.snapshot()
    rt.close()
    rt = runtimes()
    assert rt.stats.index_source.startswith("ivf-") and consistent(rt)
    x, _ = image(1)
    assert rt.predict(x).prediction.confidence.item() == 1.0  # the taught image is found through the index


def test_a_damaged_saved_index_is_refused_loudly_and_one_trained_instead(runtimes, caplog):
    runtimes().close()
    sidecar = runtimes().snapshots.index_sidecars()[0]
    flip_a_byte(sidecar.with_suffix(".faiss"))
    with caplog.at_level(logging.ERROR):
        rt = runtimes()
    assert f"{sidecar.with_suffix('.faiss')}: sha256 mismatch" in caplog.text
    assert rt.stats.index_source == "trained" and consistent(rt)  # the model store has none


def index_in_the_model_store_only(runtimes, tmp_path):
    """The index a first start trained, saved in the model store and gone from the state folder."""
    rt = runtimes()
    path = save_index(tmp_path / "store", "tiny", rt.memory.index)
    rt.close()
    for f in (tmp_path / "var").rglob("ivf-*"):
        f.unlink()
    return path


def test_a_fresh_state_folder_loads_the_model_stores_index(runtimes, tmp_path):
    index_in_the_model_store_only(runtimes, tmp_path)
    rt = runtimes()
    assert rt.stats.index_source == "the model store" and consistent(rt)


def test_a_damaged_index_in_the_model_store_is_refused_loudly_at_start_and_one_trained(runtimes, tmp_path, caplog):
    path = index_in_the_model_store_only(runtimes, tmp_path)
    flip_a_byte(path)
    with caplog.at_level(logging.ERROR):
        rt = runtimes()
    assert f"{path}: sha256 mismatch" in caplog.text
    assert rt.stats.index_source == "trained" and consistent(rt)


def test_a_missing_saved_index_is_trained_again(runtimes, tmp_path):
    index_in_the_model_store_only(runtimes, tmp_path).unlink()  # the manifest still names it
    rt = runtimes()
    assert rt.stats.index_source == "trained" and consistent(rt)


def test_forgetting_keeps_the_index_in_step_and_removes_saved_indexes_holding_the_example(runtimes):
    rt = runtimes()
    seq = teach(rt, [5], "two").outcomes[0].feedback_id
    rt.snapshots.write_index(rt.applied_seq, rt.memory.index)  # an index holding the example
    assert any(rt.snapshots.position(s) >= seq for s in rt.snapshots.index_sidecars())
    rt.forget(seq)
    assert consistent(rt)
    assert all(rt.snapshots.position(s) < seq for s in rt.snapshots.index_sidecars())


def test_a_memory_that_outgrows_its_index_gets_a_new_one_off_the_request_path(runtimes, monkeypatch):
    rt = runtimes()
    old = rt.memory.index
    release, building = threading.Event(), threading.Event()

    class SlowIVF(IVFIndex):
        def __init__(self, *a, **kw):
            building.set()
            release.wait(30)
            super().__init__(*a, **kw)
    monkeypatch.setattr(replica_module, "IVFIndex", SlowIVF)
    monkeypatch.setattr(IVFIndex, "outgrown", lambda self, size: self is old)
    teach(rt, [7], "one")  # returns while the new index is still being trained
    assert building.wait(10) and rt.memory.index is old
    thread = rt.replica._retraining
    teach(rt, [8, 9], "Novel")  # written during the training: read again before the swap
    release.set()
    thread.join(30)
    assert rt.memory.index is not old and rt.stats.index_retrains == 1 and consistent(rt)
    assert len(rt.snapshots.index_sidecars()) == 2  # saved for the next start beside the first
