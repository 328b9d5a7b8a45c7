"""The service over HTTP: ``to_asgi()`` + Starlette's TestClient for every endpoint and error
case, a real ``hnet-serve serve`` (``bentoml serve``) subprocess called with
``bentoml.SyncHTTPClient``, and ``bentoml build`` of bentofile.yaml."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from starlette.testclient import TestClient

from hnet_serve.checkpoint import checkpoint_hash, save_checkpoint
from hnet_serve.serving.runtime import Runtime
from tests.conftest import save_service_checkpoint, tiny_mlp_model

ROOT = Path(__file__).resolve().parent.parent
MAX_ROWS = 64
MAX_BYTES = 100_000
ROW = [0.25] * 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_service_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


@functools.cache
def asgi_app():
    """One app per process: BentoML registers its HTTP metrics globally when an app is built.
    Each TestClient context runs the app's lifespan, i.e. a fresh service instance."""
    from hnet_serve.serving.service import HNetService

    return HNetService.to_asgi()


@pytest.fixture(scope="module")
def prometheus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prometheus")


@contextlib.contextmanager
def serving(monkeypatch, prometheus_dir, ready: bool = True, **env):
    for key in [k for k in os.environ if k.startswith("HNET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(prometheus_dir))
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    with TestClient(asgi_app(), raise_server_exceptions=False) as c:
        if ready:
            wait_ready(c.get, timeout=60)
        yield c


@pytest.fixture
def client(checkpoint, prometheus_dir, monkeypatch):
    with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=checkpoint,
                 HNET_MAX_ROWS=MAX_ROWS, HNET_MAX_REQUEST_BYTES=MAX_BYTES) as c:
        yield c


def wait_ready(get, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"service not ready after {timeout} s")


@pytest.fixture(scope="module")
def reference(checkpoint) -> Runtime:
    return Runtime.from_checkpoint(checkpoint)


# -- endpoints -----------------------------------------------------------------------------
def test_health(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_predict_with_task(client, reference):
    x = np.random.default_rng(0).normal(size=(4, 12)).round(4)
    r = client.post("/predict", json={"task": "task-1", "inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    want = reference.predict("task-1", x)
    assert body["task"] == "task-1" and "inferred" not in body
    assert body["predictions"] == want.predictions.tolist()
    np.testing.assert_allclose(body["probabilities"], want.probabilities, atol=1e-6)
    binary = client.post("/predict", json={"task": "binary", "inputs": [ROW]}).json()
    assert len(binary["probabilities"][0]) == 2


@pytest.mark.parametrize("body", [{"task": None, "inputs": [ROW, ROW]}, {"inputs": [ROW, ROW]}])
def test_predict_infers_the_task(client, reference, body):
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    want = reference.predict(None, np.array(body["inputs"]))
    assert out["inferred"] is True and out["task"] == want.tasks
    np.testing.assert_allclose(out["confidence"], want.confidence, atol=1e-6)
    assert len(out["probabilities"][0]) == 3  # the most classes of any task


def test_tasks_lists_every_task(client):
    client.post("/predict", json={"task": "task-2", "inputs": [ROW]})
    r = client.get("/tasks")
    assert r.status_code == 200
    tasks = {t["name"]: t for t in r.json()["tasks"]}
    assert list(tasks) == ["task-0", "task-1", "task-2", "binary"]
    assert tasks["binary"]["label_names"] == ["no", "yes"] and tasks["binary"]["num_classes"] == 2
    assert tasks["task-2"]["cached"] is True and tasks["task-2"]["input_shape"] == [12]
    assert client.post("/tasks").json()["tasks"] == r.json()["tasks"]  # an API too (BentoML clients)
    assert client.put("/tasks").status_code == 405


def test_metrics_count_cache_and_requests(client):
    before = client.get("/metrics").text
    for _ in range(3):
        client.post("/predict", json={"task": "task-0", "inputs": [ROW]})
    client.post("/predict", json={"inputs": [ROW]})
    text = client.get("/metrics").text

    def value(text: str, name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert value(text, 'hnet_requests_total{task="task-0"}') == value(
        before, 'hnet_requests_total{task="task-0"}') + 3
    assert value(text, 'hnet_requests_total{task="*"}') >= 1
    assert value(text, "hnet_cache_hits_total") >= value(before, "hnet_cache_hits_total") + 3
    assert value(text, "hnet_cache_capacity_bytes") == 512 * 1024 * 1024
    for name in ("hnet_cache_misses_total", "hnet_cache_evictions_total", "hnet_cache_bytes"):
        assert name in text


# -- every client error is a 4xx with a message, never a 500 ---------------------------------
def _raw(body: str) -> dict:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


ERROR_CASES = [
    ("unknown task", {"json": {"task": "ghost", "inputs": [ROW]}}, 404, "unknown task 'ghost'"),
    ("wrong row length", {"json": {"task": "task-0", "inputs": [[1.0] * 11]}}, 400, "shape [12]"),
    ("ragged rows", {"json": {"task": "task-0", "inputs": [ROW, [1.0]]}}, 400, "equal length"),
    ("one row, no outer list", {"json": {"task": "task-0", "inputs": ROW}}, 400, "shape"),
    ("strings", {"json": {"task": "task-0", "inputs": [["a"] * 12]}}, 400, "numbers"),
    ("booleans", {"json": {"task": "task-0", "inputs": [[True] * 12]}}, 400, "numbers"),
    ("nulls", {"json": {"task": "task-0", "inputs": [[None] * 12]}}, 400, "numeric rows"),
    ("NaN", _raw('{"task": "task-0", "inputs": [[NaN' + ", 0" * 11 + "]]}"), 400, "NaN or inf"),
    ("Infinity", _raw('{"task": "task-0", "inputs": [[Infinity' + ", 0" * 11 + "]]}"), 400,
     "NaN or inf"),
    ("overflow", _raw('{"task": "task-0", "inputs": [[1e999' + ", 0" * 11 + "]]}"), 400,
     "NaN or inf"),
    ("float32 overflow", {"json": {"task": "task-0", "inputs": [[1e39] * 12]}}, 400, "overflow"),
    ("empty", {"json": {"task": "task-0", "inputs": []}}, 400, "at least one row"),
    ("too many rows", {"json": {"task": "task-0", "inputs": [[0] * 12] * (MAX_ROWS + 1)}}, 400,
     f"max_rows={MAX_ROWS}"),
    ("inputs not a list", {"json": {"task": "task-0", "inputs": "abc"}}, 400, "validation error"),
    ("no inputs", {"json": {"task": "task-0"}}, 400, "validation error"),
    ("task not a string", {"json": {"task": 3, "inputs": [ROW]}}, 400, "validation error"),
    ("malformed JSON", _raw('{"task": "task-0", "inputs": [[1, 2'), 400, "validation error"),
    ("body too large", {"json": {"task": "task-0", "inputs": [[0.123456789] * 12] * 1000}}, 400,
     "too large"),
    ("chunked body too large",
     {"content": iter([b'{"task": "task-0", "inputs": [', b"[0]," * 30_000, b"[0]]}"]),
      "headers": {"content-type": "application/json"}}, 400, "too large"),
]


@pytest.mark.parametrize(("case", "request_kw", "status", "message"), ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_client_errors(client, case, request_kw, status, message):
    r = client.post("/predict", **request_kw)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert message in r.text, (case, r.text)
    assert r.headers["content-type"].startswith("application/json")


def test_server_still_healthy_after_errors(client):
    assert client.post("/predict", json={"task": "task-0", "inputs": [ROW]}).status_code == 200


def test_unready_service(monkeypatch, prometheus_dir, tmp_path):
    """A broken checkpoint: /livez 200, /readyz 503, /predict and /tasks 503 with the reason."""
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_mlp_model(2), path)
    (path / "manifest.json").write_text("{not json")
    with serving(monkeypatch, prometheus_dir, ready=False, HNET_CHECKPOINT=path) as c:
        deadline = time.monotonic() + 30
        while "failed to load" not in c.get("/tasks").text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/livez").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/predict", json={"task": "task-0", "inputs": [ROW]})
        assert r.status_code == 503 and "not valid JSON" in r.json()["error"]
        assert c.get("/tasks").status_code == 503


# -- a real server ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


def child_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HNET_", "PROMETHEUS_"))}
    env["BENTOML_HOME"] = str(home)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.integration
def test_hnet_serve_subprocess_with_bentoml_client(checkpoint, bentoml_home, reference):
    import bentoml

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = bentoml_home / "serve.log"
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(checkpoint), "--port", str(port)]
    with live_server(cmd, child_env(bentoml_home), log, port) as (http, proc):
        x = np.random.default_rng(3).normal(size=(2, 12)).round(4)
        with bentoml.SyncHTTPClient(url) as client:
            out = client.predict(task="task-0", inputs=x.tolist())
            want = reference.predict("task-0", x)
            assert out["predictions"] == want.predictions.tolist()
            np.testing.assert_allclose(out["probabilities"], want.probabilities, atol=1e-6)
            inferred = client.predict(inputs=x.tolist())
            assert inferred["inferred"] is True and len(inferred["task"]) == 2
            with pytest.raises(bentoml.exceptions.NotFound, match="ghost"):
                client.predict(task="ghost", inputs=x.tolist())
            with pytest.raises(bentoml.exceptions.BentoMLException) as err:
                client.predict(task="task-0", inputs=[[1.0, 2.0]])
            assert err.value.error_code == 400
        assert http.get("/tasks").json()["tasks"][0]["name"] == "task-0"
        metrics = http.get("/metrics").text
        assert "bentoml_service_request_total" in metrics  # BentoML's own metrics
        assert 'hnet_requests_total{task="task-0"} 1.0' in metrics
        # The checkpoint went through the model store under its content hash.
        tag_dir = bentoml_home / "models" / "hnet" / checkpoint_hash(checkpoint)[:16]
        assert (tag_dir / "checkpoint" / "manifest.json").is_file()
    assert proc.returncode is not None


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started in its own session, SIGKILL it if it is still up after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

@contextlib.contextmanager
def live_server(cmd: list[str], env: dict[str, str], log: Path, port: int, *,
                cwd: Path = ROOT, timeout: float = 150.0):
    """Run ``cmd`` (a server on 127.0.0.1:``port``) in its own session with its output in
    ``log``; yield ``(httpx client, process)`` once ``/readyz`` answers 200 (else fail with the
    log's tail); stop the whole process group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            try:
                wait_ready(http.get, timeout=timeout)
            except AssertionError:
                raise AssertionError(log.read_text()[-3000:]) from None
            yield http, proc
    finally:
        stop_process_group(proc)


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          check=False)


@pytest.mark.integration
def test_bentoml_build_packs_the_checkpoint(checkpoint, bentoml_home, tmp_path):
    env = child_env(bentoml_home)
    tag = f"hnet:{checkpoint_hash(checkpoint)[:16]}"
    env["HNET_MODEL_TAG"] = tag
    # The README's steps: `hnet-serve serve DIR --import-only` (idempotent), then `bentoml build`.
    exe = str(Path(sys.executable).with_name("hnet-serve"))
    done = run([exe, "serve", str(checkpoint), "--import-only"], env)
    assert done.returncode == 0 and done.stdout.strip() == tag, done.stderr[-2000:]
    build = run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], env)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    bento_tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = bento_tag.split(":")
    bento = yaml.safe_load((bentoml_home / "bentos" / name / version / "bento.yaml").read_text())
    assert bento["service"] == "hnet_serve.serving.service:HNetService"
    assert [m["tag"] for m in bento["services"][0]["models"]] == [tag]
    assert not (bentoml_home / "bentos" / name / version / "src" / "training").exists()
    # The exported Bento (what containerize and push ship) carries the checkpoint itself.
    archive = tmp_path / "hnet.bento"
    export = run([sys.executable, "-m", "bentoml", "export", bento_tag, str(archive)], env)
    assert export.returncode == 0, export.stderr[-2000:]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    version_dir = tag.split(":")[1]
    assert f"./models/hnet/{version_dir}/checkpoint/manifest.json" in names
    assert f"./models/hnet/{version_dir}/checkpoint/weights.safetensors" in names
    assert bento["labels"]["project"] == "hnet-serve"

    # Issue 18: the Bento is pinned to what it packed. Another checkpoint imported later is the
    # store's hnet:latest; `bentoml serve <bento>` still serves the packed one.
    other = save_service_checkpoint(tmp_path / "other")
    model = tiny_mlp_model(3)
    model.add_task("binary", num_classes=2, label_names=["no", "yes"])
    model.add_task("later")
    save_checkpoint(model, other)
    done = run([exe, "serve", str(other), "--import-only"], env)
    assert done.returncode == 0, done.stderr[-2000:]
    serve_env = {k: v for k, v in env.items() if k != "HNET_MODEL_TAG"}
    port = free_port()
    log = tmp_path / "bento-serve.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1",
           "--port", str(port)]
    with live_server(cmd, serve_env, log, port, cwd=tmp_path) as (http, _):
        served = http.get("/version").json()
        assert served["version"] == checkpoint_hash(checkpoint), log.read_text()[-3000:]
        assert served["source"] == tag and "later" not in served["tasks"]
    assert f"serving model {tag} (packed in the Bento {bento_tag})" in log.read_text()


def test_every_response_names_the_served_version(client, checkpoint):
    """Issue 18: the checkpoint's content hash is its version: x-hnet-version on /predict (and
    every other response), GET/POST /version, /tasks and an info metric."""
    from hnet_serve.checkpoint import checkpoint_hash

    version = checkpoint_hash(checkpoint)
    r = client.post("/predict", json={"task": "task-0", "inputs": [[0.0] * 12]})
    assert r.status_code == 200 and r.headers["x-hnet-version"] == version
    v = client.get("/version")
    assert v.status_code == 200 and v.headers["x-hnet-version"] == version
    body = v.json()
    assert body["version"] == version and body["previous"] is None
    assert body["tasks"] == [t["name"] for t in client.get("/tasks").json()["tasks"]]
    assert set(body) == {"version", "previous", "tasks", "loaded_at", "source"}
    assert client.post("/version", json={}).json() == body
    assert client.get("/tasks").json()["version"] == version
    assert f'hnet_checkpoint_info{{version="{version}"}} 1.0' in client.get("/metrics").text
    assert client.post("/predict", json={"task": "nope", "inputs": [[0.0] * 12]}).headers[
        "x-hnet-version"] == version


def test_task_inference_can_abstain_and_lists_its_candidates(client):
    """Issue 16: rows below min_confidence get task null and abstained true instead of a
    guess; top_tasks lists the k most likely tasks with their confidence."""
    rows = [[0.0] * 12, [0.5] * 12]
    guessed = client.post("/predict", json={"inputs": rows}).json()
    assert guessed["abstained"] == [False, False]
    assert [len(t) for t in guessed["top_tasks"]] == [3, 3]
    for row, top in zip(range(2), guessed["top_tasks"]):
        assert top[0]["task"] == guessed["task"][row]
        assert top[0]["confidence"] == pytest.approx(guessed["confidence"][row], abs=1e-6)
    strict = client.post("/predict", json={"inputs": rows, "min_confidence": 1.0,
                                           "top_k": 1}).json()
    assert strict["abstained"] == [True, True] and strict["task"] == [None, None]
    assert strict["predictions"] == [None, None] and strict["labels"] == [None, None]
    assert [len(t) for t in strict["top_tasks"]] == [1, 1]  # still says what it would pick
    bad = client.post("/predict", json={"inputs": rows, "min_confidence": 2})
    assert bad.status_code == 400
    given = client.post("/predict", json={"task": "task-0", "inputs": rows}).json()
    assert "abstained" not in given and "top_tasks" not in given


def test_decide_leaves_given_rows_alone_in_a_mixed_batch(checkpoint):
    import numpy as np

    rt = Runtime.from_checkpoint(checkpoint)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    mixed = rt.predict_mixed(["task-0", None, "task-1", None], x)
    decided = rt.decide(mixed, min_confidence=1.01, top_k=2)
    assert decided.abstained.tolist() == [False, True, False, True]
    assert decided.tasks[0] == "task-0" and decided.tasks[1] is None
    assert decided.top_tasks[0] is None and len(decided.top_tasks[1]) == 2
