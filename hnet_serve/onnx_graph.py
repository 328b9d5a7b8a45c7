"""ONNX graphs of a model's tasks: trace the target once, bake any task's weights in by name.

:class:`TaskGraph` exports the target network *once*, with every generated parameter, every
per-task buffer (batch-norm statistics) and the task's output columns as **graph inputs** named
exactly like the target's ``param_shapes``/``buffer_shapes`` keys. Those inputs are then turned
into initializers, so the traced graph is a template without weights, and a task's model is the
template plus that task's tensors as initializers under the same names. Because the weights
were inputs while tracing, the exporter could neither fold nor rename them: the name mapping is
exact by construction, and :meth:`TaskGraph.build` still checks it (names, shapes, dtypes, and
one ONNX Runtime run against PyTorch with weights the trace never saw).

Baking a task therefore costs one generation plus a copy of its weights into protobuf, never a
trace. The serving runtime (onnx backend) uses this module directly; ``export/`` adds
verification, quantization, files and the CLI on top.

The other kind of graph, one file for every task with ``task_index`` as an input, is built by
:mod:`hnet_serve.export.dynamic_graph` from the helpers here.

Names in every graph: input ``input`` float32 ``[batch, *input_shape]`` (dynamic batch), output
``logits`` float32 ``[batch, num_classes]`` (the task's head already selected). Model-level
``metadata_props`` use the ``META_*`` keys below; values are strings (JSON where structured).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn
from torch.func import functional_call

from hnet_serve import __version__
from hnet_serve.errors import ExportError, InputError
from hnet_serve.graph_cache import cached_graph, write_graph_entry
from hnet_serve.normalization import STD
from hnet_serve.onnx_mlp import mlp_template
from hnet_serve.targets import MLPTarget, TargetNet, build_target

if TYPE_CHECKING:
    from hnet_serve.model import HNetModel
    from hnet_serve.registry import TaskInfo

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TASK_INDEX_NAME = "task_index"
BATCH_DIM = "batch"
# The task's output columns (its head's slice of the target's outputs) as an int64 initializer:
# head selection is data, not graph structure, so one trace serves every head and class count.
COLUMNS_NAME = "hnet_serve.columns"

# metadata_props keys (all values are strings).
META_TASK = "hnet_serve.task"  # task name
META_TASK_INDEX = "hnet_serve.task_index"  # its row in the embedding table
META_LABEL_NAMES = "hnet_serve.label_names"  # JSON list of strings, or "null"
META_INPUT_SHAPE = "hnet_serve.input_shape"  # JSON list of ints, batch excluded
META_NUM_CLASSES = "hnet_serve.num_classes"  # int
META_CHECKPOINT_HASH = "hnet_serve.checkpoint_hash"  # sha256 content hash of the checkpoint
META_VERSION = "hnet_serve.version"  # package version that wrote the file
META_TASKS = "hnet_serve.tasks"  # dynamic graph: JSON list of task names, by task_index
META_GRAPH_KIND = "hnet_serve.graph"  # "task" or "dynamic"

# Example batch used while tracing; the batch dimension is symbolic, so any size runs.
TRACE_BATCH = 3


# -- helpers ------------------------------------------------------------------------------
def model_state_hash(model: HNetModel) -> str:
    """The content hash :func:`~hnet_serve.checkpoint.save_checkpoint` records for ``model`` now.

    For a model loaded from an unmodified checkpoint this equals that checkpoint's hash. It is
    computed by the checkpoint format's own serializer, in memory (never re-implemented here).
    """
    from hnet_serve.checkpoint import state_hash

    return state_hash(model)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log chatter (the result is checked, not trusted)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fill_tensor(t: TensorProto, name: str, array: np.ndarray) -> TensorProto:
    """Make ``t`` a float32/int64 tensor holding ``array`` (one copy, little-endian raw data)."""
    t.name = name
    if array.dtype == np.float32:
        t.data_type = TensorProto.FLOAT
        data = np.ascontiguousarray(array, dtype="<f4")
    elif array.dtype == np.int64:
        t.data_type = TensorProto.INT64
        data = np.ascontiguousarray(array, dtype="<i8")
    else:  # pragma: no cover - internal: only these two dtypes are produced
        raise TypeError(f"unsupported initializer dtype {array.dtype}")
    t.dims.extend(array.shape)
    t.raw_data = data.tobytes()
    return t


def tensor_proto(name: str, array: np.ndarray) -> TensorProto:
    return _fill_tensor(TensorProto(), name, array)


def set_dims(value: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def strip(proto: onnx.ModelProto) -> None:
    """Drop exporter bookkeeping (node metadata, stale shape annotations); keep the graph."""
    del proto.graph.value_info[:]  # shapes are re-inferred; per-task class counts differ
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.initializer]:
        del value.metadata_props[:]
    del proto.metadata_props[:]
    proto.graph.doc_string = ""
    proto.producer_name = "hnet-serve"
    proto.producer_version = __version__


def flat_head_twin(target: TargetNet) -> TargetNet:
    """A copy of ``target``'s architecture that returns *all* heads' outputs.

    Same parameter names and shapes (its last layer has ``num_heads * num_classes`` outputs
    either way); head selection is then done by the columns initializer, so every task, whatever
    its head, shares one traced graph.
    """
    cfg = target.config
    if cfg.num_heads == 1:
        twin_cfg = cfg
    else:
        twin_cfg = cfg.model_copy(update={"num_heads": 1, "num_classes": cfg.num_classes * cfg.num_heads})
    twin = build_target(twin_cfg)
    twin.eval()
    if twin.param_shapes != target.param_shapes or twin.buffer_shapes != target.buffer_shapes:
        raise ExportError("internal: the flat-head twin does not match the target's parameters")
    return twin


def head_columns(info: TaskInfo, num_classes: int) -> np.ndarray:
    start = info.head * num_classes
    return np.arange(start, start + info.num_classes, dtype=np.int64)  # (C_task,)


def trace_to_onnx(module: nn.Module, args: tuple, dynamic_shapes: Any, input_names: list[str],
            opset: int | None) -> onnx.ModelProto:
    """torch.export (non-strict) -> ONNX with the dynamo exporter, names as given."""
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            onnx_program = torch.onnx.export(
                program,
                input_names=input_names,
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # exporter failures come in many types
        msg = str(exc).strip().splitlines()
        raise ExportError(
            f"torch.onnx export failed ({type(exc).__name__}: {msg[0] if msg else ''})"
        ) from exc
    if onnx_program is None:  # pragma: no cover - only for dynamo=False
        raise ExportError("torch.onnx.export returned no program")
    proto = onnx_program.model_proto
    got = opset_of(proto)
    if opset is not None and got != opset:
        # The exporter works in opset 18+ and converts down with the ONNX version converter;
        # when an operator has no adapter it keeps 18 with only a warning. Refuse instead.
        raise ExportError(
            f"cannot export opset {opset}: the exporter produced opset {got} (opsets 18 and "
            "up work; lower ones only where ONNX can convert every operator of this model)"
        )
    return proto


def opset_of(proto: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _inputs_to_initializers(proto: onnx.ModelProto, keep: list[str],
                            expected: dict[str, tuple[tuple[int, ...], int]]) -> list[str]:
    """Turn graph inputs named in ``expected`` into (empty) initializer slots; check each one.

    ``expected`` maps name -> (shape, ONNX dtype). Returns the names the graph actually uses, in
    graph-input order. Raises :class:`ExportError` if the traced graph's inputs are not exactly
    ``keep`` plus a subset of ``expected`` with matching shapes and dtypes.
    """
    g = proto.graph
    used: list[str] = []
    kept = []
    for value in g.input:
        if value.name in keep:
            kept.append(value)
            continue
        if value.name not in expected:
            raise ExportError(f"traced graph has an unexpected input {value.name!r}")
        shape, dtype = expected[value.name]
        tt = value.type.tensor_type
        got = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        if tt.elem_type != dtype or got != tuple(shape):
            raise ExportError(
                f"traced graph input {value.name!r} is {got} (dtype {tt.elem_type}), "
                f"expected {tuple(shape)} (dtype {dtype})"
            )
        used.append(value.name)
    if [v.name for v in kept] != keep:
        raise ExportError(f"traced graph inputs {[v.name for v in kept]}, expected {keep}")
    del g.input[:]
    g.input.extend(kept)
    if [o.name for o in g.output] != [OUTPUT_NAME]:
        raise ExportError(f"traced graph outputs {[o.name for o in g.output]}, expected ['logits']")
    return used


# -- per-task graphs -----------------------------------------------------------------------
def _trace_template(twin: TargetNet, x: torch.Tensor, columns: torch.Tensor,
                    example: list[torch.Tensor], names: list[str],
                    opset: int | None) -> tuple[onnx.ModelProto, list[str]]:
    """Trace ``twin`` into a weightless template; returns it and the initializer names."""
    cfg = twin.config
    # (torch.export.Dim imports the exporter's symbolic-shape machinery: tracing only)
    dyn = {"x": {0: torch.export.Dim(BATCH_DIM)}, "columns": None,
           "tensors": tuple(None for _ in example)}
    proto = trace_to_onnx(_BakedTarget(twin), (x, columns, tuple(example)), dyn,
                          [INPUT_NAME, COLUMNS_NAME, *names], opset)
    expected = {n: (s, TensorProto.FLOAT) for n, s in twin.param_shapes.items()}
    expected.update({n: (s, TensorProto.FLOAT) for n, s in twin.buffer_shapes.items()})
    expected[COLUMNS_NAME] = ((cfg.num_classes,), TensorProto.INT64)
    used = _inputs_to_initializers(proto, [INPUT_NAME], expected)
    if COLUMNS_NAME not in used:
        raise ExportError("traced graph does not read the head columns")
    strip(proto)
    set_dims(proto.graph.input[0], [BATCH_DIM, *cfg.input_shape])
    return proto, used



class _BakedTarget(nn.Module):
    """What gets traced: ``(input, columns, *params, *buffers) -> logits[:, columns]``."""

    def __init__(self, twin: TargetNet) -> None:
        super().__init__()
        self.twin = twin
        self.names = [*twin.param_shapes, *twin.buffer_shapes]

    def forward(self, x: torch.Tensor, columns: torch.Tensor, tensors: tuple[torch.Tensor, ...]):
        state = dict(zip(self.names, tensors))
        out = functional_call(self.twin, state, (x,), strict=True)  # (B, heads * classes)
        return torch.index_select(out, 1, columns)  # (B, C_task)


class TaskGraph:
    """The target traced once; :meth:`model_proto` bakes one task's weights into a copy.

    Thread-safe after :meth:`build` (``model_proto``/``serialize`` only read the template and
    the model). The checkpoint hash in the metadata describes the model state at build time:
    rebuild after adding tasks or training.
    """

    def __init__(self, model: HNetModel, template: onnx.ModelProto, initializer_names: list[str],
                 *, opset: int, checkpoint_hash: str) -> None:
        self.model = model
        self.template = template  # the graph without its weights (a few KB; not a model alone)
        self.initializer_names = initializer_names  # target names the graph reads, graph order
        self.opset = opset
        self.checkpoint_hash = checkpoint_hash

    @classmethod
    def build(cls, model: HNetModel, *, opset: int | None = None,
              checkpoint_hash: str | None = None, check: bool = True) -> TaskGraph:
        """Trace ``model.target`` once (no task needed). ``checkpoint_hash`` defaults to
        :func:`model_state_hash`. ``check`` runs the graph once in ONNX Runtime with random
        weights against PyTorch, which proves the name mapping (costs one small session).

        An MLP target at the default opset is not traced: :func:`~hnet_serve.onnx_mlp.
        mlp_template` writes its graph directly (milliseconds instead of seconds); an explicit
        ``opset`` goes through the exporter, which converts and checks it."""
        target = model.target
        twin = flat_head_twin(target)
        cfg = twin.config
        g = torch.Generator().manual_seed(0)
        example = [torch.randn(s, generator=g) for s in twin.param_shapes.values()]
        example += [torch.rand(s, generator=g) + 0.5 for s in twin.buffer_shapes.values()]
        x = torch.rand(TRACE_BATCH, *cfg.input_shape, generator=g)
        columns = torch.arange(cfg.num_classes)
        names = [*twin.param_shapes, *twin.buffer_shapes]
        reserved = {INPUT_NAME, OUTPUT_NAME, COLUMNS_NAME}
        if reserved & set(names):
            raise ExportError(f"target names clash with reserved ONNX names: {reserved & set(names)}")
        content_hash = checkpoint_hash or model_state_hash(model)
        if isinstance(twin, MLPTarget) and opset is None:
            proto = mlp_template(twin.config, names, input_name=INPUT_NAME,
                                 output_name=OUTPUT_NAME, columns_name=COLUMNS_NAME)
            graph = cls(model, proto, [COLUMNS_NAME, *names], opset=opset_of(proto),
                        checkpoint_hash=content_hash)
            if check:
                graph._check_mapping(twin, example, x)
            return graph

        def trace() -> tuple[onnx.ModelProto, dict[str, Any]]:
            proto, used = _trace_template(twin, x, columns, example, names, opset)
            return proto, {"initializers": used}

        # Tracing takes seconds: the template is cached per checkpoint and target (graph_cache)
        proto, extra, hit = cached_graph(model, content_hash, kind="task", opset=opset,
                                         build=trace)
        graph = cls(model, proto, list(extra["initializers"]), opset=opset_of(proto),
                    checkpoint_hash=content_hash)
        if check or hit:  # a cached graph is always checked before it is used
            try:
                graph._check_mapping(twin, example, x)
            except Exception as exc:
                if not hit:
                    raise
                # A cache entry that does not reproduce the target is never served: retrace.
                logging.getLogger(__name__).warning("cached graph rejected (%s); retracing", exc)
                proto, extra = trace()
                write_graph_entry(model, content_hash, "task", opset, proto, extra)
                graph = cls(model, proto, list(extra["initializers"]), opset=opset_of(proto),
                            checkpoint_hash=content_hash)
                graph._check_mapping(twin, example, x)
        return graph

    def _check_mapping(self, twin: TargetNet, example: list[torch.Tensor], x: torch.Tensor) -> None:
        """Bake weights the trace never saw, run them in ORT, compare with PyTorch."""
        import onnxruntime as ort

        g = torch.Generator().manual_seed(1)
        fresh = [torch.randn(t.shape, generator=g) * 0.5 for t in example]
        cols = np.arange(twin.config.num_classes - 1, -1, -1, dtype=np.int64)  # reversed
        tensors = dict(zip([*twin.param_shapes, *twin.buffer_shapes], fresh))
        tensors = {k: (v.abs() + 0.5 if k.endswith(("running_var", STD)) else v)
                   for k, v in tensors.items()}
        proto = self._bake({k: v.numpy() for k, v in tensors.items()}, cols, len(cols))
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        with torch.no_grad():
            want = functional_call(twin, tensors, (x,), strict=True)[:, torch.from_numpy(cols)]
        diff = float(np.abs(got - want.numpy()).max())
        scale = float(want.abs().max()) + 1.0
        if not np.isfinite(diff) or diff > 1e-4 * scale:
            raise ExportError(f"traced graph does not reproduce the target (max diff {diff:.3g})")

    # -- baking ------------------------------------------------------------------------------
    def _bake(self, tensors: dict[str, np.ndarray], columns: np.ndarray,
              num_classes: int) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.template)
        inits = proto.graph.initializer
        for name in self.initializer_names:
            # Filled in place: appending a ready TensorProto would copy the weights once more.
            _fill_tensor(inits.add(), name, columns if name == COLUMNS_NAME else tensors[name])
        set_dims(proto.graph.output[0], [BATCH_DIM, num_classes])
        return proto

    def task_tensors(self, task: str, weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """The task's named float32 tensors (generated parameters + its buffers), as numpy."""
        model = self.model
        target = model.target
        if weights is None:
            with torch.no_grad():
                weights = model.generate([task])[0]  # (n_params,)
        weights = weights.detach().to("cpu", torch.float32)
        tensors = {n: t.numpy() for n, t in target.unflatten(weights).items()}
        if target.buffer_shapes:
            bufs = model.task_buffers.get(task)
            if bufs is None:
                raise InputError(f"task {task!r} has no batch-norm statistics")
            tensors.update({n: bufs[n].detach().to("cpu", torch.float32).numpy()
                            for n in target.buffer_shapes})
        return tensors

    def model_proto(self, task: str, weights: torch.Tensor | None = None) -> onnx.ModelProto:
        """Task ``task``'s model: the traced graph with its weights as initializers.

        ``weights`` (``(n_params,)``) reuses already generated weights; otherwise they are
        generated here.
        """
        info = self.model.registry.get(task)
        tensors = self.task_tensors(task, weights)
        proto = self._bake(tensors, head_columns(info, self.model.target.config.num_classes),
                           info.num_classes)
        set_metadata(proto, self.metadata(info))
        return proto

    def serialize(self, task: str, weights: torch.Tensor | None = None) -> bytes:
        """``model_proto(task, weights)`` as bytes (what a ``.onnx`` file holds)."""
        return self.model_proto(task, weights).SerializeToString()

    def metadata(self, info: TaskInfo) -> dict[str, str]:
        return {
            META_GRAPH_KIND: "task",
            META_TASK: info.name,
            META_TASK_INDEX: str(info.index),
            META_LABEL_NAMES: json.dumps(info.label_names),
            META_INPUT_SHAPE: json.dumps(list(info.input_shape)),
            META_NUM_CLASSES: str(info.num_classes),
            META_CHECKPOINT_HASH: self.checkpoint_hash,
            META_VERSION: __version__,
        }
