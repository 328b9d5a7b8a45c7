"""``--quantize int8``: ONNX Runtime dynamic quantization of a per-task model, with a report.

ONNX Runtime's dynamic quantizer handles ``MatMul`` and ``Conv`` but not ``Gemm``, which is how
the exporter writes linear layers; so every ``Gemm`` whose weight is an initializer is first
rewritten as ``MatMul`` (+ ``Add`` for the bias), with the weight transposed once. Weights are
stored as int8; activations are quantized on the fly.

The report compares the int8 model with the float one: accuracy on the task's test data when the
checkpoint's recorded data is available, otherwise the fraction of random inputs on which both
predict the same class, plus the largest logit difference.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hnet_serve.errors import ExportError
from hnet_serve.onnx_graph import INPUT_NAME, OUTPUT_NAME

EVAL_ROWS = 10_000  # test rows used for the accuracy comparison
RANDOM_ROWS = 512  # random rows used when no test data is available


@dataclass
class QuantizeReport:
    path: str
    bytes: int
    metric: str  # "accuracy" (task test data) or "agreement" (same argmax as float, random inputs)
    float_value: float
    int8_value: float
    change: float  # int8_value - float_value
    max_abs_diff: float  # largest |logit(int8) - logit(float)| over the rows evaluated
    rows: int
    note: str = ""  # why the accuracy could not be measured, when it could not


def gemm_to_matmul(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with plain ``Gemm`` (alpha = beta = 1, no transA, initializer B)
    rewritten as ``MatMul`` + ``Add``; other nodes are kept as they are."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for node in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                 and not attrs.get("transA", 0))
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])  # (out, in) when transB
        if attrs.get("transB", 0):
            w = w.T
        w_name = f"{node.input[1]}.matmul"
        if w_name not in inits:
            inits[w_name] = numpy_helper.from_array(np.ascontiguousarray(w), w_name)
            g.initializer.append(inits[w_name])
        result = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{result}.matmul" if has_bias else result
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out],
                                      name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [result],
                                          name=f"{node.name}.add"))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice on the root logger; the report says what matters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(proto: onnx.ModelProto, tmp_path: Path) -> None:
    """Write the int8 dynamic-quantized version of ``proto`` to ``tmp_path``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet():
            quantize_dynamic(gemm_to_matmul(proto), tmp_path, weight_type=QuantType.QInt8)
    except Exception as exc:  # the quantizer raises many types
        raise ExportError(f"int8 quantization failed: {exc}") from exc
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())


def compare_int8(float_session, int8_session, input_shape: tuple[int, ...],
                 test: tuple[np.ndarray, np.ndarray] | None, note: str,
                 path: str, nbytes: int) -> QuantizeReport:
    """Accuracy change on ``test`` (x, y) or argmax agreement on random inputs."""
    if test is not None:
        x, y = test[0][:EVAL_ROWS], test[1][:EVAL_ROWS]
    else:
        x = np.random.default_rng(0).random((RANDOM_ROWS, *input_shape), dtype=np.float32)
        y = None
    preds_f, preds_q, worst = [], [], 0.0
    for start in range(0, len(x), 1000):
        xb = np.ascontiguousarray(x[start : start + 1000])
        lf = float_session.run([OUTPUT_NAME], {INPUT_NAME: xb})[0]
        lq = int8_session.run([OUTPUT_NAME], {INPUT_NAME: xb})[0]
        worst = max(worst, float(np.abs(lf - lq).max()))
        preds_f.append(lf.argmax(1))
        preds_q.append(lq.argmax(1))
    pf, pq = np.concatenate(preds_f), np.concatenate(preds_q)
    if y is not None:
        metric, fv, qv = "accuracy", float((pf == y).mean()), float((pq == y).mean())
    else:
        metric, fv, qv = "agreement", 1.0, float((pf == pq).mean())
    return QuantizeReport(path, nbytes, metric, fv, qv, qv - fv, worst, len(x), note)
