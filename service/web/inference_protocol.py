"""The Open Inference Protocol (KServe v2 predict protocol), REST: health, server and model
metadata, and `infer`, with Triton's binary tensor data extension (what tritonclient[http]
sends by default).

One model is served, under its store name. `infer` takes exactly one input:

- `image` (BYTES, shape [B] or [B, 1]): encoded image files (PNG, JPEG, ...). In JSON each
  element is a base64 string (JSON strings cannot carry raw bytes); as binary data each is a
  4-byte little-endian length and the file's bytes.
- `pixels` (UINT8 0..255, or FP32 0..1; shape [B, C, H, W], or [B, H, W] for one-channel
  models): raw pixels of the model's size, normalised here with the model's mean/std.

Outputs: `label` (BYTES), `label_index` (INT64), `confidence` (FP32), `path` (BYTES:
memory/network), `class_scores` (FP32 [B, known classes]). The same limits, batching and
metrics as /predict: images decode through `decode_batch`, batches go through
`state.predict` and are counted by `predict_response`. Errors have the protocol's form
`{"error": message}`.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import time
import zlib
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ..core.preprocess import ImageError, ImageTooLarge, UnsupportedImageFormat
from ..core.store import InputSpec
from ..serving.runtime import ModelRuntime
from .errors import ApiError, BodyTimeout, BodyTooLarge
from .requests import decode_batch
from .routers import app_state, predict_response
from .settings import ServiceConfig
from .state import AppState

SERVER_NAME = "memory-classifier-service"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "pytorch_safetensors"  # the spec's "<project>_<format>": weights are safetensors, not TorchScript
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("label", "label_index", "confidence", "path", "class_scores")


# --- protocol models -------------------------------------------------------------------------
Parameters = dict[str, str | int | float | bool]


class ProtocolErrorBody(BaseModel):
    error: str = Field(description="what is wrong")


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor] = Field(description="send exactly one of them")
    outputs: list[MetadataTensor]


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when sent as binary data")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


# --- errors in the protocol's form -----------------------------------------------------------
class ProtocolError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status, self.message, self.headers = status, message, headers


def protocol_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(errors: list[dict], limit: int = 5) -> str:
    parts = []
    for e in errors[:limit]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) + (f" (and {len(errors) - limit} more)" if len(errors) > limit else "")


class ProtocolRoute(APIRoute):
    """The app's handlers answer `{"error": code, "detail": ...}`; the protocol wants
    `{"error": message}`, so this router's routes translate the same failures themselves."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ProtocolError as e:
                return protocol_error(e.status, e.message, e.headers)
            except ImageError as e:  # ImageTooLarge and UnsupportedImageFormat are ImageErrors
                status = 413 if isinstance(e, ImageTooLarge) else 415 if isinstance(e, UnsupportedImageFormat) else 400
                return protocol_error(status, e.message)
            except BodyTooLarge:
                return protocol_error(413, "request body exceeds the upload limit (MAX_UPLOAD_BYTES)")
            except BodyTimeout:
                return protocol_error(408, "the request body arrived too slowly", {"Connection": "close"})
            except RequestValidationError as e:
                return protocol_error(400, _validation_message(list(e.errors())))
            except ApiError as e:
                return protocol_error(e.status, str(e.detail), e.headers)
        return handle


ERRORS = {s: {"model": ProtocolErrorBody} for s in (400, 404, 408, 413, 415, 503)}
HEALTH = {200: {"description": "true (empty body)"}, 400: {"description": "false (empty body)"}}
router = APIRouter(route_class=ProtocolRoute, tags=["Open Inference Protocol v2"])


# --- the served model --------------------------------------------------------------------------
def served_model(state: AppState, name: str, version: str | None = None) -> ModelRuntime:
    rt = state.runtime
    if rt is None:
        raise ProtocolError(503, "the model is not loaded yet")
    if name != rt.loaded.name:
        raise ProtocolError(404, f"unknown model {name!r}; this server serves {rt.loaded.name!r}")
    if version is not None and version != rt.loaded.version:
        raise ProtocolError(404, f"model {name!r} has no version {version!r}; it serves version {rt.loaded.version!r}")
    return rt


