"""The BentoML 1.4 service: one checkpoint, every task, over HTTP.

Routes
  ``POST /predict``  ``{"task": "<name>" | null, "inputs": [[...], ...]}`` ->
                     ``{"task", "predictions", "probabilities"}`` (+ ``inferred``, ``confidence``)
  ``GET /tasks``     every task (name, input shape, classes, labels, cached, pinned) and cache stats
                     (also ``POST /tasks``, so that BentoML's clients have ``tasks()``)
  ``/v2/...``        the Open Inference Protocol (KServe v2), see :mod:`hnet_serve.serving.oip`
  ``/livez``, ``/readyz`` (BentoML's; ready only once the checkpoint is loaded), ``/metrics``
  (BentoML's plus ``hnet_cache_*`` and ``hnet_requests_total{task}``).
  ``GET /version``   the served version (content hash; ``x-hnet-version`` on every response)
  ``POST /admin/reload``, ``POST /admin/rollback``  live versions, token-protected: admin.py,
                     versions.py

The checkpoint comes from the BentoML model store (``HNET_MODEL_TAG``, default ``hnet:latest``,
declared as a class-level ``BentoModel`` so ``bentoml build`` packs it; run from a Bento, the
model it packed unless ``HNET_MODEL_TAG`` is set at run time: :func:`served_model`) or from a
directory (``HNET_CHECKPOINT``); every other setting is a :class:`~hnet_serve.serving.config.ServingConfig` field
read from ``HNET_*`` variables or the file named by ``HNET_CONFIG`` (docs/serving.md).

Loading runs in a background thread, so ``/livez`` answers at once and ``/readyz`` stays 503
until the runtime is ready. A checkpoint that fails to load or validate logs one clear error
line and leaves the service unready for good: it never serves from a half-loaded model.

Adaptive batching: concurrent requests are batched cork-style (:class:`AdaptiveBatcher`): while
one batch runs, arriving requests queue, and when it finishes everything queued (up to
``max_rows`` rows) runs as the next batch through ``Runtime.predict_mixed``, which groups rows by
task (see :mod:`hnet_serve.serving.backends` for when weights are stacked). This happens in-process,
behind the public endpoint, without BentoML's self-call HTTP hop (see docs/serving.md).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from typing import Annotated, Any

import bentoml
from pydantic import Field, WithJsonSchema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hnet_serve.errors import HNetError
from hnet_serve.serving.admin import admin_app
from hnet_serve.serving.config import ServingConfig
from hnet_serve.serving.http import (
    JsonBodyMiddleware,
    RequestBodyMiddleware,
    VersionHeaderMiddleware,
    error_response,
    install_client_error_log_filter,
    note_version,
)
from hnet_serve.serving.metrics import install_route_labels, metrics_text
from hnet_serve.serving.oip import ProtocolMiddleware, oip_app
from hnet_serve.serving.runtime import Runtime
from hnet_serve.serving.versions import LiveVersion, VersionSwitch, build_version, load_candidate

# Under "bentoml" so that `bentoml serve`'s logging setup formats and shows these lines.
logger = logging.getLogger("bentoml.hnet_serve")

MODEL_TAG_ENV = "HNET_MODEL_TAG"
MODEL_TAG = os.environ.get(MODEL_TAG_ENV) or "hnet:latest"
INFERRED = "*"  # the task label of requests without a task ("*" is not a valid task name)
# BentoML's clients encode an argument by its declared JSON schema: "tensor" makes them send
# numpy arrays (and torch tensors) as nested lists. The server still validates a list, so a bad
# row keeps our own error message.
TENSOR_INPUT = WithJsonSchema({"type": "tensor", "format": "numpy-array"}, mode="validation")


# -- GET /tasks, GET /version ------------------------------------------------------------
def _service_get(response: str) -> Any:
    """A GET endpoint answering the running service's ``response()`` method."""

    async def endpoint(request: Request) -> JSONResponse:
        try:
            svc = bentoml.get_current_service()
        except Exception:  # noqa: BLE001
            return error_response(503, "service is starting", "NotReady")
        return getattr(svc, response)()

    return endpoint


