"""Memory snapshots on disk: a safetensors file and a JSON sidecar written after it.

    snapshot-<position>.safetensors   memory state + per-slot feedback ids
    snapshot-<position>.json          its sha256 and metadata (written last: the commit point)

Both are written atomically (temp file, fsync, rename). Loading checks the sidecar names
only its own data file and the sha256 matches; a damaged snapshot is refused with an error
naming it, and the caller falls back to an older one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ..core.files import atomic_write, sha256_file
from ..core.tensorfile import TensorFileError, read_into, write_streaming

KEEP_SNAPSHOTS = 3


class SnapshotError(ValueError):
    """A snapshot that cannot be used; the message names the file."""


class SnapshotStore:
    def __init__(self, folder: str | Path, keep: int = KEEP_SNAPSHOTS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def sidecars(self) -> list[Path]:
        """Newest first."""
        return sorted(self.folder.glob("snapshot-*.json"), reverse=True)

    def check(self, sidecar: Path) -> tuple[Path, dict]:
        """(data file, metadata) of one snapshot whose sha256 matches, or SnapshotError
        naming what is wrong. The file is hashed a piece at a time."""
        try:
            meta = json.loads(sidecar.read_text())
            if meta["file"] != sidecar.name.replace(".json", ".safetensors"):  # a sidecar names only its twin
                raise SnapshotError(f"{sidecar}: names {meta['file']!r}, not its own data file")
            path = self.folder / meta["file"]
            digest = sha256_file(path)
        except SnapshotError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"{sidecar}: unreadable ({e})") from e
        if digest != meta.get("sha256"):
            raise SnapshotError(f"{path}: sha256 mismatch")
        return path, meta

    def load_into(self, path: Path, targets: dict[str, torch.Tensor]) -> None:
        """Read a checked snapshot straight into `targets` (names, dtypes and shapes are all
        checked before the first byte is copied: a mismatch changes nothing)."""
        try:
            read_into(path, targets)
        except TensorFileError as e:
            raise SnapshotError(str(e)) from e

    def write(self, position: int, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
              pieces: Iterable[tuple[str, torch.Tensor]], meta: dict) -> Path:
        """Write atomically from pieces (streamed: no second copy of the memory), sidecar
        last; prune all but the newest `keep`. Returns the sidecar."""
        stem = f"snapshot-{position:012d}"
        digest = write_streaming(self.folder / f"{stem}.safetensors", layout, pieces)
        meta = {**meta, "file": f"{stem}.safetensors", "sha256": digest, "time": time.time()}
        sidecar = self.folder / f"{stem}.json"
        atomic_write(sidecar, json.dumps(meta).encode())
        for old in self.sidecars()[self.keep:]:
            self.remove(old)
        return sidecar

    def remove(self, sidecar: Path) -> None:
        """Delete one snapshot: its sidecar first (the commit point), then its data file."""
        sidecar.unlink(missing_ok=True)
        (self.folder / sidecar.name.replace(".json", ".safetensors")).unlink(missing_ok=True)

    @staticmethod
    def position(sidecar: Path) -> int:
        """The log position a snapshot was taken at (in its name)."""
        return int(sidecar.stem.removeprefix("snapshot-"))

    def remove_holding(self, seq: int) -> None:
        """Delete every snapshot taken at or after log position `seq` (they hold that example)."""
        for sidecar in self.sidecars():
            if self.position(sidecar) >= seq:
                self.remove(sidecar)
