"""Bytes from a request -> the model's input tensor, with the limits that keep hostile
uploads out. Errors are `ImageError`s with a machine-readable code; the web layer maps
their kinds to HTTP statuses (service/web/errors.py)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .store import InputSpec

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}


class ImageError(ValueError):
    """The bytes are not a usable image (empty, not an image, truncated, corrupt)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ImageTooLarge(ImageError):
    """More pixels than the limit allows (checked from the header, before decoding)."""


class UnsupportedImageFormat(ImageError):
    """An image format outside ALLOWED_FORMATS."""


@dataclass
class ImageLimits:
    max_pixels: int = 4096 * 4096
    """Largest decoded image (width x height) accepted; larger is refused before decoding."""
    max_side: int = 16384
    """Longest side accepted."""
    max_costly_pixels: int | None = None
    """Largest image (width x height) of a kind that costs several times more CPU per pixel
    to decode than an 8-bit PNG (`costly_kind`). None: `max_pixels` alone applies."""


def media_type(data: bytes) -> str:
    """The MIME type of image bytes by their content (what Pillow reads), not by the client's claim."""
    try:
        fmt = Image.open(io.BytesIO(data)).format or "octet-stream"
    except Exception:  # not an image: decode_image refuses it with the reason
        return "application/octet-stream"
    return {"MPO": "image/jpeg"}.get(fmt, f"image/{fmt.lower()}")


def decode_image(data: bytes, spec: InputSpec, limits: ImageLimits) -> torch.Tensor:
    """One image file -> (C, H, W) float tensor, normalised with the model's statistics."""
    x = decode_pixels(data, spec, limits).float() / 255.0  # (C, H, W)
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (x - mean) / std


