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
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.preprocess import ImageError, ImageLimits, ImageTooLarge, decode_image, image_size
from ..core.store import InputSpec
from .errors import ApiError, BodyTimeout, BodyTooLarge
from .schemas import PredictJSON
from .settings import ServiceConfig


async def read_images(request: Request, cfg: ServiceConfig, allow_json: bool, label_field: bool = False):
    """The image files of a request (multipart `file` parts, or JSON image_base64), and the
    `label` form field when asked."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(422, "empty_body", "the request body is empty")
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=cfg.max_files, max_fields=8, max_part_size=cfg.max_upload_bytes)
        except (BodyTooLarge, BodyTimeout):
            raise
        except StarletteHTTPException as e:
            status = 413 if "Too many files" in str(e.detail) else 422
            raise ApiError(status, "bad_multipart", f"multipart body refused: {e.detail}")
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
        try:
            payload = PredictJSON.model_validate_json(body)
        except ValidationError as e:
            raise ApiError(422, "invalid_json", json.loads(e.json(include_url=False, include_context=False)))
        try:
            return [base64.b64decode(payload.image_base64, validate=True)]
        except (binascii.Error, ValueError) as e:
            raise ApiError(422, "invalid_base64", f"image_base64 is not valid base64: {e}")
    accepted = "multipart/form-data" + (" or application/json" if allow_json else "")
    raise ApiError(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} not accepted; send {accepted}")


# one image this small decodes on the event loop (~0.1 ms, less than handing it to the pool)
INLINE_DECODE_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 64 * 64


async def decode_batch(files: list[bytes], spec: InputSpec, cfg: ServiceConfig,
                       pool: Executor) -> tuple[torch.Tensor, list[float]]:
    """Decode in `pool` (the app's decode pool: as many threads as cores, so hostile images
    cannot pile up more decodes than the machine runs at once): ((B, C, H, W) batch, seconds
    per image). The request's pixels, read from the headers, must fit MAX_REQUEST_PIXELS
    before any image is decoded."""
    limits = ImageLimits(max_pixels=cfg.max_pixels)

    sizes = [image_size(data) for data in files]  # headers only: microseconds
    total = sum(w * h for w, h in sizes)
    if total > cfg.max_request_pixels:
        raise ImageTooLarge("request_too_large", f"the request's {len(files)} images hold {total} pixels; "
                                                 f"at most {cfg.max_request_pixels} per request")

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
