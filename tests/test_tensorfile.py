"""The streamed safetensors reader and writer against the safetensors library itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.core.files import sha256_file
from service.core.tensorfile import TensorFileError, read_into, write_streaming


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"keys": torch.randn(1000, 7, generator=g), "labels": torch.arange(1000), "writes": torch.tensor(3),
            "half": torch.randn(4, 3, generator=g).bfloat16(), "mask": torch.tensor([True, False, True])}


def test_files_written_in_pieces_load_with_the_safetensors_library(tmp_path):
    ts = sample()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in ts.items()}

    def pieces():
        for k, v in ts.items():
            for start in range(0, max(1, len(v) if v.dim() else 1), 300):
                yield k, v[start:start + 300] if v.dim() else v
    digest = write_streaming(tmp_path / "x.safetensors", layout, pieces())
    assert digest == sha256_file(tmp_path / "x.safetensors")
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == ts.keys() and all(torch.equal(loaded[k], ts[k]) for k in ts)


def test_a_short_piece_stream_is_refused_and_leaves_no_file(tmp_path):
    ts = sample()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in ts.items()}
    with pytest.raises(ValueError, match="keys got"):
        write_streaming(tmp_path / "x.safetensors", layout, [("keys", ts["keys"][:10])])
    assert list(tmp_path.iterdir()) == []


def test_library_files_read_into_existing_tensors(tmp_path):
    ts = sample()
    save_file(ts, tmp_path / "x.safetensors")
    targets = {k: torch.zeros_like(v) for k, v in ts.items()}
    storage = targets["keys"].data_ptr()
    read_into(tmp_path / "x.safetensors", targets)
    assert all(torch.equal(targets[k], ts[k]) for k in ts)
    assert targets["keys"].data_ptr() == storage  # in place: no second copy


@pytest.mark.parametrize("change", ["shape", "dtype", "name"])
def test_a_mismatched_file_is_refused_before_any_byte_is_copied(tmp_path, change):
    ts = sample()
    save_file(ts, tmp_path / "x.safetensors")
    targets = {k: torch.zeros_like(v) for k, v in ts.items()}
    if change == "shape":
        targets["labels"] = torch.zeros(999, dtype=torch.int64)
    elif change == "dtype":
        targets["labels"] = torch.zeros(1000, dtype=torch.int32)
    else:
        targets["other"] = targets.pop("labels")
    with pytest.raises(TensorFileError):
        read_into(tmp_path / "x.safetensors", targets)
    assert all(not t.any() for t in targets.values())


def test_a_truncated_file_is_refused(tmp_path):
    save_file(sample(), tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    with pytest.raises(TensorFileError):
        read_into(tmp_path / "x.safetensors", {k: torch.zeros_like(v) for k, v in sample().items()})
