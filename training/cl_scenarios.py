"""The paper's three continual-learning scenarios (van de Ven & Tolias 2019; von Oswald et al.).

* **CL1**, task-incremental: the task is given at test time (one output head per task for plain
  networks; the hypernetwork generates each task's weights, output layer included).
* **CL2**, domain-incremental: the task is not given, the output is shared (the within-task
  label: even/odd digit in SplitMNIST, the digit in PermutedMNIST).
* **CL3**, class-incremental: the task is not given and the answer is the global class (task
  offset + within-task label).

For the hypernetwork (HNET+ENT), one trained model answers all three: CL1 uses the given task's
generated weights; for CL2/CL3 the task is inferred per input by the serving runtime's
:func:`hnet_serve.task_inference.infer_tasks` (every task's weights in one batched call, lowest
softmax entropy wins) and the within-task prediction under the inferred task is the CL2 answer,
mapped to the global class (:func:`to_global`) for CL3. Plain-network baselines are trained once
per scenario instead (:func:`scenario_config`, :func:`class_incremental`); independent networks
can use the same entropy rule (:func:`evaluate_candidates`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from hnet_serve.errors import InputError
from hnet_serve.model import HNetModel
from hnet_serve.task_inference import TaskInference, infer_tasks, select_by_entropy
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import Predict

Scenario = Literal["cl1", "cl2", "cl3"]
SCENARIOS: tuple[Scenario, ...] = ("cl1", "cl2", "cl3")

# x -> (task inference per row, logits of every candidate task [(N, C_t)])
Candidates = Callable[[np.ndarray], "tuple[TaskInference, list[np.ndarray]]"]


# -- classes --------------------------------------------------------------------------------
def class_offsets(tasks: Sequence[TaskData]) -> np.ndarray:
    """First global class of every task: ``(T,)``; task t owns ``[off[t], off[t] + C_t)``."""
    sizes = np.array([t.num_classes for t in tasks], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def to_global(task_index: np.ndarray, local_pred: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """CL3: the global class of each row from its (inferred) task and within-task prediction."""
    task_index = np.asarray(task_index, dtype=np.int64)
    local_pred = np.asarray(local_pred, dtype=np.int64)
    if task_index.shape != local_pred.shape:
        raise InputError(
            f"{task_index.shape} task indices for {local_pred.shape} predictions"
        )
    if task_index.size and (task_index.min() < 0 or task_index.max() >= len(offsets)):
        raise InputError(f"task index out of range for {len(offsets)} tasks")
    return offsets[task_index] + local_pred


def class_incremental(tasks: Sequence[TaskData]) -> list[TaskData]:
    """CL3 training view for plain networks: global labels, ``num_classes`` = classes seen so far.

    Inputs are shared with ``tasks`` (no copy; a permuted task keeps its transform). A network
    with a shared head trained on these tasks learns task t on its first ``num_classes`` outputs
    (an expanding head) and is evaluated on all of them.
    """
    offsets = class_offsets(tasks)
    out, names = [], []
    for task, off in zip(tasks, offsets):
        view = copy.copy(task)  # shares the input arrays and the transform
        view.y_train = task.y_train + off
        view.y_test = task.y_test + off
        names += [f"{task.name}:{label}" for label in task.label_names]
        view.num_classes = int(off) + task.num_classes
        view.label_names = list(names)
        out.append(view)
    return out


def scenario_config(config: TrainConfig, scenario: Scenario) -> TrainConfig:
    """The training config of a plain-network baseline in ``scenario``: one head per task for
    CL1, a shared output for CL2 and CL3."""
    if scenario not in SCENARIOS:
        raise InputError(f"unknown scenario {scenario!r} (choose from {', '.join(SCENARIOS)})")
    return config.model_copy(update={"multi_head": scenario == "cl1", "num_heads": None})


def scenario_tasks(tasks: Sequence[TaskData], scenario: Scenario) -> list[TaskData]:
    """The tasks a plain-network baseline trains on in ``scenario``."""
    return class_incremental(tasks) if scenario == "cl3" else list(tasks)


# -- scores ---------------------------------------------------------------------------------
@dataclass
class ScenarioScores:
    """Accuracies (fractions) of one trained learner after its last task.

    ``per_task[name]`` holds ``cl1``, ``cl2``, ``cl3`` and ``task_inference`` for that task's test
    set; the top-level fields are their means over tasks.
    """

    per_task: dict[str, dict[str, float]] = field(default_factory=dict)
    temperature: float = 1.0
    # confusion[j][t]: fraction of task j's test inputs that the entropy rule assigns to task t
    confusion: list[list[float]] = field(default_factory=list)

    def _mean(self, key: str) -> float:
        return float(np.mean([v[key] for v in self.per_task.values()]))

    @property
    def cl1(self) -> float:
        return self._mean("cl1")

    @property
    def cl2(self) -> float:
        return self._mean("cl2")

    @property
    def cl3(self) -> float:
        return self._mean("cl3")

    @property
    def task_inference(self) -> float:
        return self._mean("task_inference")

    def to_dict(self) -> dict[str, Any]:
        return {"cl1": self.cl1, "cl2": self.cl2, "cl3": self.cl3,
                "task_inference": self.task_inference, "temperature": self.temperature,
                "per_task": self.per_task, "confusion": self.confusion}


def score_rows(
    true_task: int,
    y: np.ndarray,
    inference: TaskInference,
    logits: Sequence[np.ndarray],
    offsets: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-row correctness in each scenario for rows of task ``true_task`` with labels ``y``.

    ``logits[t]`` ``(N, C_t)`` are the rows' logits under candidate task t and ``inference``
    the entropy rule's choice among the candidates.
    """
    chosen = inference.task_index  # (N,)
    local = np.empty(len(y), dtype=np.int64)
    for t, z in enumerate(logits):
        rows = np.flatnonzero(chosen == t)
        if rows.size:
            local[rows] = z[rows].argmax(axis=1)
    return {
        "cl1": logits[true_task].argmax(axis=1) == y,
        "cl2": local == y,
        "cl3": to_global(chosen, local, offsets) == offsets[true_task] + y,
        "task_inference": chosen == true_task,
    }


