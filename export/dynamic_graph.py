"""The dynamic ONNX graph: one file for every task, ``(task_index, input) -> logits``.

The hypernetwork itself is in the graph (embedding lookup, generation, the target), so the file
is as small as the checkpoint; see docs/export.md for when to prefer it over per-task files.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from torch import nn
from torch.func import functional_call

from hnet_serve import __version__
from hnet_serve.errors import ExportError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.onnx_graph import (
    BATCH_DIM,
    INPUT_NAME,
    META_CHECKPOINT_HASH,
    META_GRAPH_KIND,
    META_INPUT_SHAPE,
    META_LABEL_NAMES,
    META_NUM_CLASSES,
    META_TASKS,
    META_VERSION,
    OUTPUT_NAME,
    TASK_INDEX_NAME,
    TRACE_BATCH,
    flat_head_twin,
    head_columns,
    model_state_hash,
    set_dims,
    set_metadata,
    strip,
    tensor_proto,
    trace_to_onnx,
)
from hnet_serve.targets import TargetNet


class _DynamicModule(nn.Module):
    """``(task_index, input) -> logits``: embedding lookup, generation and the target in one."""

    def __init__(self, model: HNetModel, twin: TargetNet, columns: torch.Tensor) -> None:
        super().__init__()
        hn = model.hypernet
        self.hypernet = hn  # its shared parameters become initializers
        self.twin = twin
        self.param_names = list(twin.param_shapes)
        self.buffer_names = list(twin.buffer_shapes)
        self.register_buffer("task_embeddings", hn.embeddings().detach().clone())  # (T, E)
        self.register_buffer("columns", columns)  # (T, C_max) int64
        for i, name in enumerate(self.buffer_names):
            table = torch.stack([model.task_buffers[t][name].detach() for t in model.task_names])
            self.register_buffer(f"task_buffer_{i}", table)  # (T, *shape)

    def forward(self, task_index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        idx = task_index.reshape(1)  # (1,)
        emb = torch.index_select(self.task_embeddings, 0, idx)  # (1, E)
        flat = self.hypernet(emb)[0]  # (n_params,)
        state = dict(self.twin.unflatten(flat))
        for i, name in enumerate(self.buffer_names):
            state[name] = torch.index_select(getattr(self, f"task_buffer_{i}"), 0, idx)[0]
        out = functional_call(self.twin, state, (x,), strict=True)  # (B, heads * classes)
        cols = torch.index_select(self.columns, 0, idx)[0]  # (C_max,)
        return torch.index_select(out, 1, cols)  # (B, C_max)


def dynamic_model_proto(model: HNetModel, *, opset: int | None = None,
                        checkpoint_hash: str | None = None) -> onnx.ModelProto:
    """One graph for every task: inputs ``task_index`` (int64 scalar) and ``input``.

    When tasks have different class counts, the graph computes ``max`` columns and slices the
    task's count off at the end, so ``logits`` is ``[batch, num_classes of that task]`` always.
    ``task_index`` must be in ``[0, num_tasks)`` (ONNX ``Gather`` semantics otherwise).
    """
    if len(model.registry) == 0:
        raise InputError("the model has no tasks to export")
    twin = flat_head_twin(model.target)
    width = model.target.config.num_classes
    infos = list(model.registry)
    counts = [t.num_classes for t in infos]
    c_max = max(counts)
    columns = torch.zeros(len(infos), c_max, dtype=torch.int64)
    for i, info in enumerate(infos):
        cols = torch.from_numpy(head_columns(info, width))
        columns[i, : len(cols)] = cols
        columns[i, len(cols):] = cols[-1]  # padding, sliced off below
    module = _DynamicModule(model, twin, columns).eval()
    x = torch.rand(TRACE_BATCH, *model.target_config.input_shape)
    dyn = {"task_index": None, "x": {0: torch.export.Dim(BATCH_DIM)}}
    proto = trace_to_onnx(module, (torch.tensor(0, dtype=torch.int64), x), dyn,
                    [TASK_INDEX_NAME, INPUT_NAME], opset)
    g = proto.graph
    if [i.name for i in g.input] != [TASK_INDEX_NAME, INPUT_NAME]:
        raise ExportError(f"dynamic graph inputs {[i.name for i in g.input]}")
    strip(proto)
    set_dims(g.input[0], [])
    set_dims(g.input[1], [BATCH_DIM, *model.target_config.input_shape])
    if len(set(counts)) > 1:
        _slice_classes(proto, counts)
        set_dims(g.output[0], [BATCH_DIM, "num_classes"])
    else:
        set_dims(g.output[0], [BATCH_DIM, c_max])
    set_metadata(proto, {
        META_GRAPH_KIND: "dynamic",
        META_TASKS: json.dumps([t.name for t in infos]),
        META_LABEL_NAMES: json.dumps({t.name: t.label_names for t in infos}),
        META_NUM_CLASSES: json.dumps(counts),
        META_INPUT_SHAPE: json.dumps(list(model.target_config.input_shape)),
        META_CHECKPOINT_HASH: checkpoint_hash or model_state_hash(model),
        META_VERSION: __version__,
    })
    return proto


def _slice_classes(proto: onnx.ModelProto, counts: list[int]) -> None:
    """Append ``logits = padded[:, :counts[task_index]]`` to the dynamic graph."""
    from onnx import helper

    g = proto.graph
    padded = "hnet_serve.logits_padded"
    for node in g.node:
        node.output[:] = [padded if o == OUTPUT_NAME else o for o in node.output]
    g.initializer.extend([
        tensor_proto("hnet_serve.num_classes", np.asarray(counts, dtype=np.int64)),
        tensor_proto("hnet_serve.zero", np.zeros(1, dtype=np.int64)),
        tensor_proto("hnet_serve.axis1", np.ones(1, dtype=np.int64)),
        tensor_proto("hnet_serve.shape1", np.ones(1, dtype=np.int64)),
    ])
    g.node.extend([
        helper.make_node("Gather", ["hnet_serve.num_classes", TASK_INDEX_NAME],
                         ["hnet_serve.n"], axis=0),
        helper.make_node("Reshape", ["hnet_serve.n", "hnet_serve.shape1"], ["hnet_serve.n1"]),
        helper.make_node("Slice", [padded, "hnet_serve.zero", "hnet_serve.n1", "hnet_serve.axis1"],
                         [OUTPUT_NAME]),
    ])

