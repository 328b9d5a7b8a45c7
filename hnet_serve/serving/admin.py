"""The admin routes: ``POST /admin/reload`` and ``POST /admin/rollback`` (docs/reliability.md).

Security model: admin routes are off unless the server has a token, from ``HNET_ADMIN_TOKEN``
or the first line of the file named by ``HNET_ADMIN_TOKEN_FILE`` (read on every call, so a
rotated file takes effect at once). Without one they answer 403 and do nothing; a request
without ``Authorization: Bearer <token>``, or with another token, answers 401 (compared with
``hmac.compare_digest``, in constant time). Every admin call is logged as one line: the client's
address, the action and its argument, the status and the outcome; never the token.

``POST /admin/reload`` ``{"checkpoint": "<dir or model tag>", "force": false}`` (both optional:
the default reloads the current source) -> ``{"version", "previous", "added", "removed",
"tasks"}``; ``POST /admin/rollback`` ``{}`` -> the same. See
:mod:`hnet_serve.serving.versions` for what is checked and how the swap happens.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hnet_serve.errors import HNetError, InputError
from hnet_serve.serving.http import error_response

logger = logging.getLogger("bentoml.hnet_serve")

TOKEN_ENV = "HNET_ADMIN_TOKEN"
TOKEN_FILE_ENV = "HNET_ADMIN_TOKEN_FILE"
MAX_ADMIN_BODY = 64 * 1024


def admin_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured admin token, or None (admin routes off). A token file that cannot be
    read counts as no token (and is logged): the routes stay closed."""
    env = os.environ if environ is None else environ
    token = (env.get(TOKEN_ENV) or "").strip()
    if token:
        return token
    path = env.get(TOKEN_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            logger.error("hnet-serve: admin token file %s unreadable (%s): admin routes are off",
                         path, getattr(exc, "strerror", None) or type(exc).__name__)
            return None
        return token or None
    return None


def authorize(request: Request) -> JSONResponse | None:
    """None if the request carries the admin token; else the 403/401 answer."""
    token = admin_token()
    if token is None:
        return error_response(403, f"admin routes are disabled: the server has no admin token "
                              f"({TOKEN_ENV} or {TOKEN_FILE_ENV})", "Forbidden")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        response = error_response(401, "admin routes need Authorization: Bearer <token>",
                                  "Unauthorized")
        response.headers["www-authenticate"] = "Bearer"
        return response
    return None


async def _body(request: Request, fields: dict[str, type]) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY:
        raise InputError(f"admin request body over {MAX_ADMIN_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InputError(f"unknown fields {unknown} (expected {sorted(fields)})")
    for key, kind in fields.items():
        if body.get(key) is not None and type(body[key]) is not kind:
            raise InputError(f"{key} must be a {kind.__name__}, got {body[key]!r}")
    return body


def _admin(action: str) -> Any:
    async def endpoint(request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        what = action
        try:
            svc = bentoml.get_current_service()
        except Exception:  # noqa: BLE001
            svc = None
        denied = authorize(request)
        if denied is not None:
            response: Response = denied
        elif svc is None or getattr(svc, "runtime", None) is None:
            response = error_response(503, "the service is not ready", "NotReady")
        else:
            try:
                if action == "reload":
                    body = await _body(request, {"checkpoint": str, "force": bool})
                    what = f"reload {body.get('checkpoint') or '(current source)'}" + (
                        " force" if body.get("force") else "")
                    result = await svc.versions.reload(body.get("checkpoint"),
                                                       force=bool(body.get("force")))
                else:
                    await _body(request, {})
                    result = await svc.versions.rollback()
                response = JSONResponse(result)
            except HNetError as exc:
                response = error_response(exc.http_status, str(exc), type(exc).__name__)
        outcome = (json.loads(response.body).get("error") if response.status_code != 200
                   else f"version {json.loads(response.body)['version'][:16]}")
        log = logger.info if response.status_code == 200 else logger.warning
        log("hnet-serve admin: %s from %s -> %d %s", what, client, response.status_code, outcome)
        return response

    return endpoint


admin_app = Starlette(routes=[Route("/reload", _admin("reload"), methods=["POST"]),
                              Route("/rollback", _admin("rollback"), methods=["POST"])])
