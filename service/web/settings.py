"""Service settings: environment variables (upper-case field names), or `python -m service
serve` flags of the same names, which take precedence. Each field's description is its --help.

`serve --workers N` resolves them once and hands them to its server processes as one JSON
document in SERVICE_CONFIG_JSON (`to_environment`); each process reads it back
(`from_environment`), so every process serves with exactly the settings the command resolved."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..core.routing import RoutingPolicy

# the settings `serve` resolved, as JSON, for the server processes it starts
CONFIG_ENV = "SERVICE_CONFIG_JSON"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container or taskset limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=(),
                                      validate_default=True)

    model_store: str = Field("model_store", description="folder of trained models")
    model_name: str = Field("fashion-mnist", description="the model to serve (a folder name inside the store)")
    api_token: str | None = Field(None, description="bearer token for writes (/feedback, /memory/snapshot); "
                                                    "unset = writes refused")
    state_dir: str = Field("var", description="folder for memory snapshots and the default SQLite feedback store")
    feedback_db: str | None = Field(None, description="feedback store: postgresql://... (several processes or "
                                    "machines) or sqlite:///path; unset = SQLite at STATE_DIR/feedback.db")
    # explicit overrides of the model's routing policy (manifest.json "routing"; unset = the model's)
    confidence_threshold: float | None = Field(None, ge=0, le=1, description="override the model's memory "
                                               "confidence threshold")
    new_class_threshold: float | None = Field(None, ge=0, le=1, description="override the confidence enough for "
                                              "a class the head lacks (taught by feedback)")
    class_balance: float | None = Field(None, ge=0, description="override the class-balance exponent of the "
                                        "memory's vote (0 = plain vote)")
    neighbours: int | None = Field(None, ge=1, description="override the number of memory items that vote")
    taught_rows: bool | None = Field(None, description="override whether taught labels get a fitted head row")
    taught_bias: float | None = Field(None, description="override the bias added to the logits of taught rows "
                                      "for classes the head lacks")
    correction_bias: float | None = Field(None, description="override the bias added to the logits of taught rows "
                                          "for classes the head has")
    taught_l2: float | None = Field(None, ge=0, description="override the L2 penalty of the taught rows' fit")
    taught_distance_weight: float | None = Field(None, ge=0, description="override the weight of a new class's "
                                                 "local evidence (Mahalanobis distances) in its taught row")
    ood_threshold: float | None = Field(None, description="override the ood_score over which an answer abstains "
                                        "(\"none of these\"; the model's is chosen on its validation split)")
    # the defaults bound what one anonymous request can cost; the model sees 28x28 or 32x32
    # images, so nothing a client needs is refused by them
    max_upload_bytes: int = Field(1024 * 1024, ge=1, description="largest request body accepted (413 above)")
    max_pixels: int = Field(1024 * 1024, ge=1, description="largest image, width x height (413 above); JPEG: 16 "
                            "times as many (it decodes at a reduced scale)")
    max_costly_pixels: int = Field(512 * 512, ge=1, description="largest 16-bit, interlaced, palette, GIF or "
                                   "WebP image, width x height (413 above; these decode several times slower per "
                                   "pixel than 8-bit PNG; MAX_PIXELS applies too)")
    max_files: int = Field(64, ge=1, description="most images in one request")
    max_request_pixels: int = Field(1024 * 1024, ge=1, description="most pixels (width x height, from the "
                                    "headers) of all images in one request together; a costly kind's (see "
                                    "MAX_COSTLY_PIXELS) count MAX_PIXELS / MAX_COSTLY_PIXELS times, JPEG's 1/16 "
                                    "(413 above)")
    decode_threads: int | None = Field(None, ge=1, description="images decoded at once (default: the cores "
                                       "this process may use)")
    body_timeout: float = Field(30.0, gt=0, description="seconds to wait for the next chunk of a request body "
                                                        "(408 after)")
    body_deadline: float = Field(60.0, gt=0, description="seconds a whole request body may take to arrive, however "
                                                         "steadily it trickles in (408 after)")
    snapshot_interval: float = Field(300.0, ge=0, description="seconds between periodic memory snapshots "
                                                              "(0 = only on demand and shutdown)")
    top_k: int = Field(5, ge=1, description="classes listed with scores in each prediction")
    feedback_pool_size: int = Field(4, ge=1, description="PostgreSQL connections per server process (a pool; "
                                    "plus one for LISTEN): replicas x workers x (this + 1) must stay below the "
                                    "server's max_connections")
    idempotency_retention: float = Field(86400.0, gt=0, description="seconds an Idempotency-Key stays bound to "
                                         "the request it was first used with (its answer replayed)")
    write_timeout: float = Field(30.0, gt=0, description="seconds a feedback write may wait for the store before "
                                 "it is cancelled (503, nothing written)")
    protect_feedback: bool = Field(True, description="user-taught items are replaced only when nothing else "
                                                     "is left")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the model and its memory live: cpu, "
                                                    "cuda (the first GPU) or auto (cuda when torch sees one)")
    engine: Literal["auto", "eager", "openvino-int8"] = Field(
        "auto", description="the network's CPU inference engine (docs/engine.md): auto (the one the model's "
        "manifest names, eager without one or on a GPU), eager (torch fp32) or openvino-int8 (made by `python -m "
        "service retrofit --engine openvino-int8`); each engine serves its own model version and memory keys")
    memory_index: Literal["exact", "ivf"] = Field("exact", description="memory search: exact (chunked matrix "
                                                  "product) or ivf (faiss IVF index, approximate)")
    index_nprobe: int = Field(12, ge=1, description="IVF cells scanned per query (more: better recall, slower; "
                              "the default was chosen by recall@1 on held-out queries, BENCHMARKS.md)")
    # the review queue (docs/review-queue.md): off unless asked for, since it keeps users' images
    review_queue: bool = Field(False, description="keep the images the model was unsure of (abstained, or "
                               "less confident than REVIEW_CONFIDENCE_BELOW) for review on the page: on or off; "
                               "a request with the header `Review-Queue: no` is never kept")
    review_queue_max: int = Field(200, ge=1, le=100_000, description="most images the review queue keeps (the "
                                  "oldest are dropped)")
    review_queue_max_age: float = Field(7 * 86400.0, gt=0, description="seconds an image stays in the review "
                                        "queue at most")
    review_confidence_below: float | None = Field(None, ge=0, le=1, description="an answer less confident than "
                                                  "this joins the review queue (unset = the routing policy's "
                                                  "confidence threshold)")
    max_batch_size: int = Field(32, description="most images the dynamic batcher runs together (1 = no batching)")
    max_batch_wait_ms: float = Field(0.0, description="longest a /predict request waits for others to join "
                                                      "its batch (0 = adaptive: run whatever is waiting as soon "
                                                      "as the model is free)")

    @model_validator(mode="after")
    def _check(self) -> "ServiceConfig":
        if self.max_batch_size < 1 or self.max_batch_wait_ms < 0:
            raise ValueError("MAX_BATCH_SIZE must be >= 1 and MAX_BATCH_WAIT_MS >= 0")
        if self.api_token == "":
            self.api_token = None
        return self

    def store_options(self) -> dict:
        """The feedback store's settings (pool_size applies to PostgreSQL only)."""
        options = {"idempotency_retention": self.idempotency_retention, "write_timeout": self.write_timeout}
        if self.feedback_db and self.feedback_db.startswith(("postgresql://", "postgres://")):
            options["pool_size"] = self.feedback_pool_size
        return options

    def policy_overrides(self) -> dict:
        """The routing-policy fields set explicitly (the rest come from the model's manifest)."""
        return {f.name: getattr(self, f.name) for f in fields(RoutingPolicy) if getattr(self, f.name) is not None}

    def to_environment(self) -> None:
        """These settings, all of them, for the processes this one starts (they inherit the environment)."""
        os.environ[CONFIG_ENV] = self.model_dump_json()

    @classmethod
    def from_environment(cls) -> "ServiceConfig":
        """The settings a parent `serve` resolved (to_environment) where it set them, else the
        environment variables'. The JSON is complete: no variable is read over it."""
        resolved = os.environ.get(CONFIG_ENV)
        return cls.model_validate_json(resolved) if resolved else cls()
