"""The HTTP service: the app factory and its lifespan (load, warm up, serve, snapshot on the
way out). Endpoints are in routers.py, request parsing in requests.py, errors in errors.py.
`uvicorn --factory service.web.app:create_app_from_environment` serves the app configured
from the environment.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..serving.review_queue import PRUNE_INTERVAL, ReviewQueue, ReviewSettings
from ..serving.runtime import ModelRuntime
from ..serving.snapshots import SnapshotError
from . import docs, inference_protocol, page
from .errors import install_error_handlers
from .middleware import LimitsAndMetrics
from .routers import router
from .settings import ServiceConfig
from .state import AppState

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: AppState = app.state.service
    cfg = state.config
    state.runtime = rt = await state.on_model_thread(
        lambda: ModelRuntime(cfg.model_store, cfg.model_name, cfg.state_dir, cfg.policy_overrides(),
                             cfg.memory_index, cfg.index_nprobe, cfg.protect_feedback, cfg.feedback_db,
                             store_options=cfg.store_options(), device=cfg.device, engine=cfg.engine))
    rt.start_tail(listener=state.metrics.tail_changed)  # what other processes commit
    spec = rt.loaded.input
    await state.on_model_thread(rt.predict, torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size))
    state.metrics.set_model_info(name=rt.loaded.name, version=rt.loaded.version, memory_kind=rt.model.config.memory,
                                 threshold=str(rt.policy.confidence_threshold),
                                 policy=json.dumps(rt.policy.to_dict(), sort_keys=True),
                                 policy_overrides=json.dumps(rt.overrides, sort_keys=True), device=str(rt.device),
                                 engine=rt.engine)
    state.update_memory_gauges()
    app.state.review_queue = queue = make_review_queue(cfg, rt, state)
    state.start_batcher()
    # the libraries' and the model's objects live as long as the process: out of the
    # collector's reach, so that a full collection scans only what requests made (with them
    # in, one stalled every request in the process: BENCHMARKS.md, "Load")
    gc.collect()
    gc.freeze()
    state.ready = True
    log.info("ready: model %s version %s, policy %s", rt.loaded.name, rt.loaded.version, rt.policy)
    tasks = [asyncio.create_task(_periodic_snapshots(state))] if cfg.snapshot_interval > 0 else []
    if queue is not None:
        tasks.append(asyncio.create_task(_periodic_review_prune(queue)))
    try:
        yield
    finally:
        state.ready = False
        for task in tasks:
            task.cancel()
        await state.stop_batchers()
        if rt.memory is not None:
            try:
                await state.on_model_thread(rt.snapshot)
                log.info("shutdown snapshot written")
            except (OSError, SnapshotError) as e:
                log.error("shutdown snapshot failed: %s", e)
        rt.close()
        state.metrics.process_exited()
        state.model_thread.shutdown(wait=True)
        state.decode_pool.shutdown(wait=True)
        state.snapshot_thread.shutdown(wait=True)


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    """The app; `config` defaults to ServiceConfig() read from the environment."""
    config = config or ServiceConfig()
    app = FastAPI(title="Memory-augmented image classifier", version="0.2.0", lifespan=lifespan,
                  description="Predicts image classes through a feature memory or the network head; "
                              "labelled feedback updates the memory online.",
                  docs_url=None, redoc_url=None)  # self-hosted in docs.py: no CDN
    app.state.service = state = AppState(config)
    app.add_middleware(LimitsAndMetrics, max_body=config.max_upload_bytes, metrics=state.metrics,
                       body_timeout=config.body_timeout, body_deadline=config.body_deadline)
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(inference_protocol.router)
    app.include_router(page.router)
    app.include_router(docs.router)
    app.mount(page.STATIC_URL, StaticFiles(directory=page.STATIC_DIR), name="static")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")
    return app


def make_review_queue(cfg: ServiceConfig, rt: ModelRuntime, state: AppState) -> ReviewQueue | None:
    """The review queue when REVIEW_QUEUE is on and the model has a memory (its store holds
    the queue, and only a memory can be taught what a reviewer says); else None."""
    if not cfg.review_queue:
        return None
    if rt.store is None:
        log.warning("REVIEW_QUEUE=on ignored: model %s has no memory (nothing to teach, no store)", rt.loaded.name)
        return None
    below = cfg.review_confidence_below
    settings = ReviewSettings(cfg.review_queue_max, cfg.review_queue_max_age,
                              rt.policy.confidence_threshold if below is None else below)
    m = state.metrics
    queue = ReviewQueue(rt.store, settings, rt.version, on_size=m.review_queue_items.set,
                        on_offer=lambda outcome: m.review_queue_images.labels(outcome).inc())
    m.review_queue_items.set(queue.size())
    log.info("review queue on: %s", settings)
    return queue


async def _periodic_review_prune(queue: ReviewQueue) -> None:
    """Expired images leave the queue, and dropped ones the database's files, without traffic."""
    while True:
        await asyncio.sleep(PRUNE_INTERVAL)
        try:
            await asyncio.to_thread(queue.prune)
        except Exception as e:  # the store is down: the next prune tries again
            log.warning("review queue prune failed: %s", e)


async def _periodic_snapshots(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.config.snapshot_interval)
        rt = state.runtime
        if rt is not None and rt.dirty:
            try:
                await state.snapshot()  # off the model thread
            except (OSError, SnapshotError) as e:
                log.error("periodic snapshot failed: %s", e)


def create_app_from_environment() -> FastAPI:
    """uvicorn's app factory: `uvicorn --factory service.web.app:create_app_from_environment`
    (settings from the environment variables), and each process of `python -m service serve
    --workers N` (the settings that command resolved, ServiceConfig.from_environment)."""
    return create_app(ServiceConfig.from_environment())
