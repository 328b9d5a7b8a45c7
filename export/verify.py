"""Verification built into the exporter: the ONNX checker, then ONNX Runtime vs PyTorch.

A model passes when ``onnx.checker.check_model(full_check=True)`` accepts it and its outputs
on random inputs (and on the task's real test inputs, when the checkpoint's recorded data can be
loaded) are within ``tolerance`` (max absolute difference, default 1e-4) of the PyTorch model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from hnet_serve.errors import ExportError
from hnet_serve.model import HNetModel
from hnet_serve.normalization import MEAN, STD
from hnet_serve.onnx_graph import INPUT_NAME, OUTPUT_NAME, TASK_INDEX_NAME

TOLERANCE = 1e-4
RANDOM_BATCHES = (1, 37)  # odd sizes on purpose: no accidental batch specialization
REAL_ROWS = 128  # rows of real test data per task used for parity


@dataclass
class Parity:
    """How far ONNX Runtime is from PyTorch for one model (max over all inputs tried)."""

    max_abs_diff: float
    rows: int
    real_rows: int  # of which real test inputs


def check_proto(proto: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` with full check (strict shape inference); ExportError on failure."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{what}: ONNX checker rejected the model: {first}") from None


def session(data: bytes | str, threads: int = 1):
    """A plain CPU ONNX Runtime session (from bytes or a file path) (one thread: verification runs beside other work)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def random_inputs(input_shape: tuple[int, ...], seed: int = 0,
                  scale: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[np.ndarray]:
    """Pixel-like ``[0, 1)`` and wider ``N(0, 1)`` batches of the odd sizes in RANDOM_BATCHES.

    ``scale``: the task's own ``(input_mean, input_std)`` (per-task normalization): the batches
    are then drawn on the task's raw scale (``mean + std * z``). Plain ``N(0, 1)`` rows would
    be hundreds of stds away for a column on a 1e-2 scale, and their huge logits would measure
    float32 rounding, not the export."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in RANDOM_BATCHES:
        for z in (torch.rand(batch, *input_shape, generator=g),
                  torch.randn(batch, *input_shape, generator=g)):
            if scale is not None:
                z = scale[0] + scale[1] * z
            out.append(z.numpy())
    return out


def compare(run_onnx: Callable[[np.ndarray], np.ndarray],
            run_torch: Callable[[torch.Tensor], torch.Tensor],
            inputs: list[np.ndarray], real: np.ndarray | None, what: str,
            tolerance: float = TOLERANCE) -> Parity:
    """Max |onnx - torch| over ``inputs`` (+ ``real``); ExportError above ``tolerance``."""
    batches = list(inputs) + ([real] if real is not None and len(real) else [])
    worst = 0.0
    for x in batches:
        x = np.require(x, np.float32, ["C", "W"])  # recorded data may be a read-only view
        got = run_onnx(x)
        with torch.no_grad():
            want = run_torch(torch.from_numpy(x)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"{what}: ONNX output shape {got.shape}, PyTorch {want.shape}")
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        if not np.isfinite(diff):
            raise ExportError(f"{what}: non-finite difference between ONNX and PyTorch outputs")
        worst = max(worst, diff)
    if worst > tolerance:
        raise ExportError(
            f"{what}: ONNX Runtime differs from PyTorch by {worst:.3g} (tolerance {tolerance:g})"
        )
    rows = sum(len(x) for x in batches)
    return Parity(worst, rows, len(real) if real is not None else 0)


def check_initializers(proto: onnx.ModelProto, what: str) -> None:
    """The cheap per-file check for models that share an already fully checked graph: every
    initializer's raw data has exactly the size its dims and dtype say."""
    for t in proto.graph.initializer:
        if not t.raw_data:  # exporter constants stored in typed fields: part of the graph
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != int(np.prod(t.dims, dtype=np.int64)) * itemsize:
            raise ExportError(f"{what}: initializer {t.name!r} does not match its shape")


def verify_task(data: bytes, proto: onnx.ModelProto, model: HNetModel, task: str,
                weights: torch.Tensor, real: np.ndarray | None = None,
                tolerance: float = TOLERANCE, *, full_check: bool = True) -> Parity:
    """Check a per-task model (``data`` = serialized ``proto``) against ``model.logits``.

    ``full_check=False`` replaces the ONNX checker by :func:`check_initializers`, for the 2nd..nth
    model baked from one graph (the checker validates the graph, not initializer values).
    """
    if full_check:
        check_proto(proto, f"task {task!r}")
    else:
        check_initializers(proto, f"task {task!r}")
    sess = session(data)

    def run_onnx(x: np.ndarray) -> np.ndarray:
        return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def run_torch(x: torch.Tensor) -> torch.Tensor:
        return model.logits(task, x, weights=weights)

    inputs = random_inputs(model.target_config.input_shape, seed=model.registry.index_of(task),
                           scale=task_scale(model, task))
    return compare(run_onnx, run_torch, inputs, real, f"task {task!r}", tolerance)


def task_scale(model: HNetModel, task: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The task's own input statistics, when the model normalizes per task."""
    bufs = model.task_buffers.get(task) or {}
    return (bufs[MEAN], bufs[STD]) if MEAN in bufs else None


def verify_dynamic(data: bytes, proto: onnx.ModelProto, model: HNetModel,
                   real: dict[str, np.ndarray] | None = None,
                   tolerance: float = TOLERANCE) -> Parity:
    """Check the dynamic graph for every task against ``model.logits``."""
    check_proto(proto, "dynamic graph")
    sess = session(data)
    worst, rows, real_rows = 0.0, 0, 0
    weights = model.generate(model.task_names).detach()  # (T, n_params), one pass
    for info in model.registry:
        index = np.array(info.index, dtype=np.int64)

        def run_onnx(x: np.ndarray, index: np.ndarray = index) -> np.ndarray:
            return sess.run([OUTPUT_NAME], {TASK_INDEX_NAME: index, INPUT_NAME: x})[0]

        def run_torch(x: torch.Tensor, name: str = info.name, i: int = info.index) -> torch.Tensor:
            return model.logits(name, x, weights=weights[i])

        inputs = random_inputs(model.target_config.input_shape, seed=info.index,
                               scale=task_scale(model, info.name))
        p = compare(run_onnx, run_torch, inputs, (real or {}).get(info.name),
                    f"dynamic graph, task {info.name!r}", tolerance)
        worst, rows, real_rows = max(worst, p.max_abs_diff), rows + p.rows, real_rows + p.real_rows
    return Parity(worst, rows, real_rows)
