"""Sequential training: the loop every continual-learning method shares, and the hnet method.

:func:`run_tasks` owns what does not depend on the method: batches, steps, progress bars,
evaluation after each task (the accuracy matrix), timing, the per-task callback (checkpoints)
and a clean stop on Ctrl-C. A method (:class:`ContinualMethod`) owns its parameters and its
optimization step. :class:`HNetMethod` is the paper's: a task-conditioned hypernetwork, a new
embedding per task and the output regularizer on every old task. Baselines (fine-tuning,
independent networks, EWC, SI) implement the same four methods and reuse the rest; they register
themselves with :func:`register_method`.
"""

from __future__ import annotations

import importlib
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from tqdm.auto import tqdm

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.targets import MLPConfig, ResNetConfig
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData, input_stats
from hnet_serve.training.evaluate import Predict, accuracy_of, continual_metrics, predictor
from hnet_serve.training.outliers import make_outlier_maker, outlier_loss
from hnet_serve.training.regularizer import Snapshot, make_snapshot, output_regularizer


class StepStats(NamedTuple):
    loss: float  # task loss
    reg: float  # regularizer (before beta); 0 when there is none


def task_seed(seed: int, index: int) -> int:
    """Seed of task ``index``'s randomness (embedding init, batch order, task subsets)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


class ContinualMethod(ABC):
    """A continual-learning method driven by :func:`run_tasks`."""

    name: str = ""

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


MethodFactory = Callable[[TrainConfig, "list[TaskData]", "HNetModel | None"], ContinualMethod]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``config.method = name`` build ``factory(config, tasks, model)``.

    ``tasks`` are the tasks about to be trained; ``model`` is an existing :class:`HNetModel`
    to continue (add-task) or None.
    """
    _METHODS[name] = factory


def make_method(
    config: TrainConfig, tasks: list[TaskData], model: HNetModel | None = None
) -> ContinualMethod:
    if config.method not in _METHODS:
        try:  # baselines live in an optional module that registers itself on import
            importlib.import_module("hnet_serve.training.baselines")
        except ModuleNotFoundError:
            pass
    factory = _METHODS.get(config.method)
    if factory is None:
        raise ConfigError(
            f"unknown training method {config.method!r} (available: {', '.join(sorted(_METHODS))})"
        )
    return factory(config, tasks, model)


def build_model(config: TrainConfig, tasks: list[TaskData], meta: dict[str, Any] | None = None
                ) -> HNetModel:
    """A fresh (task-less) model sized for ``tasks``: input shape, classes, heads and the input
    normalization (from the first task's training data) come from the data."""
    if not tasks:
        raise InputError("no tasks to train")
    shape = tasks[0].input_shape
    for t in tasks[1:]:
        if t.input_shape != shape:
            raise InputError(
                f"all tasks need the same input shape: {tasks[0].name!r} has {list(shape)}, "
                f"{t.name!r} has {list(t.input_shape)}"
            )
    mean, std = input_stats(tasks[0])
    heads = (config.num_heads or len(tasks)) if config.multi_head else 1
    common: dict[str, Any] = {
        "input_shape": shape, "num_classes": max(t.num_classes for t in tasks),
        "num_heads": heads, "input_mean": mean, "input_std": std,
    }
    spec = config.target
    try:
        if spec.kind == "mlp":
            target = MLPConfig(hidden=spec.hidden, activation=spec.activation, **common)
        else:
            target = ResNetConfig(blocks_per_stage=spec.resnet_blocks, width=spec.resnet_width,
                                  **common)
    except ValidationError as exc:
        raise ConfigError(f"target network does not fit the data: {exc.errors()[0]['msg']}") from None
    return HNetModel(target, config.hypernet, seed=config.seed, meta=meta)


# -- batches --------------------------------------------------------------------------------
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


# -- results --------------------------------------------------------------------------------
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


# -- the loop -------------------------------------------------------------------------------
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
            stats = method.train_step(xb, yb)
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


