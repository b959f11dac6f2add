"""The Open Inference Protocol's codec, with no web framework: an `infer` request body (JSON,
or JSON then binary data: Triton's binary tensor data extension, what tritonclient[http]
sends by default; gzip or deflate) -> its one input checked against the model's input spec,
and the model's outputs -> the response body (JSON, or JSON then binary data). The router
(inference_protocol.py) decodes images and predicts through the same seams as /predict; the
protocol's messages and refusals are in oip_schema.py, the bounded body in oip_body.py.

`infer` takes exactly one input:

- `image` (BYTES, shape [B] or [B, 1]): encoded image files (PNG, JPEG, ...). In JSON each
  element is a base64 string (JSON strings cannot carry raw bytes); as binary data each is a
  4-byte little-endian length and the file's bytes.
- `pixels` (UINT8 0..255, or FP32 0..1; shape [B, C, H, W], or [B, H, W] for one-channel
  models): raw pixels of the model's size, normalised here with the model's mean/std.

Outputs: `label` (BYTES), `label_index` (INT64), `confidence` (FP32), `path` (BYTES:
memory/network/abstain), `ood_score` (FP32: how unlike everything known; NaN, null in JSON,
for a model without the score), `abstained` (BOOL: "none of these", `label` is then the best
guess), `class_scores` (FP32 [B, known classes]).

No token is needed, so a request's cost is bounded before the work it bounds: the body
inflates and its JSON is scanned within bounds (oip_body.py) before it is parsed, the
declared shape is checked before the data is flattened, and no more elements are read than
the shape declares. Strings the client sent are echoed cut short. Every refusal is an
InvalidInferenceRequest (oip_schema.py: 400, or 413 for InferenceRequestTooLarge, 415 for
UnsupportedContentEncoding).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from pydantic import ValidationError

from ..core.model import Prediction
from ..core.store import InputSpec
from .oip_body import Limits, split_request
from .oip_schema import (HEADER_LENGTH, OUTPUTS, PLATFORM, InferenceRequest, InferenceRequestTooLarge,
                         InferenceResponse, InvalidInferenceRequest, MetadataTensor, ModelMetadata, RequestInput,
                         RequestOutput, ResponseOutput, validation_message)


@dataclass
class ParsedRequest:
    request: InferenceRequest
    files: list[bytes] | None = None  # the `image` input: encoded image files, to decode
    pixels: torch.Tensor | None = None  # the `pixels` input: the (B, C, H, W) normalised batch
    parse_s: float = 0.0  # seconds spent reading `pixels` (its decoding, for the metrics)


class Tensor(NamedTuple):
    datatype: str
    shape: list[int]
    values: Any  # a list of str for BYTES, else a numpy array


class Encoded(NamedTuple):
    body: bytes
    media_type: str
    headers: dict[str, str]


# --- the request ----------------------------------------------------------------------------------
def parse_request(body: bytes | bytearray, encoding: str | None, header_length: str | None, spec: InputSpec,
                  limits: Limits) -> ParsedRequest:
    """The request, its one input checked against the model's input `spec` and `limits`:
    the image files of `image`, or the normalised batch of `pixels`."""
    t0 = time.perf_counter()
    body, binary = split_request(body, encoding, header_length, spec, limits)
    if not body:
        raise InvalidInferenceRequest("the request body is empty; send an inference request (JSON)")
    try:
        req = InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)  # the input can be as large as the body
        raise InvalidInferenceRequest("invalid inference request: " + validation_message(errors))
    _check_parameters(req)
    chunks = _binary_chunks(req.inputs, binary)
    if len(req.inputs) != 1:
        raise InvalidInferenceRequest(f"send exactly one input ('image' or 'pixels'), not {len(req.inputs)}")
    inp, chunk = req.inputs[0], chunks[0]
    if inp.name == "image":
        return ParsedRequest(req, files=_image_files(inp, chunk, limits))
    if inp.name == "pixels":
        batch = _pixel_batch(inp, chunk, spec, limits)
        return ParsedRequest(req, pixels=batch, parse_s=time.perf_counter() - t0)
    raise InvalidInferenceRequest(f"unknown input {inp.name!r:.64}; this model takes 'image' (BYTES: encoded image "
                                  f"files) or 'pixels' (UINT8 or FP32: [B, C, H, W] pixels)")


def _check_parameters(req: InferenceRequest) -> None:
    # extensions that would change where data comes from or what is returned, which this
    # server lacks: refused by name rather than silently ignored
    for inp in req.inputs:
        for key in (inp.parameters or {}):
            if key.startswith("shared_memory"):
                raise InvalidInferenceRequest(f"input {inp.name!r:.64}: the shared-memory extension is not supported")
    for out in req.outputs or []:
        if out.name not in OUTPUTS:
            raise InvalidInferenceRequest(f"unknown output {out.name!r:.64}; outputs are {', '.join(OUTPUTS)}")
        for key in (out.parameters or {}):
            if key == "classification" or key.startswith("shared_memory"):
                raise InvalidInferenceRequest(f"output {out.name!r:.64}: parameter {key!r:.64} (an extension this "
                                              f"server does not support)")


def _binary_chunks(inputs: list[RequestInput], binary: memoryview) -> list[memoryview | None]:
    """Each input's slice of the binary data after the JSON, in input order (views, not copies)."""
    chunks, offset = [], 0
    for inp in inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            chunks.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInferenceRequest(f"input {inp.name!r:.64}: binary_data_size must be a byte count, not "
                                          f"{size!r:.64}")
        if inp.data is not None:
            raise InvalidInferenceRequest(f"input {inp.name!r:.64}: give either data or binary_data_size, not both")
        if offset + size > len(binary):
            raise InvalidInferenceRequest(f"input {inp.name!r:.64}: binary_data_size {size} runs past the "
                                          f"{len(binary)} bytes of binary data (is {HEADER_LENGTH} set?)")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidInferenceRequest(f"{len(binary) - offset} bytes of binary data after the JSON belong to no input")
    return chunks


