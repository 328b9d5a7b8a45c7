"""Issue 20: ``--device`` everywhere and the bfloat16 weight cache.

Everything device-agnostic runs on the CPU here; tests that need a GPU are marked ``cuda`` and
skipped where torch sees none (tests/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hnet_serve.checkpoint import load_checkpoint, save_checkpoint, state_tensors
from hnet_serve.cli import main
from hnet_serve.devices import check_device, resolve_device, resolve_dtype, to_device
from hnet_serve.errors import ConfigError
from hnet_serve.serving import Runtime, ServingConfig
from hnet_serve.serving.backends import nbytes_estimate
from hnet_serve.serving.metrics import metrics_text
from hnet_serve.training.api import evaluate_checkpoint, train_tasks
from tests.conftest import tiny_mlp_model, tiny_resnet_model
from tests.test_training import make_task, tiny_config

ALL = ["task-0", "task-1", "task-2"]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- resolving devices ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "auto:1", "", "cuda:-1"])
def test_bad_device_names_are_one_line_config_errors(spec):
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec or "nonsense")
    with pytest.raises(ValueError):
        check_device(spec or "nonsense")


def test_auto_is_cpu_without_cuda_and_cuda_is_refused(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA device.*--device cpu"):
            resolve_device(spec)


def test_auto_picks_cuda_and_indices_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_dtypes_and_cpu_copies():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="cache dtype"):
        resolve_dtype("float16")
    t = torch.ones(3)
    assert to_device(t, torch.device("cpu")) is t  # no copy when already there


# -- serving config and CLI ----------------------------------------------------------------
def test_serving_config_reads_device_and_cache_dtype_from_env():
    cfg = ServingConfig.from_env({"HNET_DEVICE": "cuda:1", "HNET_CACHE_DTYPE": "bfloat16"})
    assert (cfg.device, cfg.cache_dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(ConfigError, match="device"):
        ServingConfig.from_env({"HNET_DEVICE": "tpu"})
    with pytest.raises(ConfigError, match="cache_dtype"):
        ServingConfig.from_env({"HNET_CACHE_DTYPE": "float16"})


def test_serve_flags_reach_the_child_environment():
    import argparse

    from hnet_serve.serving.cli import serve_env

    args = argparse.Namespace(config=None, backend="torch", cache_bytes=None, device="cpu",
                              cache_dtype="bfloat16")
    env = serve_env(args, "hnet:abc")
    assert env["HNET_DEVICE"] == "cpu" and env["HNET_CACHE_DTYPE"] == "bfloat16"


@pytest.mark.parametrize("command", [
    ["train", "--out", "x"], ["add-task", "ck", "--out", "x"], ["eval", "ck"],
    ["serve", "ck"], ["score", "ck", "--input", "a.npy", "--output", "b.npy"],
])
def test_every_command_takes_device_and_refuses_a_bad_one(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--device", "gpu"])
    assert exc.value.code == 2
    assert "device must be one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


def test_train_with_cuda_on_a_cpu_machine_is_a_one_line_error(no_cuda, tmp_path, capsys):
    data = tmp_path / "a.npz"
    task = make_task("a", 1)
    np.savez(data, x_train=task.x_train, y_train=task.y_train, x_test=task.x_test,
             y_test=task.y_test)
    code = main(["train", "--benchmark", "custom", "--data", str(data), "--out",
                 str(tmp_path / "ck"), "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "no CUDA device" in err[0]
    assert not (tmp_path / "ck").exists()


# -- the bfloat16 weight cache -------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_mlp_model, tiny_resnet_model], ids=["mlp", "resnet"])
def test_bfloat16_cache_halves_the_bytes_and_agrees_with_float32(make):
    model = make()
    names = model.task_names
    shape = tuple(model.target_config.input_shape)
    x = np.random.default_rng(0).normal(size=(64, *shape)).astype(np.float32)
    rt32 = Runtime(model, ServingConfig(warm=names, backend="torch"))
    rt16 = Runtime(model, ServingConfig(warm=names, cache_dtype="bfloat16"))
    b32, b16 = rt32.cache.stats()["bytes"], rt16.cache.stats()["bytes"]
    assert b16 * 2 == b32 == len(names) * nbytes_estimate(model)
    assert b16 == len(names) * nbytes_estimate(model, torch.bfloat16)
    for name in names:
        p32, p16 = rt32.predict(name, x), rt16.predict(name, x)
        assert p16.probabilities.dtype == np.float32
        assert np.abs(p32.probabilities - p16.probabilities).max() < 0.03
        # bf16 keeps 8 bits of mantissa: a near-tie may flip, most rows may not
        assert (p32.predictions == p16.predictions).mean() >= 0.9
        assert all(t.dtype == torch.bfloat16 for t in rt16.cache.get(name).stored())


def test_bfloat16_cache_bound_counts_stored_bytes():
    """A budget for two float32 tasks holds four bfloat16 ones."""
    model = tiny_mlp_model(4)
    per_task = nbytes_estimate(model)
    rt32 = Runtime(model, ServingConfig(cache_bytes=2 * per_task, warm=model.task_names, backend="torch"))
    rt16 = Runtime(model, ServingConfig(cache_bytes=2 * per_task, warm=model.task_names,
                                        cache_dtype="bfloat16"))
    assert len(rt32.cache) == 2 and len(rt16.cache) == 4


def test_bfloat16_mixed_batches_stack_and_agree():
    model = tiny_mlp_model(3)
    x = np.random.default_rng(1).normal(size=(30, 12)).astype(np.float32)
    tasks = [ALL[i % 3] for i in range(30)]
    p32 = Runtime(model).predict_mixed(tasks, x)
    p16 = Runtime(model, ServingConfig(cache_dtype="bfloat16")).predict_mixed(tasks, x)
    assert np.abs(p32.probabilities - p16.probabilities).max() < 0.03
    inferred16 = Runtime(model, ServingConfig(cache_dtype="bfloat16")).predict(None, x)
    assert inferred16.inferred and len(inferred16.tasks) == 30


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.03)])
def test_large_mlps_are_cached_pre_packed_with_the_same_answers(dtype, tol, monkeypatch):
    """Above STACK_MAX_PARAMS, MLP layers are packed once for oneDNN (serving/packed.py): the
    same logits as the flat layout, the same bytes."""
    from hnet_serve.serving import backends
    from hnet_serve.serving.packed import packing_works

    model = tiny_mlp_model(3, hidden=(300, 200))
    assert model.target.n_params > backends.STACK_MAX_PARAMS
    if not packing_works(resolve_dtype(dtype)):
        pytest.skip(f"this torch/CPU has no oneDNN {dtype} linear")
    x = np.random.default_rng(2).normal(size=(40, 12)).astype(np.float32)
    tasks = [ALL[i % 3] for i in range(40)]
    packed = Runtime(model, ServingConfig(cache_dtype=dtype, warm=ALL, backend="torch"))
    monkeypatch.setattr(backends, "PACK_WEIGHTS", False)
    flat = Runtime(model, ServingConfig(cache_dtype=dtype, warm=ALL, backend="torch"))
    assert packed.backend.packed and not flat.backend.packed
    assert packed.cache.get("task-0").weights is None
    assert packed.cache.stats()["bytes"] == flat.cache.stats()["bytes"]
    a, b = packed.predict_mixed(tasks, x), flat.predict_mixed(tasks, x)
    assert np.abs(a.probabilities - b.probabilities).max() < tol
    assert np.array_equal(packed.predict(None, x).tasks, flat.predict(None, x).tasks) or \
        dtype == "bfloat16"


def test_packing_falls_back_to_the_flat_layout_where_it_does_not_work(monkeypatch):
    from hnet_serve.serving import backends

    monkeypatch.setattr(backends, "can_pack", lambda *a: False)
    rt = Runtime(tiny_mlp_model(3, hidden=(300, 200)), ServingConfig(warm=["task-0"], backend="torch"))
    assert not rt.backend.packed and rt.cache.get("task-0").weights is not None


def test_tasks_and_metrics_show_the_cache_dtype_and_device():
    rt = Runtime(tiny_mlp_model(), ServingConfig(cache_dtype="bfloat16", device="cpu",
                                                 warm=["task-0"]))
    info = rt.info()
    assert (info["cache_dtype"], info["device"]) == ("bfloat16", "cpu")
    assert info["cache"]["bytes"] == nbytes_estimate(rt.model, torch.bfloat16)
    text = metrics_text(rt, {})
    assert 'hnet_cache_info{device="cpu",dtype="bfloat16"} 1.0' in text


def test_bfloat16_with_the_onnx_backend_is_refused_and_alone_picks_torch():
    with pytest.raises(ConfigError, match="bfloat16 needs backend 'torch'"):
        ServingConfig.build(backend="onnx", cache_dtype="bfloat16")
    with pytest.raises(ConfigError, match="bfloat16 needs backend 'torch'"):
        ServingConfig.from_env({"HNET_BACKEND": "onnx", "HNET_CACHE_DTYPE": "bfloat16"})
    assert ServingConfig.build(cache_dtype="bfloat16").backend == "torch"


def test_serve_refuses_cuda_without_it_before_starting(no_cuda):
    import argparse

    from hnet_serve.serving.cli import serve_env

    args = argparse.Namespace(config=None, backend=None, cache_bytes=None, device="cuda",
                              cache_dtype=None)
    with pytest.raises(ConfigError, match="no CUDA device"):
        serve_env(args, "hnet:abc")


def test_onnx_backend_stays_on_cpu_providers_without_cuda():
    from hnet_serve.serving.backends import onnx_providers

    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]


# -- training and checkpoints ----------------------------------------------------------------
def test_device_is_not_saved_with_the_checkpoint(tmp_path):
    tasks = [make_task("a", 1, n=120)]
    train_tasks(tasks, tiny_config(iterations=5, device="cpu"), tmp_path / "ck",
                progress=False)
    meta = json.loads((tmp_path / "ck" / "manifest.json").read_text())["meta"]
    assert "device" not in meta["train_config"]
    report = evaluate_checkpoint(tmp_path / "ck", tasks=tasks, device="cpu")
    assert 0 <= report["accuracy"]["a"] <= 1


def test_training_on_an_unavailable_cuda_is_refused_before_anything_is_written(no_cuda,
                                                                                  tmp_path):
    with pytest.raises(ConfigError, match="no CUDA device"):
        train_tasks([make_task("a", 1, n=120)], tiny_config(iterations=5, device="cuda"),
                    tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


# -- on a GPU --------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_runtime_agrees_with_cpu_and_keeps_weights_on_the_gpu():
    model = tiny_mlp_model()
    x = np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32)
    cpu = Runtime(tiny_mlp_model(), ServingConfig(device="cpu")).predict("task-1", x)
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 0.03)):
        rt = Runtime(model, ServingConfig(device="cuda", cache_dtype=dtype))
        got = rt.predict("task-1", x)
        assert rt.cache.get("task-1").weights.device.type == "cuda"
        assert np.abs(got.probabilities - cpu.probabilities).max() < tol


@pytest.mark.cuda
def test_cuda_checkpoints_load_on_the_gpu_and_save_device_free(tmp_path):
    model = tiny_resnet_model()
    h1 = save_checkpoint(model, tmp_path / "a")
    on_gpu = load_checkpoint(tmp_path / "a", map_location="cuda")
    assert on_gpu.device.type == "cuda"
    assert all(b.device.type == "cuda" for bufs in on_gpu.task_buffers.values()
               for b in bufs.values())
    assert all(t.device.type == "cpu" for t in state_tensors(on_gpu).values())
    assert save_checkpoint(on_gpu, tmp_path / "b") == h1


@pytest.mark.cuda
def test_cuda_training_matches_the_contract(tmp_path):
    tasks = [make_task("a", 1, n=120), make_task("b", 2, n=120)]
    model, result = train_tasks(tasks, tiny_config(iterations=20, device="cuda"),
                                tmp_path / "ck", progress=False)
    assert model.device.type == "cuda" and len(result.accuracy_matrix) == 2
    assert load_checkpoint(tmp_path / "ck").device.type == "cpu"


def test_serve_with_a_missing_gpu_stores_nothing(no_cuda, monkeypatch):
    import argparse

    from hnet_serve.serving import cli, store

    def must_not_run(*_a, **_k):
        raise AssertionError("the checkpoint was imported into the model store")

    monkeypatch.setattr(store, "import_checkpoint", must_not_run)
    args = argparse.Namespace(config=None, backend=None, cache_bytes=None, device="cuda",
                              cache_dtype=None)
    with pytest.raises(ConfigError, match="no CUDA device"):
        cli.start_server("unused-checkpoint", port=0, args=args)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_packed_and_bfloat16_caches_apply_each_tasks_own_normalization(dtype, tol, monkeypatch):
    """Per-task input statistics (issue 16) reach the pre-packed layers too, and stay float32
    in a bfloat16 cache (features near 1e3 would otherwise be off by several stds)."""
    from hnet_serve.normalization import MEAN, STD
    from hnet_serve.serving import backends
    from hnet_serve.serving.packed import packing_works
    from tests.conftest import normed_mlp_model, scaled_inputs

    if not packing_works(resolve_dtype(dtype)):
        pytest.skip(f"this torch/CPU has no oneDNN {dtype} linear")
    model = normed_mlp_model("per-feature")
    monkeypatch.setattr(backends, "STACK_MAX_PARAMS", 0)  # pack even this tiny MLP
    packed = Runtime(model, ServingConfig(cache_dtype=dtype, backend="torch"))
    reference = Runtime(model, ServingConfig(backend="onnx"))  # normalizes inside the graph
    assert packed.backend.packed
    for i, name in enumerate(model.task_names):
        x = scaled_inputs(50, (6,), seed=10 + i, shift=i)
        a, b = packed.predict(name, x), reference.predict(name, x)
        assert np.abs(a.probabilities - b.probabilities).max() < tol
        bufs = packed.cache.get(name).buffers
        assert bufs[MEAN].dtype == bufs[STD].dtype == torch.float32
