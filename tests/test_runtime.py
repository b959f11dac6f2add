"""ModelRuntime without HTTP: feedback durability, snapshots and recovery."""

import pytest
import torch

from service.serving.journal import JournalError
from service.serving.runtime import ModelRuntime
from service.serving.vocabulary import LabelError
from tests.helpers import save_tiny_model


@pytest.fixture
def make_runtime(tmp_path):
    save_tiny_model(tmp_path / "store")
    return lambda: ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")


def feats(rt, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, 28, 28, generator=g)  # one image, as the runtime takes it


def state(rt):
    return {k: v.clone() for k, v in rt.memory.state_dict().items()}, rt.slot_feedback.clone(), list(rt.classes)


def same(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_journal_replay_rebuilds_the_exact_memory(make_runtime):
    rt = make_runtime()
    for i in range(12):  # past capacity 16 - 8 prefilled: replacements happen too
        rt.feedback(feats(rt, i), ["one", "two", "Novel"][i % 3])
    expected = state(rt)
    rt.close()
    rt2 = make_runtime()
    assert rt2.stats.replayed == 12 and same(state(rt2), expected)


def test_corrupt_snapshot_falls_back_to_previous_plus_journal(make_runtime, caplog):
    rt = make_runtime()
    rt.feedback(feats(rt, 1), "one")
    rt.snapshot()
    rt.feedback(feats(rt, 2), "Novel")
    newest = rt.snapshot()
    rt.feedback(feats(rt, 3), "zero")
    expected = state(rt)
    rt.close()
    data_file = newest.with_suffix(".safetensors")
    data_file.write_bytes(data_file.read_bytes()[:-10])  # corrupt the newest snapshot
    rt2 = make_runtime()
    assert "refused" in caplog.text
    assert rt2.stats.replayed == 2  # records 2 and 3, after the older snapshot
    assert same(state(rt2), expected)


def test_failed_journal_write_changes_nothing(make_runtime, monkeypatch):
    rt = make_runtime()
    before = state(rt)

    def fail(records):
        raise JournalError(28, "No space left on device")
    monkeypatch.setattr(rt.journal, "append", fail)
    with pytest.raises(JournalError):
        rt.feedback(feats(rt, 5), "Novel")
    assert same(state(rt), before) and "Novel" not in rt.classes


@pytest.mark.parametrize("label", ["", "9", "../../etc/passwd\x00", "x" * 65])
def test_bad_labels_raise_label_error(make_runtime, label):
    rt = make_runtime()
    with pytest.raises(LabelError):
        rt.feedback(feats(rt, 1), label)


def test_unicode_digits_are_names_not_indices(make_runtime):
    rt = make_runtime()  # found by schemathesis: "³".isdigit() is True but int("³") fails
    out = rt.feedback(feats(rt, 1), "³")
    assert out[0].label == "³" and rt.classes[-1] == "³"
    rt.feedback(feats(rt, 2), "Ünïcødé ✓")
    assert rt.classes[-1] == "Ünïcødé ✓"


def test_path_like_and_unicode_labels_are_only_names(make_runtime, tmp_path):
    rt = make_runtime()
    rt.feedback(feats(rt, 1), "../../etc")
    rt.feedback(feats(rt, 3), "x'; DROP TABLE memory;--")  # label space 6: two new classes fit
    assert rt.classes[-2:] == ["../../etc", "x'; DROP TABLE memory;--"]
    assert not (tmp_path / "etc").exists()
    rt.snapshot()
    rt.close()
    assert make_runtime().classes[-2:] == ["../../etc", "x'; DROP TABLE memory;--"]


def test_early_exit_model_serves_feedback_from_the_memory_path(tmp_path):
    save_tiny_model(tmp_path / "store", exit_stage="stage1", exit_dim=16)
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    rt.feedback(x[:1], "Novel")
    served = rt.predict(x)
    assert served.prediction.paths[0] == "memory" and rt.classes[served.prediction.labels[0]] == "Novel"
    assert served.feedback_ids[0] == 1 and served.prediction.timings_ms["head"] >= 0


def test_ivf_index_runtime_answers_feedback_like_exact(tmp_path):
    save_tiny_model(tmp_path / "store")
    rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", index="ivf", nprobe=4)
    assert rt.memory.index is not None and len(rt.memory.index) == rt.memory.size
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    rt.feedback(x, "Novel")
    served = rt.predict(x)
    assert [rt.classes[i] for i in served.prediction.labels] == ["Novel"] * 3
    assert len(rt.memory.index) == rt.memory.size


def test_feedback_of_a_new_class_in_a_full_memory_keeps_every_example(make_runtime):
    rt = make_runtime()
    for i in range(8):  # fill the 16 slots (8 prefilled)
        rt.feedback(feats(rt, 100 + i), "one")
    assert rt.memory.size == rt.memory.capacity
    for i in range(5):
        rt.feedback(feats(rt, i), "Novel")
    novel = rt.classes.index("Novel")
    assert int((rt.memory.labels == novel).sum()) == 5
