"""Fuzzing the HTTP API (issue 7): zero 5xx, zero schema violations, every bad request a 4xx.

Three layers, all against one in-process service (``HNetService.to_asgi()``, its lifespan run
once for the module):

1. **schemathesis** on the service's own OpenAPI document (``GET /docs.json``), every operation,
   positive and negative data, every schemathesis check (server errors, status codes, content
   types, headers, response schemas, negative data rejected) plus two contracts of
   docs/serving.md: a 4xx body names the error, a 200 body is a well-formed prediction.
2. **A property test** that reaches the 200 path schemathesis' random data rarely finds: rows
   of any count (0 .. max_rows + 2) and width, finite, non-finite and float32-overflowing
   values, known, unknown and unicode task names. An oracle says which status each body must
   get; every 200 must equal the reference :class:`Runtime`'s answer.
3. **Hand-written cases** for what generators do not produce: huge and exactly-at-limit
   bodies, deeply nested JSON, wrong content types (a pickle body is never unpickled),
   duplicate headers, unicode task names, negative/huge/tiny numbers, 0-row and over-limit
   inputs, every method on every route; and the metrics keep no label for unknown tasks.

(Cases that tests/test_service_http.py already covers, such as NaN tokens, ragged rows, strings
and streamed bodies over the limit, are not repeated here.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import DataGenerationMethod
from starlette_testclient import TestClient  # requests-based, what schemathesis' checks expect

from hnet_serve.serving.runtime import Runtime
from tests.conftest import save_service_checkpoint
from tests.test_service_http import asgi_app, wait_ready

MAX_ROWS = 16
MAX_BYTES = 64_000
INPUT = 12
TASKS = ["task-0", "task-1", "task-2", "binary"]
BASE = "http://testserver"
ZEROS = [0.0] * (INPUT - 1)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_service_checkpoint(tmp_path_factory.mktemp("fuzz") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint) -> Runtime:
    return Runtime.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    env = {"HNET_CHECKPOINT": str(checkpoint), "HNET_MAX_ROWS": str(MAX_ROWS),
           "HNET_MAX_REQUEST_BYTES": str(MAX_BYTES),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path_factory.mktemp("prometheus"))}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("HNET_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(asgi_app(), raise_server_exceptions=False) as c:
            wait_ready(c.get, timeout=60)
            yield c


# -- contracts every response must keep -------------------------------------------------------
def check_client_error(body: Any) -> None:
    """A 4xx body is a JSON object whose ``error`` names the problem."""
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body


def check_prediction(body: Any, rows: int, task: str | None) -> None:
    """A 200 body of POST /predict, as docs/serving.md defines it."""
    assert isinstance(body, dict), body
    preds, probs = body["predictions"], np.asarray(body["probabilities"], dtype=np.float64)
    assert len(preds) == rows and probs.shape[0] == rows and probs.ndim == 2
    assert np.all(probs >= 0) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert preds == probs.argmax(1).tolist()
    if task is None:
        assert body["inferred"] is True and len(body["task"]) == rows
        assert set(body["task"]) <= set(TASKS) and len(body["confidence"]) == rows
        assert all(0.0 <= c <= 1.0 for c in body["confidence"])
    else:
        assert body["task"] == task and "inferred" not in body


def service_contract(ctx, response, case) -> None:
    """schemathesis check: the two contracts above, for whatever the generator sent."""
    if 400 <= response.status_code < 500:
        check_client_error(response.json())
    if case.path == "/predict" and response.status_code == 200:
        body = case.body if isinstance(case.body, dict) else {}
        check_prediction(response.json(), len(body["inputs"]), body.get("task"))


# -- 1. schemathesis on the published schema ---------------------------------------------------
@pytest.fixture(scope="module")
def openapi(client):
    response = client.get("/docs.json")
    assert response.status_code == 200
    return schemathesis.from_dict(response.json())


schema = schemathesis.from_pytest_fixture(
    "openapi",
    data_generation_methods=[DataGenerationMethod.positive, DataGenerationMethod.negative],
)


@schema.parametrize()
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_schemathesis_every_operation(case, client):
    response = case.call(session=client, base_url=BASE)
    case.validate_response(response, additional_checks=(service_contract,))


def test_schema_covers_the_routes(openapi):
    """The fuzzed schema really holds the prediction route and the health routes."""
    paths = {op.ok().path for op in openapi.get_all_operations()}
    assert {"/predict", "/readyz", "/livez", "/metrics"} <= paths


# -- 2. property test with an oracle ----------------------------------------------------------
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
poison = st.sampled_from([math.nan, math.inf, -math.inf, 1e39, -1e39, 1e308])
task_names = st.one_of(st.none(), st.sampled_from(TASKS), st.text(max_size=70))


@st.composite
def bodies(draw) -> tuple[dict[str, Any], int]:
    """A request body and the status the service must answer it with."""
    n = draw(st.integers(0, MAX_ROWS + 2))
    width = draw(st.sampled_from([INPUT] * 5 + [0, 1, INPUT - 1, INPUT + 1]))
    rows = draw(st.lists(st.lists(finite, min_size=width, max_size=width), min_size=n,
                         max_size=n))
    poisoned = bool(n and width and draw(st.booleans()) and draw(st.booleans()))
    if poisoned:
        rows[draw(st.integers(0, n - 1))][draw(st.integers(0, width - 1))] = draw(poison)
    task = draw(task_names)
    if task is not None and task not in TASKS:
        status = 404  # the task is looked up before the rows
    elif n == 0 or n > MAX_ROWS or width != INPUT or poisoned:
        status = 400
    else:
        status = 200
    return {"task": task, "inputs": rows}, status


@given(case=bodies())
@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_predict_property(client, reference, case):
    body, status = case
    # json.dumps writes NaN / Infinity tokens, as a careless client would.
    r = client.post("/predict", data=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, (body, r.text)
    if status != 200:
        check_client_error(r.json())
        return
    out = r.json()
    check_prediction(out, len(body["inputs"]), body["task"])
    want = reference.predict(body["task"], np.asarray(body["inputs"], dtype=np.float32))
    assert out["predictions"] == want.predictions.tolist()
    np.testing.assert_allclose(out["probabilities"], want.probabilities, atol=1e-5)
    if body["task"] is None:
        assert out["task"] == want.tasks


# -- 3. hand-written cases ----------------------------------------------------------------------
def raw(text: str | bytes, content_type: str | None = "application/json") -> dict[str, Any]:
    headers = {"content-type": content_type} if content_type else {}
    return {"data": text.encode() if isinstance(text, str) else text, "headers": headers}


def row(last: float | str) -> str:
    return '{"task": "task-0", "inputs": [[' + ", ".join(["0"] * (INPUT - 1) + [str(last)]) + "]]}"


def padded_to(size: int) -> bytes:
    """A valid one-row body padded with JSON whitespace to exactly ``size`` bytes."""
    body = row(0.5).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


NESTED = 20_000  # 40 kB of brackets: under the body limit, far over any parser depth
CASES: list[tuple[str, dict[str, Any], int, str]] = [
    # huge bodies (the declared size is refused before anything is read)
    ("8 MiB body", raw(b'{"inputs": [' + b"[0]," * (2 << 20) + b"[0]]}"), 400, "too large"),
    ("one byte over the limit", raw(padded_to(MAX_BYTES + 1)), 400, "too large"),
    ("exactly at the limit", raw(padded_to(MAX_BYTES)), 200, ""),
    ("8 MiB task name", {"json": {"task": "x" * (8 << 20), "inputs": [[0] * INPUT]}}, 400,
     "too large"),
    # deeply nested JSON
    ("inputs nested 20k deep", raw('{"inputs": ' + "[" * NESTED + "]" * NESTED + "}"), 400,
     "recursion limit"),
    ("task nested 20k deep",
     raw('{"inputs": [[0]], "task": ' + '{"a":' * (NESTED // 4) + "1" + "}" * (NESTED // 4) + "}"),
     400,
     "recursion limit"),
    ("rows one level too deep", {"json": {"task": "task-0", "inputs": [[[0] * INPUT]]}}, 400,
     "shape"),
    ("rows as objects", {"json": {"task": "task-0", "inputs": [{"a": 1}]}}, 400, "numeric rows"),
    ("body is a list", {"json": [[0] * INPUT]}, 400, "validation error"),
    ("body is a string", {"json": "task-0"}, 400, "validation error"),
    ("empty body", raw(b""), 400, "validation error"),
    # wrong content types
    ("JSON sent as text/plain", raw(row(1), "text/plain"), 200, ""),
    ("JSON without a content type", raw(row(1), None), 200, ""),
    ("form-urlencoded", raw("task=task-0&inputs=1", "application/x-www-form-urlencoded"), 415,
     "must be JSON"),
    ("multipart with a JSON body", raw(row(1), "multipart/form-data; boundary=x"), 415,
     "must be JSON"),
    ("multipart without a boundary", raw(row(1), "multipart/form-data"), 415, "must be JSON"),
    ("multipart, valid form",
     raw(b'--x\r\nContent-Disposition: form-data; name="inputs"\r\n\r\n[[1]]\r\n--x--\r\n',
         "multipart/form-data; boundary=x"), 415, "must be JSON"),
    ("upper-case multipart", raw(row(1), "Multipart/Form-Data; boundary=x"), 415, "must be JSON"),
    ("binary garbage", raw(bytes(range(256)) * 4, "application/octet-stream"), 400,
     "validation error"),
    ("invalid UTF-8 in a string", raw(b'{"inputs": [[0]], "task": "\xff\xfe"}'), 400,
     "validation error"),
    ("UTF-16 body", raw(row(1).encode("utf-16")), 400, "validation error"),
    ("lone surrogate escape", raw('{"inputs": [[0]], "task": "\\ud800"}'), 400,
     "validation error"),
    # unicode task names (never valid names: [A-Za-z0-9._-]{1,64}); the 404 names them
    ("emoji task", {"json": {"task": "é中😀", "inputs": [[0] * INPUT]}}, 404, "é中😀"),
    ("right-to-left override", {"json": {"task": "\u202etask-0", "inputs": [[0] * INPUT]}}, 404,
     "unknown task"),
    ("fullwidth look-alike", {"json": {"task": "ｔａｓｋ-0", "inputs": [[0] * INPUT]}}, 404,
     "ｔａｓｋ-0"),
    ("NUL inside the name", {"json": {"task": "task-0\u0000", "inputs": [[0] * INPUT]}}, 404,
     "unknown task"),
    ("path traversal", {"json": {"task": "../../etc/passwd", "inputs": [[0] * INPUT]}}, 404,
     "unknown task"),
    ("case differs", {"json": {"task": "TASK-0", "inputs": [[0] * INPUT]}}, 404, "TASK-0"),
    ("empty name", {"json": {"task": "", "inputs": [[0] * INPUT]}}, 404, "unknown task"),
    ("duplicate task key, last wins", raw('{"task": "task-0", "task": "ghost", "inputs": [[0]]}'),
     404, "ghost"),
    # negative, huge and tiny numbers
    ("large negative", raw(row(-1e30)), 200, ""),
    ("float32 max", raw(row(FLOAT32_MAX)), 200, ""),
    ("negative float32 overflow", raw(row(-1e39)), 400, "overflow"),
    ("-1e308", raw(row(-1e308)), 400, "overflow"),
    ("int64 min", raw(row(-(2**63))), 200, ""),
    ("integer beyond 64 bits", raw(row(10**30)), 400, "numeric rows"),
    ("subnormal 5e-324", raw(row(5e-324)), 200, ""),
    ("underflow 1e-400", raw(row("1e-400")), 200, ""),
    ("negative zero", raw(row("-0.0")), 200, ""),
    ("5000-digit integer", raw(row("1" + "0" * 5000)), 400, "validation error"),
    ("5000-digit fraction", raw(row("0." + "0" * 5000 + "1")), 200, ""),
    ("-NaN token", raw(row("-NaN")), 400, "validation error"),
    # 0-row and over-limit inputs
    ("0 rows, task inferred", {"json": {"inputs": []}}, 400, "at least one row"),
    ("a row with 0 values", {"json": {"task": "task-0", "inputs": [[]]}}, 400, "shape"),
    ("exactly max_rows", {"json": {"task": "task-1", "inputs": [[0.5] * INPUT] * MAX_ROWS}}, 200,
     ""),
    ("max_rows + 1, task inferred", {"json": {"inputs": [[0.5] * INPUT] * (MAX_ROWS + 1)}}, 400,
     f"max_rows={MAX_ROWS}"),
    ("10k rows of nothing", {"json": {"task": "task-0", "inputs": [[]] * 10_000}}, 400,
     f"max_rows={MAX_ROWS}"),
    ("over-wide rows", {"json": {"task": "task-0", "inputs": [[0] * 5000]}}, 400, "shape [12]"),
]


@pytest.mark.parametrize(("case", "request_kw", "status", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_hand_written_cases(client, case, request_kw, status, message):
    r = client.post("/predict", **request_kw)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if status == 200:
        sent = request_kw.get("json") or json.loads(request_kw["data"])
        check_prediction(body, len(sent["inputs"]), sent.get("task"))
    else:
        check_client_error(body)
        assert message in r.text, (case, r.text[:300])


class _Exploit:
    """Unpickling this creates a directory: proof that a pickle body was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("content_type", ["application/vnd.bentoml+pickle",
                                          "application/vnd.bentoml+pickle; charset=x",
                                          "Application/VND.BentoML+Pickle"])
