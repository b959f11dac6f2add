"""Memory snapshots on disk: a safetensors file and a JSON sidecar written after it.

    snapshot-<position>.safetensors   memory state + per-slot feedback ids
    snapshot-<position>.json          its sha256 and metadata (written last: the commit point)
    ivf-<position>.faiss              the memory's trained IVF index (faiss's own format), when
    ivf-<position>.json               one was trained here; its sidecar, likewise

Both are written atomically (temp file, fsync, rename). Loading checks the sidecar names
only its own data file and the sha256 matches; a damaged snapshot is refused with an error
naming it, and the caller falls back to an older one. An index is saved when it is trained
(not with every snapshot: it is large and changes only by the writes the memory records),
and made to hold the restored memory's state when loaded (IVFIndex.reconcile).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ..core.files import atomic_write, sha256_file
from ..core.retrieval import IndexFileError, IVFIndex
from ..core.tensorfile import TensorFileError, read_into, write_streaming

KEEP_SNAPSHOTS = 3
KEEP_INDEXES = 2


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
        """Delete one snapshot or saved index: its sidecar first (the commit point), then its data file."""
        sidecar.unlink(missing_ok=True)
        suffix = ".faiss" if sidecar.name.startswith("ivf-") else ".safetensors"
        (self.folder / sidecar.name.replace(".json", suffix)).unlink(missing_ok=True)

    @staticmethod
    def position(sidecar: Path) -> int:
        """The log position a snapshot or saved index was taken at (in its name)."""
        return int(sidecar.stem.split("-", 1)[1])

    def remove_holding(self, seq: int) -> None:
        """Delete every snapshot and saved index taken at or after log position `seq` (they
        hold that example)."""
        for sidecar in self.sidecars() + self.index_sidecars():
            if self.position(sidecar) >= seq:
                self.remove(sidecar)

    # --- the memory's IVF index ----------------------------------------------------------------
    def index_sidecars(self) -> list[Path]:
        """Saved indexes, newest first."""
        return sorted(self.folder.glob("ivf-*.json"), reverse=True)

    def write_index(self, position: int, index: IVFIndex) -> Path:
        """Save an index holding the memory as of log position `position` (or later): data
        file, then sidecar; prune all but the newest KEEP_INDEXES. Returns the sidecar."""
        stem = f"ivf-{position:012d}"
        digest = index.save(self.folder / f"{stem}.faiss")
        meta = {"file": f"{stem}.faiss", "sha256": digest, "nlist": index.nlist, "items": len(index),
                "time": time.time()}
        sidecar = self.folder / f"{stem}.json"
        atomic_write(sidecar, json.dumps(meta).encode())
        for old in self.index_sidecars()[KEEP_INDEXES:]:
            self.remove(old)
        return sidecar

    def load_index(self, sidecar: Path, dim: int, nprobe: int | None = None) -> IVFIndex:
        """A saved index after its checks (IVFIndex.load); IndexFileError naming what is wrong."""
        try:
            meta = json.loads(sidecar.read_text())
            if meta["file"] != sidecar.name.replace(".json", ".faiss"):  # a sidecar names only its twin
                raise IndexFileError(f"{sidecar}: names {meta['file']!r}, not its own index file")
            digest = meta["sha256"]
        except IndexFileError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"{sidecar}: unreadable ({e})") from e
        return IVFIndex.load(self.folder / meta["file"], digest, dim, nprobe)
