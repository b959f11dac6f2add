"""Adaptive batching: concurrent requests queue up and run through the model as one batch.

The worker takes every request waiting at the moment the model is free (up to
`max_batch_size` images) and runs them at once; it does not wait for more. A lone client
therefore never waits (the model is idle when its request arrives), and under load the
requests that arrive while a batch runs form the next batch by themselves: the batch size
follows the load. `max_wait_ms` > 0 adds the classic fixed delay (TorchServe's
maxBatchDelay, LitServe's batch_timeout): after the first request, keep collecting until
the batch is full or that much time has passed.

Plain asyncio and torch: no web framework. `run_batch` is whatever runs the model off the
event loop (the app passes its model-thread executor).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch


@dataclass
class BatchConfig:
    max_batch_size: int = 32
    """MAX_BATCH_SIZE: most images run through the model together (1 = no batching)."""
    max_wait_ms: float = 0.0
    """MAX_BATCH_WAIT_MS: longest a request waits for others to join its batch (0 = adaptive: never wait)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"MAX_BATCH_SIZE must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"MAX_BATCH_WAIT_MS must be >= 0, got {self.max_wait_ms}")


@dataclass
class _Pending:
    images: torch.Tensor  # (n, C, H, W)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchResult:
    rows: slice  # this request's rows of the batch result
    result: object  # what run_batch returned for the whole batch
    batch_size: int
    queue_seconds: float  # from submit until its batch started running


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[torch.Tensor], Awaitable[object]], config: BatchConfig,
                 on_batch: Callable[[int, list[float]], None] | None = None):
        self.run_batch, self.config, self.on_batch = run_batch, config, on_batch
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # a request that did not fit the last batch
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in ([self._carry] if self._carry else []) + [self.queue.get_nowait() for _ in range(self.queue.qsize())]:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the service is shutting down"))

    async def submit(self, images: torch.Tensor) -> BatchResult:
        """Queue (n, C, H, W) images; returns once their batch has run."""
        p = _Pending(images, asyncio.get_running_loop().create_future())
        await self.queue.put(p)
        return await p.future

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self.queue.get()
        self._carry = None
        batch, n = [first], len(first.images)
        deadline = first.enqueued + self.config.max_wait_ms / 1e3
        while n < self.config.max_batch_size:
            if not self.queue.empty():
                p = self.queue.get_nowait()
            elif self.config.max_wait_ms <= 0:
                break  # adaptive: run what is waiting now
            else:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    p = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if n + len(p.images) > self.config.max_batch_size:
                self._carry = p  # leads the next batch
                break
            batch.append(p)
            n += len(p.images)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = await self._collect()
            batch = [p for p in batch if not p.future.done()]  # the client went away
            if not batch:
                continue
            started = time.perf_counter()
            waits = [started - p.enqueued for p in batch]
            images = torch.cat([p.images for p in batch])  # (N, C, H, W)
            if self.on_batch:
                self.on_batch(len(images), waits)
            try:
                result = await self.run_batch(images)
            except Exception as e:  # every request of the batch gets the error; the worker goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            start = 0
            for p, wait in zip(batch, waits):
                rows = slice(start, start + len(p.images))
                start = rows.stop
                if not p.future.done():
                    p.future.set_result(BatchResult(rows, result, len(images), wait))
