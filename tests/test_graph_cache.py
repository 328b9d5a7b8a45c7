"""hnet_serve.graph_cache: traced graph templates cached per checkpoint, target and opset."""

from __future__ import annotations

import numpy as np
import pytest

from hnet_serve import graph_cache, onnx_graph
from hnet_serve.checkpoint import (
    checkpoint_hash,
    load_checkpoint,
    not_a_checkpoint,
    save_checkpoint,
)
from hnet_serve.onnx_graph import TaskGraph
from hnet_serve.scoring.scorer import score_file
from hnet_serve.serving.runtime import Runtime
from tests.conftest import tiny_resnet_model


@pytest.fixture(scope="module")
def real_templates():
    """One real trace per opset, shared by the tests (every model here has the same target)."""
    return {}


@pytest.fixture
def traces(monkeypatch, real_templates):
    """Counts the exporter traces. Each call returns a copy of a real trace of this target
    (made once per opset): tracing takes seconds, and the template has no weights in it."""
    calls = []
    real = onnx_graph._trace_template

    def counting(twin, x, columns, example, names, opset):
        calls.append(opset)
        if opset not in real_templates:
            real_templates[opset] = real(twin, x, columns, example, names, opset)
        proto, used = real_templates[opset]
        copy = type(proto)()
        copy.CopyFrom(proto)
        return copy, list(used)

    monkeypatch.setattr(onnx_graph, "_trace_template", counting)
    monkeypatch.delenv(graph_cache.ENV_VAR, raising=False)
    return calls


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "ckpt"
    save_checkpoint(tiny_resnet_model(2), path)
    return path


def _entries(ckpt):
    folder = ckpt.parent / graph_cache.SIBLING_DIR / "graphs"
    return sorted(folder.glob("*.onnxcache")) if folder.exists() else []


def _outputs(model, x):
    graph = TaskGraph.build(model)
    import onnxruntime as ort

    sess = ort.InferenceSession(graph.serialize("img-1"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def test_cache_is_used_when_valid_and_leaves_the_checkpoint_alone(ckpt, traces):
    before = checkpoint_hash(ckpt)
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8), dtype=np.float32)
    first = _outputs(load_checkpoint(ckpt), x)
    second = _outputs(load_checkpoint(ckpt), x)
    assert len(traces) == 1  # the second build read the cache
    assert len(_entries(ckpt)) == 1
    np.testing.assert_array_equal(first, second)
    # beside the checkpoint, never inside it: the directory is still exactly a checkpoint
    assert not_a_checkpoint(ckpt) is None
    assert checkpoint_hash(ckpt) == before
    load_checkpoint(ckpt)  # still loads (content hash verified)


def test_rebuilt_when_the_checkpoint_or_the_opset_changes(tmp_path, traces):
    path = tmp_path / "ckpt"
    model = tiny_resnet_model(2)
    save_checkpoint(model, path)
    TaskGraph.build(load_checkpoint(path))
    assert len(traces) == 1
    model.add_task("img-2")  # new content hash, same target
    save_checkpoint(model, path)
    graph = TaskGraph.build(load_checkpoint(path))
    assert len(traces) == 2
    assert graph.checkpoint_hash == checkpoint_hash(path)
    TaskGraph.build(load_checkpoint(path), opset=20)  # another opset: another entry
    assert len(traces) == 3
    assert len(_entries(path)) == 3
    TaskGraph.build(load_checkpoint(path), opset=20)
    assert len(traces) == 3


def test_rebuilt_when_the_target_changes(tmp_path, traces):
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(tiny_resnet_model(2), a)
    other = tiny_resnet_model(2)
    other.target_config = other.target_config.model_copy(update={"input_mean": [0.4, 0.5, 0.6]})
    key_a = graph_cache.graph_key("h", tiny_resnet_model(1).target_config.model_dump(mode="json"),
                                  kind="task", opset=None)
    key_b = graph_cache.graph_key("h", other.target_config.model_dump(mode="json"),
                                  kind="task", opset=None)
    assert key_a != key_b  # same checkpoint hash, other target: another key
    TaskGraph.build(load_checkpoint(a))
    save_checkpoint(tiny_resnet_model(2, seed=3), b)  # other weights, same folder
    TaskGraph.build(load_checkpoint(b))
    assert len(traces) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-graph"])
def test_a_corrupted_cache_file_is_ignored_and_rebuilt(tmp_path, traces, damage):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_resnet_model(2), path)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8), dtype=np.float32)
    want = _outputs(load_checkpoint(path), x)
    (entry,) = _entries(path)
    data = entry.read_bytes()
    if damage == "flip":
        data = data[:-50] + bytes([data[-50] ^ 0x40]) + data[-49:]
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not a cache file"
    else:
        # a well-formed entry (right key, valid digest) holding a wrong graph: the mapping
        # check refuses it, so even a bug in the key is never served
        head, payload = data.split(b"\n", 1)
        import json

        import onnx

        proto = onnx.ModelProto()
        proto.ParseFromString(payload)
        node = next(n for n in proto.graph.node if n.op_type == "Relu")
        node.op_type = "Sigmoid"
        graph_cache.write_entry(entry, json.loads(head)["key"], proto,
                                json.loads(head)["extra"])
        data = entry.read_bytes()
    entry.write_bytes(data)
    got = _outputs(load_checkpoint(path), x)
    assert len(traces) == 2  # traced again, not served from the damaged file
    np.testing.assert_array_equal(got, want)
    assert graph_cache.read_entry(entry, graph_cache.graph_key(
        checkpoint_hash(path), load_checkpoint(path).target_config.model_dump(mode="json"),
        kind="task", opset=None)) is not None  # rewritten


def test_env_var_picks_the_folder_or_turns_the_cache_off(tmp_path, traces, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_resnet_model(2), path)
    monkeypatch.setenv(graph_cache.ENV_VAR, "off")
    TaskGraph.build(load_checkpoint(path))
    TaskGraph.build(load_checkpoint(path))
    assert len(traces) == 2 and _entries(path) == []
    monkeypatch.setenv(graph_cache.ENV_VAR, str(tmp_path / "elsewhere"))
    TaskGraph.build(load_checkpoint(path))
    TaskGraph.build(load_checkpoint(path))
    assert len(traces) == 3
    assert len(list((tmp_path / "elsewhere").glob("*.onnxcache"))) == 1
    assert _entries(path) == []


def test_an_unwritable_folder_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(graph_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(graph_cache, "_writable",
                        lambda folder: str(folder).startswith(str(tmp_path / "xdg")))
    assert graph_cache.cache_dir(tmp_path / "ro" / "ckpt") == tmp_path / "xdg" / "hnet-serve" / "graphs"
    assert graph_cache.cache_dir(None) is None  # a model never saved is not cached


def test_scoring_is_identical_with_and_without_the_cache(tmp_path, traces, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_resnet_model(2), path)
    x = np.random.default_rng(2).random((40, 3 * 8 * 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    outs = []
    for i, env in enumerate(["off", None, None]):  # no cache, cold cache, warm cache
        if env is None:
            monkeypatch.delenv(graph_cache.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(graph_cache.ENV_VAR, env)
        rt = Runtime.from_checkpoint(path, backend="onnx")
        out = tmp_path / f"o{i}.npy"
        score_file(rt, tmp_path / "x.npy", out, probabilities=True, progress=False)
        outs.append(np.load(out))
    assert len(traces) == 2  # off, then cold; the warm run read the cache
    for other in outs[1:]:
        assert other.dtype == outs[0].dtype
        for name in outs[0].dtype.names:
            np.testing.assert_array_equal(other[name], outs[0][name])
