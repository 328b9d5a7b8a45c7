"""Runtime: routing, input validation, mixed batches, task inference, config, backends."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hnet_serve.errors import ConfigError, InputError, UnknownTaskError
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.serving import backends
from hnet_serve.serving.config import ServingConfig, parse_bytes
from hnet_serve.serving.runtime import Runtime
from hnet_serve.targets import MLPConfig
from hnet_serve.task_inference import infer_tasks, select_by_entropy, softmax
from tests.conftest import (
    tiny_adapter_model,
    tiny_mlp_model,
    tiny_resnet_model,
    tiny_trunk_model,
)

# -- a model whose tasks are separable by construction ---------------------------------------
SEP_TASKS = 3
SEP_CLASSES = 3
SEP_IN = SEP_TASKS + SEP_CLASSES + 2  # task indicator, class indicator, 2 noise features


def separable_model() -> HNetModel:
    """Three tasks whose generated MLPs are confident on their own inputs only.

    A full hypernetwork with one-hot task embeddings, an identity first layer and the tasks'
    weight vectors as the columns of its output layer generates exactly the weights built here.
    Task ``t``'s MLP computes ``logit_c = 10 relu(x[t] + x[T + c] - 2)``: on its own inputs
    (``x[t] = 3``) the true class wins by 10, on another task's inputs (``x[t] = 0``) every logit
    is 0, a uniform prediction, i.e. maximal entropy.
    """
    model = HNetModel(
        MLPConfig(input_shape=(SEP_IN,), hidden=[4, 4], num_classes=SEP_CLASSES),
        HypernetConfig(kind="full", hidden=[SEP_TASKS], task_emb_dim=SEP_TASKS),
        seed=0,
    )
    thetas = []
    for t in range(SEP_TASKS):
        w1 = torch.zeros(4, SEP_IN)
        b1 = torch.zeros(4)
        for c in range(SEP_CLASSES):
            w1[c, t] = 1.0
            w1[c, SEP_TASKS + c] = 1.0
            b1[c] = -2.0
        w2 = torch.eye(4)
        w3 = torch.zeros(SEP_CLASSES, 4)
        w3[:, :SEP_CLASSES] = 10 * torch.eye(SEP_CLASSES)
        parts = [w1, b1, w2, torch.zeros(4), w3, torch.zeros(SEP_CLASSES)]
        thetas.append(torch.cat([p.flatten() for p in parts]))
    hn = model.hypernet
    with torch.no_grad():
        hn.in_task.weight.copy_(torch.eye(SEP_TASKS))
        hn.in_task.bias.zero_()
        hn.head.weight.copy_(torch.stack(thetas, dim=1))  # (n_params, T)
        hn.head.bias.zero_()
    for t in range(SEP_TASKS):
        model.add_task(f"sep-{t}", embedding=torch.eye(SEP_TASKS)[t])
    return model


def separable_inputs(n_per_task: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of every task, shuffled: (x (N, SEP_IN), task (N,), label (N,))."""
    g = np.random.default_rng(seed)
    n = n_per_task * SEP_TASKS
    task = np.repeat(np.arange(SEP_TASKS), n_per_task)
    label = g.integers(0, SEP_CLASSES, n)
    x = g.uniform(0, 0.1, (n, SEP_IN)).astype(np.float32)
    x[np.arange(n), task] = 3.0
    x[np.arange(n), SEP_TASKS + label] += 1.0
    perm = g.permutation(n)
    return x[perm], task[perm], label[perm]


def reference_probs(model: HNetModel, task: str, x: np.ndarray) -> np.ndarray:
    return model.logits(task, torch.from_numpy(x)).softmax(-1).numpy()


# -- routing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_mlp_model, tiny_resnet_model, tiny_adapter_model,
                                     tiny_trunk_model])
def test_predict_matches_the_model(factory):
    model = factory()
    rt = Runtime(model)
    name = model.task_names[-1]
    shape = model.target_config.input_shape
    x = np.random.default_rng(1).uniform(0, 1, (5, *shape)).astype(np.float32)
    pred = rt.predict(name, x)
    ref = reference_probs(model, name, x)
    np.testing.assert_allclose(pred.probabilities, ref, atol=1e-5)
    np.testing.assert_array_equal(pred.predictions, ref.argmax(1))
    assert pred.tasks == [name] * 5 and not pred.inferred and pred.confidence is None
    assert pred.predictions.dtype == np.int64 and pred.probabilities.dtype == np.float32
    # Flattened rows and nested lists give the same answer.
    flat = rt.predict(name, x.reshape(5, -1).tolist())
    np.testing.assert_allclose(flat.probabilities, pred.probabilities, atol=1e-6)