def test_a_pickle_body_is_never_loaded(client, tmp_path, content_type):
    marker = tmp_path / "unpickled"
    r = client.post("/predict", data=pickle.dumps({"inputs": _Exploit(marker)}),
                    headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    check_client_error(r.json())
    assert not marker.exists()


@pytest.mark.parametrize("order", [(b"multipart/form-data; boundary=x", b"application/json"),
                                   (b"application/json", b"multipart/form-data; boundary=x")])
def test_duplicate_content_type_headers(order):
    """Whichever Content-Type header a parser reads, a form type among them is refused (HTTP
    clients cannot send duplicate headers, so the middleware is called directly)."""
    from hnet_serve.serving.http import JsonBodyMiddleware

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "http.request", "body": row(1).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict",
             "headers": [(b"content-type", value) for value in order]}
    asyncio.run(JsonBodyMiddleware(app)(scope, receive, send))
    assert not reached and sent[0]["status"] == 415


ROUTES = ["/predict", "/tasks", "/readyz", "/livez", "/healthz", "/metrics", "/docs.json",
          "/schema.json", "/", "/no-such-route"]


# (HEAD is left out: the requests-based test client cannot read a bodiless response.)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_every_method_on_every_route(client, method):
    for route in ROUTES:
        r = client.request(method, route, params={"task": "é", "x": "1" * 1000},
                           headers={"accept": "application/xml", "x-fuzz": "1" * 4000})
        assert r.status_code < 500, (method, route, r.status_code, r.text[:200])
        if method == "POST" and route == "/predict":
            assert r.status_code == 400  # no body


