"""The ONNX graph of an MLP target, written node by node instead of traced.

Tracing a target with the torch exporter costs seconds at every start (2.1 s warm, 6.9 s in a
fresh process for an MLP 784-100-100-10, most of ``hnet-serve score``'s and the onnx backend's
start-up). An MLP is a short, fixed chain of ONNX operators, so :func:`mlp_template` writes the
same graph the exporter produces (``Flatten``, ``Gemm`` per layer with the activation between,
``Gather`` of the task's output columns) in milliseconds, with every weight a named, empty
initializer slot exactly like :class:`~hnet_serve.onnx_graph.TaskGraph`'s traced template.
``TaskGraph.build`` still runs the graph once in ONNX Runtime against PyTorch (the mapping
check), so a mistake here cannot reach a user.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hnet_serve.normalization import MEAN, STD
from hnet_serve.targets import MLPConfig

# The opset the torch exporter writes for these graphs today; explicit opsets go through it.
DEFAULT_OPSET = 20


def _activation(kind: str, x: str, out: str, nodes: list) -> None:
    """Append nodes computing ``out = activation(x)`` exactly as ``targets.activation_fn``."""
    if kind == "relu":
        nodes.append(helper.make_node("Relu", [x], [out]))
    elif kind == "tanh":
        nodes.append(helper.make_node("Tanh", [x], [out]))
    elif kind == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [x], [out]))
    elif kind == "elu":
        nodes.append(helper.make_node("Elu", [x], [out], alpha=1.0))
    elif kind == "leaky_relu":
        nodes.append(helper.make_node("LeakyRelu", [x], [out], alpha=0.01))
    elif kind == "gelu":  # torch's default (exact): 0.5 x (1 + erf(x / sqrt 2))
        nodes.append(helper.make_node("Gelu", [x], [out], approximate="none"))
    else:  # pragma: no cover - MLPConfig validates the name
        raise ValueError(f"no ONNX form for activation {kind!r}")


def mlp_template(
    config: MLPConfig,
    param_names: list[str],
    *,
    input_name: str,
    output_name: str,
    columns_name: str,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """``input (B, *input_shape) -> logits (B, len(columns))`` with the weights left as names.

    ``param_names`` are the target's ``param_shapes`` keys (weight, then bias, per layer),
    optionally followed by its ``input_mean``/``input_std`` buffer names (per-task statistics);
    ``columns_name`` is the int64 vector of the task's output columns (its head). The graph has
    no initializer for these names: the caller bakes each task's tensors in.
    """
    nodes: list[onnx.NodeProto] = []
    consts: list[TensorProto] = []
    x = input_name
    if config.input_norm != "none":
        # The task's own statistics (targets.TargetNet.normalize applies them first): per-task
        # tensors baked like the weights, shaped to broadcast against (B, *input_shape).
        nodes += [helper.make_node("Sub", [x, MEAN], ["hnet_serve.task_centred"]),
                  helper.make_node("Div", ["hnet_serve.task_centred", STD],
                                   ["hnet_serve.task_normalized"])]
        x = "hnet_serve.task_normalized"
    if len(config.input_shape) > 1:
        nodes.append(helper.make_node("Flatten", [x], ["hnet_serve.flat"], axis=1))
        x = "hnet_serve.flat"
    mean = np.asarray(config.input_mean, dtype=np.float32)
    std = np.asarray(config.input_std, dtype=np.float32)
    if not (np.all(mean == 0) and np.all(std == 1)):
        # The target normalizes per channel: expand its values over the flattened features.
        per = math.prod(config.input_shape) // mean.size if len(config.input_shape) > 1 else 1
        if len(config.input_shape) > 1:
            mean, std = np.repeat(mean, per), np.repeat(std, per)
        consts += [numpy_helper.from_array(mean.reshape(1, -1), "hnet_serve.input_mean"),
                   numpy_helper.from_array(std.reshape(1, -1), "hnet_serve.input_std")]
        nodes += [helper.make_node("Sub", [x, "hnet_serve.input_mean"], ["hnet_serve.centred"]),
                  helper.make_node("Div", ["hnet_serve.centred", "hnet_serve.input_std"],
                                   ["hnet_serve.normalized"])]
        x = "hnet_serve.normalized"
    param_names = [n for n in param_names if n not in (MEAN, STD)]
    per_layer = 2 if config.use_bias else 1
    n_layers = len(param_names) // per_layer
    for i in range(n_layers):
        names = param_names[i * per_layer : (i + 1) * per_layer]
        out = f"hnet_serve.linear{i}"
        nodes.append(helper.make_node("Gemm", [x, *names], [out], transB=1))
        if i < n_layers - 1:
            _activation(config.activation, out, f"hnet_serve.act{i}", nodes)
            out = f"hnet_serve.act{i}"
        x = out
    nodes.append(helper.make_node("Gather", [x, columns_name], [output_name], axis=1))
    for i, node in enumerate(nodes):  # tools such as the int8 quantizer need unique names
        node.name = f"{node.op_type}_{i}"
    graph = helper.make_graph(
        nodes, "hnet_serve_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                       ["batch", *config.input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", None])],
        initializer=consts,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = min(proto.ir_version, 10)  # what current ONNX Runtime builds accept
    return proto
