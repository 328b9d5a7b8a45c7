"""The Open Inference Protocol (KServe "v2", Triton's HTTP/REST API) next to ``/predict``.

Each task is a model named by the task; task inference is one more model, named by
``ServingConfig.oip_infer_model`` (default ``_infer``), whose outputs add the inferred task's
index and confidence. A task of that name hides the inference model.

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200 (ready: once the checkpoint is loaded)
    GET  /v2/models/{model}[/versions/1]       model metadata
    GET  /v2/models/{model}[/versions/1]/ready 200 once the service is ready (404: no such model)
    POST /v2/models/{model}[/versions/1]/infer the protocol's JSON tensors, or the binary tensor
                                               extension (``Inference-Header-Content-Length``)

Inference goes through the service's validation, batcher, cache and request counters, so its
answers are ``/predict``'s for the same rows. Outputs: ``probabilities`` FP32 ``[N, C]``,
``predictions`` INT64 ``[N]`` and ``logits`` FP32 ``[N, C]``, the log-softmax of the model's
logits (the runtime returns probabilities; a log-softmax has the same softmax and argmax and
differs from the raw logits by one constant per row). The inference model adds ``task_index``
INT64 (row of ``GET /tasks``' list) and ``confidence`` FP32.

Errors answer ``{"error", "type"}`` with ``/predict``'s codes: 400 bad input, 404 unknown
model, 503 not ready. Binary input data is read in place (``np.frombuffer``), which is what
makes the binary route cheap: no float is parsed from text.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import bentoml
import numpy as np
from pydantic_core import from_json, to_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hnet_serve import __version__
from hnet_serve.errors import HNetError, InputError, UnknownTaskError
from hnet_serve.serving.http import (
    OpenAPIMiddleware,
    error_response,
    note_version,
    openapi_document,
)

VERSION = "1"  # every model has one version: the loaded checkpoint
HEADER_LENGTH = "inference-header-content-length"
TASK_OUTPUTS = ("logits", "probabilities", "predictions")
INFER_OUTPUTS = (*TASK_OUTPUTS, "task_index", "confidence")
_DTYPES = {"logits": "FP32", "probabilities": "FP32", "predictions": "INT64",
           "task_index": "INT64", "confidence": "FP32"}
_TINY = float(np.finfo(np.float32).tiny)  # floor of probabilities before the log


class _NotReady(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _service() -> Any:
    """The running service, ready; :class:`_NotReady` (503) otherwise."""
    try:
        svc = bentoml.get_current_service()
    except Exception:  # noqa: BLE001 - no instance yet
        raise _NotReady(error_response(503, "service is starting", "NotReady")) from None
    if svc.runtime is None or svc.batcher is None:
        raise _NotReady(svc.not_ready_response())
    return svc


def _model(svc: Any, request: Request) -> tuple[str, str | None]:
    """(model name, task name or None for the inference model) of the path; 404 if unknown."""
    name = request.path_params["model"]
    version = request.path_params.get("version", VERSION)
    runtime = svc.runtime
    if name in runtime.model.registry:
        task: str | None = name
    elif name == svc.config.oip_infer_model:
        task = None
    else:
        raise UnknownTaskError(name, [*runtime.task_names, svc.config.oip_infer_model])
    if version != VERSION:
        raise UnknownTaskError(f"{name} version {version}", [f"{name} version {VERSION}"])
    return name, task


def _route(handler: Any) -> Any:
    """Wrap a handler: 503 before the checkpoint is loaded, HNetError -> its status code."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(_service(), request)
        except _NotReady as exc:
            return exc.response
        except HNetError as exc:
            return error_response(exc.http_status, str(exc), type(exc).__name__)

    return endpoint


# -- metadata and health ----------------------------------------------------------------------
async def _server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "hnet-serve", "version": __version__,
                         "extensions": ["binary_tensor_data"]})


async def _live(request: Request) -> Response:
    return Response(status_code=200)


async def _ready(svc: Any, request: Request) -> Response:
    return Response(status_code=200)


async def _model_ready(svc: Any, request: Request) -> Response:
    _model(svc, request)
    return Response(status_code=200)


def model_metadata(runtime: Any, name: str, task: str | None) -> dict[str, Any]:
    """The model's inputs and outputs: ``input`` FP32 ``[-1, *input_shape]`` and the outputs."""
    shape = list(runtime.task(task).input_shape if task else runtime.model.target_config.input_shape)
    classes = runtime.output_classes(task)
    dims = {"logits": [-1, classes], "probabilities": [-1, classes], "predictions": [-1],
            "task_index": [-1], "confidence": [-1]}
    return {
        "name": name, "versions": [VERSION], "platform": "hnet_serve",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}],
        "outputs": [{"name": o, "datatype": _DTYPES[o], "shape": dims[o]}
                    for o in (TASK_OUTPUTS if task else INFER_OUTPUTS)],
    }


async def _model_metadata(svc: Any, request: Request) -> Response:
    name, task = _model(svc, request)
    return JSONResponse(model_metadata(svc.runtime, name, task))


