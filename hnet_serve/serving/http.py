"""ASGI guards in front of the service: body limits checked before parsing, JSON-only bodies,
client mistakes logged as such, the OpenAPI document, and the one error body every route
answers with (``{"error", "type"}``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from hnet_serve.serving.config import ServingConfig


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)


# -- request bodies: size limit and a pre-scan before any parsing --------------------------
# Bodies up to this size are parsed whatever they hold: a 64 KiB body parses in about a
# millisecond. Past it, the counts below must fit the limits before the body reaches a parser.
PRESCAN_BYTES = 64 * 1024
# Keys beside "inputs" add a comma each; a few spare ones keep valid bodies clear of the bound.
_SLACK = 16


@dataclass(frozen=True)
class BodyBounds:
    """The most a valid ``POST /predict`` body can hold, counted on its raw bytes.

    In JSON each list holds ``k`` elements and ``k - 1`` commas, so the commas inside one row
    (nested or flat) number ``width - 1`` whatever its nesting, and a body of ``n`` rows of
    ``width`` values holds about ``n * width`` commas: ``max_values`` is the cells limit
    (``max_rows`` x row width). Every row is a list, so ``max_lists`` bounds the rows (and
    the nesting): ``1 + max_rows * lists_per_row`` (1 for a flat row; ``1 + d1 + d1*d2 ...``
    for a row nested as its shape ``(d1, d2, ...)``). Brackets and commas inside strings count
    too; a valid body's only string is a task name, which holds neither.
    """

    max_bytes: int
    max_rows: int
    max_values: int | None = None  # None: not ready, no task shapes known yet
    max_lists: int | None = None

    @classmethod
    def of(cls, config: ServingConfig, shapes: list[tuple[int, ...]] | None = None) -> BodyBounds:
        if not shapes:
            return cls(config.max_request_bytes, config.max_rows)
        width = max(math.prod(s) for s in shapes)
        per_row = max(sum(math.prod(s[:k]) for k in range(len(s))) for s in shapes)
        return cls(config.max_request_bytes, config.max_rows,
                   config.max_rows * width + _SLACK, 1 + config.max_rows * per_row + _SLACK)

    def exceeded(self, lists: int, commas: int) -> str | None:
        """Why a body with these counts cannot be a valid request; None if it can."""
        if self.max_lists is not None and lists > self.max_lists:
            return (f"too many rows: the body holds {lists} lists, more than max_rows="
                    f"{self.max_rows} rows can")
        if self.max_values is not None and commas + 1 > self.max_values:
            return (f"too many values: the body holds over {commas} values, more than max_rows="
                    f"{self.max_rows} rows x the row width can ({self.max_values - _SLACK})")
        return None


def _current_service() -> Any:
    try:
        return bentoml.get_current_service()
    except Exception:  # noqa: BLE001 - no instance yet
        return None


def _current_bounds() -> BodyBounds:
    svc = _current_service()
    if svc is None:
        return BodyBounds.of(ServingConfig())
    runtime = getattr(svc, "runtime", None)
    return BodyBounds.of(svc.config, runtime.input_shapes() if runtime is not None else None)


# nginx's code for "client closed the request": what a client that disconnects mid-upload is
# counted as in BentoML's request metrics (it used to be a 500 and an ERROR traceback).
CLIENT_CLOSED = 499


class RequestBodyMiddleware:
    """Reads every POST body before the app does, and refuses one the service cannot take.

    * 400 past ``max_request_bytes``: a declared ``Content-Length`` before reading, a streamed
      body as soon as it passes the limit;
    * 400 for a body past :data:`PRESCAN_BYTES` whose bracket or comma count (``bytes.count``,
      about 1 ms per MiB, as the chunks arrive) exceeds :class:`BodyBounds`: the row and cells
      limits, before any JSON parser builds Python objects (a 64 MiB body of 16 M one-value
      rows took 3.5 GB and stalled the event loop for 25 s inside the parser). The rest of such
      a body is read and dropped, not kept, so the client gets its answer;
    * a client that disconnects mid-upload gets nothing and is counted as
      :data:`CLIENT_CLOSED`, never reaching the app (where it was a 500 with a traceback);
    * while the checkpoint is not loaded, the service's 503 before the body is read.

    The body is then replayed to the app as one message (no second copy is joined).
    """

    def __init__(self, app: Any, bounds: Callable[[], BodyBounds] = _current_bounds) -> None:
        self.app = app
        self.bounds = bounds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        bounds = self.bounds()
        limit = bounds.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = error_response(
            400, f"request body too large: over max_request_bytes={limit}", "InputError"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        svc = _current_service()
        if svc is not None and getattr(svc, "runtime", True) is None:
            await svc.not_ready_response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = lists = commas = 0
        refused: str | None = None
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                await error_response(CLIENT_CLOSED, "client closed the request",
                                     "ClientDisconnect")(scope, receive, send)
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return
            if refused is None:
                lists += chunk.count(b"[")
                commas += chunk.count(b",")
                if size > PRESCAN_BYTES:
                    refused = bounds.exceeded(lists, commas)
                if refused is None:
                    chunks.append(chunk)
                else:
                    chunks.clear()
            if not msg.get("more_body", False):
                break
        if refused is not None:
            await error_response(400, refused, "InputError")(scope, receive, send)
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

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


# -- client mistakes in the log ---------------------------------------------------------------
class ClientErrorLogFilter(logging.Filter):
    """Turns BentoML's ERROR-with-traceback for a client's mistake into one INFO line.

    BentoML's API handler logs every exception it answers, request validation errors (malformed
    JSON, a missing field, nesting past the parser's limit) and its own 4xx included, with
    ``logger.error(..., exc_info=True)`` (``bentoml._internal.server.http_app.log_exception``):
    583 tracebacks in 20 s of hostile traffic, indistinguishable from server faults. Exceptions
    that are not the client's (5xx, anything else) keep their ERROR and traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_client_error(exc):
            return True
        summary = " ".join(str(exc).split())
        prefix = record.getMessage().replace("%", "%%")
        record.msg = f"{prefix}: client error ({type(exc).__name__}): %s"
        record.args = (summary[:200] + ("…" if len(summary) > 200 else ""),)
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info = record.exc_text = None
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and int(exc.error_code) < 500


