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
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.store import atomic_write, sha256_bytes

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

    def load(self, sidecar: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of one snapshot, or SnapshotError naming what is wrong."""
        try:
            meta = json.loads(sidecar.read_text())
            if meta["file"] != sidecar.name.replace(".json", ".safetensors"):  # a sidecar names only its twin
                raise SnapshotError(f"{sidecar}: names {meta['file']!r}, not its own data file")
            data = (self.folder / meta["file"]).read_bytes()
        except SnapshotError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SnapshotError(f"{sidecar}: unreadable ({e})") from e
        if sha256_bytes(data) != meta.get("sha256"):
            raise SnapshotError(f"{self.folder / meta['file']}: sha256 mismatch")
        try:
            return st_load(data), meta
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise SnapshotError(f"{self.folder / meta['file']}: not valid safetensors ({e})") from e

    def write(self, position: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write atomically, sidecar last; prune all but the newest `keep`. Returns the sidecar."""
        data = st_save({k: v.contiguous() for k, v in tensors.items()})
        stem = f"snapshot-{position:012d}"
        atomic_write(self.folder / f"{stem}.safetensors", data)
        meta = {**meta, "file": f"{stem}.safetensors", "sha256": sha256_bytes(data), "time": time.time()}
        sidecar = self.folder / f"{stem}.json"
        atomic_write(sidecar, json.dumps(meta).encode())
        for old in self.sidecars()[self.keep:]:
            (self.folder / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return sidecar
