"""Task inference, the paper's HNET+ENT rule: a row belongs to the task under which its
prediction has the lowest entropy.

Pure functions of logits (plus :func:`infer_tasks`, which runs a model's every task on the rows):
the serving runtime answers requests without a task with them, and training scores the CL2/CL3
scenarios with the same code, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hnet_serve.errors import InputError
from hnet_serve.model import HNetModel


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits into a new float32 array (in-place steps: this
    runs on every request, where a few microseconds per numpy temporary add up)."""
    z = logits / temperature if temperature != 1.0 else logits
    z = np.subtract(z, z.max(axis=-1, keepdims=True), dtype=np.float32)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@dataclass
class TaskInference:
    """Per row: the chosen task (index into the candidate list), its confidence and all entropies."""

    task_index: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32 in [0, 1]
    entropy: np.ndarray  # (N, T) float32, softmax entropy under every candidate task
    confidences: np.ndarray | None = None  # (N, T) float32: every candidate's certainty


def select_by_entropy(logits: Sequence[np.ndarray], temperature: float = 1.0) -> TaskInference:
    """The HNET+ENT rule: per row, the task whose softmax(logits / T) has the lowest entropy.

    ``logits[t]`` is ``(N, C_t)``, row ``n`` predicted under task ``t``. Confidence is the chosen
    task's normalized certainty ``1 - H / log(C_t)`` (1: one-hot, 0: uniform).
    """
    if not logits:
        raise InputError("task inference needs at least one task")
    probs = [softmax(z, temperature) for z in logits]  # [(N, C_t)]
    ent = np.stack(
        [-(p * np.log(np.clip(p, 1e-30, None))).sum(-1) for p in probs], axis=1
    ).astype(np.float32)  # (N, T)
    idx = ent.argmin(axis=1)  # (N,)
    max_ent = np.log(np.array([max(z.shape[1], 2) for z in logits], dtype=np.float32))  # (T,)
    every = np.clip(1.0 - ent / max_ent, 0.0, 1.0).astype(np.float32)  # (N, T)
    return TaskInference(idx.astype(np.int64), every[np.arange(len(idx)), idx], ent, every)


def infer_tasks(
    model: HNetModel,
    inputs: np.ndarray | torch.Tensor,
    *,
    temperature: float = 1.0,
    tasks: Sequence[str] | None = None,
    weights: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> tuple[TaskInference, list[np.ndarray]]:
    """Infer each row's task from ``model`` alone: HNET+ENT on every (or the given) task.

    All candidate tasks' weights come from ONE batched hypernetwork call (unless ``weights``,
    one per candidate, are passed in, e.g. from a cache), every row is predicted under every
    candidate, and :func:`select_by_entropy` picks per row. Returns the inference and the
    per-task logits ``[(N, C_t)]`` (so callers can report the chosen task's prediction).
    """
    names = list(model.registry.names if tasks is None else tasks)
    x = torch.as_tensor(inputs, dtype=torch.float32)
    with torch.inference_mode():
        if weights is None:
            weights = model.generate(names)  # (T, n_params), one batched pass
        logits = [model.logits(n, x, w).numpy() for n, w in zip(names, weights, strict=True)]
    return select_by_entropy(logits, temperature), logits
