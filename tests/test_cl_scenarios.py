"""CL1/CL2/CL3 evaluation: class mapping, class-incremental views, task inference scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hnet_serve.errors import InputError
from hnet_serve.task_inference import TaskInference, select_by_entropy
from hnet_serve.training.cl_scenarios import (
    class_incremental,
    class_offsets,
    evaluate_hnet,
    evaluate_predictors,
    scenario_config,
    scenario_tasks,
    score_rows,
    to_global,
)
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import predictor
from hnet_serve.training.loop import run_tasks
from hnet_serve.training.methods.baselines import train_baseline
from hnet_serve.training.methods.registry import make_method
from tests.conftest import tiny_mlp_model
from tests.test_baselines import conflicting_tasks, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")


def disjoint_task(name: str, dims: list[int], *, classes: int = 2, n: int = 200, seed: int = 0,
                  dim: int = 4) -> TaskData:
    """Inputs non-zero only on ``dims`` (tasks with disjoint dims are separable); the label is
    the bin of the first of them."""
    rng = np.random.default_rng(seed)
    x = np.zeros((2 * n, dim), np.float32)
    x[:, dims] = rng.normal(size=(2 * n, len(dims)))
    edges = np.quantile(x[:, dims[0]], np.linspace(0, 1, classes + 1)[1:-1])
    y = np.digitize(x[:, dims[0]], edges).astype(np.int64)
    return TaskData(name, x[:n], y[:n], x[n:], y[n:], num_classes=classes)


# -- classes --------------------------------------------------------------------------------
def test_class_offsets_follow_each_tasks_classes():
    tasks = [disjoint_task("a", [0], classes=2), disjoint_task("b", [1], classes=3),
             disjoint_task("c", [2], classes=2)]
    assert class_offsets(tasks).tolist() == [0, 2, 5]


@pytest.mark.parametrize(
    "task_index,local,expected",
    [
        ([0, 0, 1, 2], [0, 1, 0, 1], [0, 1, 2, 6]),  # offsets [0, 2, 5]
        ([2, 1], [1, 2], [6, 4]),
        ([], [], []),
    ],
)
def test_to_global_maps_within_task_predictions(task_index, local, expected):
    offsets = np.array([0, 2, 5])
    assert to_global(np.array(task_index, dtype=np.int64), np.array(local, dtype=np.int64),
                     offsets).tolist() == expected


@pytest.mark.parametrize("task_index,local", [([3], [0]), ([-1], [0]), ([0, 1], [0])])
def test_to_global_rejects_bad_indices(task_index, local):
    with pytest.raises(InputError):
        to_global(np.array(task_index), np.array(local), np.array([0, 2, 5]))


def test_class_incremental_view_shifts_labels_and_shares_inputs():
    tasks = [disjoint_task("a", [0], classes=2), disjoint_task("b", [1], classes=3)]
    view = class_incremental(tasks)
    assert [t.num_classes for t in view] == [2, 5]
    assert view[1].y_train.tolist() == (tasks[1].y_train + 2).tolist()
    assert view[1].y_test.min() >= 2 and view[1].y_test.max() <= 4
    assert view[1].label_names == ["a:0", "a:1", "b:0", "b:1", "b:2"]
    assert view[0].x_train is tasks[0].x_train  # no copy
    assert tasks[1].y_train.max() == 2 and tasks[1].num_classes == 3  # originals untouched
    assert scenario_tasks(tasks, "cl2") == tasks


@pytest.mark.parametrize("scenario,multi", [("cl1", True), ("cl2", False), ("cl3", False)])
def test_scenario_config_sets_the_output_layout(scenario, multi):
    cfg = scenario_config(toy_config(num_heads=7), scenario)
    assert cfg.multi_head is multi and cfg.num_heads is None


def test_unknown_scenario_is_an_input_error():
    with pytest.raises(InputError, match="scenario"):
        scenario_config(toy_config(), "cl4")


def test_class_incremental_baseline_uses_an_expanding_head_and_forgets():
    """Finetuning in CL3 answers every class seen so far and loses the old task's classes."""
    tasks = conflicting_tasks()
    cfg = scenario_config(toy_config(iterations=80), "cl3")
    run = train_baseline("finetune", scenario_tasks(tasks, "cl3"), cfg, progress=False)
    learner = run.learner
    assert learner.target_config.num_classes == 4 and learner.target_config.num_heads == 1
    x = torch.from_numpy(tasks[0].x_test[:3])
    assert learner.predictor("a")(x).shape == (3, 4)  # every class seen
    matrix = run.result.accuracy_matrix
    assert matrix[0][0] > 0.9 and matrix[1][1] > 0.9
    assert matrix[1][0] < 0.1  # predicts the new task's classes for the old inputs


# -- scoring --------------------------------------------------------------------------------
def test_score_rows_by_hand():
    # Two candidate tasks with 2 classes each; four rows of task 1 with labels y.
    logits = [np.array([[5, 0], [0, 5], [5, 0], [0, 5]], np.float32),
              np.array([[0, 5], [0, 5], [5, 0], [5, 0]], np.float32)]
    y = np.array([1, 1, 0, 1])
    inference = TaskInference(np.array([1, 0, 0, 1]), np.ones(4, np.float32),
                              np.zeros((4, 2), np.float32))
    rows = score_rows(1, y, inference, logits, np.array([0, 2]))
    # CL1: task 1's own logits -> [1, 1, 0, 0]
    assert rows["cl1"].tolist() == [True, True, True, False]
    # CL2: prediction under the chosen task -> [1, 1, 0, 0]
    assert rows["cl2"].tolist() == [True, True, True, False]
    # CL3: global classes [3, 1, 0, 2] against the true [3, 3, 2, 3]
    assert rows["cl3"].tolist() == [True, False, False, False]
    assert rows["task_inference"].tolist() == [True, False, False, True]


