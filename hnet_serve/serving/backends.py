"""Backends: how a cached task turns inputs into logits.

* ``torch``: the cache holds each task's generated flat weights (plus its batch-norm
  statistics); the target runs them in-process. MLP weights are cached with each matrix
  transposed to ``(in, out)`` (``MLPTarget.to_serving_layout``): a cold task's weights then
  stream in row order through the matmul, ~10 % faster for the mixed-task batches that read
  many tasks' weights once each. Mixed-task batches of *small* MLP targets (at most
  ``STACK_MAX_PARAMS`` parameters) stack the tasks' weights and run one batched matmul per layer
  (``MLPTarget.forward_stacked``), the S-LoRA/Punica idea with generated weights instead of
  adapters; larger MLPs and other targets run one call per task group (stacking them measured
  slower: docs/benchmarks.md, "Mixed-task batches").
* ``onnx``: the cache holds one ONNX Runtime ``InferenceSession`` per task, built from the
  graph ``hnet_serve.onnx_graph.TaskGraph`` traces once, with that task's generated weights as
  initializers.

Both generate every missing task of a cache load in one batched hypernetwork pass, and both
return float32 numpy logits already cut to each task's own classes; ``outputs`` adds each
group's probabilities, which the onnx backend's sessions compute in the same run (a ``Softmax``
node appended to the task's graph: 1-2 us at batch 1 where numpy's took 5-8 us; off with
``ServingConfig.onnx_softmax``, as batch scoring does; docs/benchmarks.md, "Serving").

**Devices and dtypes.** Both run where the model is (``ServingConfig.device``): the torch backend
keeps its cached weights on that device, the onnx backend asks ONNX Runtime for its CUDA
provider when the device is CUDA and the provider is installed. The torch backend stores the
cached weights in ``ServingConfig.cache_dtype``: with ``bfloat16`` every matmul reads half the
bytes (oneDNN's bf16 GEMM accumulates in float32 and rounds its output to bfloat16; activations
stay bfloat16 between layers, inputs are normalized in float32 first, logits come back float32).
Measured agreement with float32 and speed: docs/benchmarks.md, "bfloat16 weight cache".
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from hnet_serve.devices import to_device
from hnet_serve.errors import ConfigError
from hnet_serve.model import HNetModel
from hnet_serve.normalization import MEAN, STD
from hnet_serve.registry import TaskInfo
from hnet_serve.serving.packed import PackedLayer, can_pack, pack, run_packed
from hnet_serve.serving.packed import nbytes as packed_nbytes
from hnet_serve.targets import MLPTarget
from hnet_serve.task_inference import softmax

# Stacking K tasks' MLP weights for one bmm copies K * n_params floats; it pays off only while
# that copy is cheaper than K small per-task matmul chains (a few torch ops each). Measured on
# 2 CPU cores (docs/benchmarks.md, "serving"): a 16k-parameter MLP gains, at 90k parameters it
# is a tie and above that the copy loses, so stacking is for small targets only.
STACK_MAX_PARAMS = 50_000
# A stacked bucket may pad its groups to the largest one; allow at most this much padding.
STACK_MAX_PADDING = 1.5
# Larger MLPs on the CPU cache each layer pre-packed for oneDNN (serving/packed.py): False
# keeps the flat layout (benchmarks compare both).
PACK_WEIGHTS = True


@dataclass
class Group:
    """Rows of one task inside a mixed batch."""

    info: TaskInfo
    x: np.ndarray  # (B, *input_shape) float32


def _bytes_of(buffers: dict[str, torch.Tensor] | None) -> int:
    return sum(b.numel() * b.element_size() for b in (buffers or {}).values())


@dataclass
class TorchEntry:
    """What the torch backend caches for a task."""

    weights: torch.Tensor | None  # (n_params,), its own storage; None when packed
    buffers: dict[str, torch.Tensor] | None
    nbytes: int
    layers: list[PackedLayer] | None = None  # pre-packed MLP layers (serving/packed.py)

    def stored(self) -> list[torch.Tensor]:
        """Every tensor this entry holds (what its ``nbytes`` counts)."""
        bufs = list((self.buffers or {}).values())
        if self.layers is not None:
            return [t for lay in self.layers for t in (lay.weight, lay.bias) if t is not None] + bufs
        return [self.weights, *bufs]  # type: ignore[list-item]


class Backend(Protocol):
    name: str

    def build(self, names: list[str]) -> list[Any]: ...

    def nbytes(self, entry: Any) -> int: ...

    def logits(self, entries: Sequence[Any], groups: Sequence[Group]) -> list[np.ndarray]: ...

    def outputs(self, entries: Sequence[Any], groups: Sequence[Group]
                ) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def output(self, entry: Any, group: Group) -> tuple[np.ndarray, np.ndarray]: ...


# -- generation ---------------------------------------------------------------------------
@torch.inference_mode()
def generate_weights(model: HNetModel, names: list[str]) -> list[torch.Tensor]:
    """Each named task's flat weights from ONE batched hypernetwork call, as separate tensors.

    Rows are cloned so that evicting one task frees its memory (a view would keep the whole
    ``(K, n_params)`` batch alive).
    """
    flat = model.generate(names)  # (K, n_params)
    return [row.clone() for row in flat]


# -- running generated weights ------------------------------------------------------------
def _stack_buckets(groups: Sequence[Group]) -> list[list[int]]:
    """Split group indices into buckets to stack: same head, padding bounded.

    Groups are taken largest first; a bucket pads every group to its first (largest) group's
    row count, and takes the next group only while the padded rows stay within
    ``STACK_MAX_PADDING`` times the real rows.
    """
    order = sorted(range(len(groups)), key=lambda i: -groups[i].x.shape[0])
    buckets: list[list[int]] = []
    open_by_head: dict[int, tuple[list[int], list[int]]] = {}  # head -> (bucket, [real rows])
    for i in order:
        head, rows = groups[i].info.head, groups[i].x.shape[0]
        current = open_by_head.get(head)
        if current is not None:
            bucket, real = current
            top = groups[bucket[0]].x.shape[0]
            if top * (len(bucket) + 1) <= STACK_MAX_PADDING * (real[0] + rows):
                bucket.append(i)
                real[0] += rows
                continue
        bucket = [i]
        buckets.append(bucket)
        open_by_head[head] = (bucket, [rows])
    return buckets


_CALL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = (
    weakref.WeakKeyDictionary()
)
_CALL_LOCKS_GUARD = threading.Lock()


def _call_lock(target: torch.nn.Module) -> threading.Lock:
    """A lock per target module: ``functional_call`` swaps the module's tensors while it runs,
    so two threads must not run the same module at once (``forward_stacked`` needs no lock)."""
    with _CALL_LOCKS_GUARD:
        lock = _CALL_LOCKS.get(target)
        if lock is None:
            lock = _CALL_LOCKS[target] = threading.Lock()
        return lock


def _buffers_of(model: HNetModel, buffers: Sequence[dict[str, torch.Tensor] | None] | None,
                i: int, group: Group) -> dict[str, torch.Tensor] | None:
    """Group ``i``'s per-task buffers (batch-norm and input-normalization statistics)."""
    bufs = buffers[i] if buffers is not None else None
    return bufs if bufs is not None else (model.task_buffers.get(group.info.name) or None)


