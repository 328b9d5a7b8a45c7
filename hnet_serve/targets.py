"""Target networks: ordinary modules run with weights that a hypernetwork generates.

Every target exposes ``param_shapes``, the ordered ``name -> shape`` map of the parameters the
hypernetwork must produce (the contract between the two, checked when wiring), and
``buffer_shapes``, the per-task state that is *not* generated (batch-norm running statistics,
stored per task as in the paper). A flat weight vector of length ``n_params`` is split into views
in ``param_shapes`` order and applied with ``torch.func.functional_call(..., strict=True)``.

Input normalization is part of the model (``forward``), so ONNX graphs, the service and scoring
take raw inputs: per-task ``input_mean``/``input_std`` buffers (:mod:`hnet_serve.normalization`),
and older checkpoints' config-level values (one set for every task) as constants.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.func import functional_call

from hnet_serve.errors import InputError
from hnet_serve.normalization import MEAN, STD, NormMode, norm_shape

Activation = Literal["relu", "tanh", "gelu", "elu", "leaky_relu", "sigmoid"]

_ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid,
}


def activation_fn(name: str):
    return _ACTIVATIONS[name]


def positive_sizes(v: list[int]) -> list[int]:
    """Validator body for a list of layer widths."""
    if any(h <= 0 for h in v):
        raise ValueError(f"hidden sizes must be positive, got {v}")
    return v


class _TargetConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: tuple[int, ...]
    num_classes: int = Field(gt=0, le=100_000)
    num_heads: int = Field(default=1, gt=0, le=10_000)
    input_mean: list[float] = Field(default_factory=lambda: [0.0])
    input_std: list[float] = Field(default_factory=lambda: [1.0])
    input_norm: NormMode = "none"  # per-task statistics: the input_mean/input_std buffers

    @field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"input_shape must be non-empty positive dims, got {list(v)}")
        return v

    @field_validator("input_mean")
    @classmethod
    def _finite_mean(cls, v: list[float]) -> list[float]:
        if not v or any(not math.isfinite(m) for m in v):
            raise ValueError(f"input_mean must be finite numbers, got {v}")
        return v

    @field_validator("input_std")
    @classmethod
    def _positive_std(cls, v: list[float]) -> list[float]:
        if not v or any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError(f"input_std must be positive finite numbers, got {v}")
        return v

    @model_validator(mode="after")
    def _norm_lengths(self):
        channels = self.input_shape[0] if len(self.input_shape) > 1 else 1
        for field in ("input_mean", "input_std"):
            n = len(getattr(self, field))
            if n not in (1, channels):
                raise ValueError(
                    f"{field} must have 1 or {channels} (channel) values, got {n}"
                )
        return self

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape)


class MLPConfig(_TargetConfigBase):
    """A fully connected target: input -> hidden... -> num_heads * num_classes."""

    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 100])
    activation: Activation = "relu"
    use_bias: bool = True

    @field_validator("hidden")
    @classmethod
    def _hidden_positive(cls, v: list[int]) -> list[int]:
        return positive_sizes(v)


class ResNetConfig(_TargetConfigBase):
    """The CIFAR ResNet (He et al. 2016, option-A shortcuts); depth = 6 * blocks + 2 (32 -> 5)."""

    kind: Literal["resnet"] = "resnet"
    input_shape: tuple[int, ...] = (3, 32, 32)
    blocks_per_stage: int = Field(default=5, gt=0, le=50)
    width: int = Field(default=16, gt=0, le=1024)
    bn_momentum: float = Field(default=0.1, gt=0, le=1)

    @field_validator("input_shape")
    @classmethod
    def _image_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) != 3:
            raise ValueError(f"resnet input_shape must be (channels, height, width), got {list(v)}")
        return v

    @property
    def depth(self) -> int:
        return 6 * self.blocks_per_stage + 2


# Names the training config used before it shared the targets' vocabulary (checkpoints saved
# then carry them in meta["train_config"]).
_LEGACY_SPEC_NAMES = {"resnet_blocks": "blocks_per_stage", "resnet_width": "width"}


class TargetSpec(BaseModel):
    """A target architecture without what the data decides (input shape, classes, heads,
    normalization): what a training config names. :meth:`build` completes it into the
    :class:`MLPConfig` or :class:`ResNetConfig` of the same field names."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp", "resnet"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 100])  # mlp
    activation: Activation = "relu"  # mlp
    blocks_per_stage: int = Field(default=5, gt=0, le=50)  # resnet
    width: int = Field(default=16, gt=0, le=1024)  # resnet

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: object) -> object:
        if isinstance(data, dict) and any(k in data for k in _LEGACY_SPEC_NAMES):
            data = {_LEGACY_SPEC_NAMES.get(k, k): v for k, v in data.items()}
        return data

    @field_validator("hidden")
    @classmethod
    def _hidden_positive(cls, v: list[int]) -> list[int]:
        return positive_sizes(v)

    def build(self, **data_fields: object) -> MLPConfig | ResNetConfig:
        """The full target config: this architecture plus ``input_shape``, ``num_classes``,
        ``num_heads``, ``input_mean``/``input_std`` from the data."""
        cls = MLPConfig if self.kind == "mlp" else ResNetConfig
        arch = {f: getattr(self, f) for f in type(self).model_fields if f in cls.model_fields}
        return cls(**arch, **data_fields)


