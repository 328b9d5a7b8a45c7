"""ASGI guards in front of the service: body size limit, JSON-only bodies, the OpenAPI
document, and the one error body every route answers with (``{"error", "type"}``)."""

from __future__ import annotations

from collections import deque
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from hnet_serve.serving.config import ServingConfig


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)


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
