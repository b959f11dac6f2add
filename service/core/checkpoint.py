"""Training checkpoints: what a run needs to continue from the end of an epoch, as safetensors
and JSON (no pickle, no torch.save), written atomically.

    <dir>/checkpoint.json             epoch, the settings it was written with, history, the
                                      optimiser's and schedule's state (each tensor replaced by
                                      {"__tensor__": name}), and the tensor file's name and sha256
    <dir>/epoch-<k>.safetensors       the tensors: model (network and memory), optimiser, RNG states

The tensor file is written first under a new name and checkpoint.json replaced last, so a
reader sees the previous checkpoint or the new one, never a mix (the model store's pattern);
superseded tensor files are removed after.

`flatten` turns a nested state (dicts, lists, tuples, numbers, strings, tensors) into JSON and
named tensors; `unflatten` rebuilds it: dicts with non-string keys (an optimiser's state is
keyed by parameter index) and tuples keep their types.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .files import atomic_write, sha256_file
from .tensorfile import write_streaming

FORMAT = 1
INDEX = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file or the setting at fault."""


def flatten(obj, name: str, tensors: dict[str, torch.Tensor]):
    """JSON-able form of `obj`; its tensors go into `tensors` under dotted names from `name`."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{name}: cannot checkpoint a {type(obj).__name__}")


def unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(folder: str | Path, epoch: int, state: dict) -> Path:
    """Write `state` (nested, tensors anywhere) as the checkpoint of `epoch`; returns the index file."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(state, "state", tensors)
    fname = f"epoch-{epoch:04d}.safetensors"
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    sha = write_streaming(folder / fname, layout, tensors.items())
    index = {"format": FORMAT, "epoch": epoch, "tensors": fname, "tensors_sha256": sha, "state": tree}
    atomic_write(folder / INDEX, json.dumps(index, indent=1).encode())
    for f in folder.glob("epoch-*.safetensors"):
        if f.name != fname:
            f.unlink(missing_ok=True)
    return folder / INDEX


def load_checkpoint(folder: str | Path) -> tuple[int, dict] | None:
    """(epoch, state) of the checkpoint in `folder`, None when it holds none."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_bytes())
        fname, sha, epoch, tree = index["tensors"], index["tensors_sha256"], int(index["epoch"]), index["state"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a checkpoint index ({e})") from e
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {index.get('format')!r}, expected {FORMAT}")
    tensor_path = folder / Path(fname).name
    if not tensor_path.exists() or sha256_file(tensor_path) != sha:
        raise CheckpointError(f"{tensor_path}: missing or its sha256 differs from {path}'s")
    return epoch, unflatten(tree, load_file(tensor_path))


def restore_checkpoint(state: dict, fingerprint: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, sched,
                       gen: torch.Generator, where: str) -> None:
    """Load a checkpoint's state into a freshly built run (model, optimiser, schedule, the
    global and the data-order RNG), refusing one written with other settings: `fingerprint`
    is the settings of this run, flat, as the checkpoint recorded its own."""
    saved = state["fingerprint"]
    differ = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if differ:
        raise CheckpointError(f"--resume: the checkpoint in {where} was written with other settings ("
                              + ", ".join(f"{k}={saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differ[:5])
                              + "); pass the same flags, or leave out --resume to start afresh")
    drawn_on = state["rng"].get("generator_device", "cpu")  # checkpoints written before it was kept: the CPU
    if drawn_on != gen.device.type:
        raise CheckpointError(f"--resume: the checkpoint in {where} drew its data order on {drawn_on}; a generator "
                              f"on {gen.device.type} draws another: resume with --device {drawn_on}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    gen.set_state(state["rng"]["generator"])
