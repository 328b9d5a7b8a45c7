"""What a continual-learning method is: the four calls :func:`~hnet_serve.training.loop.run_tasks`
makes (begin a task, one step, end a task, a predictor), and the seed each task's randomness
derives from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import Predict


class StepStats(NamedTuple):
    loss: float  # task loss
    reg: float  # regularizer (before beta); 0 when there is none


def task_seed(seed: int, index: int) -> int:
    """Seed of task ``index``'s randomness (embedding init, batch order, task subsets)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


class ContinualMethod(ABC):
    """A continual-learning method driven by :func:`run_tasks`."""

    name: str = ""
    #: where the method's parameters live; run_tasks moves each batch there
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def begin_task(self, index: int, task: TaskData) -> None:
        """Prepare to learn ``task`` (the ``index``-th of this run): parameters, optimizer."""

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One optimization step on a batch ``x`` ``(B, *input)``, ``y`` ``(B,)``."""

    def end_task(self, index: int, task: TaskData) -> None:
        """Called after the last step of ``task`` (consolidation, snapshots)."""

    @abstractmethod
    def predictor(self, task_name: str) -> Predict:
        """Eval-mode logits function for a task learned so far."""