def _batch_size(inp: RequestInput, limits: Limits) -> int:
    b = inp.shape[0] if inp.shape else 0
    if b < 1:
        raise InvalidInferenceRequest(f"input {inp.name!r:.64}: the batch (first dimension of the shape) is empty")
    if b > limits.max_files:
        raise InferenceRequestTooLarge(f"input {inp.name!r:.64}: at most {limits.max_files} images per request, "
                                       f"not {b}")
    return b


def _image_files(inp: RequestInput, chunk: memoryview | None, limits: Limits) -> list[bytes]:
    if inp.datatype != "BYTES":
        raise InvalidInferenceRequest(f"input 'image' must be BYTES (encoded image files), not {inp.datatype:.64}")
    if len(inp.shape) not in (1, 2) or (len(inp.shape) == 2 and inp.shape[1] != 1):
        raise InvalidInferenceRequest(f"input 'image' must have shape [B] or [B, 1], not {_shape(inp)}")
    b = _batch_size(inp, limits)
    if chunk is not None:
        files = _deserialize_bytes(chunk, b)
    elif inp.data is not None:
        flat = _flatten(inp.data, b)
        if len(flat) != b:
            raise InvalidInferenceRequest(f"input 'image': shape {_shape(inp)} holds {b} images, the data "
                                          f"{_count(flat, b)}")
        if not all(isinstance(s, str) for s in flat):
            raise InvalidInferenceRequest("input 'image': in JSON each element must be a base64 string of an image "
                                          "file")
        files = []
        for i, s in enumerate(flat):
            try:
                files.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError) as e:
                raise InvalidInferenceRequest(f"input 'image': element {i} is not valid base64 ({e})")
    else:
        raise InvalidInferenceRequest("input 'image' has neither data nor binary_data_size")
    if len(files) != b:
        raise InvalidInferenceRequest(f"input 'image': shape {_shape(inp)} holds {b} images, the data "
                                      f"{_count(files, b)}")
    return files


