"""Append-only feedback journal: one line per record, `<crc32 hex> <json>\\n`, fsync'd
before a feedback is acknowledged.

A crash can leave only the last record torn (partial line or bad checksum): reading stops
there, says so in the log, and the file is cut back to the last whole record before new
records are appended.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class JournalError(OSError):
    """The journal could not be written: the feedback is not acknowledged."""


@dataclass
class FeedbackRecord:
    id: int
    label: int
    class_name: str
    features: torch.Tensor  # (D,) float32
    ts: float

    def encode(self) -> bytes:
        payload = json.dumps({
            "id": self.id, "label": self.label, "class_name": self.class_name, "ts": self.ts,
            "features": base64.b64encode(self.features.numpy().astype("<f4").tobytes()).decode(),
        }, ensure_ascii=True, separators=(",", ":")).encode()
        return b"%08x " % zlib.crc32(payload) + payload + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "FeedbackRecord":
        crc, payload = line[:8], line[9:]
        if len(line) < 10 or line[8:9] != b" " or int(crc, 16) != zlib.crc32(payload):
            raise ValueError("checksum mismatch")
        d = json.loads(payload)
        feats = np.frombuffer(base64.b64decode(d["features"]), dtype="<f4").copy()
        return cls(int(d["id"]), int(d["label"]), str(d["class_name"]), torch.from_numpy(feats), float(d["ts"]))


class FeedbackJournal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records, good_bytes = self._read()  # read once at start, for replay
        self.last_id = self.records[-1].id if self.records else 0
        if self.path.exists() and self.path.stat().st_size > good_bytes:
            with open(self.path, "r+b") as f:  # cut the torn tail so appends start clean
                f.truncate(good_bytes)
                f.flush()
                os.fsync(f.fileno())
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = good_bytes

    def _read(self) -> tuple[list[FeedbackRecord], int]:
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        records, offset = [], 0
        while offset < len(data):
            end = data.find(b"\n", offset)
            if end < 0:
                log.warning("journal %s: last record torn (no newline, %d bytes); recovered %d records",
                            self.path, len(data) - offset, len(records))
                break
            try:
                records.append(FeedbackRecord.decode(data[offset:end]))
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                log.warning("journal %s: record at byte %d is corrupt (%s); recovered %d records, "
                            "dropping %d bytes after it", self.path, offset, e, len(records), len(data) - offset)
                break
            offset = end + 1
        return records, offset

    def append(self, records: list[FeedbackRecord]) -> None:
        """Write and fsync; on failure cut back what was written and raise JournalError."""
        data = b"".join(r.encode() for r in records)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass
            raise JournalError(e.errno, f"feedback journal write failed: {e.strerror or e}") from e
        self.size += len(data)
        self.last_id = records[-1].id if records else self.last_id

    def close(self) -> None:
        os.close(self._fd)
