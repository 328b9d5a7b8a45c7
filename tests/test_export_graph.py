"""hnet_serve.onnx_graph: one trace, per-task weights swapped in by name, and the dynamic graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from hnet_serve import __version__
from hnet_serve.checkpoint import checkpoint_hash, load_checkpoint, save_checkpoint
from hnet_serve.errors import ExportError, InputError, UnknownTaskError
from hnet_serve.export.dynamic_graph import dynamic_model_proto
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.onnx_graph import (
    COLUMNS_NAME,
    INPUT_NAME,
    META_CHECKPOINT_HASH,
    META_INPUT_SHAPE,
    META_LABEL_NAMES,
    META_NUM_CLASSES,
    META_TASK,
    META_TASK_INDEX,
    META_TASKS,
    META_VERSION,
    OUTPUT_NAME,
    TASK_INDEX_NAME,
    TaskGraph,
    model_state_hash,
    opset_of,
)
from hnet_serve.targets import MLPConfig
from tests.conftest import (
    normed_mlp_model,
    tiny_adapter_model,
    tiny_mlp_model,
    tiny_resnet_model,
    tiny_trunk_model,
)

TOL = 1e-4


def multihead_model() -> HNetModel:
    """Three heads; tasks with different heads, class counts and label names."""
    model = HNetModel(
        MLPConfig(input_shape=(2, 3), hidden=[7], num_classes=4, num_heads=3, activation="tanh"),
        HypernetConfig(kind="chunked", hidden=[5], task_emb_dim=3, chunk_emb_dim=2, chunk_size=20),
        seed=1,
    )
    model.add_task("four", num_classes=4)
    model.add_task("two", num_classes=2, head=1, label_names=["cat", "dog"])
    model.add_task("three", num_classes=3, head=2)
    return model


MODELS = {
    "mlp": lambda: tiny_mlp_model(4),
    "mlp-adapters": lambda: tiny_adapter_model(3),
    "mlp-adapters-2-layers": lambda: tiny_adapter_model(3, layers=2),
    "mlp-own-first-layers": lambda: tiny_trunk_model(3),
    "mlp-per-feature": lambda: normed_mlp_model("per-feature"),
    "mlp-image-per-channel": lambda: normed_mlp_model("per-channel", input_shape=(2, 3)),
    "mlp-global": lambda: normed_mlp_model("global", input_shape=(2, 3)),
    "resnet": lambda: tiny_resnet_model(3),
    "multihead": multihead_model,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
    model = MODELS[request.param]()
    return model, TaskGraph.build(model)


def run(data: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], feeds)[0]


def test_parity_every_task_batch_1_and_37(built):
    model, graph = built
    g = torch.Generator().manual_seed(3)
    for name in model.task_names:
        data = graph.serialize(name)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        for batch in (1, 37):
            x = torch.rand(batch, *model.target_config.input_shape, generator=g) * 2 - 0.5
            got = run(data, {INPUT_NAME: x.numpy()})
            want = model.logits(name, x).numpy()
            assert got.shape == want.shape == (batch, model.registry.get(name).num_classes)
            assert np.abs(got - want).max() <= TOL


def test_initializers_are_the_task_tensors_by_name(built):
    """Every target parameter and buffer lands, bit-identical, under its own name."""
    model, graph = built
    target = model.target
    for name in model.task_names:
        proto = graph.model_proto(name)
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        flat = model.generate([name])[0].detach()
        expected = {k: v.numpy() for k, v in target.unflatten(flat).items()}
        expected.update({k: v.numpy() for k, v in model.task_buffers[name].items()})
        assert set(expected) <= set(inits)
        for key, value in expected.items():
            np.testing.assert_array_equal(inits[key], value, err_msg=key)
        info = model.registry.get(name)
        start = info.head * model.target_config.num_classes
        np.testing.assert_array_equal(inits[COLUMNS_NAME], np.arange(start, start + info.num_classes))
        assert [i.name for i in proto.graph.input] == [INPUT_NAME]
        assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]


def test_dynamic_graph_matches_per_task_graph(built):
    model, graph = built
    proto = dynamic_model_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == [TASK_INDEX_NAME, INPUT_NAME]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(37, *model.target_config.input_shape, generator=torch.Generator().manual_seed(4))
    for info in model.registry:
        dyn = sess.run([OUTPUT_NAME], {TASK_INDEX_NAME: np.array(info.index, dtype=np.int64),
                                       INPUT_NAME: x.numpy()})[0]
        baked = run(graph.serialize(info.name), {INPUT_NAME: x.numpy()})
        assert dyn.shape == baked.shape == (37, info.num_classes)
        assert np.abs(dyn - baked).max() <= TOL
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[META_TASKS]) == model.task_names


def test_weights_argument_and_tasks_added_after_build(monkeypatch):
    model = tiny_mlp_model(2)
    graph = TaskGraph.build(model)
    other = torch.randn(model.target.n_params, generator=torch.Generator().manual_seed(5))
    x = torch.rand(6, 12)
    got = run(graph.serialize("task-1", weights=other), {INPUT_NAME: x.numpy()})
    want = model.logits("task-1", x, weights=other).numpy()
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - model.logits("task-1", x).numpy()).max() > 1e-2  # really different
    with pytest.raises(InputError):
        graph.serialize("task-1", weights=torch.zeros(model.target.n_params + 1))
    with pytest.raises(UnknownTaskError):
        graph.serialize("nope")

    # A task added after the trace is baked from the same graph, without tracing again.
    def no_trace(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(torch.export, "export", no_trace)
    model.add_task("later", num_classes=2, label_names=["no", "yes"])
    got = run(graph.serialize("later"), {INPUT_NAME: x.numpy()})
    assert got.shape == (6, 2)
    assert np.abs(got - model.logits("later", x).numpy()).max() <= TOL


def test_metadata_and_checkpoint_hash(tmp_path):
    model = multihead_model()
    saved_hash = save_checkpoint(model, tmp_path / "ckpt")
    assert model_state_hash(model) == saved_hash  # derived hash == what the checkpoint records
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert model_state_hash(loaded) == checkpoint_hash(tmp_path / "ckpt")
    graph = TaskGraph.build(loaded, checkpoint_hash=checkpoint_hash(tmp_path / "ckpt"), check=False)
    meta = {p.key: p.value for p in graph.model_proto("two").metadata_props}
    assert meta[META_TASK] == "two"
    assert meta[META_TASK_INDEX] == "1"
    assert json.loads(meta[META_LABEL_NAMES]) == ["cat", "dog"]
    assert json.loads(meta[META_INPUT_SHAPE]) == [2, 3]
    assert meta[META_NUM_CLASSES] == "2"
    assert meta[META_CHECKPOINT_HASH] == saved_hash
    assert meta[META_VERSION] == __version__
    # Changing the model changes the derived hash.
    loaded.add_task("extra")
    assert model_state_hash(loaded) != saved_hash


def test_an_opset_the_exporter_cannot_produce_is_refused():
    """torch.onnx keeps opset 18 (with a warning) when it cannot convert down; we refuse."""
    model = tiny_mlp_model(1)
    with pytest.raises(ExportError, match="cannot export opset 13"):
        TaskGraph.build(model, opset=13, check=False)
    assert opset_of(TaskGraph.build(model, opset=17, check=False).model_proto("task-0")) == 17


@pytest.mark.parametrize("cfg", [
    {"input_shape": (12,), "hidden": [16, 8], "num_classes": 3},
    {"input_shape": (12,), "hidden": [7], "num_classes": 4, "activation": "gelu", "use_bias": False},
    {"input_shape": (2, 3, 4), "hidden": [5], "num_classes": 3, "num_heads": 3, "activation": "tanh",
         "input_mean": [0.1, 0.2], "input_std": [0.5, 2.0]},
    {"input_shape": (6,), "hidden": [], "num_classes": 2, "activation": "elu", "input_mean": [0.3],
         "input_std": [0.7]},
    {"input_shape": (9,), "hidden": [4, 4], "num_classes": 2, "activation": "leaky_relu"},
    {"input_shape": (9,), "hidden": [4], "num_classes": 2, "activation": "sigmoid"},
    {"input_shape": (2, 3, 4), "hidden": [5], "num_classes": 3, "input_norm": "per-channel",
         "input_mean": [0.1, 0.2], "input_std": [0.5, 2.0]},
    {"input_shape": (9,), "hidden": [4], "num_classes": 2, "input_norm": "per-feature"},
], ids=["relu", "gelu-no-bias", "image-multihead-normalized", "linear-elu-norm", "leaky",
        "sigmoid", "per-task-per-channel-and-config", "per-task-per-feature"])
def test_mlp_graph_written_directly_equals_the_traced_graph(cfg, monkeypatch):
    """The default build writes the MLP graph without tracing; it computes what the traced graph
    (an explicit opset goes through the exporter) and PyTorch compute."""
    model = HNetModel(MLPConfig(**cfg), HypernetConfig(hidden=[6], chunk_size=40), seed=3)
    shape = model.target.buffer_shapes.get("input_mean")
    norm = None if shape is None else (torch.randn(shape), torch.rand(shape) + 0.2)
    model.add_task("t0", input_norm=norm)
    if cfg.get("num_heads", 1) > 1:
        model.add_task("t2", head=2, num_classes=2)
    traced = TaskGraph.build(model, opset=20)
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("traced"))
    direct = TaskGraph.build(model)  # check=True: ORT against PyTorch on random weights
    monkeypatch.setattr(torch.export, "export", real_export)
    assert direct.opset == 20
    x = torch.rand(5, *cfg["input_shape"]) * 3 - 1
    for task in model.task_names:
        want = model.logits(task, x).numpy()
        got = run(direct.serialize(task), {INPUT_NAME: x.numpy()})
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL
        assert np.abs(got - run(traced.serialize(task), {INPUT_NAME: x.numpy()})).max() <= TOL