def test_tasks_route_contract(client):
    """GET /tasks, the one route the OpenAPI document cannot describe (a mounted app)."""
    r = client.get("/tasks", params={"junk": "\u202e" * 100})
    assert r.status_code == 200
    body = r.json()
    assert body["backend"] == "onnx" and [t["name"] for t in body["tasks"]] == TASKS  # default
    for t in body["tasks"]:
        assert t["input_shape"] == [INPUT] and isinstance(t["cached"], bool)
        assert isinstance(t["pinned"], bool) and t["num_classes"] in (2, 3)
    assert all(isinstance(v, int) and v >= 0 for v in body["cache"].values())


def test_unknown_tasks_leave_no_metric_labels(client):
    """Request counters are labelled by task only after a task is known to exist, so fuzzed
    names cannot grow /metrics without bound."""
    for name in ("ghost", "é中😀", "x" * 60):
        assert client.post("/predict", json={"task": name, "inputs": [[0] * INPUT]}
                           ).status_code == 404
    assert client.post("/predict", json={"task": "task-2", "inputs": [[0] * INPUT]}
                       ).status_code == 200
    text = client.get("/metrics").text
    labels = {line.split('task="', 1)[1].split('"', 1)[0]
              for line in text.splitlines() if line.startswith("hnet_requests_total{")}
    assert "task-2" in labels and labels <= {*TASKS, "*"}, labels
