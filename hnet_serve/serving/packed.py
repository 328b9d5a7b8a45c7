"""MLP weights cached pre-packed for oneDNN: the torch backend's CPU path for large MLP targets.

A matmul on the CPU first re-lays its weight matrix out into the GEMM kernel's blocked format,
on every call. For one task's batch of 1024 rows that copy is amortized over the rows; in a
mixed batch (issue 5's 1024 rows over 32 tasks: 32 rows per task) each task's weights are packed
again for 32 rows, and the batch ran at 0.6x one task's throughput whatever the dtype. Packing
each layer once, when the task's weights are generated into the cache
(``torch.ops.mkldnn._reorder_linear_weight``, the op Inductor's CPU weight freezing uses), and
running ``torch.ops.mkldnn._linear_pointwise`` on the packed weights removes that copy from
every request: measured in docs/benchmarks.md, "bfloat16 weight cache" (both dtypes gain; the
mixed batch gains most).

Only where it works: CPU tensors, torch built with oneDNN, and a one-time probe per dtype that
the packed kernel gives :func:`torch.nn.functional.linear`'s numbers (an old CPU without
bfloat16 support, or a torch without the ops, falls back to the plain layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hnet_serve.targets import MLPTarget, activation_fn

# fused into the kernel (the op's post-op names); other activations run after it
_FUSED = {"relu": "relu"}


@dataclass
class PackedLayer:
    weight: torch.Tensor  # oneDNN's blocked layout of the (out, in) matrix
    bias: torch.Tensor | None


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run pre-packed linear layers in ``dtype`` correctly."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        x = torch.randn(5, 40, generator=g).to(dtype)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(
                x, torch.ops.mkldnn._reorder_linear_weight(w, None), b, "none", [], "")
            want = F.linear(x.float(), w.float(), b.float())
        return bool(torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def can_pack(target: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    return isinstance(target, MLPTarget) and device.type == "cpu" and packing_works(dtype)


@torch.inference_mode()
def pack(target: MLPTarget, flat: torch.Tensor, dtype: torch.dtype) -> list[PackedLayer]:
    """One task's generated weights ``flat`` (``(n_params,)``, generated layout) packed per
    layer, in ``dtype``."""
    state = target.unflatten(flat)
    layers = []
    for i in range(len(target.layers)):
        w = state[f"layers.{i}.weight"].to(dtype).contiguous()  # (out, in)
        b = state.get(f"layers.{i}.bias")
        layers.append(PackedLayer(torch.ops.mkldnn._reorder_linear_weight(w, None),
                                  None if b is None else b.to(dtype).clone()))
    return layers


def nbytes(layers: list[PackedLayer]) -> int:
    return sum(t.numel() * t.element_size()
               for layer in layers for t in (layer.weight, layer.bias) if t is not None)


@torch.inference_mode()
def run_packed(target: MLPTarget, layers: list[PackedLayer], x: np.ndarray, head: int,
               num_classes: int, buffers: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Logits ``(B, num_classes)`` float32 of one task's rows ``x`` with its packed layers."""
    n = x.shape[0]
    dtype = layers[0].weight.dtype
    cfg = target.config
    # the task's own input statistics (buffers), then the config's constants (older checkpoints)
    h = target.normalize(torch.from_numpy(x).reshape(n, *cfg.input_shape),
                         target._norm_of(buffers))
    h = h.reshape(n, -1).to(dtype).contiguous()  # normalized in float32, then cast
    fused = _FUSED.get(cfg.activation)
    act = activation_fn(cfg.activation)
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        post = fused if (i < last and fused) else "none"
        h = torch.ops.mkldnn._linear_pointwise(h, layer.weight, layer.bias, post, [], "")
        if i < last and not fused:
            h = act(h)
    return target.select_head(h, head)[:, :num_classes].float().numpy()
