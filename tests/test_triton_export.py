"""``hnet-serve export --format triton``: a Triton model repository whose every config.pbtxt is
parsed with Triton's own ``ModelConfig`` protobuf (from tritonclient) and checked against the
ONNX graph next to it. Triton itself does not run here (docs/export.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from hnet_serve.checkpoint import save_checkpoint
from hnet_serve.cli import main
from hnet_serve.errors import ConfigError, ExportError
from hnet_serve.export.triton import export_triton, triton_name
from hnet_serve.serving.runtime import Runtime
from hnet_serve.task_inference import softmax
from tests.conftest import tiny_mlp_model, tiny_resnet_model

tritonclient = pytest.importorskip("tritonclient")


def model_config_pb2():
    """``tritonclient.grpc.model_config_pb2`` without ``tritonclient.grpc``'s package import,
    which needs grpcio (the http extra does not install it)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PB = model_config_pb2()
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: PB.TYPE_FP32, onnx.TensorProto.INT64: PB.TYPE_INT64}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *argv])
    return code, out.getvalue(), err.getvalue()


def check_repository(repo: Path, model, tasks: list[str], max_batch_size: int) -> None:
    """Every model folder: config.pbtxt parses as ModelConfig and matches its ONNX file."""
    assert sorted(p.name for p in repo.iterdir()) == sorted(triton_name(t) for t in tasks)
    for task in tasks:
        folder = repo / triton_name(task)
        config = text_format.Parse((folder / "config.pbtxt").read_text(), PB.ModelConfig())
        graph = onnx.load(str(folder / "1" / "model.onnx")).graph
        info = model.registry.get(task)
        assert config.name == folder.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == max_batch_size
        assert list(config.version_policy.specific.versions) == [1]
        feeds = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        for declared, value in [*zip(config.input, feeds), *zip(config.output, graph.output)]:
            assert declared.name == value.name
            t = value.type.tensor_type
            assert declared.data_type == ONNX_TO_TRITON[t.elem_type]
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            assert dims[0] == -1 and list(declared.dims) == (dims[1:] if max_batch_size else dims)
        assert len(config.input) == len(feeds) == 1 and len(config.output) == len(graph.output)
        assert list(config.input[0].dims)[-len(info.input_shape):] == list(info.input_shape)
        assert list(config.output[0].dims) == [-1] * (not max_batch_size) + [info.num_classes]
        assert config.output[0].label_filename == "labels.txt"
        labels = (folder / "labels.txt").read_text().splitlines()
        assert labels == (info.label_names or [str(i) for i in range(info.num_classes)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, object]:
    model = tiny_mlp_model(2)
    model.add_task("yes.no", num_classes=2, label_names=["no", "yes"])
    path = tmp_path_factory.mktemp("triton") / "ckpt"
    save_checkpoint(model, path)
    return path, model


def test_cli_all_writes_a_repository(checkpoint, tmp_path):
    path, model = checkpoint
    code, out, err = cli(str(path), "--all", "--format", "triton", "--out", str(tmp_path / "repo"),
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "triton"
    assert [m["name"] for m in report["models"]] == ["task-0", "task-1", "yes_no"]
    check_repository(tmp_path / "repo", model, model.task_names, 64)
    # The baked model answers like the runtime's ONNX export: the file is the same export.
    x = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "repo" / "yes_no" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    want = Runtime(model).predict("yes.no", x).probabilities
    np.testing.assert_allclose(softmax(logits), want, atol=1e-5)
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".")]


def test_cli_some_tasks_and_no_batching(checkpoint, tmp_path):
    path, model = checkpoint
    code, out, err = cli(str(path), "--task", "task-1", "--format", "triton", "--out",
                         str(tmp_path / "repo"), "--max-batch-size", "0", "--no-verify")
    assert code == 0, err
    assert "Triton model 'task-1'" in out
    check_repository(tmp_path / "repo", model, ["task-1"], 0)
    assert "dynamic_batching" not in (tmp_path / "repo" / "task-1" / "config.pbtxt").read_text()


def test_resnet_dims(tmp_path):
    model = tiny_resnet_model(1)
    export_triton(model, tmp_path / "repo", verify=False, max_batch_size=8)
    check_repository(tmp_path / "repo", model, ["img-0"], 8)
    config = text_format.Parse((tmp_path / "repo" / "img-0" / "config.pbtxt").read_text(),
                               PB.ModelConfig())
    assert list(config.input[0].dims) == [3, 8, 8]


@pytest.mark.parametrize(("argv", "message"), [
    (["--dynamic"], "--format triton"),
    (["--all", "--quantize", "int8"], "--format triton"),
    (["--all", "--max-batch-size", "-1"], "max_batch_size"),
    (["--task", "ghost"], "unknown task"),
])
def test_cli_errors(checkpoint, tmp_path, argv, message):
    path, _ = checkpoint
    code, out, err = cli(str(path), *argv, "--format", "triton", "--out", str(tmp_path / "r"))
    assert code != 0 and message in err, (out, err)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_colliding_names_are_refused(tmp_path):
    model = tiny_mlp_model(0)
    model.add_task("a.b")
    model.add_task("a_b")
    with pytest.raises(ExportError, match="both be the Triton model 'a_b'"):
        export_triton(model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ConfigError):
        export_triton(model, tmp_path / "repo", ["a.b"], max_batch_size=True)
