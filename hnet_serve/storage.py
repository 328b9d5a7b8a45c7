"""What a checkpoint must keep to answer every task, counted in parameters.

The count is taken from the very tensors :func:`~hnet_serve.checkpoint.save_checkpoint` writes
(shared hypernetwork weights and chunk embeddings, the task-embedding table, per-task buffers
such as batch-norm statistics, each task's input-normalization statistics) plus the
config-level normalization values older manifests hold, so
nothing a checkpoint stores can be left out. ``stored_ratio`` compares it with one target
network: below 1.0 the checkpoint is *compressive* (smaller than a single task's network), and
``T`` separate networks would store ``T`` times one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hnet_serve.checkpoint import BUFFER_PREFIX, EMBEDDINGS_KEY, HNET_PREFIX, state_tensors
from hnet_serve.model import HNetModel
from hnet_serve.normalization import MEAN, STD


@dataclass(frozen=True)
class StoredParams:
    """Parameters a checkpoint stores, by kind, and one target network for comparison."""

    shared: int  # hypernetwork weights, chunk embeddings included
    task_embeddings: int  # every task's embedding
    task_buffers: int  # per-task state that is not generated (batch-norm statistics)
    normalization: int  # input mean/std: the target config's values + every task's own
    target: int  # parameters of ONE target network (what one task's model has)
    tasks: int

    @property
    def total(self) -> int:
        return self.shared + self.task_embeddings + self.task_buffers + self.normalization

    @property
    def ratio(self) -> float:
        """Stored parameters / one target network's."""
        return self.total / self.target

    def summary(self) -> str:
        """The sentence ``info`` and ``train`` print."""
        n = self.tasks
        plural = "task" if n == 1 else "tasks"
        return (f"stores {self.ratio:.2f}x one target network for {n} {plural}; "
                f"{n} separate network{'' if n == 1 else 's'} would store {n}x")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "ratio": self.ratio}


def stored_params(model: HNetModel) -> StoredParams:
    """Count everything ``model``'s checkpoint stores (see the module docstring)."""
    cfg = model.target_config
    kinds = {"shared": 0, "task_embeddings": 0, "task_buffers": 0,
             "normalization": len(cfg.input_mean) + len(cfg.input_std)}
    for key, tensor in state_tensors(model).items():
        if key == EMBEDDINGS_KEY:
            kinds["task_embeddings"] += tensor.numel()
        elif key.startswith(BUFFER_PREFIX) and key.rsplit("/", 1)[-1] in (MEAN, STD):
            kinds["normalization"] += tensor.numel()  # a task's own input statistics
        elif key.startswith(BUFFER_PREFIX):
            kinds["task_buffers"] += tensor.numel()
        elif key.startswith(HNET_PREFIX):
            kinds["shared"] += tensor.numel()
        else:  # pragma: no cover - state_tensors writes only these three kinds
            raise AssertionError(f"uncounted checkpoint tensor {key!r}")
    return StoredParams(
        **kinds,
        target=model.target.n_params,
        tasks=len(model.registry),
    )