def model_metadata(rt: ModelRuntime) -> ModelMetadata:
    spec = rt.loaded.input
    size = spec.image_size
    return ModelMetadata(
        name=rt.loaded.name, versions=[rt.loaded.version], platform=PLATFORM,
        inputs=[MetadataTensor(name="image", datatype="BYTES", shape=[-1]),
                MetadataTensor(name="pixels", datatype="UINT8", shape=[-1, spec.in_chans, size, size])],
        outputs=[MetadataTensor(name="label", datatype="BYTES", shape=[-1]),
                 MetadataTensor(name="label_index", datatype="INT64", shape=[-1]),
                 MetadataTensor(name="confidence", datatype="FP32", shape=[-1]),
                 MetadataTensor(name="path", datatype="BYTES", shape=[-1]),
                 MetadataTensor(name="class_scores", datatype="FP32", shape=[-1, len(rt.classes)])])


# --- endpoints ---------------------------------------------------------------------------------
@router.get("/v2", response_model=ServerMetadata, responses=ERRORS)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_class=Response, responses=HEALTH)
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", response_class=Response, responses=HEALTH)
async def server_ready(state: AppState = Depends(app_state)) -> Response:
    return Response(status_code=200 if state.ready else 400)


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=ERRORS)
async def get_model_metadata(model_name: str, state: AppState = Depends(app_state)) -> ModelMetadata:
    return model_metadata(served_model(state, model_name))


@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, responses=ERRORS)
async def get_model_version_metadata(model_name: str, model_version: str,
                                     state: AppState = Depends(app_state)) -> ModelMetadata:
    return model_metadata(served_model(state, model_name, model_version))


@router.get("/v2/models/{model_name}/ready", response_class=Response, responses=HEALTH | {404: ERRORS[404]})
async def model_ready(model_name: str, state: AppState = Depends(app_state)) -> Response:
    served_model(state, model_name)
    return Response(status_code=200 if state.ready else 400)


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_class=Response,
            responses=HEALTH | {404: ERRORS[404]})
async def model_version_ready(model_name: str, model_version: str, state: AppState = Depends(app_state)) -> Response:
    served_model(state, model_name, model_version)
    return Response(status_code=200 if state.ready else 400)


def _inlined_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its $defs written in place: `#/$defs/...` references mean
    nothing inside the OpenAPI document (ReDoc refuses them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node
    return inline(schema)


# the body is read raw (JSON, or JSON then binary data), so its schema is declared here
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined_schema(InferenceRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "binary tensor data extension: the JSON request (its length in the "
                                            "Inference-Header-Content-Length header), then each binary input"}}}}}
INFER_RESPONSES = ERRORS | {200: {"model": InferenceResponse, "content": {"application/octet-stream": {}}}}


@router.post("/v2/models/{model_name}/infer", response_class=Response, responses=INFER_RESPONSES,
             openapi_extra=INFER_BODY)
async def infer(model_name: str, request: Request, state: AppState = Depends(app_state)) -> Response:
    return await run_inference(request, state, served_model(state, model_name))


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", response_class=Response,
             responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def infer_version(model_name: str, model_version: str, request: Request,
                        state: AppState = Depends(app_state)) -> Response:
    return await run_inference(request, state, served_model(state, model_name, model_version))


# --- infer ---------------------------------------------------------------------------------------
async def run_inference(request: Request, state: AppState, rt: ModelRuntime) -> Response:
    t0 = time.perf_counter()
    if not state.ready:
        raise ProtocolError(503, "the model is not loaded yet")
    body = await request.body()  # the middleware has already bounded its size
    cfg = state.config
    body = _inflate(body, request.headers.get("content-encoding"), cfg.max_upload_bytes)
    # JSON parsing and tensor conversion of a large request would stall the event loop
    req, kind, payload, decode_s = await run_in_threadpool(
        parse_inference_request, body, request.headers.get(HEADER_LENGTH), rt.loaded.input, cfg)
    if kind == "image":
        batch, decode_s = await decode_batch(payload, rt.loaded.input, cfg, state.decode_pool)
    else:
        batch = payload
    served, batch_size = await state.predict(batch)
    answer = predict_response(rt, served, decode_s, time.perf_counter() - t0, state, batch_size)
    items = answer.predictions
    scores = served.prediction.class_scores[:, :len(rt.classes)].float().numpy()  # (B, known)
    tensors = {
        "label": ("BYTES", [len(items)], [p.label for p in items]),
        "label_index": ("INT64", [len(items)], np.array([p.label_index for p in items], dtype=np.int64)),
        "confidence": ("FP32", [len(items)], np.array([p.confidence for p in items], dtype=np.float32)),
        "path": ("BYTES", [len(items)], [p.path for p in items]),
        "class_scores": ("FP32", list(scores.shape), scores.astype(np.float32)),
    }
    return encode_response(req, tensors, rt)