def test_unknown_task_is_named():
    rt = Runtime(tiny_mlp_model())
    with pytest.raises(UnknownTaskError, match="'nope'"):
        rt.predict("nope", np.zeros((1, 12), np.float32))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "at least one row"),
        (np.zeros((0, 12)), "at least one row"),
        (3.0, "at least one row"),
        ([1.0] * 12, r"shape \[12\]"),  # one row without the outer list
        ([[1.0] * 11], r"got rows of shape \[11\]"),
        ([[1.0] * 12, [1.0] * 11], "equal length"),
        ([["a"] * 12], "numbers"),
        ([[True] * 12], "numbers"),
        ([[None] * 12], "numeric rows"),
        ({"a": 1}, "numeric rows"),
        ([[float("nan")] + [0.0] * 11], "NaN or inf"),
        ([[0.0] * 11 + [float("inf")]], "NaN or inf"),
        ([[1e39] * 12], "overflow"),
        (np.zeros((4097, 12)), "too many rows"),
        (np.zeros((2, 3, 4)), r"got rows of shape \[3, 4\]"),
    ],
)
def test_bad_inputs_are_input_errors(inputs, message):
    rt = Runtime(tiny_mlp_model())
    with pytest.raises(InputError, match=message):
        rt.validate_inputs(inputs, "task-0")
    with pytest.raises(InputError):
        rt.predict("task-0", inputs)


def test_large_finite_values_are_not_mistaken_for_overflow():
    # the finiteness check sums squares: 3e38 squared overflows float32, yet every value is finite
    # (small inputs take np.isfinite, large ones the dot product: both are checked)
    rt = Runtime(tiny_mlp_model(), ServingConfig(max_rows=10_000))
    for n in (2, 6000):
        x = np.full((n, 12), 3e38, np.float32)
        np.testing.assert_array_equal(rt.validate_inputs(x, "task-0"), x)
        x[1, 5] = np.nan
        with pytest.raises(InputError, match="first in row 1"):
            rt.validate_inputs(x, "task-0")
        x[1, 5], x[-1, 0] = 1.0, -np.inf
        with pytest.raises(InputError, match=f"first in row {n - 1}"):
            rt.validate_inputs(x, "task-0")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_task_logits_are_what_predict_decides_from(backend):
    model = tiny_mlp_model()
    rt = Runtime(model, ServingConfig(backend=backend))
    x = np.random.default_rng(3).uniform(0, 1, (9, 12)).astype(np.float32)
    logits = rt.task_logits("task-1", x)
    pred = rt.predict("task-1", x)
    assert logits.shape == (9, 3) and logits.dtype == np.float32
    np.testing.assert_array_equal(pred.predictions, logits.argmax(1))
    np.testing.assert_allclose(pred.probabilities, reference_probs(model, "task-1", x), atol=1e-5)
    with pytest.raises(InputError, match="NaN or inf"):
        rt.task_logits("task-1", np.full((1, 12), np.inf, np.float32))


def test_validate_accepts_ints_and_nested_image_rows():
    rt = Runtime(tiny_resnet_model())
    x = rt.validate_inputs(np.ones((2, 3, 8, 8), dtype=np.int64).tolist(), "img-0")
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    assert rt.validate_inputs(np.ones((2, 192)), "img-0").shape == (2, 3, 8, 8)


def test_max_rows_is_configurable():
    rt = Runtime(tiny_mlp_model(), ServingConfig(max_rows=3))
    rt.predict("task-0", np.zeros((3, 12), np.float32))
    with pytest.raises(InputError, match="max_rows=3"):
        rt.predict("task-0", np.zeros((4, 12), np.float32))


def test_float32_arrays_are_checked_in_place_and_odd_layouts_made_contiguous():
    rt = Runtime(tiny_mlp_model())
    x = np.random.default_rng(5).uniform(0, 1, (4, 12)).astype(np.float32)
    assert rt.validate_inputs(x, "task-0") is x  # a request's own float32 rows: no copy
    wide = np.repeat(x, 2, axis=1)  # (4, 24)
    for arr in (wide[:, ::2], np.asfortranarray(x), x.astype(">f4"), np.asmatrix(x),
                x.astype(np.float64), torch.from_numpy(x)):
        got = rt.validate_inputs(arr, "task-0")
        assert type(got) is np.ndarray and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, x)
    images = Runtime(tiny_resnet_model())
    flat = np.random.default_rng(6).uniform(0, 1, (2, 192)).astype(np.float32)
    got = images.validate_inputs(flat, "img-0")  # flat rows of (3, 8, 8) images: a view
    assert got.shape == (2, 3, 8, 8) and np.shares_memory(got, flat)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 17, 47])  # the first, a middle and the last value
