"""Files written atomically and hashed a piece at a time (models, snapshots)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

READ_PIECE = 8 * 1024 * 1024


@contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file beside it: fsync, rename over it, fsync the
    folder. An exception inside the block leaves `path` as it was. `mode` is set explicitly:
    mkstemp's 0600 would hide a model from the service's user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in `folder` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_file(path, mode) as f:
        f.write(data)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read a piece at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_PIECE):
            h.update(chunk)
    return h.hexdigest()


def rename_hashed(folder: Path, prefix: str, suffix: str, write) -> tuple[Path, str]:
    """Write a file whose name carries its content hash, `<prefix><sha12><suffix>`, atomically:
    `write(path)` writes a temporary file beside it and returns its sha256 (hashed as written),
    then it is renamed. Returns (path, sha256)."""
    tmp = Path(folder) / f".{prefix}pending{suffix}"
    digest = write(tmp)
    path = Path(folder) / f"{prefix}{digest[:12]}{suffix}"
    os.replace(tmp, path)
    fsync_folder(folder)
    return path, digest
