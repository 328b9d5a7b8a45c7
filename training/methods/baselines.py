"""Baselines run by the same trainer as the hypernetwork: finetune, independent, EWC and SI.

Each baseline trains a plain target network (the same architecture the hypernetwork generates,
built from the same data by :func:`~hnet_serve.training.methods.hnet.build_model`) with the same batches,
iterations, optimizer (a fresh Adam per task) and evaluation, through
:func:`hnet_serve.training.loop.run_tasks`. Only the parameters and the penalty differ:

* ``finetune``: one network trained on the tasks in sequence, no penalty (the forgetting
  reference);
* ``independent``: a fresh network per task (the no-interference reference; T times the memory);
* ``ewc``: online EWC (Schwarz et al. 2018): after task t the diagonal Fisher F_t is folded into
  ``F <- gamma F + F_t`` and the anchor moves to the current parameters; the penalty is
  ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2``;
* ``si``: Synaptic Intelligence (Zenke et al. 2017): during a task each parameter's
  contribution to the decrease of the task loss, ``omega_i += -g_i * dtheta_i``, is summed along
  the optimization path; at the end ``Omega_i += max(0, omega_i / (Delta_i^2 + xi))`` and the
  penalty is ``c * sum_i Omega_i (theta_i - theta*_i)^2``.

The output layout follows ``TrainConfig.multi_head``: one head per task (task-incremental, CL1)
or one shared output (CL2, and CL3 with the class-incremental labels of
:func:`hnet_serve.training.cl_scenarios.class_incremental`). With a shared head a task trains on its own
``num_classes`` leading outputs and is evaluated on every output seen so far (the "expanding
head" of class-incremental learning).

Importing this module registers the four methods with the trainer, so
``TrainConfig(method="ewc")`` works with :func:`hnet_serve.training.methods.registry.make_method`;
:func:`train_baseline` is the one-call entry point (``hnet-serve train --method ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hnet_serve.configs import validate
from hnet_serve.devices import resolve_device, to_device
from hnet_serve.errors import ConfigError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.normalization import fit_norm
from hnet_serve.targets import MLPConfig, ResNetConfig, TargetNet, build_target
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import Predict
from hnet_serve.training.loop import TrainResult, run_tasks
from hnet_serve.training.methods.base import ContinualMethod, StepStats, task_seed
from hnet_serve.training.methods.hnet import target_config_for
from hnet_serve.training.methods.penalties import diagonal_fisher, quadratic_penalty
from hnet_serve.training.outliers import make_outlier_maker, outlier_loss

BASELINES = ("finetune", "independent", "ewc", "si")


class BaselineOptions(BaseModel):
    """Strength hyperparameters of the baselines (ignored by the methods that do not use them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ewc_lambda: float = Field(default=100.0, ge=0)  # EWC strength lambda
    ewc_gamma: float = Field(default=1.0, ge=0, le=1)  # online EWC decay of the old Fisher
    fisher_samples: int = Field(default=500, gt=0, le=1_000_000)  # examples for the Fisher
    si_c: float = Field(default=1.0, ge=0)  # SI strength c
    si_xi: float = Field(default=0.1, gt=0)  # SI damping xi

    @classmethod
    def build(cls, values: BaselineOptions | dict[str, Any] | None = None) -> BaselineOptions:
        """Validate; a bad value raises :class:`ConfigError` naming the field."""
        return validate(cls, values or {}, "invalid baseline setting")

    @classmethod
    def from_config(cls, config: TrainConfig) -> BaselineOptions:
        """The options stored in the training config (``method_options``), defaults otherwise."""
        return cls.build(getattr(config, "method_options", None))


# -- the math (pure functions) --------------------------------------------------------------
# -- the methods ----------------------------------------------------------------------------
class NetworkMethod(ContinualMethod):
    """One plain target network trained on the tasks in sequence: the ``finetune`` baseline.

    Subclasses add a penalty (:meth:`penalty`) and consolidation (:meth:`end_task`), or a new
    network per task (:class:`IndependentMethod`).
    """

    name = "finetune"
    #: when True, :meth:`observe_step` receives each step's task-loss gradients and updates
    track_path = False
    #: True where every network answers one task only (then one output head is enough)
    one_task_per_network = False

    def __init__(
        self,
        target_config: MLPConfig | ResNetConfig,
        config: TrainConfig,
        options: BaselineOptions | None = None,
    ) -> None:
        if self.one_task_per_network:
            target_config = target_config.model_copy(update={"num_heads": 1})
        self.target_config = target_config
        self.config = config
        self.device = resolve_device(config.device)
        self.options = BaselineOptions.build(options)
        self.net: TargetNet | None = None
        self.nets: dict[str, TargetNet] = {}  # task -> the network that answers it
        self.heads: dict[str, int] = {}
        self.classes: dict[str, int] = {}
        self.seen_classes = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self._current: tuple[int, int] = (0, 0)  # (head, classes) of the task being learned
        self.generator = torch.Generator()  # outliers (training.outliers), seeded per task
        self.outliers = make_outlier_maker(config, target_config.input_shape, self.generator)

    # -- parameters ------------------------------------------------------------------------
    def new_network(self, index: int) -> TargetNet:
        """A freshly initialized target (seeded by the run's seed and ``index``)."""
        torch.manual_seed(task_seed(self.config.seed, 2_000 + index))
        return build_target(self.target_config).to(self.device)  # seeded init on the CPU

    @property
    def params(self) -> list[torch.nn.Parameter]:
        if self.net is None:
            raise RuntimeError("begin_task() must be called first")
        return list(self.net.parameters())

    @property
    def n_stored_params(self) -> int:
        """Parameters kept to answer every task learned so far."""
        unique = {id(n): n for n in self.nets.values()}
        return sum(n.n_params for n in unique.values())

    # -- the ContinualMethod interface -----------------------------------------------------
    def begin_task(self, index: int, task: TaskData) -> None:
        cfg = self.target_config
        if task.input_shape != tuple(cfg.input_shape):
            raise InputError(
                f"task {task.name!r} has inputs shaped {list(task.input_shape)}, the network "
                f"takes {list(cfg.input_shape)}"
            )
        if task.num_classes > cfg.num_classes:
            raise InputError(
                f"task {task.name!r} has {task.num_classes} classes, the network outputs "
                f"{cfg.num_classes}"
            )
        if task.name in self.nets:
            raise InputError(f"task {task.name!r} was already learned")
        if self.net is None:
            self.net = self.new_network(index)
            if cfg.input_norm != "none":  # a network of its own: this task's statistics
                mean, std = fit_norm(task.x_train, cfg.input_norm, tuple(cfg.input_shape))
                self.net.input_mean.copy_(torch.from_numpy(mean))
                self.net.input_std.copy_(torch.from_numpy(std))
        head = 0
        if cfg.num_heads > 1:
            head = len(self.heads)
            if head >= cfg.num_heads:
                raise InputError(
                    f"all {cfg.num_heads} output heads are used; task {task.name!r} needs more"
                )
        self._current = (head, task.num_classes)
        self.generator.manual_seed(task_seed(self.config.seed, 4_000 + index))
        self.nets[task.name] = self.net
        self.heads[task.name] = head
        self.classes[task.name] = task.num_classes
        self.seen_classes = max(self.seen_classes, task.num_classes)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.lr)

    def penalty(self) -> torch.Tensor | None:
        """The regularizer added to the task loss (None: no penalty yet)."""
        return None

    def observe_step(self, task_grads: list[torch.Tensor], before: list[torch.Tensor]) -> None:
        """After an optimizer step: the task-loss gradients and the parameters before it."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        net, opt = self.net, self.optimizer
        if net is None or opt is None:
            raise RuntimeError("begin_task() must be called before train_step()")
        head, classes = self._current
        net.train()
        try:
            logits = net(x, head=head)[:, :classes]  # (B, classes)
            loss = F.cross_entropy(logits, y)
        finally:
            net.eval()
        # as for HNET: outliers in eval mode (batch-norm statistics stay the task's own)
        extra = outlier_loss(self.outliers, self.config.outlier_weight, x,
                             lambda xo: net(xo, head=head)[:, :classes])
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = self.params
        task_grads = (
            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
            if self.track_path else []
        )
        reg = self.penalty()
        if reg is not None:
            reg.backward()
        before = [p.detach().clone() for p in params] if self.track_path else []
        opt.step()
        if self.track_path:
            self.observe_step(task_grads, before)
        return StepStats(float(loss.detach()), 0.0 if reg is None else float(reg.detach()))

    def end_task(self, index: int, task: TaskData) -> None:
        self.optimizer = None

    def predictor(self, task_name: str) -> Predict:
        if task_name not in self.nets:
            raise InputError(f"task {task_name!r} has not been learned")
        return _predict(self.nets[task_name], self.heads[task_name], self.output_classes(task_name))

    def output_classes(self, task_name: str) -> int:
        """Outputs a task is evaluated on: its own (multi-head) or every one seen so far."""
        if self.target_config.num_heads > 1:
            return self.classes[task_name]
        return self.seen_classes

    # -- helpers for subclasses ------------------------------------------------------------
    def sample_inputs(self, index: int, task: TaskData, n: int) -> torch.Tensor:
        """Up to ``n`` training inputs of ``task``, chosen with the run's seed."""
        x = task.x_train
        rng = np.random.default_rng(task_seed(self.config.seed, 3_000 + index))
        idx = np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))
        return to_device(torch.from_numpy(np.ascontiguousarray(x[idx])), self.device)