TargetConfig = Annotated[MLPConfig | ResNetConfig, Field(discriminator="kind")]


class TargetNet(nn.Module):
    """Shared machinery: the parameter contract, normalization and functional application."""

    config: MLPConfig | ResNetConfig

    def _init_norm(self, config: _TargetConfigBase) -> None:
        # Plain tensor attributes, not buffers: they are constants of the architecture, not
        # per-task state, and functional_call(strict=True) must not ask for them.
        shape = (1, -1) + (1,) * (len(config.input_shape) - 1)
        self._mean = torch.tensor(config.input_mean, dtype=torch.float32).reshape(shape)
        self._std = torch.tensor(config.input_std, dtype=torch.float32).reshape(shape)
        self._normalize = not (
            all(m == 0.0 for m in config.input_mean) and all(s == 1.0 for s in config.input_std)
        )
        # Per-task statistics are buffers: each task's own tensors come in like batch-norm's.
        shape = norm_shape(config.input_norm, tuple(config.input_shape))
        if shape is not None:
            self.register_buffer(MEAN, torch.zeros(shape))
            self.register_buffer(STD, torch.ones(shape))

    def _finish_init(self) -> None:
        self.param_shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict(
            (n, tuple(p.shape)) for n, p in self.named_parameters()
        )
        self.buffer_shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict(
            (n, tuple(b.shape)) for n, b in self.named_buffers()
        )
        self.n_params = sum(math.prod(s) for s in self.param_shapes.values())
        self._numels = [math.prod(s) for s in self.param_shapes.values()]

    # -- the contract ---------------------------------------------------------------------
    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``(n_params,)`` vector into views shaped like ``param_shapes``."""
        if flat.dim() != 1 or flat.shape[0] != self.n_params:
            raise InputError(
                f"expected a flat weight vector of {self.n_params} values, got {tuple(flat.shape)}"
            )
        parts = torch.split(flat, self._numels)
        return {n: p.view(s) for (n, s), p in zip(self.param_shapes.items(), parts)}

    def default_buffers(self) -> dict[str, torch.Tensor]:
        """Fresh per-task state (batch-norm statistics: mean 0, variance 1)."""
        out = {}
        for name, buf in self.named_buffers():
            ones = name.endswith("running_var") or name == STD
            fresh = torch.ones_like(buf) if ones else torch.zeros_like(buf)
            out[name] = fresh
        return out

    def apply_weights(
        self,
        flat: torch.Tensor,
        x: torch.Tensor,
        buffers: dict[str, torch.Tensor] | None = None,
        head: int = 0,
    ) -> torch.Tensor:
        """Run the target with generated weights ``flat`` (``(n_params,)``) on a batch ``x``."""
        state: dict[str, torch.Tensor] = self.unflatten(flat)
        if self.buffer_shapes:
            if buffers is None:
                raise InputError("this target needs per-task buffers (batch-norm statistics)")
            state.update(buffers)
        return functional_call(self, state, (x,), {"head": head}, strict=True)

    def normalize(self, x: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """``x`` ``(B, *input_shape)`` normalized: the task's ``input_mean``/``input_std`` (the
        module's buffers, swapped in by ``functional_call``, unless ``buffers`` hands them in),
        then the config's constants (older checkpoints; new ones leave them 0 and 1)."""
        if self.config.input_norm != "none":
            src = buffers if buffers is not None else {MEAN: self.input_mean, STD: self.input_std}
            x = (x - src[MEAN]) / src[STD]
        if self._normalize:
            x = (x - self._mean) / self._std
        return x

    def select_head(self, logits: torch.Tensor, head: int | torch.Tensor) -> torch.Tensor:
        c = self.config.num_classes
        if self.config.num_heads == 1:
            return logits
        return logits.narrow(-1, int(head) * c, c)


