import logging

import pytest
import torch

from service.serving.journal import FeedbackJournal, FeedbackRecord, JournalError


def rec(i, d=4):
    return FeedbackRecord(i, i % 3, f"c{i % 3}", torch.arange(d, dtype=torch.float32) * i, 1.5)


def test_append_then_reopen_reads_every_record(tmp_path):
    j = FeedbackJournal(tmp_path / "j.log")
    j.append([rec(1), rec(2)])
    j.append([rec(3)])
    j.close()
    j2 = FeedbackJournal(tmp_path / "j.log")
    assert [r.id for r in j2.records] == [1, 2, 3] and j2.last_id == 3
    assert torch.equal(j2.records[2].features, rec(3).features)
    assert j2.records[1].class_name == "c2"


@pytest.mark.parametrize("damage", ["torn_tail", "bad_crc_tail"])
def test_torn_last_record_is_recovered_up_to_the_last_whole_one(tmp_path, caplog, damage):
    path = tmp_path / "j.log"
    j = FeedbackJournal(path)
    j.append([rec(1), rec(2)])
    j.close()
    data = path.read_bytes()
    if damage == "torn_tail":
        path.write_bytes(data + rec(3).encode()[:25])  # crash mid-write
    else:
        last = rec(3).encode()
        path.write_bytes(data + last[:20] + b"X" + last[21:])
    with caplog.at_level(logging.WARNING, logger="service.serving.journal"):
        j2 = FeedbackJournal(path)
    assert [r.id for r in j2.records] == [1, 2]
    assert "recovered 2 records" in caplog.text
    assert path.stat().st_size == len(data)  # torn tail cut before new appends
    j2.append([rec(3)])
    j2.close()
    assert [r.id for r in FeedbackJournal(path).records] == [1, 2, 3]


def test_failed_write_raises_and_leaves_no_partial_record(tmp_path, monkeypatch):
    import service.serving.journal as journal

    j = FeedbackJournal(tmp_path / "j.log")
    j.append([rec(1)])
    size = (tmp_path / "j.log").stat().st_size

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(journal.os, "fsync", full_disk)
    with pytest.raises(JournalError, match="No space"):
        j.append([rec(2)])
    monkeypatch.undo()
    assert (tmp_path / "j.log").stat().st_size == size
    assert j.last_id == 1
