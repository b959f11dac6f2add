"""CPU inference engines for the network (docs/engine.md).

`eager` is torch as trained (fp32, channels-last). `openvino-int8` is the backbone quantised
to int8 by NNCF's post-training quantization and run by OpenVINO on the CPU's int8 units
(AVX-512 VNNI here; chosen by measurement: bench/perf/cpu_engines.py, BENCHMARKS.md "CPU
inference engines").

Only the backbone changes: `OpenVINOBackbone` is an nn.Module that takes what the backbone
takes (normalised (B, C, H, W) float images) and gives what it gives ((B, D) float32
features), so it replaces `model.backbone` and everything after it (head, memory, routing,
taught rows, novelty, flip TTA's second call) stays in torch, unchanged.

The engine's files are OpenVINO IR (an XML graph and a binary of weights: no pickle), made
by `quantize_backbone` and stored by the model store beside the eager model together with
the engine's own variant of everything derived from memory keys (service/core/retrofit.py
`retrofit_engine` makes it; service/core/store.py stores and checks it). `load_engine_model`
is what serving calls: the stored model with the engine's network and keys in place.

`openvino` is a runtime dependency; `nncf` is needed only to quantise (the `quantize` extra).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .store import EAGER, LoadedModel, engine_files, engine_section, load_model, model_dir, read_manifest

OPENVINO_INT8 = "openvino-int8"
ENGINES = (EAGER, OPENVINO_INT8)
NNCF_PRESET = "PERFORMANCE"  # symmetric int8 activations: what bench/perf/cpu_engines.py measured
CALIBRATION_BATCH = 32
log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine's library is missing or cannot run here; the message says what to do."""


def _openvino():
    try:
        import openvino
    except ImportError as e:  # a dependency of the package: missing only from a partial install
        raise EngineUnavailable(f"the openvino-int8 engine needs the openvino package, which cannot be imported "
                                f"({e}): `pip install openvino`, or serve with ENGINE=eager") from e
    return openvino


def _nncf():
    try:
        import nncf
    except ImportError as e:
        raise EngineUnavailable(f"quantising needs the nncf package, which cannot be imported ({e}): "
                                "`pip install 'memory-classifier-service[quantize]'` (or `pip install nncf`)") from e
    return nncf