@torch.inference_mode()
def run_generated(
    model: HNetModel,
    weights: Sequence[torch.Tensor],
    groups: Sequence[Group],
    buffers: Sequence[dict[str, torch.Tensor] | None] | None = None,
    *,
    transposed: bool = False,
) -> list[np.ndarray]:
    """Logits ``(B_g, num_classes_g)`` for each group, group ``g`` run with ``weights[g]``.

    MLP targets with small weights stack the groups' weights into one batched matmul per layer;
    other targets (or large MLPs) run one functional call per group. ``transposed``: MLP
    weights are in :meth:`~hnet_serve.targets.MLPTarget.to_serving_layout`'s layout.
    """
    target = model.target
    out: list[np.ndarray | None] = [None] * len(groups)
    stack = isinstance(target, MLPTarget) and target.n_params <= STACK_MAX_PARAMS
    if stack:
        for bucket in _stack_buckets(groups):
            if len(bucket) == 1:
                continue  # a lone group runs on the plain path below
            top = groups[bucket[0]].x.shape[0]
            xs = torch.zeros(len(bucket), top, target.config.input_size)  # (K, B, in)
            for k, i in enumerate(bucket):
                g = groups[i]
                xs[k, : g.x.shape[0]] = torch.from_numpy(g.x.reshape(g.x.shape[0], -1))
            w = torch.stack([weights[i] for i in bucket])  # (K, n_params)
            norms = [_buffers_of(model, buffers, i, groups[i]) for i in bucket]
            stacked = ({n: torch.stack([b[n] for b in norms]) for n in norms[0]}  # (K, ...)
                       if norms[0] else None)
            y = target.forward_stacked(w, to_device(xs, w.device),
                                       head=groups[bucket[0]].info.head,
                                       transposed=transposed, buffers=stacked)  # (K, B, C)
            y = y.float().cpu()
            for k, i in enumerate(bucket):
                g = groups[i]
                out[i] = y[k, : g.x.shape[0], : g.info.num_classes].numpy()
    for i, g in enumerate(groups):
        if out[i] is not None:
            continue
        x = to_device(torch.from_numpy(g.x), weights[i].device)
        bufs = _buffers_of(model, buffers, i, g)
        if isinstance(target, MLPTarget):
            # plain matmuls on views of the flat weights, no functional_call
            y = target.forward_one(weights[i], x, head=g.info.head, transposed=transposed,
                                   buffers=bufs)
        else:
            if transposed:
                raise ConfigError("only MLP targets have a transposed serving layout")
            with _call_lock(target):
                y = target.apply_weights(weights[i], x, bufs, head=g.info.head)  # (B, C)
        out[i] = y[:, : g.info.num_classes].float().cpu().numpy()
    return out  # type: ignore[return-value]


