"""Sequential training: the loop every continual-learning method shares.

:func:`run_tasks` owns what does not depend on the method: batches, steps, progress bars,
evaluation after each task (the accuracy matrix), timing, the per-task callback (checkpoints)
and a clean stop on Ctrl-C. A method (:class:`~hnet_serve.training.methods.base.ContinualMethod`)
owns its parameters and its optimization step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hnet_serve.devices import to_device
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import accuracy_of, continual_metrics
from hnet_serve.training.methods.base import ContinualMethod, task_seed


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` mini-batches, reshuffled every epoch with a seeded generator."""
    rng = np.random.default_rng(seed)
    n = len(y)
    bs = min(batch_size, n)
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + bs]
        pos += bs
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


@dataclass
class TrainResult:
    """What a run produced; ``accuracy_matrix[i][j]``: accuracy on task j after task i."""

    task_names: list[str]
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)
    final_reg: list[float] = field(default_factory=list)
    interrupted: bool = False

    @property
    def completed(self) -> list[str]:
        return self.task_names[: len(self.accuracy_matrix)]

    @property
    def final_accuracy(self) -> dict[str, float]:
        if not self.accuracy_matrix:
            return {}
        row = self.accuracy_matrix[-1]
        return {n: float(v) for n, v in zip(self.completed, row) if v is not None}

    @property
    def metrics(self) -> dict[str, float | None]:
        return continual_metrics(self.accuracy_matrix)

    @property
    def mean_accuracy(self) -> float | None:
        return self.metrics["mean_accuracy"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_names": self.completed,
            "accuracy_matrix": self.accuracy_matrix,
            "accuracy": self.final_accuracy,
            **self.metrics,
            "seconds": self.seconds,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "final_reg": self.final_reg,
            "interrupted": self.interrupted,
        }


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``result`` holds the tasks completed before it."""

    def __init__(self, result: TrainResult) -> None:
        super().__init__("training interrupted")
        self.result = result


def run_tasks(
    method: ContinualMethod,
    tasks: list[TaskData],
    config: TrainConfig,
    *,
    on_task_end: Callable[[int, TaskData, TrainResult], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``tasks`` in order with ``method``; evaluate every task seen after each one.

    ``on_task_end(i, task, result)`` runs after task i is trained and evaluated (the API saves
    the checkpoint there). Ctrl-C raises :class:`Interrupted` carrying the result of the tasks
    completed so far; the task in progress is not reported.
    """
    result = TrainResult([t.name for t in tasks])
    # Once a task's loss nears zero its gradients turn denormal and CPU steps get 2-3x slower
    # (docs/reproduction.md, "Speed"); flushing them to zero costs no accuracy. Process-wide,
    # so it is switched back to torch's default (off) afterwards.
    torch.set_flush_denormal(True)
    try:
        for i, task in enumerate(tasks):
            _train_one(method, i, task, config, result, progress, len(tasks))
            row: list[float | None] = [
                accuracy_of(method.predictor(t.name), t.x_test, t.y_test, config.eval_batch_size)
                for t in tasks[: i + 1]
            ]
            result.accuracy_matrix.append(row + [None] * (len(tasks) - i - 1))
            if on_task_end is not None:
                on_task_end(i, task, result)
    except KeyboardInterrupt:
        result.interrupted = True
        raise Interrupted(result) from None
    finally:
        torch.set_flush_denormal(False)
    return result


def _train_one(
    method: ContinualMethod, i: int, task: TaskData, config: TrainConfig, result: TrainResult,
    progress: bool, n_tasks: int,
) -> None:
    x, y = task.x_train, task.y_train  # materialized once for the whole task
    steps = config.steps_for(len(y))
    method.begin_task(i, task)
    t0 = time.perf_counter()
    loss_avg = reg_avg = 0.0
    bar = tqdm(total=steps, desc=f"task {i + 1}/{n_tasks} {task.name}", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True, mininterval=0.5)
    with bar:
        for step, (xb, yb) in enumerate(batches(x, y, config.batch_size, steps,
                                                 task_seed(config.seed, i))):
            stats = method.train_step(to_device(xb, method.device), to_device(yb, method.device))
            w = 0.1 if step else 1.0  # running averages for the bar
            loss_avg += w * (stats.loss - loss_avg)
            reg_avg += w * (stats.reg - reg_avg)
            bar.update(1)
            if step % 25 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss_avg:.4f}", reg=f"{reg_avg:.2e}", refresh=False)
    method.end_task(i, task)
    result.seconds.append(time.perf_counter() - t0)
    result.steps.append(steps)
    result.final_loss.append(loss_avg)
    result.final_reg.append(reg_avg)