def library_versions() -> dict[str, str | None]:
    out = {}
    for mod in ("openvino", "nncf"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def quantize_backbone(backbone: nn.Module, calibration: torch.Tensor) -> dict[str, bytes]:
    """The backbone as an int8 OpenVINO model: converted from the torch module (batch size
    left dynamic), then NNCF post-training quantization calibrated on `calibration`
    (normalised (N, C, H, W) float32 TRAINING images: the caller draws them, never validation
    or test). Returns the IR files' bytes: {".xml": graph, ".bin": weights}."""
    ov, nncf = _openvino(), _nncf()
    if calibration.dim() != 4 or not len(calibration):
        raise ValueError(f"calibration images must be (N, C, H, W) with N >= 1, got {tuple(calibration.shape)}")
    device = next(backbone.parameters()).device
    net = _WithProbe(backbone.eval()) if getattr(backbone, "probe_dim", 0) else backbone.eval()
    x = calibration.float().contiguous()  # NCHW: the layout the engine is given (see OpenVINOBackbone)
    with torch.no_grad(), warnings.catch_warnings(), _quiet("nncf"):
        warnings.simplefilter("ignore")  # the tracer's warnings about the backbone's Python control flow
        fp32 = ov.convert_model(net, example_input=x[:1].to(device), input=[(-1, *x.shape[1:])])
        batches = [b.numpy() for b in x.split(CALIBRATION_BATCH)]
        int8 = nncf.quantize(fp32, nncf.Dataset(batches), preset=getattr(nncf.QuantizationPreset, NNCF_PRESET),
                             subset_size=len(batches))
    with tempfile.TemporaryDirectory(prefix="engine-") as tmp:
        xml = Path(tmp) / "backbone.xml"
        ov.save_model(int8, str(xml), compress_to_fp16=False)  # fp16 storage would round what int8 left in fp32
        return {".xml": xml.read_bytes(), ".bin": xml.with_suffix(".bin").read_bytes()}


class _WithProbe(nn.Module):
    """The backbone exported with two outputs, (features, probe): forward_with_probe."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.forward_with_probe(x)


class _quiet:
    """Lower a library's logger to warnings while it runs (NNCF prints progress bars at INFO)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class OpenVINOBackbone(nn.Module):
    """A drop-in backbone run by OpenVINO: forward((B, C, H, W) normalised float images) ->
    (B, D) float32 features on the input's device. Compiled once, any batch size (dynamic
    batch dimension), `threads` inference threads (default torch's: the process's share of
    the cores, as serving sets it). Each calling thread gets its own infer request (a request
    is not safe to share between threads). No parameters: the weights are in the IR."""

    def __init__(self, xml: bytes, weights: bytes, threads: int | None = None):
        super().__init__()
        ov = _openvino()
        core = ov.Core()
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        self.threads = int(threads or torch.get_num_threads())
        # f32 for what is not int8 (NNCF leaves a few ops in float): what was measured, and the
        # same on every CPU (a bf16 default would depend on the CPU's instructions)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
        outputs = [int(o.get_partial_shape()[1].get_length()) for o in self.compiled.outputs]
        self.num_features = outputs[0]
        self.probe_dim = outputs[1] if len(outputs) > 1 else 0  # engines made before the probe have none
        self._local = threading.local()

    def _infer(self, x: torch.Tensor) -> list[torch.Tensor]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        # NCHW contiguous: `embed` hands a channels-last tensor, whose numpy view OpenVINO would copy anyway
        images = x.detach().to("cpu", torch.float32).contiguous(memory_format=torch.contiguous_format).numpy()
        results = request.infer({0: images})  # views of the request's output buffers: copied out
        return [torch.from_numpy(np.array(results[i], dtype=np.float32, copy=True)).to(x.device)
                for i in range(len(self.compiled.outputs))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._infer(x)[0]  # (B, D)

    def forward_with_probe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, probes = self._infer(x)
        return features, probes  # (B, D), (B, P)

    def extra_repr(self) -> str:
        return f"openvino int8, {self.threads} threads, {self.num_features} features, probe {self.probe_dim}"


def resolve_engine(requested: str, manifest: dict, device: str | torch.device = "cpu") -> str:
    """The engine to serve with: `requested` (auto = the manifest's engine, eager without one).
    The engines run on the CPU: auto on another device is eager; an explicit engine there is
    refused. An explicit engine the model lacks is refused (ModelStoreError naming the fix)."""
    if requested not in ("auto", *ENGINES):
        raise ValueError(f"ENGINE must be auto or one of {ENGINES}, got {requested!r}")
    on_cpu = torch.device(device).type == "cpu"
    if requested == "auto":
        named = (manifest.get("engine") or {}).get("name", EAGER)
        if named != EAGER and not on_cpu:
            log.info("ENGINE=auto on %s: eager (the %s engine runs on the CPU)", device, named)
            return EAGER
        return named
    if requested != EAGER:
        if not on_cpu:
            raise ValueError(f"ENGINE={requested} runs on the CPU, not on {device}: set DEVICE=cpu or ENGINE=eager")
        engine_section(manifest, requested)
    return requested


def load_engine_model(store: str | Path, name: str, engine: str = "auto",
                      device: str | torch.device = "cpu") -> LoadedModel:
    """The stored model as served with `engine` (see resolve_engine): eager is `load_model`;
    another engine is the model with that engine's keys and thresholds (load_model's keys_of)
    and its network in place of the backbone, its files checked by sha256 first.
    EngineUnavailable when the engine's library is missing (the message names ENGINE=eager)."""
    manifest = read_manifest(model_dir(store, name))
    chosen = resolve_engine(engine, manifest, device)
    if chosen == EAGER:
        return load_model(store, name)
    try:
        _openvino()
    except EngineUnavailable as e:
        raise EngineUnavailable(f"model {name!r} is served with the {chosen} engine "
                                f"({'its manifest names it' if engine == 'auto' else 'ENGINE=' + engine}), but {e}"
                                ) from e
    files = engine_files(store, name, manifest, chosen)
    loaded = load_model(store, name, keys_of=chosen)
    if loaded.model.exit_proj is not None:
        raise ValueError(f"model {name!r}: an engine runs the whole backbone, and this model's memory reads an inner "
                         "stage (exit_stage); serve it with ENGINE=eager")
    loaded.model.backbone = OpenVINOBackbone(files["xml"], files["bin"])
    return loaded