# -- inference ----------------------------------------------------------------------------------
def _decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body, inflated (gzip/deflate, as tritonclient sends) up to ``limit`` bytes."""
    if not encoding or encoding.lower() == "identity":
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding.lower())
    if wbits is None:
        raise InputError(f"unsupported content-encoding {encoding!r} (gzip, deflate)")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InputError(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise InputError(f"request body too large: over max_request_bytes={limit} decompressed")
    return data


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON inference header and the binary data after it."""
    view = memoryview(body)
    if header_length is None:
        n = len(body)
    elif header_length.isascii() and header_length.strip().isdigit() and int(
            header_length) <= len(body):
        n = int(header_length)
    else:
        raise InputError(f"Inference-Header-Content-Length must be an integer from 0 to the "
                         f"body's {len(body)} bytes, got {header_length[:40]!r}")
    try:  # pydantic-core's parser: 64 rows of JSON floats parse ~4x faster than with json.loads
        header = from_json(bytes(view[:n]))
    except ValueError as exc:
        raise InputError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InputError("the inference request must be a JSON object")
    return header, view[n:]


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise InputError(f"{what}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _input_array(header: dict[str, Any], binary: memoryview) -> np.ndarray:
    """The one input tensor ``input`` (FP32) as an array of its declared shape."""
    inputs = _field(header, "inputs", list, "inference request")
    if not inputs or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError("the request must hold exactly one input tensor, named 'input'")
    spec = inputs[0]
    if spec.get("name") != "input":
        raise InputError(f"unknown input {str(spec.get('name'))[:80]!r}: the input is 'input'")
    if spec.get("datatype") != "FP32":
        raise InputError(f"input 'input' must be FP32, got {str(spec.get('datatype'))[:20]!r}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError("input 'input': shape must be a list of 1 to 8 integers >= 0")
    count = math.prod(shape)
    params = _field(spec, "parameters", dict, "input 'input'") or {}
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != 4 * count:
            raise InputError(f"input 'input': binary_data_size must be {4 * count} "
                             f"(shape {shape} x 4 bytes), got {size!r}")
        if len(binary) != size:
            raise InputError(f"input 'input': {len(binary)} bytes of binary data after the "
                             f"header, binary_data_size says {size}")
        arr = np.frombuffer(bytearray(binary), dtype="<f4")  # a writable copy: torch wants one
    else:
        if len(binary):
            raise InputError("binary data after the header, but no input has binary_data_size")
        try:
            arr = np.asarray(spec.get("data"))
        except (ValueError, TypeError):
            arr = np.asarray(None)
        if arr.dtype.kind not in "iuf" or arr.size != count:
            raise InputError(f"input 'input': data must be {count} numbers (shape {shape}), "
                             "flat or nested row-major")
    return arr.reshape(shape)


def _requested(header: dict[str, Any], names: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(output, binary?) for each output to return, in the request's order."""
    params = _field(header, "parameters", dict, "inference request") or {}
    default = params.get("binary_data_output") is True
    outputs = _field(header, "outputs", list, "inference request")
    if not outputs:
        return [(n, default) for n in names]
    chosen = []
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in names:
            raise InputError(f"unknown output {str(name)[:80]!r} (outputs: {', '.join(names)})")
        p = _field(out, "parameters", dict, f"output {name!r}") or {}
        if p.get("classification"):
            raise InputError("the classification extension is not supported; ask for "
                             "'probabilities'")
        chosen.append((name, bool(p.get("binary_data", default))))
    return chosen


def _tensors(pred: Any, runtime: Any) -> dict[str, np.ndarray]:
    probs = pred.probabilities  # (N, C) float32
    out = {
        "logits": np.log(np.maximum(probs, _TINY)).astype(np.float32),
        "probabilities": probs,
        "predictions": pred.predictions.astype(np.int64),
    }
    if pred.inferred:
        index = {t: i for i, t in enumerate(runtime.task_names)}
        out["task_index"] = np.array([index[t] for t in pred.tasks], dtype=np.int64)
        out["confidence"] = np.asarray(pred.confidence, dtype=np.float32)
    return out


def infer_response(name: str, request_id: Any, tensors: dict[str, np.ndarray],
                   chosen: list[tuple[str, bool]]) -> Response:
    """The protocol's response: JSON outputs, binary ones appended after the JSON header."""
    outputs, blobs = [], []
    for out, binary in chosen:
        arr = tensors[out]
        item: dict[str, Any] = {"name": out, "datatype": _DTYPES[out], "shape": list(arr.shape)}
        if binary:
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = arr.ravel().tolist()
        outputs.append(item)
    body: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    head = to_json(body)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


async def _infer(svc: Any, request: Request) -> Response:
    name, task = _model(svc, request)
    body = _decode_body(await request.body(), request.headers.get("content-encoding"),
                        int(svc.config.max_request_bytes))
    header, binary = _split(body, request.headers.get(HEADER_LENGTH))
    request_id = _field(header, "id", str, "inference request")
    chosen = _requested(header, TASK_OUTPUTS if task else INFER_OUTPUTS)
    live = svc.live  # one version for the whole request, taken after the body is read
    runtime = live.runtime
    note_version(live.version)
    x = runtime.validate_inputs(_input_array(header, binary), task)
    pred = await live.batcher.predict(task, x)
    svc.record_request(task)
    return infer_response(name, request_id, _tensors(pred, runtime), chosen)


async def _no_route(request: Request) -> Response:
    return error_response(404, f"no such route: {request.method} {request.scope['path'][:200]!r}",
                          "NotFound")




_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"
oip_app = Starlette(routes=[
    Route("/v2", _server_metadata, methods=["GET"]),
    Route("/v2/health/live", _live, methods=["GET"]),
    Route("/v2/health/ready", _route(_ready), methods=["GET"]),
    *(r for base in (_MODEL, _VERSION) for r in (
        Route(base, _route(_model_metadata), methods=["GET"]),
        Route(base + "/ready", _route(_model_ready), methods=["GET"]),
        Route(base + "/infer", _route(_infer), methods=["POST"]),
    )),
    # Anything else under /v2 (a model name with a slash, an empty one, a route this server
    # does not offer, like /v2/repository/index): a 404 in the protocol's error form.
    Route("/v2/{rest:path}", _no_route),
])


# -- the OpenAPI document ------------------------------------------------------------------------
def _op(summary: str, ok: dict[str, Any], params: list[dict[str, Any]],
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    error = {"application/json": {"schema": {"type": "object", "properties": {
        "error": {"type": "string"}, "type": {"type": "string"}}, "required": ["error"]}}}
    op: dict[str, Any] = {
        "summary": summary, "tags": ["Open Inference Protocol"], "parameters": params,
        "responses": {"200": ok, **{code: {"description": why, "content": error} for code, why in
                                    (("400", "bad request"), ("404", "unknown model"),
                                     ("503", "not ready"))}},
    }
    if body is not None:
        op["requestBody"] = body
    return op


def _path_params(versioned: bool) -> list[dict[str, Any]]:
    params = [{"name": "model", "in": "path", "required": True,
               "schema": {"type": "string"}, "description": "a task, or the inference model"}]
    if versioned:
        params.append({"name": "version", "in": "path", "required": True,
                       "schema": {"type": "string"}, "description": f"'{VERSION}'"})
    return params


def openapi_paths() -> dict[str, Any]:
    """OpenAPI path items of the v2 routes and of ``GET /tasks``, ``GET /version`` (mounted apps, which BentoML's
    document leaves out)."""
    obj = {"application/json": {"schema": {"type": "object"}}}
    empty = {"description": "yes"}
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"}, "parameters": {"type": "object"},
        "data": {"type": "array"}}}
    request = {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": {"type": "object"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "schema": {"type": "integer", "minimum": 0},
              "description": "bytes of JSON before the binary tensor data"}
    paths: dict[str, Any] = {
        "/v2": {"get": _op("server metadata", {"description": "metadata", "content": obj}, [])},
        "/v2/health/live": {"get": _op("liveness", empty, [])},
        "/v2/health/ready": {"get": _op("readiness", empty, [])},
        "/tasks": {"get": _op("every task and the cache statistics",
                              {"description": "tasks", "content": obj}, [])},
    }
    paths["/version"] = {"get": _op("the served checkpoint's version (content hash), the "
                                    "previous one, its tasks, when and from where it was loaded",
                                    {"description": "version", "content": obj}, [])}
    for route in ("/tasks", "/version"):
        paths[route]["get"]["tags"] = ["Service APIs"]
    for base, versioned in ((_MODEL, False), (_VERSION, True)):
        params = _path_params(versioned)
        paths[base] = {"get": _op("model metadata", {"description": "metadata",
                                                     "content": obj}, params)}
        paths[base + "/ready"] = {"get": _op("model readiness", empty, params)}
        paths[base + "/infer"] = {"post": _op(
            "inference", {"description": "outputs", "content": {
                **obj, "application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}},
            [*params, header], request)}
    return paths


class ProtocolMiddleware(OpenAPIMiddleware):
    """``GET /docs.json``: the service's document (:func:`openapi_document`) plus
    :func:`openapi_paths`; and the protocol's 404 for ``/v2/`` paths with a line break, which
    no mounted app sees (BentoML's mount matches paths with ``.*``, which stops at one)."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v2/") and ("\n" in path or "\r" in path):
            response = await _no_route(Request(scope, receive))
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and scope.get("path") == "/docs.json" and scope.get(
            "method"
        ) in ("GET", "HEAD"):
            spec = openapi_document(self.service)
            for path, item in openapi_paths().items():
                spec["paths"].setdefault(path, {}).update(item)
            # POST /tasks and /version take no arguments (any JSON object is ignored):
            # document no body
            for route in ("/tasks", "/version"):
                spec["paths"].get(route, {}).get("post", {}).pop("requestBody", None)
            await JSONResponse(spec)(scope, receive, send)
            return
        await self.app(scope, receive, send)