class MLPTarget(TargetNet):
    """Fully connected network; ``forward`` accepts ``(B, *input_shape)`` or ``(B, input_size)``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        sizes = [config.input_size, *config.hidden, config.num_classes * config.num_heads]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=config.use_bias) for a, b in itertools.pairwise(sizes)
        )
        self._act = activation_fn(config.activation)
        self._init_norm(config)
        self._finish_init()
        # (weight offset, out, in, bias offset or -1) per layer, for forward_one's slicing
        self._spans: list[tuple[int, int, int, int]] = []
        offset = 0
        for layer in self.layers:
            out_f, in_f = layer.weight.shape
            bias_at = offset + out_f * in_f if layer.bias is not None else -1
            self._spans.append((offset, out_f, in_f, bias_at))
            offset += out_f * in_f + (out_f if layer.bias is not None else 0)

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        x = self.normalize(x.reshape(x.shape[0], *self.config.input_shape))
        h = x.reshape(x.shape[0], -1).to(self.layers[0].weight.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self._act(h)
        return self.select_head(h, head)

    def _norm_of(self, buffers: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        if self.config.input_norm == "none":
            return None
        if buffers is None or MEAN not in buffers:
            raise InputError("this target normalizes per task: pass the task's buffers")
        return {MEAN: buffers[MEAN], STD: buffers[STD]}

    def to_serving_layout(self, flat: torch.Tensor) -> torch.Tensor:
        """The same weights with every layer's matrix stored transposed, ``(in, out)`` row-major.

        ``flat`` is ``(..., n_params)`` in the generated layout (``param_shapes`` order); the
        result has the same shape and numbers. ``forward_stacked(..., transposed=True)`` reads
        it: a matmul whose weight streams in row order from memory, which is what a cold
        weight (one of many cached tasks) needs. Measured in ``benchmarks/bench_serving.py``
        (mixed-task batches): about 10 % faster than the ``(out, in)`` layout on cold weights.
        """
        lead = flat.shape[:-1]
        parts = []
        for at, out_f, in_f, bias_at in self._spans:
            w = flat[..., at : at + out_f * in_f].reshape(*lead, out_f, in_f)
            parts.append(w.transpose(-1, -2).reshape(*lead, out_f * in_f))
            if bias_at >= 0:
                parts.append(flat[..., bias_at : bias_at + out_f])
        return torch.cat(parts, dim=-1)

    def forward_one(
        self, flat: torch.Tensor, x: torch.Tensor, head: int = 0, *, transposed: bool = False,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One task with generated weights ``flat`` ``(n_params,)`` on ``x`` ``(B, ...)``.

        The serving path for a single task's rows: 2-D ``addmm`` on views of ``flat``, with
        the least per-call overhead (it runs once per task of every mixed batch).
        ``transposed``: ``flat`` is in :meth:`to_serving_layout`'s layout; ``buffers``: the
        task's normalization statistics (needed when ``config.input_norm`` is not none).
        """
        n = x.shape[0]
        h = self.normalize(x.reshape(n, *self.config.input_shape), self._norm_of(buffers))
        h = h.reshape(n, -1).to(flat.dtype)  # normalized in float32, then in the weights' dtype
        last = len(self._spans) - 1
        for i, (at, out_f, in_f, bias_at) in enumerate(self._spans):
            w = flat[at : at + out_f * in_f]
            w = w.view(in_f, out_f) if transposed else w.view(out_f, in_f).t()
            h = torch.addmm(flat[bias_at : bias_at + out_f], h, w) if bias_at >= 0 else h @ w
            if i < last:
                h = self._act(h)
        return self.select_head(h, head)

    def forward_stacked(
        self, flat: torch.Tensor, x: torch.Tensor, head: int = 0, *, transposed: bool = False,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """K tasks at once: ``flat`` ``(K, n_params)``, ``x`` ``(K, B, input_size)`` -> ``(K, B, C)``.

        One batched matmul per layer (``baddbmm``) instead of K small ones: the mixed-task
        serving path (S-LoRA/Punica style, with generated weights instead of adapters).
        ``transposed``: ``flat`` is in :meth:`to_serving_layout`'s layout; ``buffers``: the
        tasks' normalization statistics stacked, ``(K, *norm_shape)`` each.
        """
        k, b = x.shape[0], x.shape[1]
        norm = self._norm_of(buffers)
        if norm is not None:  # (K, *shape) -> (K, 1, *shape): each task's rows get its values
            norm = {n: t.unsqueeze(1) for n, t in norm.items()}
        h = self.normalize(x.reshape(k, b, *self.config.input_shape), norm).reshape(k, b, -1)
        h = h.to(flat.dtype)  # normalized in float32, then in the weights' dtype
        last = len(self._spans) - 1
        for i, (at, out_f, in_f, bias_at) in enumerate(self._spans):
            w = flat[:, at : at + out_f * in_f]
            w = (w.reshape(k, in_f, out_f) if transposed
                 else w.reshape(k, out_f, in_f).transpose(1, 2))  # (K, in, out)
            if bias_at >= 0:
                bias = flat[:, bias_at : bias_at + out_f].unsqueeze(1)  # (K, 1, out)
                h = torch.baddbmm(bias, h, w)  # (K, B, out)
            else:
                h = torch.bmm(h, w)
            if i < last:
                h = self._act(h)
        return self.select_head(h, head)


class TaskBatchNorm2d(nn.Module):
    """Batch norm whose affine parameters are generated and whose statistics live per task.

    Only ``running_mean``/``running_var`` are buffers (no ``num_batches_tracked``): the runtime
    passes the task's own statistics in through ``functional_call``; in training mode they are
    updated in place, so each task's tensors collect that task's statistics.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum = momentum
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, self.momentum, self.eps,
        )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = TaskBatchNorm2d(c_out, momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = TaskBatchNorm2d(c_out, momentum)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            # Option A of the CIFAR ResNet: subsample and zero-pad channels (no parameters).
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class ResNetTarget(TargetNet):
    """ResNet-(6n+2) for small images; ResNet-32 (n = 5) is the paper's CIFAR network."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        c, w, m = config.input_shape[0], config.width, config.bn_momentum
        self.conv1 = nn.Conv2d(c, w, 3, 1, 1, bias=False)
        self.bn1 = TaskBatchNorm2d(w, m)
        blocks = []
        c_in = w
        for stage, width in enumerate((w, 2 * w, 4 * w)):
            for b in range(config.blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(_BasicBlock(c_in, width, stride, m))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, config.num_classes * config.num_heads)
        self._init_norm(config)
        self._finish_init()

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        x = self.normalize(x.reshape(x.shape[0], *self.config.input_shape))
        x = x.to(self.conv1.weight.dtype)  # normalized in float32, run in the weights' dtype
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.blocks(h)
        h = h.mean(dim=(2, 3))  # global average pool -> (B, 4w)
        return self.select_head(self.fc(h), head)


def build_target(config: MLPConfig | ResNetConfig) -> TargetNet:
    if isinstance(config, MLPConfig):
        return MLPTarget(config)
    if isinstance(config, ResNetConfig):
        return ResNetTarget(config)
    raise TypeError(f"unknown target config {type(config).__name__}")