tasks_app = Starlette(routes=[Route("/tasks", _service_get("tasks_response"), methods=["GET"]),
                              Route("/version", _service_get("version_response"),
                                    methods=["GET"])])


# -- the service --------------------------------------------------------------------------
@bentoml.asgi_app(admin_app, path="/admin", name="admin")  # reload, rollback: admin.py
@bentoml.asgi_app(oip_app, path="/", name="oip")  # the Open Inference Protocol: oip.py
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
        # the served version (runtime, batcher, version record) and reloads: versions.py
        self.versions = VersionSwitch(self.config)
        self.load_error: str | None = None
        self.checkpoint_path: str | None = None
        self._requests: Counter[str] = Counter()
        self._requests_lock = threading.Lock()
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._load, name="hnet-load", daemon=True)
        self._loader.start()

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            self.config = ServingConfig.from_env()
            self.versions.config = self.config
            if self.config.checkpoint:
                path = source = self.config.checkpoint
            else:
                from hnet_serve.serving.store import checkpoint_dir

                stored, why = served_model(self.model)
                logger.info("hnet-serve: serving model %s (%s)", stored.tag, why)
                path, source = str(checkpoint_dir(stored)), str(stored.tag)
            self.checkpoint_path = path
            model, version = load_candidate(path)
            live = build_version(model, version, path, source, self.config)
            self.versions.current = live
            logger.info("hnet-serve: serving version %s (%s)", version, source)
            logger.info(
                "hnet-serve: ready: %d tasks from %s (backend %s, cache %d bytes)",
                len(model.registry), path, live.runtime.backend.name, self.config.cache_bytes,
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

    # The served version's parts; a request takes ``live`` once and uses only that.
    @property
    def live(self) -> LiveVersion | None:
        return self.versions.current

    @property
    def runtime(self) -> Runtime | None:
        return self.live.runtime if self.live is not None else None

    @property
    def batcher(self) -> Any:
        return self.live.batcher if self.live is not None else None

    @property
    def version_info(self) -> dict[str, Any] | None:
        """``{"version", "previous", "tasks", "loaded_at", "source"}`` of the served checkpoint;
        its content hash is its version (x-hnet-version on every response, GET /version)."""
        return self.live.info if self.live is not None else None

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading finished (successfully or not); True when ready to serve."""
        self._ready.wait(timeout)
        return self.runtime is not None

    def __is_ready__(self) -> bool:
        return self.runtime is not None

    def not_ready_response(self) -> JSONResponse:
        """The 503 of every route while not ready; the reason without the server's paths (the
        log line has them)."""
        if self.load_error:
            reason = redact_paths(self.load_error, [self.checkpoint_path])
            return error_response(503, f"checkpoint failed to load: {reason}", "NotReady")
        return error_response(503, "the checkpoint is still loading", "NotReady")

    # -- routes ----------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(
        self,
        inputs: Annotated[
            list[Any], Field(description="rows shaped like the task's input, or flattened"),
            TENSOR_INPUT,
        ],
        task: Annotated[
            str | None, Field(description="task name; null or absent: infer it per row")
        ] = None,
        min_confidence: Annotated[
            float | None, Field(ge=0.0, le=1.0, description=(
                "task inference: rows less confident than this abstain (task null, no "
                "prediction) instead of guessing; default: the service's min_confidence"))
        ] = None,
        top_k: Annotated[
            int, Field(ge=0, le=1000, description="task inference: list this many most likely "
                       "tasks per row with their confidence (top_tasks)")
        ] = 3,
    ) -> dict[str, Any]:
        """Predict ``inputs`` under ``task``; without a task, infer it per row (HNET+ENT)."""
        live = self.live  # one version for the whole request (a reload may swap meanwhile)
        if live is None:
            return self.not_ready_response()  # type: ignore[return-value]
        runtime, batcher = live.runtime, live.batcher
        note_version(live.version)
        try:
            x = runtime.validate_inputs(inputs, task)
            pred = await batcher.predict(task, x)
            if task is None:
                threshold = self.config.min_confidence if min_confidence is None else min_confidence
                pred = runtime.decide(pred, min_confidence=threshold, top_k=top_k)
        except HNetError as exc:
            return error_response(exc.http_status, str(exc), type(exc).__name__)  # type: ignore[return-value]
        with self._requests_lock:
            self._requests[task if task is not None else INFERRED] += 1
        return pred.to_json()

    @bentoml.api(route="/tasks")
    async def tasks(self) -> dict[str, Any]:
        """Every task (name, input shape, classes, labels, cached, pinned) and the cache
        statistics; the same as ``GET /tasks``, as an API so that BentoML's clients have it."""
        return self.tasks_response()  # type: ignore[return-value]

    def tasks_response(self) -> JSONResponse:
        live = self.live
        if live is None:
            return self.not_ready_response()
        note_version(live.version)
        return JSONResponse({"version": live.version, **live.runtime.info()})

    def version_response(self) -> JSONResponse:
        live = self.live
        if live is None:
            return self.not_ready_response()
        note_version(live.version)
        return JSONResponse(live.info)

    @bentoml.api(route="/version")
    async def version(self) -> dict[str, Any]:
        """The served checkpoint's version (its content hash), the previous one, its tasks, when
        and from where it was loaded; the same as ``GET /version``."""
        return self.version_response()  # type: ignore[return-value]

    @property
    def version_header(self) -> bytes | None:
        """The value of ``x-hnet-version`` (None until loaded)."""
        return self.version_info["version"].encode() if self.version_info else None

    def __metrics__(self, content: str) -> str:
        """Append the cache counters and per-task request counts to BentoML's metrics."""
        version = self.version_info["version"] if self.version_info else None
        return content + metrics_text(self.runtime, self._requests_snapshot(), version)

    def record_request(self, task: str | None) -> None:
        """Count a served request of ``task`` (None: task inferred) for ``/metrics``."""
        with self._requests_lock:
            self._requests[task if task is not None else INFERRED] += 1

    def _requests_snapshot(self) -> dict[str, int]:
        with self._requests_lock:
            return dict(self._requests)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.live is not None:
            self.live.batcher.close()


