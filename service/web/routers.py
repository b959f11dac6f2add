"""The endpoints: thin, each reads its request, hands the work to the runtime (off the event
loop) and shapes the answer. Their dependencies (the app's state, the runtime, the token) are
in dependencies.py."""

from __future__ import annotations

import math

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..core.preprocess import media_type
from ..serving.feedback_store import Upload
from ..serving.review_queue import ReviewQueue, answers_of
from ..serving.runtime import FeedbackResult, ModelRuntime, Served
from .dependencies import (app_state, observe_prediction, ready_runtime, require_review_queue, require_token,
                           review_queue, runtime)
from .errors import STATUSES, ApiError
from .requests import decode_batch, read_images
from .schemas import (ClassScore, Dismissed, ErrorBody, FeedbackItem, FeedbackList, FeedbackResponse, Forgotten,
                      Health, ImagePrediction, MemoryResponse, NearestItem, PredictJSON, PredictResponse, ReviewEntry,
                      ReviewList, ReviewTeach, SnapshotResponse, StoredExample)
from .state import AppState

ERRORS = {s: {"model": ErrorBody} for s in STATUSES}

_file_array = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": _file_array}}},
    "application/json": {"schema": PredictJSON.model_json_schema()}}}}
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file", "label"], "properties": {
        "file": _file_array,
        "label": {"type": "string", "description": "class name or index; a new name teaches a new class"}}}}}}}

router = APIRouter()
MAX_ID = 2 ** 63 - 1  # feedback ids are 64-bit integers in both stores: larger ones are refused (422), not looked up
FeedbackId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def predict(request: Request, state: AppState = Depends(app_state),
                  rt: ModelRuntime = Depends(runtime), queue: ReviewQueue | None = Depends(review_queue),
                  review: str | None = Header(None, alias="Review-Queue", pattern="^(yes|no)$", description=
                                              "no: never keep these images in the review queue (REVIEW_QUEUE=on "
                                              "keeps those the model is unsure of)")) -> Response:
    t0 = time.perf_counter()
    files = await read_images(request, state.config, allow_json=True)
    batch, decode_s = await decode_batch(files, rt.loaded.input, state.config, state.decode_pool)
    served, batch_size = await state.predict(batch)
    answer = predict_response(rt, served, decode_s, time.perf_counter() - t0, state, batch_size)
    if queue is not None:  # never waits for the store
        queue.offer(files, answers_of(served.prediction, [p.label for p in answer.predictions]),
                    opted_out=review == "no")
    # serialised here, once: FastAPI would validate the model against response_model again
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post("/feedback", response_model=FeedbackResponse, responses=ERRORS, openapi_extra=FEEDBACK_BODY,
             dependencies=[Depends(require_token)])
async def feedback(request: Request, state: AppState = Depends(app_state), rt: ModelRuntime = Depends(runtime),
                   idempotency_key: str | None = Header(None, max_length=200, description=
                                                        "a retried request with the same key gets the first "
                                                        "answer and writes nothing")) -> Response:
    files, label = await read_images(request, state.config, allow_json=False, label_field=True)
    return await teach(state, rt, files, label, idempotency_key)


async def teach(state: AppState, rt: ModelRuntime, files: list[bytes], label: str,
                idempotency_key: str | None) -> Response:
    """The feedback use case over HTTP (POST /feedback, and teaching a review queue item)."""
    rt.check_label(label)  # an early, clear refusal before decoding (microseconds: on the loop)
    batch, _ = await decode_batch(files, rt.loaded.input, state.config, state.decode_pool)
    vectors = await state.embed(batch)
    uploads = [Upload(f, media_type(f)) for f in files]
    result = await run_in_threadpool(rt.submit_feedback, vectors, label, uploads, idempotency_key,
                                     feedback_body, state.metrics.commit_latency.observe)
    if result.replayed:  # a retry: the first answer, byte for byte, counted once
        return Response(result.body, media_type="application/json", headers={"Idempotent-Replayed": "true"})
    for o in result.outcomes:
        state.metrics.feedback.labels(o.action).inc()
    state.update_memory_gauges()
    return Response(result.body, media_type="application/json")


def feedback_body(result: FeedbackResult) -> str:
    return FeedbackResponse(new_class=result.new_class, request_id=result.request_id, items=[
        FeedbackItem(feedback_id=o.feedback_id, action=o.action, slot=o.slot, replaced_label=o.previous_label,
                     label=o.label, label_index=o.label_index) for o in result.outcomes]).model_dump_json()


@router.get("/feedback", response_model=FeedbackList, responses=ERRORS, dependencies=[Depends(require_token)])
async def list_feedback(rt: ModelRuntime = Depends(runtime), limit: int = Query(50, ge=1, le=500),
                        before: int | None = Query(None, ge=1, le=MAX_ID)) -> FeedbackList:
    rows = await run_in_threadpool(rt.store.examples, limit, before)
    items = [StoredExample(id=r.seq, label=r.label, time=r.created, forgotten=r.forgotten is not None,
                           request_id=r.request_id) for r in rows]
    return FeedbackList(items=items, next_before=items[-1].id if len(items) == limit else None)


@router.get("/feedback/{feedback_id}/image", responses=ERRORS, dependencies=[Depends(require_token)],
            response_class=Response)
async def feedback_image(feedback_id: FeedbackId, rt: ModelRuntime = Depends(runtime)) -> Response:
    data, media, forgotten = await run_in_threadpool(rt.store.image, feedback_id)
    if forgotten:
        raise ApiError(410, "forgotten", f"feedback {feedback_id} was forgotten: its image is erased")
    return Response(data, media_type=media or "application/octet-stream")


