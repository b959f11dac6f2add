"""What one app instance holds: settings, the runtime, the batcher, metrics, the model thread."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..serving.batching import BatchConfig, DynamicBatcher
from ..serving.runtime import ModelRuntime
from .metrics import Metrics
from .settings import ServiceConfig, usable_cores


def _background_priority() -> None:
    try:  # on Linux a thread has its own nice value; raising it needs no privilege
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class AppState:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.runtime: ModelRuntime | None = None
        self.batcher: DynamicBatcher | None = None  # None: MAX_BATCH_SIZE 1, each request runs alone
        self.embed_batcher: DynamicBatcher | None = None  # /feedback's embeddings, batched the same way
        self.ready = False
        self.metrics = Metrics()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # snapshots: one at a time, on a thread at background CPU priority, so that writing a
        # large memory takes the cores only when predictions leave them idle
        self.snapshot_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot",
                                                  initializer=_background_priority)
        # image decoding: bounded by the cores, not by the web server's 40-thread pool
        self.decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads or usable_cores(),
                                              thread_name_prefix="decode")

    def not_ready_reason(self) -> str | None:
        """Why this process should not take traffic now (None: ready)."""
        if not self.ready or self.runtime is None:
            return "the model is not loaded yet"
        return self.runtime.not_ready_reason()

    async def on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def snapshot(self):
        """The runtime's snapshot, on the snapshot thread."""
        return await asyncio.get_running_loop().run_in_executor(self.snapshot_thread, self.runtime.snapshot)

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        self.metrics.batch_size.observe(size)
        for w in waits:
            self.metrics.batch_queue.observe(w)

    def start_batcher(self) -> None:
        cfg = self.config
        if cfg.max_batch_size > 1:
            rt = self.runtime
            self.batcher = DynamicBatcher(lambda x: self.on_model_thread(rt.predict, x),
                                          BatchConfig(cfg.max_batch_size, cfg.max_batch_wait_ms), self._observe_batch)
            self.batcher.start()
            if rt.memory is not None:  # concurrent feedback requests share one backbone pass
                self.embed_batcher = DynamicBatcher(lambda x: self.on_model_thread(rt.embed_batch, x),
                                                    BatchConfig(cfg.max_batch_size, cfg.max_batch_wait_ms))
                self.embed_batcher.start()

    async def stop_batchers(self) -> None:
        for b in (self.batcher, self.embed_batcher):
            if b is not None:
                await b.stop()

    async def predict(self, images: torch.Tensor):
        """Through the dynamic batcher, or straight to the model thread without one."""
        if self.batcher is None:
            served = await self.on_model_thread(self.runtime.predict, images)
            self._observe_batch(len(images), [])
            return served, len(images)
        r = await self.batcher.submit(images)
        return r.result.select(r.rows), r.batch_size

    async def embed(self, images: torch.Tensor) -> list:
        """Feedback images -> the vectors this model version stores, batched with concurrent requests."""
        if self.embed_batcher is None:
            return await self.on_model_thread(self.runtime.embed, images)
        r = await self.embed_batcher.submit(images)
        return list(r.result[r.rows].numpy())

    def update_memory_gauges(self) -> None:
        rt = self.runtime
        if rt is not None and rt.memory is not None:
            self.metrics.memory_size.set(rt.memory.size)
            self.metrics.memory_capacity.set(rt.memory.capacity)