# -- the hypernetwork method ----------------------------------------------------------------
def make_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where available (several times faster on CPU for the large
    output layer of a hypernetwork; same update rule)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def adam_lookahead(
    optimizer: torch.optim.Adam, named: dict[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """ΔΘ: the change Adam's next step would make from the current ``.grad``s (state untouched).

    The paper's lookahead: regularize f_h(e, Θ + ΔΘ) so the step taken for the new task is
    already corrected for the old ones.
    """
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    out = {}
    for name, p in named.items():
        g = p.grad
        if g is None:
            continue
        state = optimizer.state.get(p, {})
        step = float(state.get("step", 0)) + 1
        m = (1 - beta1) * g + (beta1 * state["exp_avg"] if "exp_avg" in state else 0)
        v = (1 - beta2) * g * g + (beta2 * state["exp_avg_sq"] if "exp_avg_sq" in state else 0)
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        out[name] = -lr * m_hat / (v_hat.sqrt() + eps)
    return out


class HNetMethod(ContinualMethod):
    """The paper's method on an :class:`HNetModel` (which may already hold trained tasks)."""

    name = "hnet"

    def __init__(self, model: HNetModel, config: TrainConfig) -> None:
        if config.method_options:
            raise ConfigError(
                f"the hnet method takes no method_options, got {sorted(config.method_options)}"
            )
        self.model = model
        self.config = config
        self.snapshot: Snapshot | None = None
        self.row = -1
        self.head = 0
        self.num_classes = 0
        self.buffers: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator()
        self.outliers = make_outlier_maker(config, model.target_config.input_shape,
                                           self.generator)

    def begin_task(self, index: int, task: TaskData) -> None:
        model, cfg = self.model, self.config
        if task.input_shape != tuple(model.target_config.input_shape):
            raise InputError(
                f"task {task.name!r} has inputs shaped {list(task.input_shape)}, the model takes "
                f"{list(model.target_config.input_shape)}"
            )
        old = list(range(len(model.registry)))
        head = 0
        if model.target_config.num_heads > 1:
            head = len(old)
            if head >= model.target_config.num_heads:
                raise InputError(
                    f"all {model.target_config.num_heads} output heads are used; a new task "
                    "needs a model with more heads (num_heads)"
                )
        self.generator.manual_seed(task_seed(cfg.seed, 1_000 + len(old)))
        info = model.add_task(task.name, num_classes=task.num_classes,
                              label_names=task.label_names, head=head, generator=self.generator)
        hn = model.hypernet
        self.row, self.head, self.num_classes = info.index, head, task.num_classes
        self.buffers = model.task_buffers[task.name] or None
        self.snapshot = make_snapshot(hn, old) if old and cfg.beta > 0 else None
        params = [*hn.shared_parameters(), hn.task_embs[self.row]]
        if cfg.train_old_embeddings:
            params += [hn.task_embs[j] for j in old]
        self.optimizer = make_adam(params, cfg.lr)
        self._shared = {n: p for n, p in hn.named_parameters() if not n.startswith("task_embs")}

    def _subset(self) -> torch.Tensor | None:
        k = self.snapshot.num_tasks if self.snapshot else 0
        n = self.config.reg_tasks
        if not n or n >= k:
            return None
        return torch.randperm(k, generator=self.generator)[:n]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        model, hn, cfg, opt = self.model, self.model.hypernet, self.config, self.optimizer
        if opt is None:
            raise RuntimeError("begin_task() must be called before train_step()")
        model.target.train()  # batch-norm statistics of this task update in place
        try:
            weights = hn(hn.embeddings([self.row]))[0]  # (n_params,)
            logits = model.target.apply_weights(weights, x, self.buffers, head=self.head)
            loss = F.cross_entropy(logits[:, : self.num_classes], y)
        finally:
            model.target.eval()
        # outliers run in eval mode: they must not move the task's batch-norm statistics
        extra = outlier_loss(self.outliers, cfg.outlier_weight, x, lambda xo: model.target
                             .apply_weights(weights, xo, self.buffers, head=self.head)
                             [:, : self.num_classes])
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reg_value = 0.0
        if self.snapshot is not None:
            delta = adam_lookahead(opt, self._shared) if cfg.lookahead else None
            emb = hn.embeddings(self.snapshot.task_ids) if cfg.train_old_embeddings else None
            reg = output_regularizer(hn, self.snapshot, embeddings=emb, delta=delta,
                                     subset=self._subset(), method=cfg.reg_method)
            (cfg.beta * reg).backward()
            reg_value = reg.item()
        opt.step()
        return StepStats(loss.item(), reg_value)

    def end_task(self, index: int, task: TaskData) -> None:
        self.snapshot = None
        self.optimizer = None

    def predictor(self, task_name: str) -> Predict:
        return predictor(self.model, task_name)


register_method(
    "hnet", lambda config, tasks, model: HNetMethod(model or build_model(config, tasks), config)
)