class TorchBackend:
    """Generated weights cached as tensors (in ``dtype``, on the model's device); the target
    runs them in-process."""

    name = "torch"

    def __init__(self, model: HNetModel, *, dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.dtype = dtype
        target = model.target
        self.packed = (PACK_WEIGHTS and target.n_params > STACK_MAX_PARAMS
                       and can_pack(target, model.device, dtype))

    def build(self, names: list[str]) -> list[TorchEntry]:
        """Generate ``names`` in one batched call; MLP weights are kept transposed
        (``MLPTarget.to_serving_layout``: cold weights stream in row order)."""
        target = self.model.target
        mlp = isinstance(target, MLPTarget)
        if self.packed:
            with torch.inference_mode():
                flat = self.model.generate(names)  # (K, n_params)
            packs = [pack(target, row, self.dtype) for row in flat]  # type: ignore[arg-type]
            norms = [self._buffers(name) for name in names]
            return [TorchEntry(None, b, packed_nbytes(p) + _bytes_of(b), p)
                    for p, b in zip(packs, norms)]
        if mlp:
            with torch.inference_mode():
                flat = self.model.generate(names)  # (K, n_params)
                # one new tensor per task (a view would keep the whole batch alive)
                rows = [target.to_serving_layout(row) for row in flat]
        else:
            rows = generate_weights(self.model, names)
        entries = []
        for name, w in zip(names, rows):
            w = w.to(self.dtype)  # its own storage either way (a new tensor or the clone)
            bufs = self._buffers(name)
            entries.append(TorchEntry(w, bufs, w.numel() * w.element_size() + _bytes_of(bufs)))
        return entries

    def _buffers(self, name: str) -> dict[str, torch.Tensor] | None:
        """The task's buffers in the cache dtype, except its input-normalization statistics:
        those stay float32 (inputs are normalized in float32; a bfloat16 mean of a column near
        1e3 would be off by ~4, several of its standard deviations)."""
        bufs = self.model.task_buffers.get(name) or None
        if bufs and self.dtype != torch.float32:
            bufs = {k: b if k in (MEAN, STD) else b.to(self.dtype) for k, b in bufs.items()}
        return bufs

    def nbytes(self, entry: TorchEntry) -> int:
        return entry.nbytes

    def logits(self, entries: Sequence[TorchEntry], groups: Sequence[Group]) -> list[np.ndarray]:
        if self.packed:
            return [run_packed(self.model.target, e.layers, g.x, g.info.head,  # type: ignore
                               g.info.num_classes, e.buffers) for e, g in zip(entries, groups)]
        # build() keeps every MLP's weights in the serving layout
        return run_generated(
            self.model, [e.weights for e in entries], groups, [e.buffers for e in entries],
            transposed=isinstance(self.model.target, MLPTarget),
        )

    def outputs(self, entries: Sequence[TorchEntry], groups: Sequence[Group]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each group's ``(logits, probabilities)``, both ``(B_g, num_classes_g)``."""
        return [(z, softmax(z)) for z in self.logits(entries, groups)]

    def output(self, entry: TorchEntry, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """One group's ``(logits, probabilities)``."""
        return self.outputs([entry], [group])[0]


# -- ONNX Runtime -------------------------------------------------------------------------
def default_threads() -> int:
    """This process's CPU share: the CPUs it may run on (cgroup/affinity aware where possible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, *, spinning: bool | None = None):
    """ORT session options with intra-op threads set explicitly (never ORT's own guess).

    Spinning is turned off by default: many sessions (one per cached task) share the same
    cores, and spinning worker threads of idle sessions would burn the CPU the busy one needs.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or default_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


# The serving sessions' outputs: the task graph's logits and their softmax (with_probabilities).
LOGITS, PROBABILITIES = "logits", "probabilities"
_LOGITS, _BOTH = [LOGITS], [LOGITS, PROBABILITIES]


def with_probabilities(proto: Any) -> Any:
    """``proto`` (a task graph, output ``logits (B, C)``), changed in place, with a second
    output ``probabilities``: their softmax (``axis=1`` reads alike in every opset for 2-D)."""
    from onnx import helper

    graph = proto.graph
    (logits,) = [o for o in graph.output if o.name == LOGITS]
    graph.node.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1,
                                       name="hnet_serve.softmax"))
    probs = graph.output.add()
    probs.CopyFrom(logits)  # same type and shape: (batch, num_classes) float32
    probs.name = PROBABILITIES
    return proto


@dataclass
class OnnxEntry:
    """What the onnx backend caches for a task: its session and the serialized model's size."""

    session: Any  # onnxruntime.InferenceSession
    nbytes: int


class OnnxBackend:
    """One ONNX Runtime session per cached task, built from the task's generated weights."""

    name = "onnx"

    def __init__(self, model: HNetModel, *, threads: int | None = None,
                 device: torch.device | None = None, probabilities: bool = True) -> None:
        try:
            from hnet_serve.onnx_graph import TaskGraph
        except ImportError as exc:  # pragma: no cover - depends on the export module
            raise ConfigError(f"backend 'onnx' is not available: {exc}") from None
        self.model = model
        self.threads = int(threads or default_threads())
        self.graph = TaskGraph.build(model)  # traced once
        self._options = session_options(self.threads)
        self.providers = onnx_providers(device or torch.device("cpu"))
        self.probabilities = probabilities  # sessions output them too (with_probabilities)

    def build(self, names: list[str]) -> list[OnnxEntry]:
        import onnxruntime as ort

        entries = []
        for name, w in zip(names, generate_weights(self.model, names)):
            proto = self.graph.model_proto(name, weights=w)
            data = (with_probabilities(proto) if self.probabilities else proto).SerializeToString()
            session = ort.InferenceSession(
                data, sess_options=self._options, providers=self.providers
            )
            # The session holds the initializers (about the serialized size) plus its arena.
            entries.append(OnnxEntry(session, len(data)))
        return entries

    def nbytes(self, entry: OnnxEntry) -> int:
        return entry.nbytes

    def logits(self, entries: Sequence[OnnxEntry], groups: Sequence[Group]) -> list[np.ndarray]:
        # The task graph gathers the task's own columns: its logits are (B, num_classes) float32.
        # ORT runs the softmax node even when only the logits are fetched: batch scoring builds
        # its sessions without one (ServingConfig.onnx_softmax).
        return [entry.session.run(_LOGITS, {"input": g.x})[0]
                for entry, g in zip(entries, groups)]

    def outputs(self, entries: Sequence[OnnxEntry], groups: Sequence[Group]
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each group's ``(logits, probabilities)`` from one session run."""
        return [self.output(e, g) for e, g in zip(entries, groups)]

    def output(self, entry: OnnxEntry, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """One group's ``(logits, probabilities)`` from one session run (the batch-1 path:
        nothing but the run), or the logits and numpy's softmax without ``probabilities``."""
        if not self.probabilities:
            (logits,) = entry.session.run(_LOGITS, {"input": group.x})
            return logits, softmax(logits)
        logits, probs = entry.session.run(_BOTH, {"input": group.x})
        return logits, probs


def onnx_providers(device: torch.device) -> list[Any]:
    """ORT execution providers for ``device``: CUDA (on that GPU) before the CPU when the
    device is CUDA and onnxruntime has the CUDA provider (``onnxruntime-gpu``), else the CPU."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_backend(name: str, model: HNetModel, *, threads: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 onnx_softmax: bool = True) -> Backend:
    if name == "torch":
        return TorchBackend(model, dtype=dtype)
    if name == "onnx":
        if dtype != torch.float32:
            raise ConfigError("cache_dtype bfloat16 needs backend 'torch' (the onnx backend's "
                              "sessions run float32 graphs); use --backend torch")
        return OnnxBackend(model, threads=threads, device=device, probabilities=onnx_softmax)
    raise ConfigError(f"backend must be 'torch' or 'onnx', got {name!r}")


def nbytes_estimate(model: HNetModel, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one cached task takes with the torch backend (weights + buffers in ``dtype``,
    input-normalization statistics in float32)."""
    shapes = model.target.buffer_shapes
    norm = sum(math.prod(s) for k, s in shapes.items() if k in (MEAN, STD))
    bufs = sum(math.prod(s) for s in shapes.values()) - norm
    return (torch.empty((), dtype=dtype).element_size() * (model.target.n_params + bufs)
            + 4 * norm)
