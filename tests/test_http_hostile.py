"""Hostile clients (issue 14, the service side): bounded metric labels, work bounded before
parsing, client mistakes that look like client mistakes, and the minor leaks.

In-process cases use ``to_asgi()`` + TestClient (tests/test_service_http.py's helpers); the
metrics, memory, disconnect and log cases need a real ``bentoml serve`` (one module-scoped
server, about 20 s with its start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.errors import ConfigError
from hnet_serve.serving.config import ServingConfig
from hnet_serve.serving.http import CLIENT_CLOSED, PRESCAN_BYTES, BodyBounds, RequestBodyMiddleware
from hnet_serve.serving.runtime import Runtime
from tests.conftest import save_service_checkpoint, tiny_mlp_model
from tests.test_service_http import (
    ROOT,
    child_env,
    free_port,
    serving,
    stop_process_group,
    wait_ready,
)

ROW = [0.25] * 12
MiB = 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_service_checkpoint(tmp_path_factory.mktemp("hostile") / "ckpt")


@pytest.fixture(scope="module")
def prometheus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prometheus")


@pytest.fixture
def client(checkpoint, prometheus_dir, monkeypatch):
    with serving(monkeypatch, prometheus_dir, HNET_CHECKPOINT=checkpoint,
                 HNET_MAX_ROWS=64, HNET_MAX_REQUEST_BYTES=64 * MiB) as c:
        yield c


def rows_body(n: int, width: int = 1) -> bytes:
    """``{"inputs": [[0, ...], ...]}`` of ``n`` rows, built as bytes (no Python lists)."""
    row = b"[" + b",".join([b"0"] * width) + b"]"
    return b'{"task": "task-0", "inputs": [' + b",".join([row] * n) + b"]}"


# -- minor 9: an unknown task name is echoed cut short ----------------------------------------
def test_a_huge_unknown_task_name_gets_a_small_404(client):
    r = client.post("/predict", json={"task": "x" * (10 * MiB), "inputs": [ROW]})
    assert r.status_code == 404
    assert len(r.content) < 1000 and ("x" * 64 + "…") in r.json()["error"]
    assert "'ghost'" in client.post("/predict", json={"task": "ghost", "inputs": [ROW]}).text


# -- minor 8: a boolean among numbers is refused ------------------------------------------------
@pytest.mark.parametrize("row", [[True] + [0.5] * 11, [0.5] * 11 + [False], [1] * 11 + [True]])
def test_a_boolean_mixed_with_numbers_is_refused(client, row):
    r = client.post("/predict", json={"task": "task-0", "inputs": [ROW, row]})
    assert r.status_code == 400 and "boolean in row 1" in r.json()["error"], r.text
    assert client.post("/predict", json={"task": "task-0", "inputs": [[1] * 12, [0.0] * 12]}
                       ).status_code == 200


# -- minor 6: the 503 does not show the server's paths ------------------------------------------
def test_the_503_body_shows_no_server_path(monkeypatch, prometheus_dir, tmp_path):
    path = tmp_path / "secret-dir" / "ckpt"
    save_checkpoint(tiny_mlp_model(2), path)
    (path / "weights.safetensors").write_bytes(b"rotten")
    with serving(monkeypatch, prometheus_dir, ready=False, HNET_CHECKPOINT=path) as c:
        deadline = time.monotonic() + 30
        while "failed to load" not in c.get("/tasks").text and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/predict", json={"task": "task-0", "inputs": [ROW]})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]
    assert str(tmp_path) not in r.text and "secret-dir" not in r.text, r.text
    assert "<checkpoint>/weights.safetensors" in r.json()["error"]


# -- major 3: work bounded before parsing --------------------------------------------------------
def test_bounds_count_any_row_nesting():
    config = ServingConfig(max_rows=10)
    flat = BodyBounds.of(config, [(12,)])
    assert (flat.max_values, flat.max_lists) == (10 * 12 + 16, 1 + 10 + 16)
    nested = BodyBounds.of(config, [(3, 4, 5)])
    assert (nested.max_values, nested.max_lists) == (10 * 60 + 16, 1 + 10 * (1 + 3 + 12) + 16)
    # a valid body at the limits passes: its commas are rows x width - 1 (+1 per extra key)
    rows = np.zeros((10, 3, 4, 5)).tolist()
    body = json.dumps({"task": "t", "inputs": rows}).encode()
    assert nested.exceeded(body.count(b"["), body.count(b",")) is None
    body = json.dumps({"task": "t", "inputs": rows + rows[:1]}).encode()
    assert "too many" in nested.exceeded(body.count(b"["), body.count(b","))


@pytest.mark.parametrize(("body", "message"), [
    (rows_body(2 * MiB), "too many rows"),  # 8 MiB of one-value rows
    (rows_body(40_000, width=12), "too many rows"),
    (rows_body(64, width=12 * 64), "too many values"),  # right row count, rows far too wide
    (b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "too many rows"),
], ids=["8 MiB of one-value rows", "40k rows", "rows 64x too wide", "nested 200k deep"])
def test_bodies_past_the_limits_are_refused_before_parsing(client, body, message):
    """Old code: the 8 MiB body became ~2 M Python lists and an array (about 1 GB and seconds
    on the event loop) before the row limit was checked."""
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 400 and message in r.json()["error"], r.text[:300]
    assert "max_rows=64" in r.json()["error"]
    assert peak < 4 * len(body) + 16 * MiB, peak / MiB  # the body and its copies, no objects
    assert elapsed < 2.0


def test_the_largest_valid_body_still_passes(client):
    body = rows_body(64, width=12) + b" " * PRESCAN_BYTES  # past the pre-scan size, at the limits
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 64


# -- minor 10: client mistakes are not server faults ----------------------------------------------
def test_client_mistakes_log_one_info_line_not_a_traceback(client, caplog):
    bad = ['{"task": "task-0", "inputs": [[1, 2', '{"task": 3, "inputs": [[1]]}', '{"task": "a"}',
           '[1, 2]', '{"inputs": ' + "[" * 5000 + "]" * 5000 + "}"]
    with caplog.at_level(logging.INFO):
        for text in bad:
            r = client.post("/predict", content=text, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not errors, [r.getMessage()[:200] for r in errors]
    lines = [r.getMessage() for r in caplog.records if "client error" in r.getMessage()]
    assert len(lines) == len(bad) and all("\n" not in line for line in lines), lines


def test_a_client_that_disconnects_mid_upload_is_not_a_server_error():
    """The middleware sees the disconnect; the app (BentoML's parser, which answered 500 with a
    traceback) is never called."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    messages = [{"type": "http.request", "body": b'{"inputs": [[0', "more_body": True},
                {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict",
             "headers": [(b"content-length", b"100000")]}
    asyncio.run(RequestBodyMiddleware(app, bounds=lambda: BodyBounds(10**6, 64))(
        scope, receive, send))
    assert not reached and sent[0]["status"] == CLIENT_CLOSED