def _inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """tritonclient can gzip or deflate its request; inflate at most `limit` bytes, so a small
    compressed body cannot expand past the upload limit (a compression bomb)."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise ProtocolError(415, f"content encoding {encoding!r} not accepted; send gzip, deflate or none")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"the {encoding} body could not be inflated: {e}")
    if len(out) > limit:
        raise ProtocolError(413, f"the inflated request body exceeds the upload limit of {limit} bytes")
    return out


def parse_inference_request(body: bytes, header_length: str | None, spec: InputSpec, cfg: ServiceConfig):
    """(request, "image", [file bytes], []) or (request, "pixels", (B, C, H, W) normalised
    batch, seconds per image)."""
    t0 = time.perf_counter()
    if not body:
        raise ProtocolError(400, "the request body is empty; send an inference request (JSON)")
    binary = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} must be the length of the JSON part (1..{len(body)}), "
                                     f"not {header_length!r}")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        req = InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        raise ProtocolError(400, "invalid inference request: " + _validation_message(e.errors(include_url=False)))
    _check_parameters(req)
    chunks = _binary_chunks(req.inputs, binary)
    if len(req.inputs) != 1:
        raise ProtocolError(400, f"send exactly one input ('image' or 'pixels'), not {len(req.inputs)}")
    inp, chunk = req.inputs[0], chunks[0]
    if inp.name == "image":
        return req, "image", _image_files(inp, chunk, cfg), []
    if inp.name == "pixels":
        batch = _pixel_batch(inp, chunk, spec, cfg)
        return req, "pixels", batch, [(time.perf_counter() - t0) / len(batch)] * len(batch)
    raise ProtocolError(400, f"unknown input {inp.name!r}; this model takes 'image' (BYTES: encoded image files) "
                             f"or 'pixels' (UINT8 or FP32: [B, C, H, W] pixels)")


def _check_parameters(req: InferenceRequest) -> None:
    # extensions that would change where data comes from or what is returned, which this
    # server lacks: refused by name rather than silently ignored
    for inp in req.inputs:
        for key in (inp.parameters or {}):
            if key.startswith("shared_memory"):
                raise ProtocolError(400, f"input {inp.name!r}: the shared-memory extension is not supported")
    for out in req.outputs or []:
        if out.name not in OUTPUTS:
            raise ProtocolError(400, f"unknown output {out.name!r}; outputs are {', '.join(OUTPUTS)}")
        for key in (out.parameters or {}):
            if key == "classification" or key.startswith("shared_memory"):
                raise ProtocolError(400, f"output {out.name!r}: parameter {key!r} (an extension this server "
                                         f"does not support)")


def _binary_chunks(inputs: list[RequestInput], binary: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data after the JSON, in input order."""
    chunks, offset = [], 0
    for inp in inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            chunks.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(400, f"input {inp.name!r}: binary_data_size must be a byte count, not {size!r}")
        if inp.data is not None:
            raise ProtocolError(400, f"input {inp.name!r}: give either data or binary_data_size, not both")
        if offset + size > len(binary):
            raise ProtocolError(400, f"input {inp.name!r}: binary_data_size {size} runs past the {len(binary)} "
                                     f"bytes of binary data (is {HEADER_LENGTH} set?)")
        chunks.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data after the JSON belong to no input")
    return chunks


def _batch_size(inp: RequestInput, cfg: ServiceConfig) -> int:
    b = inp.shape[0] if inp.shape else 0
    if b < 1:
        raise ProtocolError(400, f"input {inp.name!r}: the batch (first dimension of the shape) is empty")
    if b > cfg.max_files:
        raise ProtocolError(413, f"input {inp.name!r}: at most {cfg.max_files} images per request, not {b}")
    return b