def evaluate_candidates(
    candidates: Candidates,
    tasks: Sequence[TaskData],
    *,
    temperature: float = 1.0,
    batch_size: int = 2000,
    max_rows: int | None = None,
) -> ScenarioScores:
    """Score CL1/CL2/CL3 and task inference on every task's test set (its first ``max_rows``
    rows when given: a cheaper estimate, e.g. after every task of a long run).

    ``candidates(x)`` returns the entropy rule's choice and the logits of every task in
    ``tasks`` (same order) for the rows ``x``.
    """
    if not tasks:
        raise InputError("no tasks to evaluate")
    offsets = class_offsets(tasks)
    scores = ScenarioScores(temperature=temperature)
    for j, task in enumerate(tasks):
        x, y = task.x_test[:max_rows], task.y_test[:max_rows]
        hits: dict[str, list[np.ndarray]] = {}
        chosen = np.zeros(len(tasks), dtype=np.int64)
        for start in range(0, len(y), batch_size):
            inference, logits = candidates(x[start : start + batch_size])
            if len(logits) != len(tasks):
                raise InputError(f"{len(logits)} candidate tasks for {len(tasks)} tasks")
            rows = score_rows(j, y[start : start + batch_size], inference, logits, offsets)
            for key, ok in rows.items():
                hits.setdefault(key, []).append(ok)
            chosen += np.bincount(inference.task_index, minlength=len(tasks))
        scores.per_task[task.name] = {k: float(np.concatenate(v).mean()) for k, v in hits.items()}
        scores.confusion.append((chosen / chosen.sum()).tolist())
    return scores


def evaluate_hnet(
    model: HNetModel,
    tasks: Sequence[TaskData],
    *,
    temperature: float = 1.0,
    batch_size: int = 2000,
    max_rows: int | None = None,
) -> ScenarioScores:
    """HNET (CL1) and HNET+ENT (CL2, CL3) on the test sets of ``tasks`` (all in the model).

    Every task's weights are generated once, in one batched call, and reused for every batch
    of rows; inference is :func:`~hnet_serve.task_inference.infer_tasks`.
    """
    names = [t.name for t in tasks]
    with torch.inference_mode():
        weights = model.generate(names)  # (T, n_params)
    return evaluate_candidates(
        lambda x: infer_tasks(model, x, temperature=temperature, tasks=names, weights=weights),
        tasks, temperature=temperature, batch_size=batch_size, max_rows=max_rows,
    )


def evaluate_predictors(
    predictors: Sequence[Predict],
    tasks: Sequence[TaskData],
    *,
    temperature: float = 1.0,
    batch_size: int = 2000,
    max_rows: int | None = None,
) -> ScenarioScores:
    """The same scores for one predictor per task (e.g. independent networks), with the same
    entropy rule (:func:`~hnet_serve.task_inference.select_by_entropy`) choosing among them."""
    if len(predictors) != len(tasks):
        raise InputError(f"{len(predictors)} predictors for {len(tasks)} tasks")

    def candidates(x: np.ndarray) -> tuple[TaskInference, list[np.ndarray]]:
        xb = torch.from_numpy(np.ascontiguousarray(x))
        logits = [p(xb).numpy() for p in predictors]  # [(N, C_t)]
        return select_by_entropy(logits, temperature), logits

    return evaluate_candidates(candidates, tasks, temperature=temperature, batch_size=batch_size,
                               max_rows=max_rows)
