"""safetensors files streamed: written piece by piece, read straight into existing tensors.

The safetensors library saves from whole tensors and loads into new ones, so saving or
loading a 1 GB memory costs one or two more gigabytes at the peak. The format is small
(https://huggingface.co/docs/safetensors: an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes),
so here it is written and read in pieces of a few megabytes:

    write_streaming(path, layout, pieces)   the header, then each piece as it comes; sha256
    read_into(path, targets)                checks names, dtypes, shapes and ranges, then
                                            reads each tensor's bytes into the target's storage

Files written here load with safetensors.torch.load_file, and read_into reads files that
safetensors.torch.save_file wrote (tests/test_tensorfile.py checks both ways).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .files import READ_PIECE, atomic_file

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
MAX_HEADER = 100 * 1024 * 1024  # the library's own limit
assert sys.byteorder == "little", "safetensors stores little-endian bytes; this host is big-endian"


class TensorFileError(ValueError):
    """A file that is not the safetensors file expected (the message names it and what differs)."""


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = torch.tensor([], dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n


def write_streaming(path: str | Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                    pieces: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                    mode: int = 0o644) -> str:
    """Write a safetensors file atomically (temp file, fsync, rename) from `pieces`: (name,
    tensor) in `layout` order, each tensor's rows in order, adding up to the layout's shapes.
    Returns the sha256 of the file."""
    path = Path(path)
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    sha = hashlib.sha256()
    with atomic_file(path, mode) as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            f.write(chunk)
            sha.update(chunk)
        written = {name: 0 for name in layout}
        for name, piece in pieces:
            data = memoryview(tensor_bytes(piece.detach().contiguous()))
            f.write(data)
            sha.update(data)
            written[name] += len(data)
        for name, (dtype, shape) in layout.items():
            if written[name] != _nbytes(dtype, shape):
                raise ValueError(f"{path}: {name} got {written[name]} bytes, its layout needs "
                                 f"{_nbytes(dtype, shape)}")
    return sha.hexdigest()


def tensor_bytes(t: torch.Tensor):
    """A contiguous tensor's storage as a writable uint8 numpy array (any dtype, bf16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file; TensorFileError if malformed."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TensorFileError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise TensorFileError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"{path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_into(path: str | Path, targets: dict[str, torch.Tensor], prefix: str = "") -> dict[str, str]:
    """Read every tensor of the file into `targets[prefix + name]` (contiguous CPU tensors,
    overwritten in place). All names, dtypes, shapes and byte ranges are checked before the
    first byte is copied; returns the file's metadata."""
    path = Path(path)
    header, start = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    size = path.stat().st_size
    names = {prefix + k for k in header}
    expected = {k for k in targets if k.startswith(prefix)}
    if names != expected:
        raise TensorFileError(f"{path}: tensors differ from the model's (missing {sorted(expected - names)[:3]}, "
                              f"unexpected {sorted(names - expected)[:3]})")
    plan = []
    for name, entry in header.items():
        t = targets[prefix + name]
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype, shape = entry["dtype"], [int(s) for s in entry["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise TensorFileError(f"{path}: bad header entry for {name} ({e})") from e
        if dtype != DTYPES.get(t.dtype) or shape != list(t.shape):
            raise TensorFileError(f"{path}: {name} is {dtype} {shape}, expected {DTYPES.get(t.dtype)} {list(t.shape)}")
        if end - begin != _nbytes(t.dtype, t.shape) or begin < 0 or start + end > size:
            raise TensorFileError(f"{path}: {name}'s byte range [{begin}, {end}) does not fit")
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"read_into needs contiguous CPU targets ({prefix + name})")
        plan.append((start + begin, t))
    with open(path, "rb") as f:
        for offset, t in plan:
            view = memoryview(tensor_bytes(t.detach()))
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:done + READ_PIECE])
                if not n:
                    raise TensorFileError(f"{path}: ended early")
                done += n
    return metadata