def _gated(dims_on: list[int], label_dims: list[int], scale: float = 10.0):
    """Confident on inputs living in ``dims_on``, uniform (zero logits) elsewhere; the class is
    the sign of the sum of ``label_dims``."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        gate = (x[:, dims_on].abs().sum(1, keepdim=True) > 0).float()  # (B, 1)
        v = x[:, label_dims].sum(1, keepdim=True) * scale  # (B, 1)
        return gate * torch.cat([-v, v], dim=1)  # (B, 2)

    return predict


def test_entropy_rule_infers_the_task_on_separable_tasks():
    tasks = [disjoint_task("a", [0, 2], seed=1), disjoint_task("b", [1, 3], seed=2)]
    preds = [_gated([0, 2], [0]), _gated([1, 3], [1])]
    scores = evaluate_predictors(preds, tasks)
    assert scores.task_inference == 1.0
    assert scores.cl1 > 0.95
    assert scores.cl3 == pytest.approx(scores.cl1)
    assert scores.cl2 == pytest.approx(scores.cl1)


def test_wrong_task_inference_lowers_cl3_not_cl1():
    """A predictor confident everywhere steals the other task's rows: CL3 pays, CL1 does not."""
    tasks = [disjoint_task("a", [0, 2], seed=1), disjoint_task("b", [1, 3], seed=2)]
    # Task a's predictor also answers (confidently, and by the right sign) on task b's inputs.
    greedy = [_gated([0, 1, 2, 3], [0, 1], scale=100.0), _gated([1, 3], [1])]
    scores = evaluate_predictors(greedy, tasks)
    b = scores.per_task["b"]
    assert scores.per_task["a"]["task_inference"] == 1.0
    assert scores.confusion[0] == [1.0, 0.0]
    assert scores.confusion[1][0] == pytest.approx(1 - b["task_inference"])
    assert b["task_inference"] < 0.2
    assert b["cl1"] > 0.95 and b["cl2"] > 0.95  # the within-task answer is still right
    assert b["cl3"] < 0.2  # but the global class is task a's
    with pytest.raises(InputError):
        evaluate_predictors(greedy[:1], tasks)


def test_max_rows_scores_the_first_rows_only():
    tasks = [disjoint_task("a", [0, 2], seed=1), disjoint_task("b", [1, 3], seed=2)]
    greedy = [_gated([0, 1, 2, 3], [0, 1], scale=100.0), _gated([1, 3], [1])]
    capped = evaluate_predictors(greedy, tasks, max_rows=50, batch_size=16)
    by_hand = evaluate_predictors(
        greedy, [TaskData(t.name, t.x_train, t.y_train, t.x_test[:50], t.y_test[:50],
                          num_classes=2) for t in tasks])
    assert capped.per_task == by_hand.per_task
    assert capped.per_task != evaluate_predictors(greedy, tasks).per_task


def test_hnet_scores_equal_the_generic_path_with_its_own_predictors():
    """evaluate_hnet (one batched generation + the runtime's infer_tasks) gives the same
    per-task scores as scoring each task's own predictor with the same entropy rule."""
    model = tiny_mlp_model(3)
    tasks = [disjoint_task(f"task-{i}", [i, i + 3], classes=3, seed=i, dim=12) for i in range(3)]
    via_runtime = evaluate_hnet(model, tasks, temperature=2.0, batch_size=64)
    generic = evaluate_predictors([predictor(model, t.name) for t in tasks], tasks,
                                  temperature=2.0)
    for name in via_runtime.per_task:
        for key, value in via_runtime.per_task[name].items():
            assert value == pytest.approx(generic.per_task[name][key], abs=1 / 200)


def test_hnet_plus_ent_after_training_two_disjoint_tasks():
    """Trained end to end: CL1 from the accuracy matrix, then HNET+ENT; CL3 can only be right
    where the task was inferred, and the scores agree with a direct count."""
    tasks = [disjoint_task("a", [0, 2], seed=1), disjoint_task("b", [1, 3], seed=2)]
    cfg = toy_config(iterations=200)
    method = make_method(cfg, tasks)
    result = run_tasks(method, tasks, cfg, progress=False)
    scores = evaluate_hnet(method.model, tasks)
    assert scores.cl1 == pytest.approx(result.mean_accuracy)
    assert scores.cl1 > 0.9
    assert scores.cl3 <= min(scores.task_inference, scores.cl2) + 1e-9
    # Direct count for task b: inferred task and within-task prediction from the logits.
    x = tasks[1].x_test
    logits = [method.model.logits(t.name, torch.from_numpy(x)).numpy() for t in tasks]
    choice = select_by_entropy(logits).task_index
    assert scores.per_task["b"]["task_inference"] == pytest.approx((choice == 1).mean(), abs=0.01)