def _predict(net: TargetNet, head: int, classes: int) -> Predict:
    device = next(net.parameters()).device

    def predict(xb: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return net(to_device(xb, device), head=head)[:, :classes]  # (B, classes)

    return predict


class IndependentMethod(NetworkMethod):
    """A fresh network per task: no interference, and T networks to store."""

    name = "independent"
    one_task_per_network = True

    def begin_task(self, index: int, task: TaskData) -> None:
        self.net = None  # the base class builds a new one
        super().begin_task(index, task)

    def output_classes(self, task_name: str) -> int:
        return self.classes[task_name]  # the task's own network


class EWCMethod(NetworkMethod):
    """Online EWC: a decayed running sum of diagonal Fishers, anchored at the last task's end."""

    name = "ewc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self.generator = torch.Generator()

    def penalty(self) -> torch.Tensor | None:
        if self.fisher is None or self.anchor is None or self.options.ewc_lambda == 0:
            return None
        return 0.5 * self.options.ewc_lambda * quadratic_penalty(
            self.params, self.anchor, self.fisher
        )

    def end_task(self, index: int, task: TaskData) -> None:
        super().end_task(index, task)
        head, classes = self._current
        self.generator.manual_seed(task_seed(self.config.seed, 4_000 + index))
        x = self.sample_inputs(index, task, self.options.fisher_samples)
        new = diagonal_fisher(self.net, x, head=head, num_classes=classes,
                              generator=self.generator)
        gamma = self.options.ewc_gamma
        self.fisher = new if self.fisher is None else [
            gamma * old + f for old, f in zip(self.fisher, new)
        ]
        self.anchor = [p.detach().clone() for p in self.params]


class SIMethod(NetworkMethod):
    """Synaptic Intelligence: importance from each parameter's path integral of the task loss."""

    name = "si"
    track_path = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.importance: list[torch.Tensor] | None = None  # Omega
        self.anchor: list[torch.Tensor] | None = None
        self._omega: list[torch.Tensor] = []  # running path integral of the current task
        self._start: list[torch.Tensor] = []

    def begin_task(self, index: int, task: TaskData) -> None:
        super().begin_task(index, task)
        self._start = [p.detach().clone() for p in self.params]
        self._omega = [torch.zeros_like(p) for p in self._start]

    def observe_step(self, task_grads: list[torch.Tensor], before: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for w, g, b, p in zip(self._omega, task_grads, before, self.params):
                w.add_(-g * (p - b))

    def penalty(self) -> torch.Tensor | None:
        if self.importance is None or self.anchor is None or self.options.si_c == 0:
            return None
        return self.options.si_c * quadratic_penalty(self.params, self.anchor, self.importance)

    def end_task(self, index: int, task: TaskData) -> None:
        super().end_task(index, task)
        xi = self.options.si_xi
        with torch.no_grad():
            new = [
                (w / ((p - s).pow(2) + xi)).clamp_min(0)
                for w, p, s in zip(self._omega, self.params, self._start)
            ]
        self.importance = new if self.importance is None else [
            old + n for old, n in zip(self.importance, new)
        ]
        self.anchor = [p.detach().clone() for p in self.params]


_CLASSES: dict[str, type[NetworkMethod]] = {
    "finetune": NetworkMethod,
    "independent": IndependentMethod,
    "ewc": EWCMethod,
    "si": SIMethod,
}


def make_baseline(
    method: str,
    config: TrainConfig,
    tasks: list[TaskData],
    options: BaselineOptions | dict[str, Any] | None = None,
) -> NetworkMethod:
    """A baseline learner sized for ``tasks`` (its options default to the config's)."""
    if method not in _CLASSES:
        raise ConfigError(f"unknown baseline {method!r} (choose from {', '.join(BASELINES)})")
    opts = BaselineOptions.build(options) if options is not None else (
        BaselineOptions.from_config(config)
    )
    # A network per task standardizes with its task's statistics (as the hypernetwork does);
    # one network for several tasks takes the first task's, as constants of the config.
    cls = _CLASSES[method]
    target = target_config_for(config, tasks, checkpoint=False,
                               per_task_norm=cls.one_task_per_network)
    return cls(target, config, opts)


def baseline_factory(method: str) -> Callable[[TrainConfig, list[TaskData], HNetModel | None],
                                      ContinualMethod]:
    def factory(config: TrainConfig, tasks: list[TaskData], model: HNetModel | None
                ) -> ContinualMethod:
        if model is not None:
            raise ConfigError(
                f"method {method!r} trains a plain network and cannot continue a hypernetwork "
                "checkpoint; use --method hnet to add tasks to it"
            )
        return make_baseline(method, config, tasks)

    return factory


# -- one call -------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """A trained baseline: its accuracy matrix and timings (``result``) and its networks."""

    method: str
    options: BaselineOptions
    result: TrainResult
    learner: NetworkMethod

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.result.metrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options.model_dump(),
            "stored_params": self.learner.n_stored_params,
            **self.result.to_dict(),
        }


def train_baseline(
    method: str,
    tasks: list[TaskData],
    config: TrainConfig,
    options: BaselineOptions | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    on_task_end: Callable[[int, TaskData, TrainResult], None] | None = None,
) -> BaselineResult:
    """Train baseline ``method`` on ``tasks`` in order with ``config``'s data settings, steps,
    batch size, learning rate, seed and output layout (``multi_head``)."""
    config = config.model_copy(update={"method": method})
    learner = make_baseline(method, config, tasks, options)
    result = run_tasks(learner, tasks, config, on_task_end=on_task_end, progress=progress)
    return BaselineResult(method, learner.options, result, learner)
