"""Shared helpers: image bytes of every kind, and a tiny stored model."""

import io

import numpy as np
import torch
from PIL import Image

from service.core.model import ClassifierConfig, EnhancedClassifier
from service.core.store import InputSpec, save_model

CLASSES = ["zero", "one", "two", "three"]


def image_bytes(fmt="PNG", size=(28, 28), mode="L", seed=0, **save_kw) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        im = Image.fromarray(arr)
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8), "RGB").convert("P")
    else:
        shape = size[::-1] if channels == 1 else (*size[::-1], channels)
        im = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def save_tiny_model(store, name="tiny", memory="cached", memory_classes=6, prefill=8, **config):
    torch.manual_seed(0)
    cfg = ClassifierConfig(num_classes=4, in_chans=1, image_size=28, memory=memory, memory_size=16,
                           memory_classes=memory_classes, **config)
    model = EnhancedClassifier(cfg).eval()
    if model.memory is not None and prefill:
        with torch.no_grad():
            model.memory.update(model.embed(torch.randn(prefill, 1, 28, 28))[0], torch.arange(prefill) % 4)
    if model.taught is not None:  # replay features as training leaves them: every class, eval mode
        n = model.taught.replay_labels.numel()
        with torch.no_grad():
            model.taught.replay_features.copy_(model.embed(torch.randn(n, 1, 28, 28))[0])
        model.taught.replay_labels.copy_(torch.arange(n) % 4)
    save_model(store, name, model, CLASSES, InputSpec(28, 1, [0.5], [0.5]))
    return model


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(image_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", image_bytes())
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("L", (28, 28), c) for c in (0, 128, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def multipage_tiff() -> bytes:
    frames = [Image.new("RGB", (28, 28), (c, c, c)) for c in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1)), "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def polyglot() -> bytes:
    """A valid PNG with a ZIP archive appended (readable as both)."""
    return image_bytes() + zip_bytes()


def nan_tiff() -> bytes:
    """A 32-bit float TIFF full of NaN and infinities."""
    arr = np.full((28, 28), np.nan, dtype=np.float32)
    arr[0, 0], arr[1, 1] = np.inf, -np.inf
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()
