"""ModelRuntime over the feedback store, without HTTP: the memory is the model plus the
ordered log; snapshots, forgetting, idempotent retries, damaged state refused."""

import io
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from service.serving.feedback_store import FeedbackStoreError, StoreUnavailable, Upload
from service.serving.sqlite_store import SqliteStore
from service.serving.runtime import ModelRuntime
from service.serving.vocabulary import LabelError
from tests.helpers import save_tiny_model


@pytest.fixture
def make_runtime(tmp_path):
    save_tiny_model(tmp_path / "store")
    made = []

    def make(**kw):
        rt = ModelRuntime(tmp_path / "store", "tiny", tmp_path / "var", **kw)
        made.append(rt)
        return rt
    yield make
    for rt in made:
        rt.close()


def image(seed):
    """(normalised (1, 1, 28, 28) tensor, the PNG bytes it came from)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    x = (torch.from_numpy(a).float() / 255 - 0.5) / 0.5
    return x.view(1, 1, 28, 28), buf.getvalue()


def teach(rt, seeds, label, key=None):
    xs, pngs = zip(*(image(s) for s in seeds))
    return rt.submit_feedback(rt.embed(torch.cat(xs)), label, [Upload(p, "image/png") for p in pngs], key)


def state(rt):
    return {k: v.clone() for k, v in rt.memory.state_dict().items()}, rt.slot_feedback.clone(), list(rt.classes)


def same(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("protect", [True, False])
def test_the_log_alone_rebuilds_the_exact_memory(make_runtime, tmp_path, protect):
    rt = make_runtime(protect_feedback=protect)
    for i in range(12):  # past capacity 16 - 8 prefilled: replacements happen too
        teach(rt, [i, 100 + i] if i % 4 == 0 else [i], ["one", "two", "Novel"][i % 3])
    expected, expected_hash = state(rt), rt.state_hash()
    rt.close()
    rt2 = make_runtime(protect_feedback=protect)  # no snapshot written: the trained model + the whole log
    assert rt2.stats.restored_from_seq == 0 and rt2.stats.feedback_applied == 15
    assert same(state(rt2), expected) and rt2.state_hash() == expected_hash


def test_a_request_of_several_images_is_applied_whole_on_replay_as_live(make_runtime):
    rt = make_runtime(protect_feedback=False)
    r = teach(rt, [40, 41, 42], "Novel")  # one request: its three examples land in three slots
    assert len({o.slot for o in r.outcomes}) == 3
    expected = rt.state_hash()
    rt.close()
    assert make_runtime(protect_feedback=False).state_hash() == expected


def test_snapshot_plus_the_log_after_it_equals_the_live_memory(make_runtime):
    rt = make_runtime()
    teach(rt, [1], "one")
    rt.snapshot()
    teach(rt, [2, 3], "Novel")
    expected = rt.state_hash()
    rt.close()
    rt2 = make_runtime()
    assert rt2.stats.restored_from_seq == 1 and rt2.stats.feedback_applied == 2
    assert rt2.state_hash() == expected


def test_flipped_byte_in_a_snapshot_is_refused_and_the_previous_one_used(make_runtime, caplog):
    rt = make_runtime()
    teach(rt, [1], "one")
    rt.snapshot()
    teach(rt, [2], "Novel")
    newest = rt.snapshot()
    teach(rt, [3], "zero")
    expected = rt.state_hash()
    rt.close()
    data_file = newest.with_suffix(".safetensors")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    rt2 = make_runtime()
    assert "sha256 mismatch" in caplog.text
    assert rt2.stats.restored_from_seq == 1  # the older snapshot, then seqs 2 and 3 from the log
    assert rt2.state_hash() == expected


def test_a_retried_idempotency_key_writes_nothing_and_gets_the_first_outcome(make_runtime):
    rt = make_runtime()
    first = teach(rt, [5, 6], "Novel", key="retry-me")
    h = rt.state_hash()
    again = teach(rt, [5, 6], "Novel", key="retry-me")
    assert [o.feedback_id for o in again.outcomes] == [o.feedback_id for o in first.outcomes]
    assert again.request_id == first.request_id and rt.store.last_seq() == 2 and rt.state_hash() == h


def test_forget_empties_the_slot_and_survives_a_restart(make_runtime):
    rt = make_runtime()
    r = teach(rt, [7], "Novel")
    fid, slot = r.outcomes[0].feedback_id, r.outcomes[0].slot
    x, _ = image(7)
    assert rt.predict(x).prediction.paths == ["memory"]
    assert rt.forget(fid) and not rt.forget(fid)  # the second time: already forgotten
    assert int(rt.memory.labels[slot]) == -1 and int(rt.slot_feedback[slot]) == -1
    assert rt.store.image(fid)[0] is None  # the image is erased
    h = rt.state_hash()
    rt.close()
    rt2 = make_runtime()
    assert rt2.state_hash() == h


def test_two_runtimes_on_one_store_converge_by_tailing(make_runtime):
    a, b = make_runtime(), make_runtime()
    b.start_tail(interval=0.01)
    teach(a, [1, 2], "Hat")
    teach(a, [3], "one")
    a.forget(1)
    import time
    deadline = time.monotonic() + 10
    while b.applied_seq < a.applied_seq and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.applied_seq == a.applied_seq and b.state_hash() == a.state_hash()


def test_labels_differing_in_case_and_unicode_form_are_one_class(make_runtime):
    rt = make_runtime()
    teach(rt, [1], "Café")
    r = teach(rt, [2], " CAFE\u0301 ")  # decomposed é, other case, spaces
    assert r.outcomes[0].label == "Café" and rt.classes.count("Café") == 1


def test_a_refused_label_writes_nothing(make_runtime):
    rt = make_runtime()
    with pytest.raises(LabelError):
        teach(rt, [1], "")
    assert rt.store.last_seq() == 0


def test_an_unreachable_store_acknowledges_nothing_and_changes_nothing(make_runtime, monkeypatch):
    rt = make_runtime()
    before = rt.state_hash()

    def down(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(rt.store, "_do_append", down)
    with pytest.raises(StoreUnavailable):
        teach(rt, [1], "one")
    assert rt.state_hash() == before and rt.store.last_seq() == 0


def test_a_damaged_feature_vector_is_refused_loudly(make_runtime, tmp_path):
    rt = make_runtime()
    teach(rt, [1], "one")
    rt.close()
    db = sqlite3.connect(tmp_path / "var" / "feedback.db")
    vec = bytearray(db.execute("SELECT vector FROM features").fetchone()[0])
    vec[0] ^= 0xFF
    db.execute("UPDATE features SET vector = ?", (bytes(vec),))
    db.commit()
    db.close()
    with pytest.raises(FeedbackStoreError, match="checksum"):
        make_runtime()


def test_a_corrupted_sqlite_file_is_a_clear_error_and_is_left_as_it_was(tmp_path):
    path = tmp_path / "feedback.db"
    SqliteStore(path).close()
    raw = bytearray(path.read_bytes())
    raw[:16] = b"garbage garbage!"  # the header
    path.write_bytes(bytes(raw))
    with pytest.raises(FeedbackStoreError, match="damaged|integrity"):
        SqliteStore(path)
    assert path.read_bytes() == bytes(raw)  # nothing truncated or rewritten


def test_a_snapshot_in_progress_blocks_neither_predictions_nor_feedback_and_records_its_start(make_runtime,
                                                                                               monkeypatch):
    import threading

    from service.serving import snapshots

    rt = make_runtime()
    teach(rt, [1], "one")
    at_start = state(rt)
    paused, resume = threading.Event(), threading.Event()
    real_write = snapshots.write_streaming

    def slow_write(path, layout, pieces, *a, **kw):
        def held():
            for i, piece in enumerate(pieces):
                if i == 1:  # one piece copied: hold the writer in the middle of the memory
                    paused.set()
                    resume.wait(30)
                yield piece
        return real_write(path, layout, held(), *a, **kw)
    monkeypatch.setattr(snapshots, "write_streaming", slow_write)
    writer = threading.Thread(target=rt.snapshot)
    writer.start()
    assert paused.wait(30)
    # mid-snapshot: the memory lock is free, so predictions and feedback go through
    assert len(rt.predict(image(5)[0]).prediction.labels) == 1
    teach(rt, [2, 3], "Novel")
    resume.set()
    writer.join(30)
    live = rt.state_hash()
    rt.close()
    # the snapshot holds the memory as of its start; the log brings the rest
    rt2 = make_runtime()
    assert rt2.stats.restored_from_seq == 1
    assert rt2.state_hash() == live
    from safetensors.torch import load_file
    path, meta = rt2.snapshots.check(rt2.snapshots.sidecars()[0])
    saved = load_file(path)  # the file itself, by the safetensors library
    assert same(({k: saved[k] for k in at_start[0]}, saved["slot_feedback"], meta["classes"]), at_start)


def _open_store_at(path: str, start: float) -> str:
    import time as _time
    _time.sleep(max(0.0, start - _time.time()))  # every process opens at the same instant
    try:
        SqliteStore(path).close()
        return "ok"
    except Exception as e:  # noqa: BLE001 - the error is the result
        return repr(e)


@pytest.mark.slow  # 4 spawned processes
def test_processes_creating_one_sqlite_store_at_once_all_open_it(tmp_path):
    # serve --workers N starts N processes on one fresh store: switching a new file to WAL
    # needs it alone, and SQLite answered "database is locked" without waiting
    import multiprocessing
    import time
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(abs, range(4))  # the workers are up before the race starts
        for round_ in range(8):
            path = str(tmp_path / f"round{round_}" / "feedback.db")
            start = time.time() + 0.3
            results = pool.starmap(_open_store_at, [(path, start)] * 4)
            assert results == ["ok"] * 4, results
