"""The BentoML service class used directly (no HTTP), its batcher, the model store and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import numpy as np
import pytest

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.errors import CheckpointError, ConfigError
from hnet_serve.serving.batching import AdaptiveBatcher
from hnet_serve.serving.metrics import metrics_text
from hnet_serve.serving.runtime import Runtime
from hnet_serve.serving.service import HNetService
from tests.conftest import tiny_mlp_model


def mlp_checkpoint(path):
    model = tiny_mlp_model(3)
    model.add_task("binary", num_classes=2)
    save_checkpoint(model, path)
    return model


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    mlp_checkpoint(path)
    return path


def start(monkeypatch, **env) -> HNetService:
    for key in list(os.environ):
        if key.startswith("HNET_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    svc = HNetService()
    svc.wait_loaded(60)
    return svc


def call(svc: HNetService, **body):
    return asyncio.run(svc.predict(**body))


def test_class_predicts_like_the_runtime(monkeypatch, checkpoint):
    svc = start(monkeypatch, HNET_CHECKPOINT=checkpoint, HNET_WARM="task-1")
    assert svc.__is_ready__() and "task-1" in svc.runtime.cache
    ref = Runtime.from_checkpoint(checkpoint)
    x = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    out = call(svc, task="task-2", inputs=x.tolist())
    want = ref.predict("task-2", x)
    assert out["task"] == "task-2" and "inferred" not in out
    np.testing.assert_allclose(out["probabilities"], want.probabilities, atol=1e-6)
    assert out["predictions"] == want.predictions.tolist()
    inferred = call(svc, inputs=x.tolist())
    assert inferred["inferred"] is True and len(inferred["confidence"]) == 3
    assert inferred["task"] == ref.predict(None, x).tasks
    svc.batcher.close()


def test_class_maps_errors_to_status(monkeypatch, checkpoint):
    svc = start(monkeypatch, HNET_CHECKPOINT=checkpoint, HNET_MAX_ROWS=2)
    cases = [
        ({"task": "ghost", "inputs": [[0.0] * 12]}, 404, "ghost"),
        ({"task": "task-0", "inputs": [[0.0] * 12] * 3}, 400, "max_rows=2"),
        ({"task": "task-0", "inputs": [[0.0] * 5]}, 400, "shape"),
        ({"task": None, "inputs": []}, 400, "at least one row"),
    ]
    for body, status, message in cases:
        resp = call(svc, **body)
        assert resp.status_code == status, body
        assert message in json.loads(resp.body)["error"]
    svc.batcher.close()


def test_bad_checkpoint_keeps_the_service_unready(monkeypatch, tmp_path, caplog):
    path = tmp_path / "ckpt"
    mlp_checkpoint(path)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    with caplog.at_level(logging.ERROR):
        svc = start(monkeypatch, HNET_CHECKPOINT=path)
    assert not svc.__is_ready__()
    assert "content hash mismatch" in svc.load_error
    assert any("NOT READY" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    resp = call(svc, task="task-0", inputs=[[0.0] * 12])
    assert resp.status_code == 503 and "failed to load" in json.loads(resp.body)["error"]
    assert svc.tasks_response().status_code == 503
    assert "hnet_ready 0.0" in svc.__metrics__("")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HNET_BACKEND": "caffe"}, "backend='caffe'"),
        ({"HNET_PINNED": "ghost"}, "pinned names unknown tasks"),
        ({"HNET_CHECKPOINT": "/no/such/dir"}, "does not exist"),
    ],
)
def test_bad_config_keeps_the_service_unready(monkeypatch, checkpoint, env, message):
    env = {"HNET_CHECKPOINT": checkpoint, **env}
    svc = start(monkeypatch, **env)
    assert not svc.__is_ready__() and message in svc.load_error


def test_batcher_batches_concurrent_requests_and_splits_them_back(checkpoint):
    rt = Runtime.from_checkpoint(checkpoint)
    batcher = AdaptiveBatcher(rt)
    g = np.random.default_rng(1)
    requests = [
        (t, g.normal(size=(1 + i % 3, 12)).astype(np.float32))
        for i, t in enumerate(["task-0", "binary", None, "task-2", "task-0", None, "binary"] * 3)
    ]

    async def run_all():
        return await asyncio.gather(*(batcher.predict(t, x) for t, x in requests))

    results = asyncio.run(run_all())
    assert batcher.batched_requests == len(requests)
    assert batcher.batches < len(requests)  # requests were batched together
    for (task, x), got in zip(requests, results):
        want = rt.predict(task, x)
        assert got.tasks == want.tasks and got.inferred == want.inferred
        assert got.probabilities.shape == want.probabilities.shape
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)
        np.testing.assert_array_equal(got.predictions, want.predictions)
        if task is None:
            np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-5)
    batcher.close()


def test_batcher_respects_max_rows(checkpoint):
    rt = Runtime.from_checkpoint(checkpoint)
    batcher = AdaptiveBatcher(rt, max_rows=4)
    xs = [np.zeros((3, 12), np.float32) for _ in range(5)]

    async def run_all():
        return await asyncio.gather(*(batcher.predict("task-0", x) for x in xs))

    asyncio.run(run_all())
    assert batcher.batches == 5  # 3 + 3 > 4: no two requests fit one batch
    batcher.close()


def test_metrics_text_reports_cache_and_requests(checkpoint):
    rt = Runtime.from_checkpoint(checkpoint, warm=["task-0", "task-1"])
    rt.predict("task-0", np.zeros((1, 12), np.float32))
    text = metrics_text(rt, {"task-0": 3, "*": 2})
    assert "hnet_cache_hits_total 1.0" in text
    assert "hnet_cache_misses_total 2.0" in text
    assert "hnet_cache_entries 2.0" in text
    assert 'hnet_requests_total{task="task-0"} 3.0' in text
    assert 'hnet_requests_total{task="*"} 2.0' in text


# -- model store -------------------------------------------------------------------------
@pytest.fixture
def model_store(tmp_path):
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    (tmp_path / "models").mkdir()
    with BentoMLContainer.model_store.patch(ModelStore(str(tmp_path / "models"))):
        yield tmp_path / "models"


def test_import_checkpoint_is_content_addressed(model_store, checkpoint, tmp_path):
    import bentoml

    from hnet_serve.checkpoint import checkpoint_hash
    from hnet_serve.serving.store import checkpoint_dir, import_checkpoint

    tag = import_checkpoint(checkpoint)
    assert tag == f"hnet:{checkpoint_hash(checkpoint)[:16]}"
    assert import_checkpoint(checkpoint) == tag  # idempotent
    stored = bentoml.models.get(tag)
    assert stored.info.labels["tasks"] == "4" and stored.info.labels["target"] == "mlp"
    model = Runtime.from_checkpoint(checkpoint_dir(stored)).model
    assert model.task_names == ["task-0", "task-1", "task-2", "binary"]
    # A different checkpoint gets a different tag; a broken one is refused and not stored.
    other = tmp_path / "other"
    save_checkpoint(tiny_mlp_model(2, seed=5), other)
    assert import_checkpoint(other) != tag
    (checkpoint / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        import_checkpoint(checkpoint)
    assert len(bentoml.models.list("hnet")) == 2


# -- the serve command ---------------------------------------------------------------------
def serve_args(argv):
    from hnet_serve.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_command_parses_the_contract_flags():
    args = serve_args(["ckpt", "--port", "8123", "--host", "0.0.0.0", "--backend", "onnx",
                       "--cache-bytes", "64MiB"])
    assert (args.checkpoint, args.port, args.host, args.backend, args.cache_bytes) == (
        "ckpt", 8123, "0.0.0.0", "onnx", "64MiB")
    assert serve_args(["ckpt"]).host == "127.0.0.1"
    for bad in (["ckpt", "--port", "0"], ["ckpt", "--backend", "tf"], ["ckpt", "--port", "x"]):
        with pytest.raises(SystemExit):
            serve_args(bad)


def test_serve_env_passes_options_and_checks_them(monkeypatch):
    from hnet_serve.serving.cli import serve_env

    monkeypatch.setenv("HNET_CHECKPOINT", "/somewhere/else")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = serve_env(serve_args(["ckpt", "--backend", "onnx", "--cache-bytes", "1GiB"]), "hnet:abc")
    assert env["HNET_MODEL_TAG"] == "hnet:abc" and env["HNET_BACKEND"] == "onnx"
    assert env["HNET_CACHE_BYTES"] == "1GiB" and "HNET_CHECKPOINT" not in env
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    with pytest.raises(ConfigError, match="cache_bytes"):
        serve_env(serve_args(["ckpt", "--cache-bytes", "huge"]), "hnet:abc")


def test_serve_command_refuses_a_bad_checkpoint(model_store, tmp_path, capsys):
    from hnet_serve.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "8124"]) == 1
    assert "does not exist" in capsys.readouterr().err



def test_batched_requests_are_not_validated_a_second_time(checkpoint, monkeypatch):
    """The service validates a request once (before queueing it); the batcher hands the
    validated rows to the runtime, which must not check them again."""
    rt = Runtime.from_checkpoint(checkpoint)
    batcher = AdaptiveBatcher(rt)
    x = rt.validate_inputs(np.ones((2, 12), np.float32), "task-0")
    want = rt.predict("task-0", x)
    calls = []
    monkeypatch.setattr(rt, "validate_inputs", lambda *a, **k: calls.append(a))

    async def run_all():
        return await asyncio.gather(batcher.predict("task-0", x), batcher.predict(None, x),
                                    batcher.predict("binary", x))

    got = asyncio.run(run_all())
    assert calls == []
    np.testing.assert_allclose(got[0].probabilities, want.probabilities, atol=1e-6)
    batcher.close()


def test_serve_on_a_busy_port_is_one_line(checkpoint, capsys, monkeypatch, tmp_path):
    import socket

    from hnet_serve.cli import main

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", str(checkpoint), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == f"hnet-serve serve: error: port {port} is in use"
    assert not (tmp_path / "bentoml").exists()  # refused before importing anything