# -- minor 12 (service part): degenerate temperatures ---------------------------------------------
@pytest.mark.parametrize("value", ["inf", "1e308", "1e-45", "nan", "0", "-1", "1e-3", "1e3"])
def test_degenerate_temperatures_are_refused(value):
    with pytest.raises(ConfigError, match=r"temperature='.*'"):
        ServingConfig.from_env({"HNET_TEMPERATURE": value})


@pytest.mark.parametrize("value", [0.01, 1.0, 100.0])
def test_temperatures_in_range_infer_more_than_the_first_task(value):
    rt = Runtime(tiny_mlp_model(3), ServingConfig(temperature=value))
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32) * 3
    pred = rt.predict(None, x)
    assert len(set(pred.tasks)) > 1 and np.isfinite(pred.confidence).all()


# -- task inference exclusion ---------------------------------------------------------------------
def test_excluded_tasks_never_win_task_inference_but_are_served_by_name():
    model = tiny_mlp_model(3)
    x = np.random.default_rng(1).normal(size=(300, 12)).astype(np.float32) * 3
    assert "task-1" in Runtime(model).predict(None, x).tasks
    rt = Runtime(model, ServingConfig.from_env({"HNET_EXCLUDE_FROM_INFERENCE": "task-1"}))
    assert "task-1" not in rt.predict(None, x).tasks
    assert "task-1" not in rt.predict_mixed([None] * 300, x).tasks
    assert rt.predict("task-1", x[:2]).tasks == ["task-1", "task-1"]


@pytest.mark.parametrize(("names", "message"), [(["ghost"], "unknown tasks"),
                                                (["task-0", "task-1", "task-2"], "every task")])
def test_bad_exclusions_are_config_errors(names, message):
    with pytest.raises(ConfigError, match=message):
        Runtime(tiny_mlp_model(3), ServingConfig(exclude_from_inference=names))