def _deserialize_bytes(chunk: memoryview, count: int) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then its
    bytes. At most `count` + 1 elements are read (the shape's count, and one to show there
    are more): a chunk of a million zero-length elements costs no more than the shape allows."""
    out, i = [], 0
    while i < len(chunk) and len(out) <= count:
        if i + 4 > len(chunk):
            raise InvalidInferenceRequest("input 'image': binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", chunk, i)
        if i + 4 + n > len(chunk):
            raise InvalidInferenceRequest(f"input 'image': element {len(out)} declares {n} bytes, fewer remain")
        out.append(bytes(chunk[i + 4:i + 4 + n]))
        i += 4 + n
    return out


def _flatten(data: list, count: int) -> list:
    """The leaves of nested lists in order, at most `count` + 1 of them (the shape's count, and
    one to show there are more)."""
    out, stack = [], [iter(data)]
    while stack and len(out) <= count:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
            if len(out) > count:
                break
        else:
            stack.pop()
    return out


def _shape(inp: RequestInput) -> str:
    """The input's shape for a message: as sent when short, else its batch and length (as every
    string the client sent is cut to 64 characters: an answer stays small)."""
    return str(inp.shape) if len(inp.shape) <= 8 else f"[{inp.shape[0]}, ... ({len(inp.shape)} dimensions)]"


def _count(items: list, count: int) -> str:
    return str(len(items)) if len(items) <= count else f"more than {count}"


def _pixel_batch(inp: RequestInput, chunk: memoryview | None, spec: InputSpec, limits: Limits) -> torch.Tensor:
    c, size = spec.in_chans, spec.image_size
    expected = f"[B, {c}, {size}, {size}]" + (f" or [B, {size}, {size}]" if c == 1 else "")
    if inp.datatype not in ("UINT8", "FP32"):
        raise InvalidInferenceRequest(f"input 'pixels' must be UINT8 (0..255) or FP32 (0..1), not {inp.datatype:.64}")
    shape = list(inp.shape)
    if len(shape) == 3 and c == 1:
        shape = [shape[0], 1, shape[1], shape[2]]
    if len(shape) != 4 or shape[1:] != [c, size, size]:
        raise InvalidInferenceRequest(f"input 'pixels' must have shape {expected} for this model, not {_shape(inp)}")
    b = _batch_size(inp, limits)
    count = math.prod(shape)
    if chunk is not None:
        width = 1 if inp.datatype == "UINT8" else 4
        if len(chunk) != count * width:
            raise InvalidInferenceRequest(f"input 'pixels': shape {_shape(inp)} of {inp.datatype} needs "
                                          f"{count * width} bytes of binary data, got {len(chunk)}")
        arr = np.frombuffer(chunk, dtype=np.uint8 if width == 1 else "<f4")
    elif inp.data is not None:
        flat = _flatten(inp.data, count)
        if len(flat) != count:
            raise InvalidInferenceRequest(f"input 'pixels': shape {_shape(inp)} holds {count} values, the data "
                                          f"{_count(flat, count)}")
        integral = inp.datatype == "UINT8"
        if not all(type(v) is int or (not integral and type(v) is float) for v in flat):
            raise InvalidInferenceRequest(f"input 'pixels': {inp.datatype} data must be "
                                          + ("integers" if integral else "numbers"))
        try:
            arr = np.array(flat, dtype=np.int64 if integral else np.float64)
        except OverflowError:  # an integer past int64 (JsonBounds lets 20 digits through)
            raise InvalidInferenceRequest("input 'pixels': " + ("UINT8 values must be 0..255" if integral else
                                                                "FP32 values must be finite pixels in 0..1"))
    else:
        raise InvalidInferenceRequest("input 'pixels' has neither data nor binary_data_size")
    if inp.datatype == "UINT8":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise InvalidInferenceRequest("input 'pixels': UINT8 values must be 0..255")
        x = arr.astype(np.float32) / 255.0  # as decode_image scales 8-bit pixels
    else:
        x = arr.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InvalidInferenceRequest("input 'pixels': FP32 values must be finite pixels in 0..1")
    t = torch.from_numpy(x.reshape(b, c, size, size).copy())
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - mean) / std


# --- the answer ----------------------------------------------------------------------------------
def model_metadata(name: str, version: str, spec: InputSpec, known_classes: int) -> ModelMetadata:
    size = spec.image_size
    return ModelMetadata(
        name=name, versions=[version], platform=PLATFORM,
        inputs=[MetadataTensor(name="image", datatype="BYTES", shape=[-1]),
                MetadataTensor(name="pixels", datatype="UINT8", shape=[-1, spec.in_chans, size, size])],
        outputs=[MetadataTensor(name="label", datatype="BYTES", shape=[-1]),
                 MetadataTensor(name="label_index", datatype="INT64", shape=[-1]),
                 MetadataTensor(name="confidence", datatype="FP32", shape=[-1]),
                 MetadataTensor(name="path", datatype="BYTES", shape=[-1]),
                 MetadataTensor(name="ood_score", datatype="FP32", shape=[-1]),
                 MetadataTensor(name="abstained", datatype="BOOL", shape=[-1]),
                 MetadataTensor(name="class_scores", datatype="FP32", shape=[-1, known_classes])])


def prediction_tensors(p: Prediction, class_name: Callable[[int], str], known_classes: int) -> dict[str, Tensor]:
    """The outputs, read from the prediction's tensors: class_scores over the known classes."""
    index = p.labels.numpy().astype(np.int64)
    scores = p.class_scores[:, :known_classes].float().numpy()  # (B, known)
    b = len(index)
    return {
        "label": Tensor("BYTES", [b], [class_name(int(i)) for i in index]),
        "label_index": Tensor("INT64", [b], index),
        "confidence": Tensor("FP32", [b], p.confidence.float().numpy()),
        "path": Tensor("BYTES", [b], p.paths),
        "ood_score": Tensor("FP32", [b], p.ood_score.float().numpy()),
        "abstained": Tensor("BOOL", [b], p.abstained.numpy().astype(np.bool_)),
        "class_scores": Tensor("FP32", list(scores.shape), scores),
    }