def test_every_nonfinite_value_of_a_float32_array_is_found(where, bad):
    rt = Runtime(tiny_mlp_model())
    x = np.ones((4, 12), np.float32)
    x.flat[where] = bad
    with pytest.raises(InputError, match=f"NaN or inf \\(first in row {where // 12}\\)"):
        rt.predict("task-0", x)


@pytest.mark.parametrize(("backend", "onnx_softmax"),
                         [("torch", True), ("onnx", True), ("onnx", False)])
def test_probabilities_are_the_softmax_of_the_logits_on_every_path(backend, onnx_softmax):
    rt = Runtime(tiny_mlp_model(), ServingConfig(backend=backend, onnx_softmax=onnx_softmax))
    x = np.random.default_rng(7).normal(0, 3, (6, 12)).astype(np.float32)
    pred = rt.predict("task-1", x)
    logits = rt.task_logits("task-1", x)
    np.testing.assert_allclose(pred.probabilities, softmax(logits), rtol=1e-6, atol=1e-7)
    assert pred.probabilities.dtype == np.float32 and pred.probabilities.shape == (6, 3)
    mixed = rt.predict_mixed(["task-1"] * 3 + ["task-0"] * 3, x)
    alone = rt.predict("task-1", x[:3])
    if backend == "onnx":
        # With onnx_softmax the session computes the softmax in the same run, an output beside
        # the logits; a request answers exactly alike whether the batcher ran it alone or with
        # others. Without, the sessions hold the logits only and numpy computes the softmax.
        outputs = rt.cache.get("task-1").session.get_outputs()
        want = [("logits", ["batch", 3]), ("probabilities", ["batch", 3])]
        assert [(o.name, o.shape) for o in outputs] == want[: 1 + onnx_softmax]
        np.testing.assert_array_equal(mixed.probabilities[:3], alone.probabilities)
        if not onnx_softmax:
            np.testing.assert_array_equal(pred.probabilities, softmax(logits))
    np.testing.assert_allclose(mixed.probabilities[:3], alone.probabilities, atol=1e-6)


# -- mixed batches -----------------------------------------------------------------------------
def _mixed_case(rt: Runtime, tasks: list[str], x: np.ndarray) -> None:
    mixed = rt.predict_mixed(tasks, x)
    assert mixed.tasks == tasks
    for name in set(tasks):
        rows = [i for i, t in enumerate(tasks) if t == name]
        alone = rt.predict(name, x[rows])
        c = alone.probabilities.shape[1]
        np.testing.assert_allclose(mixed.probabilities[rows, :c], alone.probabilities, atol=1e-5)
        assert not mixed.probabilities[rows, c:].any()  # zero padding
        np.testing.assert_array_equal(mixed.predictions[rows], alone.predictions)


@pytest.mark.parametrize("stack_max", [backends.STACK_MAX_PARAMS, 0])
def test_mixed_batch_equals_per_task_predictions(monkeypatch, stack_max):
    """Both the stacked (one bmm) path and the per-task path agree with per-task predict."""
    monkeypatch.setattr(backends, "STACK_MAX_PARAMS", stack_max)
    model = tiny_mlp_model(4)
    model.add_task("two-classes", num_classes=2)
    rt = Runtime(model)
    g = np.random.default_rng(2)
    # Skewed group sizes, so buckets with padding and lone groups both occur.
    tasks = ["task-0"] * 9 + ["task-1"] * 4 + ["task-2"] * 3 + ["task-3"] + ["two-classes"] * 3
    perm = g.permutation(len(tasks))
    tasks = [tasks[i] for i in perm]
    x = g.normal(size=(len(tasks), 12)).astype(np.float32)
    _mixed_case(rt, tasks, x)
    assert rt.cache.stats()["loads"] >= 1