# -- a real server: labels, memory, disconnects, logs ----------------------------------------------
def worker_pid(root: int) -> int:
    import psutil

    for p in psutil.Process(root).children(recursive=True):
        if "_bentoml_impl.worker" in " ".join(p.cmdline()):
            return p.pid
    raise AssertionError("no BentoML worker process")


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    port, log = free_port(), home / "serve.log"
    env = {**child_env(home), "OMP_WAIT_POLICY": "PASSIVE", "HNET_INTRA_OP_THREADS": "1"}
    cmd = [sys.executable, "-m", "hnet_serve.cli", "serve", str(checkpoint), "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 150
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                try:
                    wait_ready(http.get, timeout=1)
                    break
                except AssertionError:
                    pass
            yield http, worker_pid(proc.pid), log, port
    finally:
        stop_process_group(proc)


@pytest.mark.integration
def test_random_paths_and_task_names_keep_metrics_and_memory_flat(server):
    http, worker, _, _ = server
    rng = random.Random(0)

    def junk(n: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.~%") for _ in range(n))

    def burst(count: int) -> None:
        def one(i: int) -> None:
            if i % 4 == 0:
                r = http.post("/predict", json={"task": junk(rng.randint(1, 2000)), "inputs": [ROW]})
                assert r.status_code == 404
            else:
                r = http.request(rng.choice(["GET", "POST"]), "/" + junk(rng.randint(1, 2000)))
                assert r.status_code in (404, 405)

        threads = [threading.Thread(target=lambda k=k: [one(j) for j in range(k, count, 8)])
                   for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert http.post("/predict", json={"task": "task-0", "inputs": [ROW]}).status_code == 200
    burst(400)  # every kind of label once, allocator warmed up
    size0, rss0 = len(http.get("/metrics").content), rss(worker)
    burst(3000)
    text = http.get("/metrics").text
    size1, rss1 = len(text), rss(worker)
    assert size1 - size0 < 4096, (size0, size1)  # counters' digits only, no new series
    assert rss1 - rss0 < 32 * MiB, (rss0 / MiB, rss1 / MiB)
    endpoints = {line.split('endpoint="', 1)[1].split('"', 1)[0]
                 for line in text.splitlines() if 'endpoint="' in line}
    assert endpoints <= {"other", "/predict", "/tasks", "/version", "/livez", "/readyz", "/healthz",
                         "/metrics", "/docs.json", "/schema.json", "/", "/static_content"}, endpoints
    tasks = {line.split('task="', 1)[1].split('"', 1)[0]
             for line in text.splitlines() if line.startswith("hnet_requests_total{")}
    assert tasks == {"task-0"}, tasks


@pytest.mark.integration
def test_a_64_mib_body_of_16m_rows_is_refused_fast_and_others_are_served(server):
    import psutil

    http, worker, _, _ = server
    body = rows_body(16 * MiB)[: 64 * MiB - 2] + b"]}"
    assert len(body) <= 64 * MiB
    base = psutil.Process(worker).memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss(worker))

    latencies: list[float] = []

    def honest() -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=30) as own:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert own.post("/predict", json={"task": "task-1", "inputs": [ROW]}
                                ).status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.01)

    threads = [threading.Thread(target=sample), threading.Thread(target=honest)]
    for t in threads:
        t.start()
    try:
        t0 = time.perf_counter()
        r = http.post("/predict", content=body, headers={"content-type": "application/json"})
        elapsed = time.perf_counter() - t0
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert r.status_code == 400 and "too many rows" in r.text, r.text[:300]
    assert elapsed < 5.0, elapsed  # the upload itself; old code: ~25 s and 3.5 GB
    assert peak[0] - base < 256 * MiB, (peak[0] - base) / MiB
    assert latencies and max(latencies) < 1.0, max(latencies)


@pytest.mark.integration
def test_disconnects_and_malformed_bodies_are_no_500_and_no_traceback(server):
    http, _, log, port = server
    for _ in range(5):  # announce 100 kB, send 1 kB, hang up
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100000\r\n\r\n" + b'{"inputs": [[' + b"0," * 500)
        time.sleep(0.05)
    for text in ['{"task": "task-0", "inputs": [[1, 2', '{"inputs": "abc"}', "{}"]:
        r = http.post("/predict", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 400
    time.sleep(1.0)
    metrics = http.get("/metrics").text
    served_500 = [ln for ln in metrics.splitlines() if 'http_response_code="500"' in ln
                  and "request_total" in ln and not ln.rstrip().endswith(" 0.0")]
    assert not served_500, served_500
    assert f'http_response_code="{CLIENT_CLOSED}"' in metrics
    text = log.read_text()
    errors = [ln for ln in text.splitlines() if "[ERROR]" in ln or "Traceback" in ln]
    assert not errors, errors
    assert "client error (ValidationError)" in text


@pytest.mark.parametrize("path", ["/predict", "/tasks", "/livez", "/x/../predict", "/nope/deep"])
def test_route_template_names_the_route_or_other(client, path):
    from hnet_serve.serving.metrics import route_template
    from tests.test_service_http import asgi_app

    app = asgi_app()
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
    want = path if path in ("/predict", "/tasks", "/livez") else "other"
    assert route_template(app, scope) == want

