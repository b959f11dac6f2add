"""Service configuration: environment variables, with CLI flags of the same names."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass
class ServiceConfig:
    model_store: str = "model_store"
    """MODEL_STORE: folder of trained models."""
    model_name: str = "fashion-mnist"
    """MODEL_NAME: the model to serve (a folder name inside the store)."""
    api_token: str | None = None
    """API_TOKEN: bearer token for /feedback and /memory/snapshot; unset = those endpoints refused."""
    state_dir: str = "var"
    """STATE_DIR: folder for the feedback journal and memory snapshots."""
    confidence_threshold: float | None = None
    """CONFIDENCE_THRESHOLD: override the model's memory confidence threshold."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """MAX_UPLOAD_BYTES: largest request body accepted (413 above)."""
    max_pixels: int = 4096 * 4096
    """MAX_PIXELS: largest decoded image, width x height (413 above)."""
    max_files: int = 64
    """MAX_FILES: most images in one request."""
    body_timeout: float = 30.0
    """BODY_TIMEOUT: seconds the server waits for the next chunk of a request body (408 after)."""
    snapshot_interval: float = 300.0
    """SNAPSHOT_INTERVAL: seconds between periodic memory snapshots (0 = only on demand and shutdown)."""
    top_k: int = 5
    """TOP_K: classes listed with scores in each prediction."""
    protect_feedback: bool = True
    """PROTECT_FEEDBACK: user-taught items are replaced only when nothing else is left (1/0)."""
    new_class_threshold: float | None = 0.5
    """NEW_CLASS_THRESHOLD: memory confidence enough for a class the head does not know (taught by feedback)."""
    class_balance: float = 0.5
    """CLASS_BALANCE: neighbour vote weight x (mean items per class / items of its class) ** this (0 = plain)."""
    memory_index: str = "exact"
    """MEMORY_INDEX: memory search, exact (chunked matrix product) or ivf (faiss IVF index, approximate)."""
    index_nprobe: int = 16
    """INDEX_NPROBE: IVF cells scanned per query (more: better recall, slower)."""
    max_batch_size: int = 32
    """MAX_BATCH_SIZE: most images the dynamic batcher runs together (1 = no batching)."""
    max_batch_wait_ms: float = 2.0
    """MAX_BATCH_WAIT_MS: longest a /predict request waits for others to join its batch."""

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_pixels < 1 or self.max_files < 1:
            raise ValueError("MAX_UPLOAD_BYTES, MAX_PIXELS and MAX_FILES must be >= 1")
        if self.max_batch_size < 1 or self.max_batch_wait_ms < 0:
            raise ValueError("MAX_BATCH_SIZE must be >= 1 and MAX_BATCH_WAIT_MS >= 0")
        if self.new_class_threshold is not None and not 0 <= self.new_class_threshold <= 1:
            raise ValueError(f"NEW_CLASS_THRESHOLD must be in [0, 1], got {self.new_class_threshold}")
        if self.class_balance < 0:
            raise ValueError(f"CLASS_BALANCE must be >= 0, got {self.class_balance}")
        if self.memory_index not in ("exact", "ivf"):
            raise ValueError(f"MEMORY_INDEX must be exact or ivf, got {self.memory_index!r}")
        if self.index_nprobe < 1:
            raise ValueError(f"INDEX_NPROBE must be >= 1, got {self.index_nprobe}")
        if self.body_timeout <= 0:
            raise ValueError(f"BODY_TIMEOUT must be > 0, got {self.body_timeout}")
        if self.confidence_threshold is not None and not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"CONFIDENCE_THRESHOLD must be in [0, 1], got {self.confidence_threshold}")
        if self.api_token == "":
            self.api_token = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> "ServiceConfig":
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None:
                continue
            kind = f.type if isinstance(f.type, type) else str(f.type)
            if "bool" in str(kind):
                if raw.lower() not in ("1", "0", "true", "false"):
                    raise ValueError(f"{f.name.upper()} must be 1/0/true/false, got {raw!r}")
                values[f.name] = raw.lower() in ("1", "true")
            elif "float" in str(kind):
                values[f.name] = float(raw)
            elif "int" in str(kind):
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
