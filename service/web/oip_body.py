"""The body of an Open Inference Protocol `infer` request, bounded before it is parsed, with
no web framework: inflated (gzip or deflate) a step at a time to at most `max_inflated_bytes`
(InferenceRequestTooLarge), its JSON part scanned as it inflates for more values than any
valid request holds or over-long integers (`JsonBounds`: InvalidInferenceRequest), then
split into the JSON part and the binary data after it (the binary tensor data extension).
oip_codec.py parses what this returns."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..core.store import InputSpec
from .oip_schema import HEADER_LENGTH, InferenceRequestTooLarge, InvalidInferenceRequest, UnsupportedContentEncoding
# JsonBounds is pure Python; it lives with the /predict body parsing, which holds its JSON to it too
from .json_bounds import JsonBounds, JsonOutOfBounds


@dataclass(frozen=True)
class Limits:
    """The service's limits a request is held to (MAX_FILES and MAX_UPLOAD_BYTES of ServiceConfig)."""
    max_files: int
    max_upload_bytes: int


# --- bounds, checked before the work they bound ------------------------------------------------
# what a request holds besides its tensor's values: the outputs asked, parameters, the shape
REQUEST_ROOM = 1024
# the body inflates (and its JSON is scanned) this much at a time: a bomb stops within one step
INFLATE_STEP = JsonBounds.STEP
# a compressed body may inflate to this many times its size (image files, already compressed,
# hardly shrink), or to what the largest valid request holds as JSON text, whichever is more
INFLATE_RATIO = 20
JSON_VALUE_BYTES = 24  # "-0.0039215686274509803, ": a pixel in 0..1 printed in full, and its comma


def max_json_values(spec: InputSpec, limits: Limits) -> int:
    """Most JSON values (each a Python object once parsed) a valid inference request holds:
    the largest pixel batch, MAX_FILES images of the model's size, written out as nested
    lists [B][C][H][W], plus REQUEST_ROOM for the rest of the request."""
    c, size = spec.in_chans, spec.image_size
    return limits.max_files * c * size * size + 1 + limits.max_files * (1 + c * (1 + size)) + REQUEST_ROOM


def max_inflated_bytes(compressed: int, spec: InputSpec, limits: Limits) -> int:
    """Most bytes a compressed body of `compressed` bytes may inflate to: INFLATE_RATIO times
    its size, or the largest valid request as JSON text (max_json_values of JSON_VALUE_BYTES
    each, which uniform pixels compress far below), whichever is more; never past the upload
    limit. A small bomb stops after a few megabytes, not at MAX_UPLOAD_BYTES."""
    largest_json = max_json_values(spec, limits) * JSON_VALUE_BYTES
    return min(limits.max_upload_bytes, max(INFLATE_RATIO * compressed, largest_json))


def _inflated_pieces(body: bytes | bytearray, encoding: str | None, limit: int, upload_limit: int):
    """The body, inflated when it is gzip or deflate (tritonclient can compress its request)
    at most INFLATE_STEP bytes at a time and never past `limit` bytes in all
    (InferenceRequestTooLarge): a compression bomb stops at the limit, and the caller can
    refuse what it has seen before the rest is inflated."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        yield body
        return
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(name)
    if wbits is None:
        raise UnsupportedContentEncoding(f"content encoding {encoding!r:.64} not accepted; send gzip, deflate or "
                                         f"none")
    d, size, view = zlib.decompressobj(wbits), 0, memoryview(body)
    try:
        # the input too goes in a step at a time: zlib copies what it leaves unconsumed
        for start in range(0, len(body), INFLATE_STEP):
            pending = view[start:start + INFLATE_STEP]
            while not d.eof:
                piece = d.decompress(pending, INFLATE_STEP)
                pending = d.unconsumed_tail
                size += len(piece)
                if size > limit:
                    raise InferenceRequestTooLarge(
                        f"the inflated request body exceeds the upload limit of {limit} bytes"
                        if limit == upload_limit else
                        f"the {encoding:.16} body inflates past {limit} bytes, more than {INFLATE_RATIO} times its "
                        f"{len(body)} bytes and more than any valid request holds")
                if piece:
                    yield piece
                if not pending and len(piece) < INFLATE_STEP:
                    break  # this step's input is used up and its output drained
            if d.eof:
                break
    except zlib.error as e:
        raise InvalidInferenceRequest(f"the {encoding:.16} body could not be inflated: {e}")
    if not d.eof:
        raise InvalidInferenceRequest(f"the {encoding:.16} body could not be inflated: it ends inside the "
                                      f"compressed stream")


def split_request(body: bytes | bytearray, encoding: str | None, header_length: str | None, spec: InputSpec,
                  limits: Limits) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of an inference request. The body inflates to at most
    `max_inflated_bytes` (InferenceRequestTooLarge above) and its JSON part is held to
    `JsonBounds(max_json_values)` (InvalidInferenceRequest beyond); both are checked INFLATE_STEP bytes at a time
    as the body inflates, before anything is parsed, so neither a compression bomb nor a body
    of millions of tiny values costs more than the step that crosses a bound. The binary part
    is a view: not copied."""
    json_length = None
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) < 1:
            raise InvalidInferenceRequest(f"{HEADER_LENGTH} must be the length of the JSON part, not "
                                          f"{header_length!r:.64}")
        json_length = int(header_length)
    max_values = max_json_values(spec, limits)
    pieces, size, bounds = [], 0, JsonBounds(max_values)
    limit = max_inflated_bytes(len(body), spec, limits)
    for piece in _inflated_pieces(body, encoding, limit, limits.max_upload_bytes):
        json_end = len(piece) if json_length is None else max(0, min(len(piece), json_length - size))
        try:
            bounds.feed(piece, 0, json_end)
        except JsonOutOfBounds as e:
            raise InvalidInferenceRequest(f"invalid inference request: {e}; no valid request to this model "
                                          f"holds as much (MAX_FILES images as nested lists of pixels hold "
                                          f"{max_values})")
        size += len(piece)
        pieces.append(piece)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    del pieces
    if json_length is None:
        return data, memoryview(b"")
    if json_length > len(data):
        raise InvalidInferenceRequest(f"{HEADER_LENGTH} must be the length of the JSON part (1..{len(data)}), "
                                      f"not {header_length!r:.64}")
    view = memoryview(data)
    return bytes(view[:json_length]), view[json_length:]
