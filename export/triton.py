"""A Triton Inference Server model repository: one model per task, from the per-task ONNX export.

    REPO/<model>/config.pbtxt      platform "onnxruntime_onnx", max_batch_size, input and output
                                   names, data types and dims read from the ONNX file itself
    REPO/<model>/labels.txt        the task's class names, one a line (Triton's classification
                                   extension); class indices for tasks without label names
    REPO/<model>/1/model.onnx      the task's ONNX model (weights baked in, as ``export --all``)

``<model>`` is the task name with every character Triton's model names and file systems may trip
on (anything but letters, digits, ``_`` and ``-``) replaced by ``_``; two tasks that would share a
name stop the export before anything is written. The ONNX files are exported (and verified) by
:func:`hnet_serve.export.onnx_export.export_all` into a staging folder inside REPO, then renamed
into place; the configuration files are written atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from hnet_serve.errors import ConfigError, ExportError
from hnet_serve.export.onnx_export import (
    ExportResult,
    Source,
    atomic_write,
    export_all,
    load_source,
    resolve_tasks,
)
from hnet_serve.fsutil import fsync_path

PLATFORM = "onnxruntime_onnx"
LABELS = "labels.txt"
VERSION = "1"
# ONNX TensorProto element types -> Triton data types (the ones an export can hold).
_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
                 onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
                 onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.BOOL: "TYPE_BOOL"}


@dataclass
class TritonModel:
    """One model of the repository."""

    task: str
    name: str  # the Triton model name (the folder)
    config: str  # path of config.pbtxt
    labels: str  # path of labels.txt
    onnx: ExportResult  # the ONNX file (its path is REPO/<name>/1/model.onnx)


def triton_name(task: str) -> str:
    """The task's Triton model name: ``[A-Za-z0-9_-]`` only (``digits.v2`` -> ``digits_v2``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", task)


def _names(tasks: list[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for task in tasks:
        name = triton_name(task)
        if name.lower() in seen:  # case-insensitive file systems would merge them
            raise ExportError(f"tasks {seen[name.lower()]!r} and {task!r} would both be the "
                              f"Triton model {name!r}; rename one or export them separately")
        seen[name.lower()] = task
    return {task: triton_name(task) for task in tasks}


def _tensor(value: onnx.ValueInfoProto, batched: bool) -> tuple[str, list[int]]:
    """(Triton data type, dims) of a graph input or output; the batch dimension is left out
    when the model is batched (Triton adds it), and must then be symbolic in the file."""
    t = value.type.tensor_type
    if t.elem_type not in _TRITON_TYPES:
        raise ExportError(f"{value.name}: ONNX element type {t.elem_type} has no Triton type")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if batched:
        if not dims or dims[0] != -1:
            raise ExportError(f"{value.name}: the first dimension must be the batch, got {dims}")
        dims = dims[1:]
    return _TRITON_TYPES[t.elem_type], dims


def config_pbtxt(name: str, proto: onnx.ModelProto, max_batch_size: int) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for an ONNX model."""
    batched = max_batch_size > 0
    initializers = {i.name for i in proto.graph.initializer}

    def block(kind: str, values: list[onnx.ValueInfoProto], labels: bool) -> list[str]:
        lines = [f"{kind} ["]
        for n, value in enumerate(values):
            dtype, dims = _tensor(value, batched)
            lines += ["  {", f'    name: "{value.name}"', f"    data_type: {dtype}",
                      f"    dims: [ {', '.join(map(str, dims))} ]"]
            if labels:
                lines.append(f'    label_filename: "{LABELS}"')
            lines.append("  }" + ("," if n < len(values) - 1 else ""))
        return [*lines, "]"]

    inputs = [i for i in proto.graph.input if i.name not in initializers]
    lines = [f'name: "{name}"', f'platform: "{PLATFORM}"', f"max_batch_size: {max_batch_size}",
             *block("input", inputs, labels=False),
             *block("output", list(proto.graph.output), labels=True),
             f'version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}']
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def export_triton(source: Source, repo: str | os.PathLike, tasks: list[str] | None = None, *,
                  opset: int | None = None, verify: bool = True, max_batch_size: int = 64,
                  progress: bool = False) -> list[TritonModel]:
    """Write a Triton model repository for ``tasks`` (all when None) under ``repo``."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not (
            0 <= max_batch_size <= 2**31 - 1):
        raise ConfigError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    model, _ = load_source(source)
    names = _names(resolve_tasks(model, tasks))
    out = Path(os.path.abspath(repo))
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hnet-staging-", dir=out))
    models: list[TritonModel] = []
    try:
        results = export_all(source, staging, list(names), opset=opset, verify=verify,
                             progress=progress)
        for result in results:
            task = result.task or ""
            name, info = names[task], model.registry.get(task)
            folder = out / name
            (folder / VERSION).mkdir(parents=True, exist_ok=True)
            target = folder / VERSION / "model.onnx"
            proto = onnx.load(result.path, load_external_data=False)
            config = config_pbtxt(name, proto, max_batch_size)
            labels = info.label_names or [str(i) for i in range(info.num_classes)]
            if any("\n" in label or "\r" in label for label in labels):
                raise ExportError(f"task {task!r}: a label name holds a line break, which "
                                  f"{LABELS} (one label a line) cannot represent")
            os.replace(result.path, target)
            fsync_path(target.parent)
            atomic_write(folder / "config.pbtxt", config.encode())
            atomic_write(folder / LABELS, ("\n".join(labels) + "\n").encode())
            result.path = str(target)
            models.append(TritonModel(task, name, str(folder / "config.pbtxt"),
                                      str(folder / LABELS), result))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models
