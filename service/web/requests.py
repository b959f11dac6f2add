"""Request bodies -> image bytes (and a label), and image bytes -> the model's input batch.
Every refusal is an ApiError or a domain error naming the problem."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from concurrent.futures import Executor

import torch
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.preprocess import (ImageError, ImageLimits, ImageTooLarge, check_limits, decode_cost, decode_image,
                               image_header)
from ..core.store import InputSpec
from .errors import ApiError, BodyTimeout, BodyTooLarge
from .json_bounds import JsonBounds, JsonOutOfBounds
from .schemas import PredictJSON
from .settings import ServiceConfig

# what a /predict JSON body holds: {"image_base64": "..."}, with room for a few ignored fields
MAX_PREDICT_JSON_VALUES = 16
# a multipart body's fields besides files: /feedback's `label`, with room for mistakes to name
MAX_FORM_FIELDS = 8


async def read_images(request: Request, cfg: ServiceConfig, allow_json: bool, label_field: bool = False):
    """The image files of a request (multipart `file` parts, or JSON image_base64), and the
    `label` form field when asked."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(422, "empty_body", "the request body is empty")
    if ctype == "multipart/form-data":
        # the parser stops at the first part past MAX_FILES files or MAX_FORM_FIELDS fields (and
        # python-multipart at a part's 9th header or one over 4 kB), so thousands of parts cost
        # what the first few dozen do
        try:
            form = await request.form(max_files=cfg.max_files, max_fields=MAX_FORM_FIELDS,
                                      max_part_size=cfg.max_upload_bytes)
        except (BodyTooLarge, BodyTimeout):
            raise
        except StarletteHTTPException as e:
            if "Too many files" in str(e.detail):
                raise ApiError(413, "too_many_files", f"at most {cfg.max_files} files per request (MAX_FILES); "
                                                      f"the multipart body has more")
            if "Too many fields" in str(e.detail):
                raise ApiError(413, "too_many_fields", f"at most {MAX_FORM_FIELDS} text fields per request; "
                                                       f"the multipart body has more")
            raise ApiError(422, "bad_multipart", f"multipart body refused: {e.detail}")
        except Exception as e:
            raise ApiError(422, "bad_multipart", f"malformed multipart body: {e}")
        try:
            expected = {"file", "label"} if label_field else {"file"}
            unknown = sorted(set(form.keys()) - expected)
            if unknown:
                raise ApiError(422, "unexpected_field", f"unexpected field(s) {unknown}; expected {sorted(expected)}")
            parts = form.getlist("file")
            if not parts:
                raise ApiError(422, "missing_field", "missing field 'file' (one or more image files)")
            if len(parts) > cfg.max_files:
                raise ApiError(413, "too_many_files", f"at most {cfg.max_files} files per request")
            files = []
            for p in parts:
                if not isinstance(p, UploadFile):
                    raise ApiError(422, "not_a_file", "field 'file' must be a file upload, not text")
                files.append(await p.read())
            if not label_field:
                return files
            labels = form.getlist("label")
            if len(labels) != 1 or not isinstance(labels[0], str):
                raise ApiError(422, "missing_field", "exactly one text field 'label' (class name or index) is required")
            return files, labels[0]
        finally:
            await form.close()
    if ctype == "application/json" and allow_json:
        body = await request.body()
        if not body:
            raise ApiError(422, "empty_body", "the request body is empty")
        if len(body) <= INLINE_JSON_BYTES:
            return [predict_json_image(body)]
        return [await run_in_threadpool(predict_json_image, body)]  # megabytes would stall the event loop
    accepted = "multipart/form-data" + (" or application/json" if allow_json else "")
    raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} not accepted; send {accepted}")


# a /predict JSON body this small is read on the event loop (less than the hop to a thread)
INLINE_JSON_BYTES = 64 * 1024


def predict_json_image(body: bytes) -> bytes:
    """The image file of a /predict JSON body {"image_base64": "..."}; its bounds are checked
    before it is parsed, and a refusal does not echo the input (it can be as large as the body)."""
    try:
        JsonBounds(MAX_PREDICT_JSON_VALUES).feed(body)
    except JsonOutOfBounds as e:
        raise ApiError(422, "invalid_json", f"{e}; send {{\"image_base64\": \"...\"}}")
    try:
        payload = PredictJSON.model_validate_json(body)
    except ValidationError as e:
        raise ApiError(422, "invalid_json", json.loads(e.json(include_url=False, include_context=False,
                                                              include_input=False)))
    try:
        return base64.b64decode(payload.image_base64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "invalid_base64", f"image_base64 is not valid base64: {e}")


# one image this small decodes on the event loop (~0.1 ms, less than handing it to the pool)
INLINE_DECODE_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 64 * 64


async def decode_batch(files: list[bytes], spec: InputSpec, cfg: ServiceConfig,
                       pool: Executor) -> tuple[torch.Tensor, list[float]]:
    """Decode in `pool` (the app's decode pool: as many threads as cores, so hostile images
    cannot pile up more decodes than the machine runs at once): ((B, C, H, W) batch, seconds
    per image). Each image's limits, and the request's decoding cost (`decode_cost`, in
    pixels of 8-bit PNG) against MAX_REQUEST_PIXELS, are checked from the headers before
    any image is decoded: the budget bounds the request's decoding CPU."""
    limits = ImageLimits(max_pixels=cfg.max_pixels, max_costly_pixels=min(cfg.max_pixels, cfg.max_costly_pixels))
    total = 0
    for i, data in enumerate(files):
        header = image_header(data)  # microseconds
        if header is None:
            continue  # not an image: decoding says why
        try:
            check_limits(*header, limits)
        except ImageTooLarge as e:
            raise ImageTooLarge(e.code, e.message if len(files) == 1 else f"file {i + 1} of {len(files)}: "
                                f"{e.message}") from None
        total += decode_cost(*header, limits)
    if total > cfg.max_request_pixels:
        raise ImageTooLarge("request_too_large", f"the request's {len(files)} images cost {total} pixels to decode "
                                                 f"(costly kinds count more, JPEG less); at most "
                                                 f"{cfg.max_request_pixels} per request")

    def decode_all():
        out, times = [], []
        for i, data in enumerate(files):
            t = time.perf_counter()
            try:
                out.append(decode_image(data, spec, limits))
            except ImageError as e:
                if len(files) == 1:
                    raise
                raise type(e)(e.code, f"file {i + 1} of {len(files)}: {e.message}") from e
            times.append(time.perf_counter() - t)
        return torch.stack(out), times  # (B, C, H, W)
    if len(files) == 1 and len(files[0]) <= INLINE_DECODE_BYTES and total <= INLINE_DECODE_PIXELS:
        return decode_all()  # a thumbnail: decoding costs less than the hop to a thread
    return await asyncio.get_running_loop().run_in_executor(pool, decode_all)
