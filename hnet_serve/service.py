"""The BentoML 1.4 service: one checkpoint, every task, over HTTP.

Routes
  ``POST /predict``  ``{"task": "<name>" | null, "inputs": [[...], ...]}`` ->
                     ``{"task", "predictions", "probabilities"}`` (+ ``inferred``, ``confidence``)
  ``GET /tasks``     every task (name, input shape, classes, labels, cached, pinned) and cache stats
  ``/livez``, ``/readyz`` (BentoML's; ready only once the checkpoint is loaded), ``/metrics``
  (BentoML's plus ``hnet_cache_*`` and ``hnet_requests_total{task}``).

The checkpoint comes from the BentoML model store (``HNET_MODEL_TAG``, default ``hnet:latest``,
declared as a class-level ``BentoModel`` so ``bentoml build`` packs it) or from a directory
(``HNET_CHECKPOINT``); every other setting is a :class:`~hnet_serve.runtime.ServingConfig` field
read from ``HNET_*`` variables or the file named by ``HNET_CONFIG`` (docs/serving.md).

Loading runs in a background thread, so ``/livez`` answers at once and ``/readyz`` stays 503
until the runtime is ready. A checkpoint that fails to load or validate logs one clear error
line and leaves the service unready for good: it never serves from a half-loaded model.

Adaptive batching: concurrent requests are batched cork-style (:class:`AdaptiveBatcher`): while
one batch runs, arriving requests queue, and when it finishes everything queued (up to
``max_rows`` rows) runs as the next batch through ``Runtime.predict_mixed``, which groups rows by
task (stacked weights and one batched matmul per layer for MLP targets). This happens in-process,
behind the public endpoint, without BentoML's self-call HTTP hop (see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hnet_serve.errors import HNetError
from hnet_serve.runtime import Prediction, Runtime, ServingConfig

# Under "bentoml" so that `bentoml serve`'s logging setup formats and shows these lines.
logger = logging.getLogger("bentoml.hnet_serve")

MODEL_TAG_ENV = "HNET_MODEL_TAG"
MODEL_TAG = os.environ.get(MODEL_TAG_ENV) or "hnet:latest"
INFERRED = "*"  # the task label of requests without a task ("*" is not a valid task name)


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)


# -- adaptive batching --------------------------------------------------------------------
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

    async def predict(self, task: str | None, x: np.ndarray) -> Prediction:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._wake = loop, asyncio.Event()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[Prediction] = loop.create_future()
        self._pending.append(_Pending(task, x, fut))
        self._wake.set()
        return await fut

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
            mixed = self.runtime.predict_mixed(tasks, np.concatenate([p.x for p in batch]))
        except Exception:  # noqa: BLE001 - one failing request must not fail the whole batch
            return [self._execute_one(p) for p in batch]
        return split_prediction(self.runtime, mixed, batch)

    def _execute_one(self, p: _Pending) -> Prediction | Exception:
        try:
            return self.runtime.predict(p.task, p.x)
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
            )
        )
        start = stop
    return out


# -- request size limit -------------------------------------------------------------------
def _request_limit() -> int:
    try:
        svc = bentoml.get_current_service()
        return int(svc.config.max_request_bytes)
    except Exception:  # noqa: BLE001 - no instance yet: the default limit
        return ServingConfig().max_request_bytes


class BodyLimitMiddleware:
    """400 for request bodies over ``max_request_bytes`` (declared or streamed)."""

    def __init__(self, app: Any, limit: Any = _request_limit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = error_response(
            400, f"request body too large: over max_request_bytes={limit}", "InputError"
        )
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                await too_large(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # Chunked body: read it (up to the limit) and replay it to the app.
        messages: deque[dict] = deque()
        size = 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > limit:
                await too_large(scope, receive, send)
                return
            if not msg.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.popleft() if messages else await receive()

        await self.app(scope, replay, send)


# -- request media types -----------------------------------------------------------------
# BentoML picks a body parser by Content-Type; a malformed form body makes its form parser raise,
# which BentoML answers with a 500 (found by tests/test_http_fuzz.py). Every POST route here
# takes JSON, so form (and pickle) bodies are refused up front.
_NOT_JSON = ("multipart/form-data", "application/x-www-form-urlencoded",
             "application/vnd.bentoml+pickle")


class JsonBodyMiddleware:
    """415 for POST bodies sent as a form or a pickle (any of the Content-Type headers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            for key, value in scope.get("headers") or []:
                media = value.split(b";")[0].strip().lower().decode("latin-1")
                if key.lower() == b"content-type" and media in _NOT_JSON:
                    await error_response(
                        415, f"the request body must be JSON (content-type: application/json), "
                        f"not {media}", "UnsupportedMediaType",
                    )(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# -- the OpenAPI document -----------------------------------------------------------------
def openapi_document() -> dict[str, Any]:
    """BentoML's OpenAPI document, with the error ``detail`` field typed as BentoML sends it.

    BentoML 1.4 declares ``detail`` a string, but answers request validation errors with
    pydantic's list of errors; clients generated from the schema (and schema checks) would
    reject every such 400.
    """
    spec = HNetService.openapi_spec.asdict()
    for schema in spec.get("components", {}).get("schemas", {}).values():
        detail = schema.get("properties", {}).get("detail")
        if isinstance(detail, dict) and detail.get("type") == "string":
            schema["properties"]["detail"] = {
                "title": detail.get("title", "Error Detail"),
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
            }
    return spec


class OpenAPIMiddleware:
    """Serves :func:`openapi_document` at ``GET /docs.json``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/docs.json" and scope.get(
            "method"
        ) in ("GET", "HEAD"):
            await JSONResponse(openapi_document())(scope, receive, send)
            return
        await self.app(scope, receive, send)


# -- GET /tasks ---------------------------------------------------------------------------
async def _tasks_endpoint(request: Request) -> JSONResponse:
    try:
        svc = bentoml.get_current_service()
    except Exception:  # noqa: BLE001
        return error_response(503, "service is starting", "NotReady")
    return svc.tasks_response()


tasks_app = Starlette(routes=[Route("/tasks", _tasks_endpoint, methods=["GET"])])


# -- the service --------------------------------------------------------------------------
@bentoml.asgi_app(tasks_app, path="/", name="tasks")
@bentoml.service(
    name="hnet",
    workers=1,  # one runtime per process holds the cache; scale with intra-op threads
    traffic={"timeout": 300},
    labels={"project": "hnet-serve"},
)
class HNetService:
    """Serves every task of one hypernetwork checkpoint."""

    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.config: ServingConfig = ServingConfig()
        self.runtime: Runtime | None = None
        self.batcher: AdaptiveBatcher | None = None
        self.load_error: str | None = None
        self.checkpoint_path: str | None = None
        self._requests: Counter[str] = Counter()
        self._requests_lock = threading.Lock()
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._load, name="hnet-load", daemon=True)
        self._loader.start()

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        from hnet_serve.checkpoint import load_checkpoint

        try:
            self.config = ServingConfig.from_env()
            if self.config.checkpoint:
                path = self.config.checkpoint
            else:
                from hnet_serve.store import checkpoint_dir

                path = str(checkpoint_dir(self.model))
            self.checkpoint_path = path
            model = load_checkpoint(path)
            runtime = Runtime(model, self.config.model_copy(update={"checkpoint": path}))
            self.batcher = AdaptiveBatcher(runtime)
            self.runtime = runtime
            logger.info(
                "hnet-serve: ready: %d tasks from %s (backend %s, cache %d bytes)",
                len(model.registry), path, runtime.backend.name, self.config.cache_bytes,
            )
        except Exception as exc:  # noqa: BLE001 - every failure must leave the service unready
            where = self.checkpoint_path or f"model {MODEL_TAG}"
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "hnet-serve: NOT READY: the checkpoint %s failed to load, /readyz stays 503: %s",
                where, self.load_error,
            )
        finally:
            self._ready.set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading finished (successfully or not); True when ready to serve."""
        self._ready.wait(timeout)
        return self.runtime is not None

    def __is_ready__(self) -> bool:
        return self.runtime is not None

    def _not_ready(self) -> JSONResponse:
        if self.load_error:
            return error_response(503, f"checkpoint failed to load: {self.load_error}", "NotReady")
        return error_response(503, "the checkpoint is still loading", "NotReady")

    # -- routes ----------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(
        self,
        inputs: Annotated[
            list[Any], Field(description="rows shaped like the task's input, or flattened")
        ],
        task: Annotated[
            str | None, Field(description="task name; null or absent: infer it per row")
        ] = None,
    ) -> dict[str, Any]:
        """Predict ``inputs`` under ``task``; without a task, infer it per row (HNET+ENT)."""
        runtime, batcher = self.runtime, self.batcher
        if runtime is None or batcher is None:
            return self._not_ready()  # type: ignore[return-value]
        try:
            x = runtime.validate_inputs(inputs, task)
            pred = await batcher.predict(task, x)
        except HNetError as exc:
            return error_response(exc.http_status, str(exc), type(exc).__name__)  # type: ignore[return-value]
        with self._requests_lock:
            self._requests[task if task is not None else INFERRED] += 1
        return pred.to_json()

    def tasks_response(self) -> JSONResponse:
        if self.runtime is None:
            return self._not_ready()
        return JSONResponse(self.runtime.info())

    def __metrics__(self, content: str) -> str:
        """Append the cache counters and per-task request counts to BentoML's metrics."""
        return content + metrics_text(self.runtime, self._requests_snapshot())

    def _requests_snapshot(self) -> dict[str, int]:
        with self._requests_lock:
            return dict(self._requests)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


HNetService.add_asgi_middleware(BodyLimitMiddleware)
HNetService.add_asgi_middleware(JsonBodyMiddleware)
HNetService.add_asgi_middleware(OpenAPIMiddleware)


def metrics_text(runtime: Runtime | None, requests: dict[str, int]) -> str:
    """Prometheus text for the cache statistics and request counts (prometheus_client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            stats = runtime.cache.stats() if runtime is not None else {}
            for key, doc in (
                ("hits", "cache lookups served from the cache"),
                ("misses", "cache lookups that had to generate (or wait for) a task"),
                ("evictions", "tasks evicted to stay within the byte budget"),
                ("generated", "tasks generated by the hypernetwork"),
            ):
                yield CounterMetricFamily(f"hnet_cache_{key}", doc, value=stats.get(key, 0))
            for key, doc in (
                ("bytes", "bytes held by cached tasks"),
                ("capacity_bytes", "cache budget in bytes"),
                ("entries", "cached tasks"),
            ):
                yield GaugeMetricFamily(f"hnet_cache_{key}", doc, value=stats.get(key, 0))
            counts = CounterMetricFamily(
                "hnet_requests", "predict requests by task ('*': task inferred)", labels=["task"]
            )
            for task, n in sorted(requests.items()):
                counts.add_metric([task], n)
            yield counts
            yield GaugeMetricFamily(
                "hnet_ready", "1 once the checkpoint is loaded", value=float(runtime is not None)
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


__all__ = [
    "AdaptiveBatcher", "BodyLimitMiddleware", "HNetService", "JsonBodyMiddleware",
    "OpenAPIMiddleware", "metrics_text", "openapi_document",
]