def install_client_error_log_filter() -> None:
    """Attach :class:`ClientErrorLogFilter` to the logger BentoML's API handler uses (once)."""
    from bentoml._internal.server import http_app

    if not any(isinstance(f, ClientErrorLogFilter) for f in http_app.logger.filters):
        http_app.logger.addFilter(ClientErrorLogFilter())


# -- the OpenAPI document -----------------------------------------------------------------
def openapi_document(service: Any) -> dict[str, Any]:
    """BentoML's OpenAPI document, with the error ``detail`` field typed as BentoML sends it.

    BentoML 1.4 declares ``detail`` a string, but answers request validation errors with
    pydantic's list of errors; clients generated from the schema (and schema checks) would
    reject every such 400.
    """
    spec = service.openapi_spec.asdict()
    for schema in spec.get("components", {}).get("schemas", {}).values():
        detail = schema.get("properties", {}).get("detail")
        if isinstance(detail, dict) and detail.get("type") == "string":
            schema["properties"]["detail"] = {
                "title": detail.get("title", "Error Detail"),
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}],
            }
    return spec


class OpenAPIMiddleware:
    """Serves :func:`openapi_document` of ``service`` at ``GET /docs.json``."""

    def __init__(self, app: Any, service: Any) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == "/docs.json" and scope.get(
            "method"
        ) in ("GET", "HEAD"):
            await JSONResponse(openapi_document(self.service))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class VersionHeaderMiddleware:
    """``x-hnet-version: <content hash>`` on every HTTP response once the checkpoint is loaded,
    so a client knows which version answered (docs/serving.md). A request that ran on a version
    names that one (:func:`note_version`), even when a reload swapped versions meanwhile; other
    responses name the version served when they start."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered: dict[str, bytes] = {}  # shared with the handler, whatever task runs it
        token = _ANSWERED_BY.set(answered)

        async def send_with_version(message: dict) -> None:
            if message["type"] == "http.response.start":
                version = answered.get("version") or _served_version()
                if version is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-hnet-version", version)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_version)
        finally:
            _ANSWERED_BY.reset(token)


_ANSWERED_BY: ContextVar[dict[str, bytes] | None] = ContextVar("hnet_answered_by", default=None)


def note_version(version: str) -> None:
    """Record that the current request runs on ``version`` (its ``x-hnet-version``)."""
    answered = _ANSWERED_BY.get()
    if answered is not None:
        answered["version"] = version.encode()


def _served_version() -> bytes | None:
    try:
        return bentoml.get_current_service().version_header
    except Exception:  # noqa: BLE001 - no instance yet: no header
        return None
