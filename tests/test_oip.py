"""The Open Inference Protocol (KServe v2) against a real ``hnet-serve serve`` subprocess, through
the clients people use: ``tritonclient.http`` (JSON and binary tensors), plus raw HTTP for the
error forms, ``bentoml.SyncHTTPClient`` with numpy inputs, and the docs' example.

KServe's own client (``kserve.InferenceRESTClient``) is not tested: installing ``kserve`` here
would downgrade protobuf and upgrade Starlette under BentoML.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from hnet_serve.serving.runtime import Runtime
from tests.conftest import save_service_checkpoint
from tests.test_service_http import (
    ROOT,
    child_env,
    free_port,
    live_server,
)

httpclient = pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.integration
MAX_ROWS = 64
MAX_BYTES = 200_000
TASKS = ["task-0", "task-1", "task-2", "binary"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_service_checkpoint(tmp_path_factory.mktemp("oip") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint) -> Runtime:
    return Runtime.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``hnet-serve serve`` on 127.0.0.1; yields ``host:port``."""
    home = tmp_path_factory.mktemp("bentoml_home")
    port = free_port()
    env = {**child_env(home), "HNET_MAX_ROWS": str(MAX_ROWS),
           "HNET_MAX_REQUEST_BYTES": str(MAX_BYTES)}
    log = home / "serve.log"
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(checkpoint), "--port", str(port)]
    with live_server(cmd, env, log, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(server)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        yield c


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)


def infer(triton, model: str, x: np.ndarray, *, binary: bool, outputs: list[str] | None = None):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    requested = None
    if outputs is not None:
        requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    return triton.infer(model, [inp], outputs=requested)


# -- health and metadata -------------------------------------------------------------------------
def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "hnet-serve" and "binary_tensor_data" in meta["extensions"]
    for name in [*TASKS, "_infer"]:
        assert triton.is_model_ready(name), name
        assert triton.is_model_ready(name, model_version="1"), name
    assert not triton.is_model_ready("ghost")
    assert not triton.is_model_ready("task-0", model_version="2")
    meta = triton.get_model_metadata("binary")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 12]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "logits": ("FP32", [-1, 2]), "probabilities": ("FP32", [-1, 2]),
        "predictions": ("INT64", [-1])}
    meta = triton.get_model_metadata("_infer")
    assert [o["name"] for o in meta["outputs"]] == [
        "logits", "probabilities", "predictions", "task_index", "confidence"]
    assert meta["outputs"][1]["shape"] == [-1, 3]  # the most classes of any task
    with pytest.raises(httpclient.InferenceServerException, match="unknown task 'ghost'"):
        triton.get_model_metadata("ghost")


# -- inference equals /predict ---------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("task", ["task-1", "binary"])
def test_infer_equals_predict(triton, http, reference, task, binary):
    x = rows(5, seed=len(task))
    result = infer(triton, task, x, binary=binary,
                   outputs=["probabilities", "predictions", "logits"])
    want = http.post("/predict", json={"task": task, "inputs": x.tolist()}).json()
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and result.as_numpy("predictions").dtype == np.int64
    np.testing.assert_array_equal(probs, np.asarray(want["probabilities"], dtype=np.float32))
    assert result.as_numpy("predictions").tolist() == want["predictions"]
    logits = result.as_numpy("logits")  # log-softmax: same softmax, same argmax
    np.testing.assert_allclose(np.exp(logits), probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs, reference.predict(task, x).probabilities, atol=1e-6)