def _image_files(inp: RequestInput, chunk: bytes | None, cfg: ServiceConfig) -> list[bytes]:
    if inp.datatype != "BYTES":
        raise ProtocolError(400, f"input 'image' must be BYTES (encoded image files), not {inp.datatype}")
    if len(inp.shape) not in (1, 2) or (len(inp.shape) == 2 and inp.shape[1] != 1):
        raise ProtocolError(400, f"input 'image' must have shape [B] or [B, 1], not {inp.shape}")
    b = _batch_size(inp, cfg)
    if chunk is not None:
        files = _deserialize_bytes(chunk)
    elif inp.data is not None:
        flat = _flatten(inp.data)
        if not all(isinstance(s, str) for s in flat):
            raise ProtocolError(400, "input 'image': in JSON each element must be a base64 string of an image file")
        files = []
        for i, s in enumerate(flat):
            try:
                files.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError) as e:
                raise ProtocolError(400, f"input 'image': element {i} is not valid base64 ({e})")
    else:
        raise ProtocolError(400, "input 'image' has neither data nor binary_data_size")
    if len(files) != b:
        raise ProtocolError(400, f"input 'image': shape {inp.shape} holds {b} images, the data {len(files)}")
    return files


def _deserialize_bytes(chunk: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise ProtocolError(400, "input 'image': binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", chunk, i)
        if i + 4 + n > len(chunk):
            raise ProtocolError(400, f"input 'image': element {len(out)} declares {n} bytes, fewer remain")
        out.append(chunk[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _flatten(data: list) -> list:
    out, stack = [], [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _pixel_batch(inp: RequestInput, chunk: bytes | None, spec: InputSpec, cfg: ServiceConfig) -> torch.Tensor:
    c, size = spec.in_chans, spec.image_size
    expected = f"[B, {c}, {size}, {size}]" + (f" or [B, {size}, {size}]" if c == 1 else "")
    if inp.datatype not in ("UINT8", "FP32"):
        raise ProtocolError(400, f"input 'pixels' must be UINT8 (0..255) or FP32 (0..1), not {inp.datatype}")
    shape = list(inp.shape)
    if len(shape) == 3 and c == 1:
        shape = [shape[0], 1, shape[1], shape[2]]
    if len(shape) != 4 or shape[1:] != [c, size, size]:
        raise ProtocolError(400, f"input 'pixels' must have shape {expected} for this model, not {inp.shape}")
    b = _batch_size(inp, cfg)
    count = math.prod(shape)
    if chunk is not None:
        width = 1 if inp.datatype == "UINT8" else 4
        if len(chunk) != count * width:
            raise ProtocolError(400, f"input 'pixels': shape {inp.shape} of {inp.datatype} needs {count * width} "
                                     f"bytes of binary data, got {len(chunk)}")
        arr = np.frombuffer(chunk, dtype=np.uint8 if width == 1 else "<f4")
    elif inp.data is not None:
        flat = _flatten(inp.data)
        if len(flat) != count:
            raise ProtocolError(400, f"input 'pixels': shape {inp.shape} holds {count} values, the data {len(flat)}")
        integral = inp.datatype == "UINT8"
        if not all(type(v) is int or (not integral and type(v) is float) for v in flat):
            raise ProtocolError(400, f"input 'pixels': {inp.datatype} data must be "
                                     + ("integers" if integral else "numbers"))
        arr = np.array(flat, dtype=np.int64 if integral else np.float64)
    else:
        raise ProtocolError(400, "input 'pixels' has neither data nor binary_data_size")
    if inp.datatype == "UINT8":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ProtocolError(400, "input 'pixels': UINT8 values must be 0..255")
        x = arr.astype(np.float32) / 255.0  # as decode_image scales 8-bit pixels
    else:
        x = arr.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ProtocolError(400, "input 'pixels': FP32 values must be finite pixels in 0..1")
    t = torch.from_numpy(x.reshape(b, c, size, size).copy())
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - mean) / std


def encode_response(req: InferenceRequest, tensors: dict[str, tuple[str, list[int], Any]],
                    rt: ModelRuntime) -> Response:
    """JSON, or JSON then binary data for the outputs asked as binary (the extension)."""
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
            data = values if datatype == "BYTES" else values.reshape(-1).tolist()
            outputs.append(ResponseOutput(name=out.name, shape=shape, datatype=datatype, data=data))
    header = InferenceResponse(model_name=rt.loaded.name, model_version=rt.loaded.version, id=req.id,
                               outputs=outputs).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})