def image_header(data: bytes) -> tuple[int, int, str | None, str | None] | None:
    """(width, height, format, costly_kind) from the header alone, for a request's budget;
    None when the bytes are no image (decode_pixels says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            return *im.size, im.format, costly_kind(im)
    except Exception:
        return None


JPEG_DISCOUNT = 16  # a large JPEG decodes at 1/4 to 1/8 scale (draft): a pixel costs ~1/16 of a PNG's


def decode_cost(w: int, h: int, fmt: str | None, kind: str | None, limits: ImageLimits) -> int:
    """What decoding an image costs, in pixels of 8-bit PNG: a costly kind's pixels count as
    many times as its limit is below `max_pixels`, a JPEG's 1/JPEG_DISCOUNT of one."""
    if kind and limits.max_costly_pixels:
        return -(-w * h * limits.max_pixels // limits.max_costly_pixels)
    if fmt in ("JPEG", "MPO"):
        return w * h // JPEG_DISCOUNT
    return w * h


def check_limits(w: int, h: int, fmt: str | None, kind: str | None, limits: ImageLimits) -> None:
    """ImageTooLarge, naming the limit, for an image whose decoding would cost too much
    (from its header alone: nothing is decoded yet)."""
    if w < 1 or h < 1 or max(w, h) > limits.max_side:
        raise ImageTooLarge("image_too_large", f"image of {w}x{h} pixels: at most {limits.max_side} per side")
    if kind and limits.max_costly_pixels is not None and w * h > limits.max_costly_pixels:
        raise ImageTooLarge("image_too_large", f"{kind} image of {w}x{h} pixels exceeds the limit of "
                            f"{limits.max_costly_pixels} pixels for 16-bit, interlaced, palette, GIF or "
                            f"WebP images (they decode several times slower per pixel; send a smaller "
                            f"image, or 8-bit PNG or JPEG)")
    if decode_cost(w, h, fmt, kind, limits) > limits.max_pixels:
        jpeg = fmt in ("JPEG", "MPO")
        raise ImageTooLarge("image_too_large", f"image of {w}x{h} pixels exceeds the limit of "
                            f"{limits.max_pixels * (JPEG_DISCOUNT if jpeg else 1)} pixels"
                            + ("" if jpeg else f" ({limits.max_pixels * JPEG_DISCOUNT} for JPEG)"))


def costly_kind(im: Image.Image) -> str | None:
    """Why decoding this opened (not yet loaded) image costs several times more CPU per pixel
    than an 8-bit PNG, from its header; None when it does not. "16-bit" (or wider samples:
    more bytes to inflate, and Pillow's reduce takes none), "interlaced" (Adam7: seven
    passes), "palette" or "1-bit" (expanded to full-size RGB or grey before shrinking), "GIF"
    (LZW, whatever its mode), "WebP" (decoded at full size: Pillow cannot scale it)."""
    rawmodes = [t.args if isinstance(t.args, str) else next((a for a in t.args or () if isinstance(a, str)), "")
                for t in im.tile]
    if im.mode in WIDE_MODES or im.mode.startswith("I;16") or any(";16" in r for r in rawmodes):
        return "16-bit"
    if im.info.get("interlace"):
        return "interlaced"
    if im.format in ("GIF", "WEBP"):
        return {"GIF": "GIF", "WEBP": "WebP"}[im.format]
    if im.mode in ("P", "PA", "1"):
        return "1-bit" if im.mode == "1" else "palette"
    return None


def decode_pixels(data: bytes, spec: InputSpec, limits: ImageLimits) -> torch.Tensor:
    """One image file -> (C, H, W) uint8 at the model's size and channels (what training reads).

    The header is read first and the size checked before any pixel is decoded, so a
    decompression bomb costs nothing; kinds that cost more per pixel (`costly_kind`) have
    their own, lower limit. The work then scales with the model's input, not the
    upload: JPEG decodes at a reduced scale (`draft`), other images are reduced by an
    integer factor before resampling, and 16-bit or float images are rescaled to 8 bits
    after shrinking, never converted at full size. Animated images give their first
    frame; EXIF orientation is applied; any mode (grey, 16-bit, RGB, RGBA, palette, CMYK)
    becomes the model's channels.
    """
    if not data:
        raise ImageError("empty_file", "the uploaded file is empty")
    size = (spec.image_size, spec.image_size)
    mode = "L" if spec.in_chans == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if im.format not in ALLOWED_FORMATS:
                raise UnsupportedImageFormat("unsupported_image_format", f"image format {im.format} is not accepted")
            check_limits(w, h, im.format, costly_kind(im), limits)
            im.seek(0)
            orientation = im.getexif().get(ORIENTATION_TAG)
            if im.format in ("JPEG", "MPO"):  # DCT scaling: decode at 1/2, 1/4 or 1/8 while >= the model's size
                im.draft(mode if im.mode in ("L", "RGB", "YCbCr") else None, size)
            im.load()
            im = _shrink(im, size)
            im = _to_mode(im, mode)
            if orientation in ORIENTATIONS:  # after shrinking: the target is square, so the order does not matter
                im = im.transpose(ORIENTATIONS[orientation])
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise ImageError("not_an_image", "the file is not an image Pillow can read") from e
        raise ImageTooLarge("image_too_large", f"decompression bomb refused: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageError("corrupt_image", f"the image could not be decoded: {e}") from e
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()  # (C, H, W)


ORIENTATION_TAG = 0x0112
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per sample


def _shrink(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """To `size` (bilinear). A large image is first reduced by an integer factor (a box filter
    over whole blocks, as Pillow's reducing_gap does) so that resampling sees about twice the
    target; modes Pillow cannot reduce are box-filtered straight to the target."""
    if im.size == size:
        return im
    if im.mode == "1" or (im.mode == "P" and "transparency" not in im.info):
        im = im.convert("L" if im.mode == "1" else "RGB")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    if im.mode in WIDE_MODES or im.mode.startswith("I;16"):
        return im.resize(size, Image.Resampling.BOX)  # Pillow's reduce takes no 16-bit or float images
    try:
        return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    except ValueError:  # a mode without reduce (LAB, HSV, ...): to RGB first
        return im.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode in WIDE_MODES or im.mode.startswith("I;16"):  # scale to 8 bits by the image's own range
        a = np.asarray(im, dtype=np.float64)  # (H, W) at the model's size: a few kilobytes
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))  # transparent = background black
        im = Image.alpha_composite(background, im)
    return im.convert(mode)