def encode_response(req: InferenceRequest, tensors: dict[str, Tensor], model_name: str,
                    model_version: str) -> Encoded:
    """The outputs `req` asks for (all by default) as JSON, or as JSON then binary data for
    the outputs asked as binary (the extension)."""
    wanted = req.outputs if req.outputs is not None else [RequestOutput(name=n) for n in OUTPUTS]
    all_binary = bool((req.parameters or {}).get("binary_data_output", False))
    outputs, blobs = [], []
    for out in wanted:
        datatype, shape, values = tensors[out.name]
        binary = bool((out.parameters or {}).get("binary_data", all_binary))
        if binary:
            blob = (b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
                    if datatype == "BYTES" else values.astype(values.dtype.newbyteorder("<")).tobytes())
            blobs.append(blob)
            outputs.append(ResponseOutput(name=out.name, shape=shape, datatype=datatype,
                                          parameters={"binary_data_size": len(blob)}))
        else:
            data = list(values) if datatype == "BYTES" else values.reshape(-1).tolist()
            outputs.append(ResponseOutput(name=out.name, shape=shape, datatype=datatype, data=data))
    header = InferenceResponse(model_name=model_name, model_version=model_version, id=req.id,
                               outputs=outputs).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Encoded(header, "application/json", {})
    return Encoded(header + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(header))})
