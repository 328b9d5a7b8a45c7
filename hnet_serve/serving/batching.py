"""Adaptive (cork-style) batching of concurrent requests into ``Runtime.predict_mixed`` calls.

No fixed wait: an idle batcher runs a request at once; under load, the requests that arrive while
a batch runs form the next one (up to ``max_rows`` rows), so batches grow with load. It runs
in-process, behind the public endpoint, without BentoML's self-call HTTP hop (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from hnet_serve.serving.runtime import Prediction, Runtime


@dataclass
class _Pending:
    task: str | None
    x: np.ndarray  # (n, *input_shape) float32, already validated
    future: asyncio.Future[Prediction]


class AdaptiveBatcher:
    """Cork-style batching of concurrent requests into ``Runtime.predict_mixed`` calls.

    No fixed wait: an idle batcher runs a request at once; under load, the requests that arrive
    while a batch runs form the next one (up to ``max_rows`` rows), so batches grow with load.
    One batch runs at a time, in a dedicated thread (the backends use every core themselves).
    """

    def __init__(self, runtime: Runtime, max_rows: int | None = None) -> None:
        self.runtime = runtime
        self.max_rows = max_rows or runtime.config.max_rows
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hnet-batch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.batched_requests = 0
        self.in_flight = 0  # requests queued or running (read on the event loop: no lock)

    async def predict(self, task: str | None, x: np.ndarray) -> Prediction:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._wake = loop, asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[Prediction] = loop.create_future()
        self._pending.append(_Pending(task, x, fut))
        self._wake.set()
        self.in_flight += 1
        try:
            return await fut
        finally:
            self.in_flight -= 1

    def _take(self) -> list[_Pending]:
        batch = [self._pending.popleft()]
        rows = batch[0].x.shape[0]
        while self._pending and rows + self._pending[0].x.shape[0] <= self.max_rows:
            item = self._pending.popleft()
            batch.append(item)
            rows += item.x.shape[0]
        return [p for p in batch if not p.future.done()]  # drop requests already cancelled

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        if wake is None:  # pragma: no cover - predict() sets it before starting this task
            return
        while True:
            await wake.wait()
            wake.clear()
            while self._pending:
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._execute, batch)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                self.batches += 1
                self.batched_requests += len(batch)
                for p, result in zip(batch, results):
                    if p.future.done():
                        continue
                    if isinstance(result, Exception):
                        p.future.set_exception(result)
                    else:
                        p.future.set_result(result)

    def _execute(self, batch: list[_Pending]) -> list[Prediction | Exception]:
        generated = self.runtime.cache.stats()["generated"]
        try:
            return self._predict(batch)
        finally:
            if self.runtime.cache.stats()["generated"] != generated:
                release_free_memory()  # this batch generated (and so evicted) weights

    def _predict(self, batch: list[_Pending]) -> list[Prediction | Exception]:
        if len(batch) == 1:
            return [self._execute_one(batch[0])]
        tasks = [p.task for p in batch for _ in range(p.x.shape[0])]
        try:
            mixed = self.runtime.predict_mixed(tasks, np.concatenate([p.x for p in batch]),
                                               validated=True)
        except Exception:  # noqa: BLE001 - one failing request must not fail the whole batch
            return [self._execute_one(p) for p in batch]
        return split_prediction(self.runtime, mixed, batch)

    def _execute_one(self, p: _Pending) -> Prediction | Exception:
        try:
            return self.runtime.predict(p.task, p.x, validated=True)
        except Exception as exc:  # noqa: BLE001 - handed to this request only
            return exc

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Generated weights are large and short-lived, and glibc keeps such freed blocks in its heap:
    in the 60 s load test (benchmarks/load_test.py) the worker's peak RSS rose 355 MiB over its
    RSS at readiness without a trim after the batches that generate, 270 MiB with it (for an
    82 MiB cache). A trim costs about a millisecond; a generation, tens of milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def split_prediction(runtime: Runtime, mixed: Prediction, batch: list[_Pending]) -> list[Prediction]:
    """Cut a mixed-batch prediction back into one prediction per request."""
    out = []
    start = 0
    for p in batch:
        stop = start + p.x.shape[0]
        tasks = mixed.tasks[start:stop]
        classes = runtime.output_classes(p.task)
        out.append(
            Prediction(
                tasks,
                mixed.predictions[start:stop],
                mixed.probabilities[start:stop, :classes],
                inferred=p.task is None,
                confidence=mixed.confidence[start:stop] if p.task is None else None,
                labels=mixed.labels[start:stop],
                task_confidence=(mixed.task_confidence[start:stop]
                                 if p.task is None and mixed.task_confidence is not None
                                 else None),
            )
        )
        start = stop
    return out
