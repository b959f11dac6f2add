"""Request and response models of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable error code")
    detail: str | list = Field(description="what is wrong, naming the field or file")


class PredictJSON(BaseModel):
    image_base64: str = Field(min_length=1, description="one image file, base64-encoded")


class ClassScore(BaseModel):
    label: str
    label_index: int
    score: float


class NearestItem(BaseModel):
    slot: int
    label: str
    similarity: float
    feedback_id: int | None = Field(description="the feedback that wrote this item, if any")


class ImagePrediction(BaseModel):
    label: str
    label_index: int
    confidence: float
    path: Literal["memory", "network", "abstain"] = Field(
        description="abstain: the image is unlike anything the model knows (\"none of these\"); label is the best guess")
    ood_score: float | None = Field(description="how unlike everything known the image is (higher: less alike); "
                                    "null when the model has no such score")
    abstained: bool = Field(description="ood_score is over the model's threshold (path abstain)")
    top_k: list[ClassScore]
    nearest: NearestItem | None
    latency_ms: float


class PredictResponse(BaseModel):
    model: str
    model_version: str
    predictions: list[ImagePrediction]


class FeedbackItem(BaseModel):
    feedback_id: int
    action: Literal["added", "replaced", "skipped", "pending"] = Field(
        description="what this process's memory did; pending: committed, applied as soon as the store is readable")
    slot: int | None
    replaced_label: str | None = Field(description="label the slot held before, when replaced")
    label: str
    label_index: int


class FeedbackResponse(BaseModel):
    items: list[FeedbackItem]
    new_class: bool
    request_id: str = Field("", description="the request these examples came in")


class StoredExample(BaseModel):
    id: int = Field(description="feedback id: the example's place in the log's total order")
    label: str
    time: float = Field(description="when it was committed (unix seconds)")
    forgotten: bool
    request_id: str


class FeedbackList(BaseModel):
    items: list[StoredExample]
    next_before: int | None = Field(description="pass as `before` for the next (older) page; null at the end")


class Forgotten(BaseModel):
    id: int
    forgotten: bool = True
    already: bool = Field(description="it had been forgotten before this request")


class ReviewEntry(BaseModel):
    id: int = Field(description="the review item's id (GET /review/{id}/image, POST /review/{id}/teach, "
                                "DELETE /review/{id})")
    label: str = Field(description="the best guess when the image was predicted")
    confidence: float
    ood_score: float | None
    abstained: bool = Field(description="the answer was \"none of these\" (path abstain)")
    path: Literal["memory", "network", "abstain"]
    time: float = Field(description="when it joined the queue, or was predicted again (unix seconds)")
    content_type: str
    image_url: str = Field(description="its image, as received (needs the token)")
    model_version: str


class ReviewList(BaseModel):
    items: list[ReviewEntry] = Field(description="newest first")
    size: int = Field(description="images in the queue")
    max_items: int = Field(description="REVIEW_QUEUE_MAX: the oldest are dropped beyond it")
    max_age: float = Field(description="REVIEW_QUEUE_MAX_AGE: seconds an image stays at most")
    confidence_below: float = Field(description="an answer less confident than this joins the queue (abstained "
                                                "ones always do)")


class ReviewTeach(BaseModel):
    label: str = Field(min_length=1, max_length=200, description="class name or index; a new name teaches a "
                                                                 "new class")


class Dismissed(BaseModel):
    id: int
    dismissed: bool = True


class MemoryResponse(BaseModel):
    kind: str
    capacity: int
    size: int
    per_class: dict[str, int]
    replacements: int
    feedback_items: int = 0
    taught_rows: list[str] = Field(default_factory=list, description="labels with a head row fitted on their "
                                                                     "taught examples")
    classes: list[str] = []
    label_space: int = 0
    last_snapshot_time: float | None = None
    applied_seq: int = Field(0, description="the last feedback log sequence applied to this memory")
    feedback_store: str = ""
    model_version: str = ""
    pid: int = Field(0, description="the server process that answered (several serve one port with --workers)")
    policy: dict = Field(default_factory=dict, description="the routing policy in force (manifest + overrides)")
    policy_overrides: dict = Field(default_factory=dict, description="policy fields set at serve time")
    device: str = Field("cpu", description="where the model and its memory live (DEVICE)")
    engine: str = Field("eager", description="the network's inference engine in force (ENGINE): eager or "
                                             "openvino-int8; the memory's keys are that engine's")
    state_hash: str = Field("", description="sha256 of the memory state: equal across processes exactly when "
                                            "their memories are")


class SnapshotResponse(BaseModel):
    file: str
    last_seq: int
    time: float


class Health(BaseModel):
    status: str
    model: str | None = None
    model_version: str | None = None
