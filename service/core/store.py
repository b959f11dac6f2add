"""The on-disk model store: `<store>/<name>/manifest.json` plus safetensors artifacts.

    manifest.json              format version, class names, input spec, classifier config,
                               training metrics, {artifact file: sha256}
    weights-<sha12>.safetensors    backbone and head
    memory-<sha12>.safetensors     memory state (keys, labels, values, counters)
    ivf-<sha12>.faiss              optional: the memory's trained IVF index, as faiss writes it
                                   (manifest "index": its file and cells); derived state, so
                                   not part of the model's version
    reports (metrics.json, ...)    listed with their sha256 too
    engine-<engine>-<sha12>.xml/.bin           optional: a CPU inference engine's network, as
                                               OpenVINO IR (service/core/engine.py; docs/engine.md)
    engine-<engine>-state-<sha12>.safetensors  its variant of everything derived from memory
                                               keys (memory, replay features, novelty); the
                                               manifest's "engine" section names these files, its
                                               routing thresholds, calibration and gate figures

The weights and memory files are always the eager (torch fp32) variant: whatever reads a
model without asking for an engine gets a model whose keys and queries come from one
network. `load_model(..., keys_of=engine)` reads the engine's variant of the derived state
instead (the engine's network itself is loaded by service/core/engine.py).

Artifact names carry their content hash and the manifest is replaced last, so a save is
atomic: a reader sees the old model or the new one, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from .files import atomic_write, rename_hashed, sha256_file
from .model import ClassifierConfig, EnhancedClassifier
from .retrieval import IndexFileError, IVFIndex
from .routing import RoutingPolicy
from .tensorfile import TensorFileError, read_header, read_into

FORMAT_VERSION = 2  # 2: the routing policy has its own section (1 kept it in the classifier's)
INDEX_PREFIX, INDEX_SUFFIX = "ivf-", ".faiss"
ENGINE_PREFIX = "engine-"
EAGER = "eager"  # torch as trained: the variant the weights and memory files hold
# the model's state an engine has its own variant of: everything computed from the network's features
ENGINE_STATE_PREFIXES = ("memory.", "taught.", "novelty.")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
log = logging.getLogger(__name__)


class ModelStoreError(Exception):
    """A model that cannot be loaded; the message names the file at fault."""


@dataclass
class InputSpec:
    image_size: int
    in_chans: int
    mean: list[float]
    std: list[float]


@dataclass
class EngineVariant:
    """What `save_model` stores for a CPU inference engine beside the eager model: its network
    files ({suffix: bytes}, e.g. {".xml": ..., ".bin": ...}), its variant of the derived state
    (`ENGINE_STATE_PREFIXES` entries of the model's state_dict), its routing thresholds and a
    record (calibration, gate figures) for the manifest."""
    name: str
    files: dict[str, bytes]
    state: dict[str, torch.Tensor]
    routing: dict
    record: dict


@dataclass
class LoadedModel:
    model: EnhancedClassifier
    classes: list[str]
    input: InputSpec
    manifest: dict = field(repr=False)
    engine: str = EAGER  # whose keys the memory holds (load_model's keys_of)

    @property
    def policy(self) -> RoutingPolicy:
        return self.model.policy

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        """The served version: the stored model's, or one of its own per engine (see served_version)."""
        return served_version(self.manifest, self.engine)


def served_version(manifest: dict, engine: str = EAGER) -> str:
    """The version a model is served as with `engine`. Feedback vectors and memory snapshots
    are kept per served version, so an engine's keys are never read by another: eager is
    the stored model's version (as before engines existed), another engine a hash of that
    version and its name (the version already covers the engine's files)."""
    if engine == EAGER:
        return manifest["version"]
    return sha256_bytes(f"{manifest['version']}:{engine}".encode())[:12]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def model_version(artifacts: dict[str, str]) -> str:
    """The model's version: a hash of its artifacts' hashes, the derived index's left out (a
    model gains an index without becoming another model: its snapshots and vectors stay its own)."""
    return sha256_bytes("".join(sorted(h for f, h in artifacts.items() if not is_index(f))).encode())[:12]


def is_index(fname: str) -> bool:
    return fname.startswith(INDEX_PREFIX) and fname.endswith(INDEX_SUFFIX)


def is_engine_file(fname: str) -> bool:
    return fname.startswith(ENGINE_PREFIX)


def save_model(store: str | Path, name: str, model: EnhancedClassifier, classes: list[str], input_spec: InputSpec,
               metrics: dict | None = None, reports: dict[str, bytes] | None = None, splits: dict | None = None,
               engine: EngineVariant | None = None) -> Path:
    """Write the model to `<store>/<name>/`; returns that folder. A memory with an index
    attached (`memory.index`) has it saved too (`save_index`). `model` is the eager model
    (its backbone a torch module); `engine` adds a CPU inference engine's files and variant."""
    d = model_dir(store, name)
    state = model.state_dict()
    if not any(k.startswith("backbone.") for k in state):
        raise ValueError("save_model: the model's backbone has no torch weights (an engine module in its place?); "
                         "save the eager model and pass the engine as `engine`")
    weights = {k: v for k, v in state.items() if not k.startswith("memory.")}
    memory = {k[len("memory."):]: v for k, v in state.items() if k.startswith("memory.")}
    blobs: dict[str, bytes] = {}
    for stem, tensors in (("weights", weights), ("memory", memory)):
        if tensors:
            data = st_save(_tensors(tensors))
            blobs[f"{stem}-{sha256_bytes(data)[:12]}.safetensors"] = data
    for fname, data in (reports or {}).items():
        if is_engine_file(fname) or is_index(fname):
            raise ValueError(f"save_model: {fname!r} is not a report (engine and index files are saved by their own "
                             "arguments)")
        blobs[fname] = data
    engine_section = None
    if engine is not None:
        if engine.name == EAGER or not NAME_PATTERN.match(engine.name):
            raise ValueError(f"save_model: {engine.name!r} is not an engine name")
        stray = [k for k in engine.state if not k.startswith(ENGINE_STATE_PREFIXES)]
        if stray:
            raise ValueError(f"save_model: engine state holds more than derived state ({stray[:3]})")
        files = {}
        for suffix, data in {**engine.files, ".safetensors": st_save(_tensors(engine.state))}.items():
            stem = "state-" if suffix == ".safetensors" else ""
            fname = f"{ENGINE_PREFIX}{engine.name}-{stem}{sha256_bytes(data)[:12]}{suffix}"
            blobs[fname] = data
            files[suffix.lstrip(".")] = fname
        engine_section = {"name": engine.name, "files": files, "routing": engine.routing, **engine.record}
    for fname, data in blobs.items():
        atomic_write(d / fname, data)
    artifacts = {f: sha256_bytes(b) for f, b in blobs.items()}
    version = model_version(artifacts)
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
    if engine_section is not None:
        manifest["engine"] = engine_section
    atomic_write(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    _prune(d, artifacts)
    if model.memory is not None and model.memory.index is not None:
        save_index(store, name, model.memory.index)
    return d


def _prune(d: Path, artifacts: dict) -> None:
    """Delete superseded artifacts of an earlier save (after the manifest that dropped them)."""
    for f in [*d.glob("*.safetensors"), *d.glob(f"{INDEX_PREFIX}*{INDEX_SUFFIX}"), *d.glob(f"{ENGINE_PREFIX}*")]:
        if f.name not in artifacts:
            f.unlink(missing_ok=True)


def save_index(store: str | Path, name: str, index: IVFIndex) -> Path:
    """Add the memory's trained IVF index to a saved model (replacing any earlier one): the
    file, then the manifest naming it. The model's version stays what it was. Returns the file."""
    d = model_dir(store, name)
    manifest = read_manifest(d)
    path, digest = rename_hashed(d, INDEX_PREFIX, INDEX_SUFFIX, index.save)
    artifacts = {f: h for f, h in manifest["artifacts"].items() if not is_index(f)} | {path.name: digest}
    manifest = manifest | {"artifacts": artifacts,
                           "index": {"kind": "ivf", "file": path.name, "nlist": index.nlist, "nprobe": index.nprobe,
                                     "items": len(index)}}
    atomic_write(d / "manifest.json", json.dumps(manifest, indent=2).encode())
    _prune(d, artifacts)
    return path


def load_index(store: str | Path, name: str, manifest: dict, dim: int, nprobe: int | None = None) -> IVFIndex | None:
    """The model's saved IVF index, or None when it has none (or its file is gone: the index is
    derived state, rebuilt from the memory). A damaged file is refused: IndexFileError naming it."""
    fname = (manifest.get("index") or {}).get("file")
    if fname is None:
        return None
    d = model_dir(store, name)
    if fname not in manifest["artifacts"] or not is_index(fname) or "/" in fname:
        raise IndexFileError(f"{d / 'manifest.json'}: its index {fname!r} is not one of its artifacts")
    if not (d / fname).exists():
        return None
    return IVFIndex.load(d / fname, manifest["artifacts"][fname], dim, nprobe)


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


def checked_artifact(d: Path, manifest: dict, fname: str) -> Path:
    """The artifact's path, after checking it is listed and its sha256 matches (read a piece
    at a time: a 1M-item memory is not held twice to be checked)."""
    expected = manifest["artifacts"].get(fname)
    path = d / fname
    if expected is None or "/" in fname or fname.startswith("."):
        raise ModelStoreError(f"{path}: not an artifact of this manifest")
    if not path.exists():
        raise ModelStoreError(f"{path}: missing")
    if sha256_file(path) != expected:
        raise ModelStoreError(f"{path}: sha256 mismatch (truncated or modified)")
    return path


def checked_bytes(d: Path, manifest: dict, fname: str) -> bytes:
    """An artifact's bytes, read once and checked against the manifest's sha256 (what is
    checked is what is used)."""
    path = checked_artifact(d, manifest, fname)  # listed, present
    data = path.read_bytes()
    if sha256_bytes(data) != manifest["artifacts"][fname]:
        raise ModelStoreError(f"{path}: sha256 mismatch (truncated or modified)")
    return data


def engine_section(manifest: dict, engine: str, d: Path | None = None) -> dict:
    """The manifest's record of `engine`; ModelStoreError when the model has none."""
    section = manifest.get("engine")
    if not isinstance(section, dict) or section.get("name") != engine:
        have = section.get("name") if isinstance(section, dict) else None
        where = d / "manifest.json" if d is not None else "the manifest"
        raise ModelStoreError(f"{where}: the model has no {engine!r} engine (it has "
                              f"{repr(have) if have else 'none'}); make one with `python -m service retrofit "
                              f"--name {manifest.get('name')} --engine {engine}`, or serve it with ENGINE=eager")
    return section


def engine_files(store: str | Path, name: str, manifest: dict, engine: str) -> dict[str, bytes]:
    """The engine's network files ({"xml": ..., "bin": ...}), each checked by sha256."""
    d = model_dir(store, name)
    section = engine_section(manifest, engine, d)
    return {kind: checked_bytes(d, manifest, fname) for kind, fname in section["files"].items()
            if kind != "safetensors"}


def load_model(store: str | Path, name: str, keys_of: str = EAGER) -> LoadedModel:
    """Rebuild the saved classifier exactly; any missing, tampered or mismatched artifact is
    refused with a ModelStoreError naming the file. `keys_of`: the engine whose variant of the
    derived state (memory, replay features, novelty, routing thresholds) to read; the network
    stays the eager one (service/core/engine.py puts the engine's in its place)."""
    t0 = time.perf_counter()
    d = model_dir(store, name)
    manifest = read_manifest(d)
    try:
        # models saved before the replay features, the ood_score or its probe existed have none
        config = ClassifierConfig(**{"replay_per_class": 0, "novelty": False, "novelty_probe": False,
                                     **manifest["classifier"]})
        input_spec = InputSpec(**manifest["input"])
        policy = RoutingPolicy.from_dict(manifest["routing"])
    except (TypeError, ValueError) as e:
        raise ModelStoreError(f"{d / 'manifest.json'}: bad classifier, input or routing settings ({e})") from e
    model = EnhancedClassifier(config)
    model.policy = policy
    # each artifact is read straight into the model's own tensors: the start-up peak is the
    # model's size plus a few megabytes, not two or three copies of a large memory
    state = model.state_dict()
    parts = {"weights-": {k: v for k, v in state.items() if not k.startswith("memory.")},
             "memory-": {k[len("memory."):]: v for k, v in state.items() if k.startswith("memory.")}}
    found = set()
    for fname in manifest["artifacts"]:
        stem = next((p for p in parts if fname.startswith(p)), None)
        if not fname.endswith(".safetensors") or stem is None:
            continue
        path = checked_artifact(d, manifest, fname)
        targets = parts[stem]
        try:
            if stem == "memory-" and model.memory is not None:
                # a model saved before an optional memory entry existed keeps its default
                held = set(read_header(path)[0])
                targets = {k: v for k, v in targets.items() if k in held or k not in model.memory.OPTIONAL_STATE}
            read_into(path, targets)
        except TensorFileError as e:
            raise ModelStoreError(f"artifacts do not match the manifest's classifier: {e}") from e
        found.add(stem)
    missing = sorted(k for stem, part in parts.items() if part and stem not in found for k in part)
    if missing:
        raise ModelStoreError(f"{d}: artifacts do not match the manifest's classifier (missing {missing[:3]})")
    if keys_of != EAGER:
        manifest = _read_engine_state(d, manifest, keys_of, model)
    if model.memory is not None:
        model.memory._recount()  # written in place, not through load_state_dict
    model.eval()
    if len(manifest["classes"]) != config.num_classes:
        raise ModelStoreError(f"{d / 'manifest.json'}: {len(manifest['classes'])} class names for "
                              f"{config.num_classes} head classes")
    log.info("model %s read and checked in %.2f s", d, time.perf_counter() - t0)
    return LoadedModel(model, list(manifest["classes"]), input_spec, manifest, keys_of)


def _read_engine_state(d: Path, manifest: dict, engine: str, model: EnhancedClassifier) -> dict:
    """Read the engine's variant of the derived state into `model` and its routing thresholds
    into its policy; returns the manifest as this variant reads it (without the stored IVF
    index, which was built on the eager keys: the replica trains one on these)."""
    section = engine_section(manifest, engine, d)
    fname = section["files"].get("safetensors")
    path = checked_artifact(d, manifest, fname or "")
    state = model.state_dict()
    targets = {k: v for k, v in state.items() if k.startswith(ENGINE_STATE_PREFIXES)}
    try:
        read_into(path, targets)  # every name, dtype and shape checked before a byte is copied
    except TensorFileError as e:
        raise ModelStoreError(f"the engine's state does not match the manifest's classifier: {e}") from e
    try:
        model.policy = model.policy.replace(**section["routing"])
    except (TypeError, ValueError) as e:
        raise ModelStoreError(f"{d / 'manifest.json'}: bad engine routing settings ({e})") from e
    return {k: v for k, v in manifest.items() if k != "index"}
