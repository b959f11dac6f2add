"""What users taught, out of the feedback store: for training the next model.

`taught_examples` gives the examples not forgotten, oldest first, decoded to a model's
input (uint8 pixels) with their labels, for `python -m service train --feedback-db URL`.
`export_imagefolder` writes the stored image files as they were received into
`<out>/train/<label>/<id>.<ext>`, the layout `--dataset imagefolder` reads (labels are
percent-encoded as folder names: "T-shirt/top" -> "T-shirt%2Ftop").
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import torch

from ..core.preprocess import ImageLimits, decode_pixels
from ..core.files import atomic_write
from ..core.store import InputSpec
from .feedback_store import Example, FeedbackStore, FeedbackStoreError

EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/bmp": ".bmp",
              "image/gif": ".gif", "image/tiff": ".tiff"}


def stored_examples(store: FeedbackStore, page: int = 500) -> list[Example]:
    """Every example not forgotten, oldest first."""
    out, before = [], None
    while True:
        rows = store.examples(limit=page, before=before, include_forgotten=False)
        out.extend(rows)
        if len(rows) < page:
            return out[::-1]
        before = rows[-1].seq


def taught_examples(store: FeedbackStore, spec: InputSpec) -> tuple[torch.Tensor, list[str]]:
    """((N, C, H, W) uint8 images at `spec`'s size and channels, N labels)."""
    images, labels = [], []
    for e in stored_examples(store):
        data, _, forgotten = store.image(e.seq)
        if forgotten or data is None:  # forgotten meanwhile
            continue
        images.append(decode_pixels(data, spec, ImageLimits(max_pixels=1 << 62)))
        labels.append(e.label)
    if not images:
        return torch.zeros(0, spec.in_chans, spec.image_size, spec.image_size, dtype=torch.uint8), []
    return torch.stack(images), labels


def folder_name(label: str) -> str:
    name = urllib.parse.quote(label, safe=" -_")
    return name if not name.startswith(".") else "%2E" + name[1:]


def export_imagefolder(store: FeedbackStore, out: str | Path) -> int:
    """Write every example not forgotten; returns how many."""
    out = Path(out)
    n = 0
    for e in stored_examples(store):
        data, media, forgotten = store.image(e.seq)
        if forgotten or data is None:
            continue
        ext = EXTENSIONS.get(media or "")
        if ext is None:
            raise FeedbackStoreError(f"example {e.seq} has an unexpected media type {media!r}")
        atomic_write(out / "train" / folder_name(e.label) / f"{e.seq:09d}{ext}", data)
        n += 1
    return n