def test_mixed_batch_resnet_and_inferred_rows():
    model = tiny_resnet_model(3)
    rt = Runtime(model)
    x = np.random.default_rng(3).uniform(0, 1, (5, 3, 8, 8)).astype(np.float32)
    tasks = ["img-2", "img-0", "img-2", "img-1", "img-0"]
    _mixed_case(rt, tasks, x)
    pred = rt.predict_mixed(["img-1", None, "img-0", None, None], x)
    assert pred.inferred
    assert np.isnan(pred.confidence[[0, 2]]).all() and np.isfinite(pred.confidence[[1, 3, 4]]).all()
    alone = rt.predict(None, x[[1, 3, 4]])
    assert [pred.tasks[i] for i in (1, 3, 4)] == alone.tasks
    body = pred.to_json()
    assert body["confidence"][0] is None and body["inferred"] is True


def test_mixed_batch_generates_missing_tasks_in_one_call():
    model = tiny_mlp_model(5)
    rt = Runtime(model)
    x = np.zeros((5, 12), np.float32)
    rt.predict_mixed([f"task-{i}" for i in range(5)], x)
    s = rt.cache.stats()
    assert (s["loads"], s["generated"]) == (1, 5)


def test_mixed_batch_checks_lengths_and_names():
    rt = Runtime(tiny_mlp_model())
    with pytest.raises(InputError, match="2 task names for 3 rows"):
        rt.predict_mixed(["task-0", "task-1"], np.zeros((3, 12)))
    with pytest.raises(UnknownTaskError, match="'zz'"):
        rt.predict_mixed(["task-0", "zz"], np.zeros((2, 12)))


# -- task inference ------------------------------------------------------------------------------
def test_task_inference_picks_the_right_task():
    model = separable_model()
    x, task, label = separable_inputs()
    inf, _ = infer_tasks(model, x)
    np.testing.assert_array_equal(inf.task_index, task)
    assert inf.entropy.shape == (len(x), SEP_TASKS)
    assert (inf.confidence > 0.9).all()
    rt = Runtime(model)
    pred = rt.predict(None, x)
    assert pred.inferred
    assert pred.tasks == [f"sep-{t}" for t in task]
    np.testing.assert_array_equal(pred.predictions, label)
    np.testing.assert_allclose(pred.confidence, inf.confidence, atol=1e-6)
    # All tasks' weights were generated in one batched call.
    assert rt.cache.stats()["loads"] == 1


def test_task_inference_uses_given_weights_and_candidates():
    model = separable_model()
    x, task, _ = separable_inputs()
    # Swap two tasks' weights: the rule must follow the weights it was given.
    w = model.generate(["sep-1", "sep-0"])
    inf, _ = infer_tasks(model, x, tasks=["sep-0", "sep-1"], weights=w)
    own = task < 2
    np.testing.assert_array_equal(inf.task_index[own], 1 - task[own])


def test_select_by_entropy_rule_and_temperature():
    sharp = np.array([[4.0, 0.0], [0.0, 0.0]], np.float32)
    flat = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    inf = select_by_entropy([sharp, flat])
    np.testing.assert_array_equal(inf.task_index, [0, 1])
    assert inf.confidence[0] > inf.confidence[1] > 0
    # Temperature changes the entropies but not which task is sharpest here.
    hot = select_by_entropy([sharp, flat], temperature=10.0)
    np.testing.assert_array_equal(hot.task_index, [0, 1])
    assert hot.confidence[0] < inf.confidence[0]
    uniform = select_by_entropy([np.zeros((1, 4), np.float32)])
    assert uniform.confidence[0] == pytest.approx(0.0, abs=1e-6)


# -- cache through the runtime ---------------------------------------------------------------------
def test_pinned_and_warm_tasks():
    model = tiny_mlp_model(6)
    per_task = backends.nbytes_estimate(model)
    cfg = ServingConfig(backend="torch", cache_bytes=3 * per_task, pinned=["task-0"],
                        warm=["task-1"])  # per_task is the torch backend's size
    rt = Runtime(model, cfg)
    assert set(rt.cache.keys()) == {"task-0", "task-1"}
    assert rt.cache.stats()["loads"] == 1  # pinned + warm in one batched call
    x = np.zeros((1, 12), np.float32)
    for i in range(2, 6):
        rt.predict(f"task-{i}", x)
    s = rt.cache.stats()
    assert "task-0" in rt.cache and s["evictions"] >= 2 and s["bytes"] <= 3 * per_task
    info = rt.info()
    flags = {t["name"]: (t["cached"], t["pinned"]) for t in info["tasks"]}
    assert flags["task-0"] == (True, True) and flags["task-1"] == (False, False)


