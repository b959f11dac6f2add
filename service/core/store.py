"""The on-disk model store: `<store>/<name>/manifest.json` plus safetensors artifacts.

    manifest.json              format version, class names, input spec, classifier config,
                               training metrics, {artifact file: sha256}
    weights-<sha12>.safetensors    backbone and head
    memory-<sha12>.safetensors     memory state (keys, labels, values, counters)
    reports (metrics.json, ...)    listed with their sha256 too

Artifact names carry their content hash and the manifest is replaced last, so a save is
atomic: a reader sees the old model or the new one, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .model import ClassifierConfig, EnhancedClassifier
from .routing import RoutingPolicy

FORMAT_VERSION = 2  # 2: the routing policy has its own section (1 kept it in the classifier's)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelStoreError(Exception):
    """A model that cannot be loaded; the message names the file at fault."""


@dataclass
class InputSpec:
    image_size: int
    in_chans: int
    mean: list[float]
    std: list[float]


@dataclass
class LoadedModel:
    model: EnhancedClassifier
    classes: list[str]
    input: InputSpec
    manifest: dict = field(repr=False)

    @property
    def policy(self) -> RoutingPolicy:
        return self.model.policy

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the folder.
    `mode` is set explicitly: mkstemp's 0600 would hide a model from the service's user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def model_dir(store: str | Path, name: str) -> Path:
    """The folder of model `name`, refusing any name that could leave the store."""
    if not NAME_PATTERN.match(name) or name in (".", ".."):
        raise ModelStoreError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                              "(up to 64, not starting with '.')")
    root = Path(store).resolve()
    d = (root / name).resolve()
    if d.parent != root:
        raise ModelStoreError(f"model name {name!r} points outside the store {str(root)!r}")
    return d


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_model(store: str | Path, name: str, model: EnhancedClassifier, classes: list[str], input_spec: InputSpec,
               metrics: dict | None = None, reports: dict[str, bytes] | None = None, splits: dict | None = None) -> Path:
    """Write the model to `<store>/<name>/`; returns that folder."""
    d = model_dir(store, name)
    state = model.state_dict()
    weights = {k: v for k, v in state.items() if not k.startswith("memory.")}
    memory = {k[len("memory."):]: v for k, v in state.items() if k.startswith("memory.")}
    blobs: dict[str, bytes] = {}
    for stem, tensors in (("weights", weights), ("memory", memory)):
        if tensors:
            data = st_save(_tensors(tensors))
            blobs[f"{stem}-{sha256_bytes(data)[:12]}.safetensors"] = data
    for fname, data in (reports or {}).items():
        blobs[fname] = data
    for fname, data in blobs.items():
        atomic_write(d / fname, data)
    artifacts = {f: sha256_bytes(b) for f, b in blobs.items()}
    version = sha256_bytes("".join(sorted(artifacts.values())).encode())[:12]
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(classes),
        "input": vars(input_spec),
        "classifier": model.config.to_dict(),
        "routing": model.policy.to_dict(),
        "data": splits or {},
        "metrics": metrics or {},
        "artifacts": artifacts,
    }
    atomic_write(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    for f in d.glob("*.safetensors"):  # superseded artifacts of an earlier save
        if f.name not in artifacts:
            f.unlink(missing_ok=True)
    return d


def read_manifest(d: Path) -> dict:
    path = d / "manifest.json"
    if not path.exists():
        raise ModelStoreError(f"{path}: missing (no model here; train one with `python -m service train`)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelStoreError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") not in (1, FORMAT_VERSION):
        raise ModelStoreError(f"{path}: format_version is not 1 or {FORMAT_VERSION}")
    if manifest["format_version"] == 1 and isinstance(manifest.get("classifier"), dict):
        # version 1 kept the threshold and the voting neighbours among the classifier settings
        c = manifest["classifier"] = dict(manifest["classifier"])
        manifest["routing"] = {"confidence_threshold": c.pop("confidence_threshold", 0.85),
                               "neighbours": c.pop("top_k", 5)}
    for key in ("name", "version", "classes", "input", "classifier", "routing", "artifacts"):
        if key not in manifest:
            raise ModelStoreError(f"{path}: field {key!r} missing")
    return manifest


def read_artifact(d: Path, manifest: dict, fname: str) -> bytes:
    """The artifact's bytes, after checking it is listed and its sha256 matches."""
    expected = manifest["artifacts"].get(fname)
    path = d / fname
    if expected is None or "/" in fname or fname.startswith("."):
        raise ModelStoreError(f"{path}: not an artifact of this manifest")
    if not path.exists():
        raise ModelStoreError(f"{path}: missing")
    data = path.read_bytes()
    if sha256_bytes(data) != expected:
        raise ModelStoreError(f"{path}: sha256 mismatch (truncated or modified)")
    return data


def load_model(store: str | Path, name: str) -> LoadedModel:
    """Rebuild the saved classifier exactly; any missing, tampered or mismatched artifact is
    refused with a ModelStoreError naming the file."""
    d = model_dir(store, name)
    manifest = read_manifest(d)
    try:
        config = ClassifierConfig(**manifest["classifier"])
        input_spec = InputSpec(**manifest["input"])
        policy = RoutingPolicy.from_dict(manifest["routing"])
    except (TypeError, ValueError) as e:
        raise ModelStoreError(f"{d / 'manifest.json'}: bad classifier, input or routing settings ({e})") from e
    model = EnhancedClassifier(config)
    model.policy = policy
    state: dict[str, torch.Tensor] = {}
    for fname in manifest["artifacts"]:
        if not fname.endswith(".safetensors"):
            continue
        data = read_artifact(d, manifest, fname)
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelStoreError(f"{d / fname}: not a valid safetensors file ({e})") from e
        prefix = "memory." if fname.startswith("memory-") else ""
        state.update({prefix + k: v for k, v in tensors.items()})
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelStoreError(f"{d}: artifacts do not match the manifest's classifier "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict(state)
    model.eval()
    if len(manifest["classes"]) != config.num_classes:
        raise ModelStoreError(f"{d / 'manifest.json'}: {len(manifest['classes'])} class names for "
                              f"{config.num_classes} head classes")
    return LoadedModel(model, list(manifest["classes"]), input_spec, manifest)