def test_infer_without_outputs_returns_every_output_in_binary(triton):
    """tritonclient asks for binary outputs when no outputs are named."""
    result = infer(triton, "task-0", rows(3), binary=True)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["logits", "probabilities", "predictions"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert result.as_numpy("probabilities").shape == (3, 3)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_model_matches_task_inference(triton, http, binary):
    x = rows(6, seed=9)
    result = infer(triton, "_infer", x, binary=binary)
    want = http.post("/predict", json={"inputs": x.tolist()}).json()
    assert [TASKS[i] for i in result.as_numpy("task_index")] == want["task"]
    np.testing.assert_allclose(result.as_numpy("confidence"), want["confidence"], atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("probabilities"),
                                  np.asarray(want["probabilities"], dtype=np.float32))
    assert result.as_numpy("predictions").tolist() == want["predictions"]


def test_request_id_versions_and_compression(triton, http):
    x = rows(2)
    inp = httpclient.InferInput("input", [2, 12], "FP32")
    inp.set_data_from_numpy(x)
    want = http.post("/predict", json={"task": "task-2", "inputs": x.tolist()}).json()
    for kw in ({"request_compression_algorithm": "gzip"},
               {"request_compression_algorithm": "deflate"}, {"model_version": "1"}):
        result = triton.infer("task-2", [inp], request_id="r-7", **kw)
        assert result.get_response()["id"] == "r-7"
        assert result.as_numpy("predictions").tolist() == want["predictions"], kw


def test_nested_json_data_and_the_task_shape(http):
    x = rows(2)
    body = {"inputs": [{"name": "input", "shape": [2, 12], "datatype": "FP32",
                        "data": x.tolist()}]}
    r = http.post("/v2/models/task-0/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["probabilities"]["shape"] == [2, 3] and len(out["probabilities"]["data"]) == 6


def test_requests_are_counted_like_predict(triton, http):
    def count(task: str) -> float:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(f'hnet_requests_total{{task="{task}"}} '):
                return float(line.split()[-1])
        return 0.0

    before = count("task-2"), count("*")
    infer(triton, "task-2", rows(1), binary=True)
    infer(triton, "_infer", rows(1), binary=False)
    assert (count("task-2"), count("*")) == (before[0] + 1, before[1] + 1)


# -- errors: the protocol's form, /predict's codes, never a 500 -----------------------------------
def _body(**tensor) -> dict:
    spec = {"name": "input", "shape": [1, 12], "datatype": "FP32", "data": [0.5] * 12, **tensor}
    return {"inputs": [spec]}


def _binary(x: np.ndarray, *, size: int | None = None, header_length: str | None = None,
            extra: bytes = b"") -> dict:
    data = x.tobytes() + extra
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": size or x.nbytes}}]}
                      ).encode()
    return {"content": head + data,
            "headers": {"Inference-Header-Content-Length": header_length or str(len(head))}}


ERRORS = [
    ("unknown model", "ghost", {"json": _body()}, 404, "unknown task 'ghost'"),
    ("unknown version", "task-0/versions/2", {"json": _body()}, 404, "version 2"),
    ("wrong datatype", "task-0", {"json": _body(datatype="FP64")}, 400, "must be FP32"),
    ("wrong input name", "task-0", {"json": _body(name="x")}, 400, "unknown input 'x'"),
    ("two inputs", "task-0", {"json": {"inputs": [_body()["inputs"][0]] * 2}}, 400,
     "exactly one input"),
    ("no inputs", "task-0", {"json": {"outputs": []}}, 400, "exactly one input"),
    ("not an object", "task-0", {"json": [1, 2]}, 400, "JSON object"),
    ("malformed JSON", "task-0", {"content": b'{"inputs": ['}, 400, "not valid JSON"),
    ("shape vs data", "task-0", {"json": _body(shape=[2, 12])}, 400, "must be 24 numbers"),
    ("negative shape", "task-0", {"json": _body(shape=[-1, 12])}, 400, "integers >= 0"),
    ("row shape", "task-0", {"json": _body(shape=[2, 6])}, 400, "shape [12]"),
    ("strings", "task-0", {"json": _body(data=["a"] * 12)}, 400, "must be 12 numbers"),
    ("booleans", "task-0", {"json": _body(data=[True] * 12)}, 400, "must be 12 numbers"),
    ("NaN", "task-0", {"content": json.dumps(_body(data=[float("nan")] * 12)).encode()}, 400,
     "NaN or inf"),
    ("too many rows", "task-0", {"json": _body(shape=[MAX_ROWS + 1, 12],
                                               data=[0.0] * 12 * (MAX_ROWS + 1))}, 400,
     f"max_rows={MAX_ROWS}"),
    ("unknown output", "task-0", {"json": {**_body(), "outputs": [{"name": "task_index"}]}},
     400, "unknown output 'task_index'"),
    ("classification", "task-0", {"json": {**_body(), "outputs": [
        {"name": "probabilities", "parameters": {"classification": 2}}]}}, 400,
     "classification extension"),
    ("binary size", "task-0", _binary(rows(2), size=95), 400, "binary_data_size must be 96"),
    ("binary short", "task-0", _binary(rows(2), extra=b"x"), 400, "97 bytes of binary data"),
    ("header length", "task-0", _binary(rows(1), header_length="99999"), 400,
     "Inference-Header-Content-Length"),
    ("header length text", "task-0", _binary(rows(1), header_length="abc"), 400,
     "Inference-Header-Content-Length"),
    ("binary NaN", "task-0", _binary(np.full((1, 12), np.nan, np.float32)), 400, "NaN or inf"),
    ("binary over the body limit", "task-0", _binary(rows(MAX_BYTES // 48 + 1)), 400,
     "too large"),
    ("gzip bomb", "task-0", {"content": gzip.compress(b" " * (MAX_BYTES + 10)),
                             "headers": {"Content-Encoding": "gzip"}}, 400, "decompressed"),
    ("bad gzip", "task-0", {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}},
     400, "cannot be decompressed"),
    ("brotli", "task-0", {"content": b"{}", "headers": {"Content-Encoding": "br"}}, 400,
     "unsupported content-encoding"),
]


@pytest.mark.parametrize(("case", "model", "kw", "status", "message"), ERRORS,
                         ids=[e[0] for e in ERRORS])
def test_errors(http, case, model, kw, status, message):
    r = http.post(f"/v2/models/{model}/infer", **kw)
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert message in body["error"], (case, body)
    assert r.headers["content-type"].startswith("application/json")


def test_errors_through_tritonclient(triton):
    with pytest.raises(httpclient.InferenceServerException, match="shape \\[12\\]"):
        infer(triton, "task-0", np.zeros((2, 5), np.float32), binary=True)
    with pytest.raises(httpclient.InferenceServerException, match="unknown task"):
        infer(triton, "nope", rows(1), binary=False)
    assert triton.is_server_ready()


# -- the BentoML client: numpy inputs, /tasks; the OpenAPI document ----------------------------------
def test_bentoml_client_numpy_and_tasks(server, reference):
    import bentoml

    x = rows(3, seed=4)
    with bentoml.SyncHTTPClient(f"http://{server}") as client:
        out = client.predict(task="task-0", inputs=x)
        np.testing.assert_allclose(out["probabilities"],
                                   reference.predict("task-0", x).probabilities, atol=1e-6)
        assert client.predict(task="task-0", inputs=x.tolist()) == out
        assert client.predict(inputs=x.astype(np.float64))["inferred"] is True
        assert [t["name"] for t in client.tasks()["tasks"]] == TASKS
        version = client.version()  # issue 18: every route reaches BentoML's client
        assert set(version) == {"version", "previous", "tasks", "loaded_at", "source"}
        assert version["tasks"] == TASKS


def test_openapi_document_lists_tasks_and_v2(http):
    paths = http.get("/docs.json").json()["paths"]
    assert {"get", "post"} <= set(paths["/tasks"])
    assert {"get", "post"} <= set(paths["/version"])
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model}",
                 "/v2/models/{model}/ready", "/v2/models/{model}/infer"):
        assert path in paths, path
    assert http.get("/tasks").json()["tasks"] == http.post("/tasks").json()["tasks"]


# -- docs/serving.md's example runs as written -------------------------------------------------------
def test_serving_doc_tritonclient_example(server):
    """The example as written, in a fresh interpreter; only the address and task differ."""
    text = (ROOT / "docs" / "serving.md").read_text()
    (code,) = re.findall(r"```python\n(import numpy as np\nimport tritonclient.*?)```", text,
                         flags=re.DOTALL)
    code = code.replace("localhost:3000", server).replace("digits-0", "task-1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predictions [" in done.stdout and "task_index [" in done.stdout