@pytest.mark.parametrize("field", ["pinned", "warm"])
def test_unknown_pinned_or_warm_task_is_a_config_error(field):
    with pytest.raises(ConfigError, match=f"{field} names unknown tasks"):
        Runtime(tiny_mlp_model(), ServingConfig(**{field: ["ghost"]}))


def test_concurrent_requests_generate_each_task_once():
    model = tiny_resnet_model(2)
    rt = Runtime(model)
    x = np.random.default_rng(0).uniform(size=(2, 3, 8, 8)).astype(np.float32)
    expected = {n: reference_probs(model, n, x) for n in model.task_names}
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        name = model.task_names[i % 2]
        try:
            for _ in range(5):
                np.testing.assert_allclose(rt.predict(name, x).probabilities, expected[name],
                                           atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert rt.cache.stats()["generated"] == 2


# -- configuration ---------------------------------------------------------------------------------
def test_config_from_env_and_file(tmp_path):
    cfg_file = tmp_path / "serving.yaml"
    cfg_file.write_text("serving:\n  cache_bytes: 1MiB\n  max_rows: 7\n  pinned: [a]\n")
    env = {"HNET_CONFIG": str(cfg_file), "HNET_MAX_ROWS": "9", "HNET_WARM": "b, c",
           "HNET_BACKEND": "onnx"}
    cfg = ServingConfig.from_env(env, temperature=2.0)
    assert cfg.cache_bytes == 1024 * 1024 and cfg.max_rows == 9  # env beats the file
    assert cfg.pinned == ["a"] and cfg.warm == ["b", "c"] and cfg.backend == "onnx"
    assert cfg.temperature == 2.0
    (tmp_path / "s.json").write_text('{"max_request_bytes": "2 MB"}')
    assert ServingConfig.from_env({"HNET_CONFIG": str(tmp_path / "s.json")}).max_request_bytes == 2_000_000


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HNET_BACKEND": "tensorflow"}, "backend='tensorflow'"),
        ({"HNET_CACHE_BYTES": "lots"}, "cache_bytes='lots'"),
        ({"HNET_MAX_ROWS": "0"}, "max_rows='0'"),
        ({"HNET_TEMPERATURE": "-1"}, "temperature"),
        ({"HNET_CONFIG": "/does/not/exist.yaml"}, "does not exist"),
    ],
)
def test_bad_config_names_the_field(env, message):
    with pytest.raises(ConfigError, match=message):
        ServingConfig.from_env(env)


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(10) == 10
    for bad in ("-1", "5 parsecs", True, -3):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_from_checkpoint_round_trip(tmp_path):
    from hnet_serve.checkpoint import save_checkpoint

    model = tiny_mlp_model()
    save_checkpoint(model, tmp_path / "ckpt")
    rt = Runtime.from_checkpoint(tmp_path / "ckpt", cache_bytes="1MiB", warm=["task-2"])
    assert rt.config.checkpoint == str(tmp_path / "ckpt") and "task-2" in rt.cache
    x = np.ones((2, 12), np.float32)
    np.testing.assert_allclose(rt.predict("task-2", x).probabilities,
                               reference_probs(model, "task-2", x), atol=1e-6)


# -- backends agree ----------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_mlp_model, tiny_resnet_model])
def test_torch_and_onnx_backends_agree(factory):
    model = factory(3)
    torch_rt = Runtime(model, ServingConfig(backend="torch"))
    onnx_rt = Runtime(model, ServingConfig(backend="onnx", intra_op_threads=1))
    assert torch_rt.backend.name == "torch"
    assert onnx_rt.backend.name == "onnx" and onnx_rt.backend.threads == 1
    shape = model.target_config.input_shape
    x = np.random.default_rng(4).uniform(0, 1, (6, *shape)).astype(np.float32)
    for name in model.task_names:
        a, b = torch_rt.predict(name, x), onnx_rt.predict(name, x)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_array_equal(a.predictions, b.predictions)
    tasks = [model.task_names[i % 3] for i in range(5)] + [None]
    a, b = torch_rt.predict_mixed(tasks, x), onnx_rt.predict_mixed(tasks, x)
    assert a.tasks == b.tasks
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    # The onnx cache holds sessions built from generated weights, one load per miss batch.
    s = onnx_rt.cache.stats()
    assert s["entries"] == 3 and s["generated"] == 3 and s["bytes"] > 4 * model.target.n_params
