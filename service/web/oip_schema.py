"""The Open Inference Protocol's (KServe v2, REST) messages and refusals, with no web framework:
the pydantic models its codec (oip_codec.py) parses and answers with and its router
(inference_protocol.py) declares in the OpenAPI document, and the errors the codec raises.

The errors are domain errors: errors.py maps each to its status in the one table every
error of both APIs is in (an invalid inference request is 400 for the protocol)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

SERVER_NAME = "memory-classifier-service"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "pytorch_safetensors"  # the spec's "<project>_<format>": weights are safetensors, not TorchScript
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = ("label", "label_index", "confidence", "path", "ood_score", "abstained", "class_scores")


# --- refusals --------------------------------------------------------------------------------
class InvalidInferenceRequest(ValueError):
    """An inference request this server cannot use (malformed, or not what the model takes)."""


class InferenceRequestTooLarge(InvalidInferenceRequest):
    """More images than MAX_FILES, or a compressed body that inflates past its bound."""


class UnsupportedContentEncoding(InvalidInferenceRequest):
    """A Content-Encoding other than gzip, deflate or none."""


def validation_message(errors: list[dict], limit: int = 5) -> str:
    """pydantic's errors in one line (the protocol's error is one message), the first `limit`
    of them, each location part cut to 64 characters."""
    parts = []
    for e in errors[:limit]:
        where = ".".join(f"{p:.64}" if isinstance(p, str) else str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) + (f" (and {len(errors) - limit} more)" if len(errors) > limit else "")


# --- messages --------------------------------------------------------------------------------
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
    # beyond the protocol's fields (clients ignore what they do not know): the network's
    # inference engine, whose model version `versions` names (each engine serves its own)
    engine: str = Field("eager", description="the network's inference engine in force (ENGINE): eager or "
                                             "openvino-int8")


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
