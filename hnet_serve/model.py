"""HNetModel: a target network, its hypernetwork, the task registry and per-task state.

This is what a checkpoint holds and what training, export and serving pass around. It composes
the parts (no inheritance between hypernetwork and target) and keeps them consistent: adding a
task appends an embedding row, a registry entry and fresh per-task buffers together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hnet_serve.errors import InputError
from hnet_serve.hypernet import HypernetConfig, HyperNetwork
from hnet_serve.normalization import MEAN, STD
from hnet_serve.registry import TaskInfo, TaskRegistry
from hnet_serve.targets import MLPConfig, ResNetConfig, TargetNet, build_target


class HNetModel:
    def __init__(
        self,
        target_config: MLPConfig | ResNetConfig,
        hypernet_config: HypernetConfig,
        *,
        seed: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        self.target_config = target_config
        self.hypernet_config = hypernet_config
        self.target: TargetNet = build_target(target_config)
        self.target.eval()
        self.hypernet = HyperNetwork(hypernet_config, self.target.n_params,
                                     list(self.target.param_shapes.values()))
        self.registry = TaskRegistry()
        # Per-task state that is not generated: batch-norm running statistics.
        self.task_buffers: dict[str, dict[str, torch.Tensor]] = {}
        # Free-form provenance saved with the checkpoint: benchmark, data source, seed, configs.
        self.meta: dict[str, Any] = dict(meta or {})
        # The directory this model was loaded from or last saved to (not saved itself): recorded
        # data files are found relative to it.
        self.checkpoint_dir: Path | None = None

    # -- tasks ------------------------------------------------------------------------------
    def add_task(
        self,
        name: str,
        *,
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        embedding: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        input_norm: tuple[Any, Any] | None = None,
        **fields: Any,
    ) -> TaskInfo:
        """Register a task and give it a fresh embedding row and fresh buffers.

        ``input_norm``: the task's ``(mean, std)`` (``normalization.fit_norm``), required when
        the target normalizes per task (``target_config.input_norm`` is not ``none``)."""
        norm = self._norm_buffers(name, input_norm)
        num_classes = num_classes or self.target_config.num_classes
        if num_classes > self.target_config.num_classes:
            raise InputError(
                f"task {name!r} has {num_classes} classes but the target outputs "
                f"{self.target_config.num_classes}"
            )
        head = fields.pop("head", 0)
        if not 0 <= head < self.target_config.num_heads:
            raise InputError(f"head {head} out of range (target has {self.target_config.num_heads})")
        info = self.registry.add(
            name,
            input_shape=self.target_config.input_shape,
            num_classes=num_classes,
            label_names=label_names,
            head=head,
            **fields,
        )
        try:
            row = self.hypernet.add_task(embedding, generator=generator)
        except Exception:
            # Keep registry and table aligned if the embedding was rejected.
            self.registry = TaskRegistry(list(self.registry)[:-1])
            raise
        if row != info.index:  # pragma: no cover - internal invariant
            raise RuntimeError("registry and embedding table are out of step")
        self.task_buffers[name] = {**self.target.default_buffers(), **norm}
        return info

    def _norm_buffers(self, name: str, input_norm: tuple[Any, Any] | None
                      ) -> dict[str, torch.Tensor]:
        shape = self.target.buffer_shapes.get(MEAN)
        if shape is None:
            if input_norm is not None:
                raise InputError("this model has no per-task input normalization")
            return {}
        if input_norm is None:
            raise InputError(f"task {name!r} needs its input normalization (mean, std)")
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(shape) for v in input_norm)
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise InputError(f"task {name!r}: input normalization must be finite with std > 0")
        return {MEAN: mean, STD: std}

    @property
    def task_names(self) -> list[str]:
        return self.registry.names

    # -- device -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the hypernetwork (and so every generated weight) lives."""
        return next(self.hypernet.parameters()).device

    def to(self, device: torch.device | str) -> HNetModel:
        """Move the hypernetwork, the target (its normalization buffers) and every task's
        buffers to ``device``, in place; returns ``self``. Checkpoints are always saved from
        CPU copies (``checkpoint.state_tensors``), whatever the device."""
        device = torch.device(device)
        self.hypernet.to(device)
        self.target.to(device)
        self.task_buffers = {t: {k: b.to(device) for k, b in bufs.items()}
                             for t, bufs in self.task_buffers.items()}
        return self

    # -- generation and prediction ---------------------------------------------------------
    def generate(self, names: list[str]) -> torch.Tensor:
        """Flat weights for the named tasks, ``(K, n_params)``, in one batched pass."""
        ids = [self.registry.index_of(n) for n in names]
        return self.hypernet.generate(ids)

    @torch.no_grad()
    def logits(self, name: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of task ``name`` on ``x`` (eval mode); ``weights`` reuses generated weights."""
        info = self.registry.get(name)
        if weights is None:
            weights = self.generate([name])[0]
        out = self.target.apply_weights(weights, x, self.task_buffers.get(name), head=info.head)
        return out[:, : info.num_classes]

    def info(self) -> dict[str, Any]:
        return {
            "tasks": [
                {**t.summary(), "created": t.created, "metrics": t.metrics} for t in self.registry
            ],
            "target": self.target_config.model_dump(mode="json"),
            "hypernet": self.hypernet_config.model_dump(mode="json"),
            "target_params": self.target.n_params,
            "hypernet_params": self.hypernet.n_shared,
            "embedding_params": self.hypernet.num_tasks * self.hypernet.emb_dim,
            # of which each task's private first-layer correction (adapter_rank)
            "adapter_params": self.hypernet.num_tasks * self.hypernet.adapter_dim,
            "compression_ratio": self.hypernet.compression_ratio(),
        }