@router.delete("/feedback/{feedback_id}", response_model=Forgotten, responses=ERRORS,
               dependencies=[Depends(require_token)])
async def forget_feedback(feedback_id: FeedbackId, state: AppState = Depends(app_state),
                          rt: ModelRuntime = Depends(runtime)) -> Forgotten:
    changed = await run_in_threadpool(rt.forget, feedback_id)
    state.update_memory_gauges()
    return Forgotten(id=feedback_id, already=not changed)


# --- the review queue (REVIEW_QUEUE=on; docs/review-queue.md) -------------------------------------
ReviewId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


@router.get("/review", response_model=ReviewList, responses=ERRORS, dependencies=[Depends(require_token)])
async def list_review(queue: ReviewQueue = Depends(require_review_queue),
                      limit: int = Query(50, ge=1, le=500)) -> ReviewList:
    items, size = await run_in_threadpool(lambda: (queue.items(limit), queue.size()))
    s = queue.settings
    return ReviewList(items=[ReviewEntry(
        id=i.id, label=i.label, confidence=i.confidence, ood_score=i.ood_score, abstained=i.abstained, path=i.path,
        time=i.created, content_type=i.content_type, image_url=f"review/{i.id}/image", model_version=i.model_version)
        for i in items], size=size, max_items=s.max_items, max_age=s.max_age, confidence_below=s.confidence_below)


@router.get("/review/{item_id}/image", responses=ERRORS, dependencies=[Depends(require_token)],
            response_class=Response)
async def review_image(item_id: ReviewId, queue: ReviewQueue = Depends(require_review_queue)) -> Response:
    item, data = await run_in_threadpool(queue.item, item_id)
    return Response(data, media_type=item.content_type)


@router.post("/review/{item_id}/teach", response_model=FeedbackResponse, responses=ERRORS,
             dependencies=[Depends(require_token)])
async def teach_review_item(item_id: ReviewId, body: ReviewTeach, state: AppState = Depends(app_state),
                            rt: ModelRuntime = Depends(runtime),
                            queue: ReviewQueue = Depends(require_review_queue)) -> Response:
    """The item's image becomes feedback with this label, then leaves the queue."""
    rt.check_label(body.label)  # before anything is read: a bad label changes nothing
    item, data = await run_in_threadpool(queue.item, item_id)
    answer = await teach(state, rt, [data], body.label, queue.teach_key(item))
    await run_in_threadpool(queue.taught, item_id)
    return answer


@router.delete("/review/{item_id}", response_model=Dismissed, responses=ERRORS,
               dependencies=[Depends(require_token)])
async def dismiss_review_item(item_id: ReviewId, queue: ReviewQueue = Depends(require_review_queue)) -> Dismissed:
    await run_in_threadpool(queue.dismiss, item_id)  # deleted and erased from the store's files
    return Dismissed(id=item_id)


@router.get("/memory", response_model=MemoryResponse, responses=ERRORS)
async def memory(rt: ModelRuntime = Depends(runtime)) -> MemoryResponse:
    # memory_info takes the memory lock: in the thread pool, so the event loop never waits for it
    return MemoryResponse(**await run_in_threadpool(rt.memory_info))


@router.post("/memory/snapshot", response_model=SnapshotResponse, responses=ERRORS,
             dependencies=[Depends(require_token)])
async def snapshot(state: AppState = Depends(app_state), rt: ModelRuntime = Depends(runtime)) -> SnapshotResponse:
    if rt.memory is None:
        raise ApiError(422, "no_memory", "this model has no memory to snapshot")
    try:
        path = await state.snapshot()  # streamed a piece at a time; predictions go on
    except OSError as e:
        raise ApiError(507, "snapshot_failed", f"snapshot not written: {e}")
    return SnapshotResponse(file=path.name, last_seq=rt.stats.last_snapshot_seq, time=rt.stats.last_snapshot_time)


@router.get("/metrics", response_class=Response)
async def metrics(state: AppState = Depends(app_state)) -> Response:
    return Response(await run_in_threadpool(state.metrics.exposition), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"model": ErrorBody}})
async def readyz(rt: ModelRuntime = Depends(ready_runtime)) -> Health:
    return Health(status="ready", model=rt.loaded.name, model_version=rt.loaded.version)


def predict_response(rt: ModelRuntime, served: Served, decode_s: list[float], total_s: float, state: AppState,
                     batch_size: int) -> PredictResponse:
    p = served.prediction
    known = len(rt.classes)
    scores = p.class_scores[:, :known]  # (B, known)
    top_scores, top_idx = scores.topk(min(state.config.top_k, known), dim=-1)  # (B, k)
    items = []
    for i in range(len(p.labels)):
        label, path = int(p.labels[i]), p.paths[i]
        nearest = None
        if int(p.slot[i]) >= 0:
            nearest = NearestItem(slot=int(p.slot[i]), label=served.nearest_labels[i] or "",
                                  similarity=float(p.similarity[i]), feedback_id=served.feedback_ids[i])
        items.append(ImagePrediction(
            label=rt.class_name(label), label_index=label, confidence=float(p.confidence[i]), path=path,
            ood_score=None if math.isnan(ood := float(p.ood_score[i])) else ood, abstained=bool(p.abstained[i]),
            top_k=[ClassScore(label=rt.class_name(int(j)), label_index=int(j), score=float(s))
                   for s, j in zip(top_scores[i].tolist(), top_idx[i].tolist())],
            nearest=nearest, latency_ms=1e3 * total_s))
    observe_prediction(state.metrics, rt, served, decode_s, batch_size)
    return PredictResponse(model=rt.loaded.name, model_version=rt.loaded.version, predictions=items)
