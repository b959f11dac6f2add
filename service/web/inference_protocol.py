"""The Open Inference Protocol (KServe v2 predict protocol), REST: health, server and model
metadata, and `infer`, with Triton's binary tensor data extension (what tritonclient[http]
sends by default). One model is served, under its store name.

The endpoints only: the protocol's messages and refusals are in oip_schema.py, the bounded
body in oip_body.py, the codec (body -> the model's input, outputs -> the answer) in
oip_codec.py. `infer` goes through the same seams as /predict: images decode through
`decode_batch`, batches go through `state.predict`, each image counts in the metrics
(`observe_prediction`), and the outputs are read from the prediction's tensors. Errors have
the protocol's form `{"error": message}`, at the status errors.py's one table gives (its OIP
column).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ..serving.runtime import ModelRuntime
from . import oip_codec
from .dependencies import app_state, observe_prediction
from .errors import ApiError, protocol_error_response
from .oip_body import Limits
from .oip_schema import (EXTENSIONS, HEADER_LENGTH, SERVER_NAME, InferenceRequest, InferenceResponse, ModelMetadata,
                         ProtocolErrorBody, ServerMetadata)
from .requests import decode_batch
from .state import AppState


class ProtocolRoute(APIRoute):
    """The app's handlers answer in the REST API's form; this router's routes answer the same
    errors in the protocol's (errors.protocol_error_response)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                response = protocol_error_response(e)
                if response is None:
                    raise
                return response
        return handle


ERRORS = {s: {"model": ProtocolErrorBody} for s in (400, 404, 408, 413, 415, 503)}
HEALTH = {200: {"description": "true (empty body)"}, 400: {"description": "false (empty body)"}}
router = APIRouter(route_class=ProtocolRoute, tags=["Open Inference Protocol v2"])


def served_model(state: AppState, name: str, version: str | None = None) -> ModelRuntime:
    rt = state.runtime
    if rt is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    if name != rt.loaded.name:
        raise ApiError(404, "unknown_model", f"unknown model {name!r}; this server serves {rt.loaded.name!r}")
    if version is not None and version != rt.loaded.version:
        raise ApiError(404, "unknown_version", f"model {name!r} has no version {version!r}; it serves version "
                                               f"{rt.loaded.version!r}")
    return rt


def model_metadata(rt: ModelRuntime) -> ModelMetadata:
    metadata = oip_codec.model_metadata(rt.loaded.name, rt.loaded.version, rt.loaded.input, len(rt.classes))
    metadata.engine = rt.engine
    return metadata


def readiness(state: AppState) -> Response:
    return Response(status_code=200 if state.not_ready_reason() is None else 400)


# --- endpoints ---------------------------------------------------------------------------------
@router.get("/v2", response_model=ServerMetadata, responses=ERRORS)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_class=Response, responses=HEALTH)
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", response_class=Response, responses=HEALTH)
async def server_ready(state: AppState = Depends(app_state)) -> Response:
    return readiness(state)


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
    return readiness(state)


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_class=Response,
            responses=HEALTH | {404: ERRORS[404]})
async def model_version_ready(model_name: str, model_version: str, state: AppState = Depends(app_state)) -> Response:
    served_model(state, model_name, model_version)
    return readiness(state)


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


async def run_inference(request: Request, state: AppState, rt: ModelRuntime) -> Response:
    if not state.ready:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    cfg, spec = state.config, rt.loaded.input
    body = bytearray()  # grown in place: a large body is held once, not as chunks and then joined
    async for chunk in request.stream():  # the middleware bounds its size and how long it takes
        body += chunk
    # inflating, scanning and parsing a large request would stall the event loop
    limits = Limits(cfg.max_files, cfg.max_upload_bytes)
    parsed = await run_in_threadpool(oip_codec.parse_request, body, request.headers.get("content-encoding"),
                                     request.headers.get(HEADER_LENGTH), spec, limits)
    if parsed.files is not None:
        batch, decode_s = await decode_batch(parsed.files, spec, cfg, state.decode_pool)
    else:
        batch, decode_s = parsed.pixels, [parsed.parse_s / len(parsed.pixels)] * len(parsed.pixels)
    served, batch_size = await state.predict(batch)
    observe_prediction(state.metrics, rt, served, decode_s, batch_size)
    tensors = oip_codec.prediction_tensors(served.prediction, rt.class_name, len(rt.classes))
    answer = oip_codec.encode_response(parsed.request, tensors, rt.loaded.name, rt.loaded.version)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)