def served_model(default: Any) -> tuple[Any, str]:
    """The model-store model to serve and why: ``HNET_MODEL_TAG`` when set at run time (a
    deliberate override), else the model a Bento packed when this runs from one (recorded in its
    bento.yaml at ``bentoml build``: a Bento serves what it was built with, whatever
    ``hnet:latest`` is in the store it runs next to), else ``hnet:latest``."""
    override = os.environ.get(MODEL_TAG_ENV)
    if override:
        return bentoml.models.BentoModel(override).resolve(), f"{MODEL_TAG_ENV} at run time"
    bento = getattr(HNetService, "bento", None)
    if bento is not None:
        for info in bento.info.services:
            if info.name == HNetService.name and info.models:
                packed = info.models[0].tag
                return (bentoml.models.BentoModel(packed).resolve(),
                        f"packed in the Bento {bento.tag}")
    return default, "the default tag"


def redact_paths(message: str, known: list[str | None]) -> str:
    """``message`` with the checkpoint's directory shown as ``<checkpoint>`` and any other
    absolute path as ``<path>``: a client need not learn where the server keeps its files."""
    for path in known:
        if path:
            for spelling in dict.fromkeys([str(path), os.path.realpath(path)]):
                message = message.replace(spelling.rstrip("/"), "<checkpoint>")
    return _ABSOLUTE_PATH.sub("<path>", message)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.<>])/[^\s'\":,)]+")

# BentoML's request metrics labelled by route template, its API handler's log of client
# mistakes one INFO line (docs/reliability.md); both before `bentoml serve` builds the app.
install_route_labels()
install_client_error_log_filter()
HNetService.add_asgi_middleware(VersionHeaderMiddleware)
HNetService.add_asgi_middleware(RequestBodyMiddleware)
HNetService.add_asgi_middleware(JsonBodyMiddleware)
HNetService.add_asgi_middleware(ProtocolMiddleware, service=HNetService)


__all__ = ["HNetService"]
