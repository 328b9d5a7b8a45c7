"""The paper's method: a task-conditioned hypernetwork, a new embedding per task and the output
regularizer on every old task (:class:`HNetMethod`), and the model it trains (:func:`build_model`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from hnet_serve.devices import resolve_device
from hnet_serve.errors import ConfigError, InputError
from hnet_serve.hypernet import HypernetConfig, factor_counts
from hnet_serve.model import HNetModel
from hnet_serve.normalization import MEAN, fit_norm, resolve_mode
from hnet_serve.sizing import derive_hypernet
from hnet_serve.targets import MLPConfig, ResNetConfig, build_target
from hnet_serve.training.config import REG_PAIRS_TASKS, TrainConfig
from hnet_serve.training.data import TaskData, input_stats
from hnet_serve.training.evaluate import Predict, predictor
from hnet_serve.training.methods.base import ContinualMethod, StepStats, task_seed
from hnet_serve.training.outliers import make_outlier_maker, outlier_loss
from hnet_serve.training.regularizer import Snapshot, make_snapshot, output_regularizer


def target_config_for(config: TrainConfig, tasks: list[TaskData], *, checkpoint: bool = True,
                      per_task_norm: bool | None = None) -> MLPConfig | ResNetConfig:
    """The target network for ``tasks``: ``config.target``'s architecture; input shape, classes,
    heads from the data.

    ``checkpoint`` (the hypernetwork's servable model): the output width reserves room for
    tasks added later (``max_classes``, default max(10, the largest task's classes)),
    multi-head targets reserve heads likewise (``num_heads``, default max(10, the tasks)), and
    each task's inputs are normalized with its own statistics (``config.normalize``). The
    baselines (never extended) get exactly the run's classes and heads, and, unless
    ``per_task_norm`` (one network per task), the first task's statistics as constants of the
    config (one network answers every task)."""
    if not tasks:
        raise InputError("no tasks to train")
    shape = tasks[0].input_shape
    for t in tasks[1:]:
        if t.input_shape != shape:
            raise InputError(
                f"all tasks need the same input shape: {tasks[0].name!r} has {list(shape)}, "
                f"{t.name!r} has {list(t.input_shape)}"
            )
    largest = max(t.num_classes for t in tasks)
    if config.max_classes is not None and config.max_classes < largest:
        big = next(t for t in tasks if t.num_classes == largest)
        raise ConfigError(f"--max-classes {config.max_classes} is below task {big.name!r}'s "
                          f"{largest} classes")
    reserve = RESERVED_MIN if checkpoint else 0
    classes = config.max_classes or max(reserve, largest)
    heads = (config.num_heads or max(reserve, len(tasks))) if config.multi_head else 1
    if checkpoint if per_task_norm is None else per_task_norm:
        # the built-in benchmarks are images, flattened or not; custom flat data is tabular
        image = config.benchmark != "custom"
        norm = {"input_norm": resolve_mode(config.normalize, shape, image=image)}
    else:
        mean, std = input_stats(tasks[0])
        norm = {"input_mean": mean, "input_std": std}
    try:
        return config.target.build(input_shape=shape, num_classes=classes, num_heads=heads,
                                   **norm)
    except ValidationError as exc:
        raise ConfigError(f"target network does not fit the data: {exc.errors()[0]['msg']}") from None


# The least output width (and head count) a new checkpoint reserves for tasks added later.
RESERVED_MIN = 10
# adapter_rank "auto": the share of the stored-size budget that goes to the tasks' private
# first-layer corrections, the largest rank, and the least: a lower one is left out and the
# budget goes to the hypernetwork (docs/reproduction.md, "Capacity": at MLP 100-100 on Permuted
# Fashion-MNIST-10, ranks 4-8 cost up to 1.8 points; a private rank-4 first layer learns a task
# to 81 %, rank 8 to 84 %, full rank 86 %).
# The rank is also at most half the matrix's smaller side (the factors cost less than the
# matrix itself).
ADAPTER_SHARE = 0.5
ADAPTER_MAX_RANK = 64
ADAPTER_MIN_RANK = 8


def hypernet_config_for(config: TrainConfig, target: MLPConfig | ResNetConfig,
                        num_tasks: int) -> HypernetConfig:
    """``config.hypernet``, with its chunk size derived from ``config.compression`` for
    ``config.planned_tasks`` (default ``num_tasks``) tasks unless a chunk size was given (or
    the hypernetwork is not a flat chunked one): the stored size stays within that fraction of
    one ``target`` network (:func:`~hnet_serve.sizing.derive_hypernet`). An ``adapter_rank``
    of "auto" becomes a number here: with ``adapter_mode`` "replace", the largest rank that
    leaves the generator room for one task's values at full rank (:func:`_replace_rank`);
    otherwise :data:`ADAPTER_SHARE` of the budget when the sizes are derived, else 0."""
    hn = config.hypernet
    with torch.device("meta"):  # only the parameter counts: allocate nothing
        net = build_target(target)
    tasks = config.planned_tasks or num_tasks
    derive = (config.compression is not None and hn.kind == "chunked" and hn.layout == "flat"
              and "chunk_size" not in hn.model_fields_set)
    auto = hn.adapter_rank == "auto"
    if auto and hn.adapter_mode == "replace":
        fit = _replace_rank(config, hn, net, tasks) if derive else None
        if fit is not None:
            return fit
        if derive:
            warnings.warn(f"no private first layer of rank >= {ADAPTER_MIN_RANK} fits "
                          f"{config.compression}x one target network for {tasks} tasks: "
                          "training the generated one (adapter_mode 'add')", stacklevel=2)
        hn = hn.model_copy(update=PLAIN_ADAPTERS)
    per_rank = smallest = 0  # numbers per unit of rank; smallest side of a corrected matrix
    if derive:
        counts = factor_counts(hn, list(net.param_shapes.values()))
        per_rank, smallest = counts.per_task, counts.smallest
    if auto:  # sized with the hypernetwork, or none
        rank = min(ADAPTER_MAX_RANK, smallest // 2, math.floor(
            ADAPTER_SHARE * config.compression * net.n_params / (tasks * per_rank))
        ) if derive else 0
        hn = hn.model_copy(update={"adapter_rank": rank if rank >= ADAPTER_MIN_RANK else 0})
    if hn.adapter_mode == "replace" and not hn.adapter_rank:  # nothing private to replace with
        hn = hn.model_copy(update=PLAIN_ADAPTERS)
    if not derive:
        return hn
    try:
        derived = _derive(config, hn, net, tasks, hn.adapter_rank)
    except InputError as exc:
        if "compression" in config.model_fields_set:
            raise  # asked for: an error, not a larger checkpoint
        # The default cannot be met: a target this small is smaller than any hypernetwork
        # (its embeddings and input layer alone), so it gets one, not compressive, and is told.
        warnings.warn(f"no compressive hypernetwork fits this target: {exc}; training a "
                      "non-compressive one (`hnet-serve info` shows its stored size)",
                      stacklevel=2)
        return hn.model_copy(update={"adapter_rank": 0}) if auto else hn
    return hn.model_copy(update={"chunk_size": derived.chunk_size})


# What an adapter_mode "replace" preset falls back to when no private layer fits its budget.
PLAIN_ADAPTERS = {"adapter_mode": "add", "adapter_basis": "private", "freeze": "never"}


def _derive(config: TrainConfig, hn: HypernetConfig, net: Any, tasks: int, rank: int
            ) -> HypernetConfig:
    """:func:`derive_hypernet` for ``hn`` with factors of ``rank``: each task stores its input
    statistics and factors, the generator covers what the factors do not replace."""
    counts = factor_counts(hn, list(net.param_shapes.values()))
    norm = net.buffer_shapes.get(MEAN)  # each task stores its mean and std
    return derive_hypernet(net.n_params, tasks, config.compression, hidden=hn.hidden,
                           task_emb_dim=hn.task_emb_dim, chunk_emb_dim=hn.chunk_emb_dim,
                           per_task_values=(2 * math.prod(norm) if norm else 0)
                           + rank * counts.per_task,
                           generated=net.n_params - (counts.replaced if rank else 0),
                           shared_values=rank * counts.shared)


def _replace_rank(config: TrainConfig, hn: HypernetConfig, net: Any, tasks: int
                  ) -> HypernetConfig | None:
    """adapter_mode "replace", rank "auto": the largest rank (at least
    :data:`ADAPTER_MIN_RANK`, at most half the matrix's smaller side) whose factors leave the
    generator enough for one task's values at full rank (chunks <= last hidden width + 1, so
    the first task is not learned through a compressed generator); None if none fits."""
    counts = factor_counts(hn, list(net.param_shapes.values()))
    for rank in range(counts.smallest // 2, ADAPTER_MIN_RANK - 1, -1):
        try:
            derived = _derive(config, hn, net, tasks, rank)
        except InputError:
            continue
        if math.ceil((net.n_params - counts.replaced) / derived.chunk_size) <= hn.hidden[-1] + 1:
            return hn.model_copy(update={"adapter_rank": rank, "chunk_size": derived.chunk_size})
    return None


def build_model(config: TrainConfig, tasks: list[TaskData], meta: dict[str, Any] | None = None
                ) -> HNetModel:
    """A fresh (task-less) model sized for ``tasks`` (see :func:`target_config_for` and
    :func:`hypernet_config_for`)."""
    target = target_config_for(config, tasks)
    return HNetModel(target, hypernet_config_for(config, target, len(tasks)), seed=config.seed,
                     meta=meta)


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


def check_room(model: HNetModel, task: TaskData) -> int:
    """The output head ``task`` gets; a one-line error if its classes or a head do not fit."""
    tc = model.target_config
    if task.num_classes > tc.num_classes:
        raise InputError(
            f"{_named(task)} has {task.num_classes} classes but this checkpoint reserves "
            f"{tc.num_classes}: train a new checkpoint with --max-classes {task.num_classes} "
            "(or more)")
    if tc.num_heads == 1:
        return 0
    head = len(model.registry)
    if head >= tc.num_heads:
        raise InputError(
            f"all {tc.num_heads} output heads of this multi-head checkpoint are used: train a "
            f"new one with a larger num_heads (config file) for {_named(task)}")
    return head


def _named(task: TaskData) -> str:
    """``task 'name' (its file)``: what a one-line error about a task starts with."""
    path = task.source.get("path")
    return f"task {task.name!r}" + (f" ({path})" if path else "")


def task_norm(model: HNetModel, task: TaskData) -> tuple[Any, Any] | None:
    """``task``'s own input statistics in the model's mode (None: no per-task normalization)."""
    tc = model.target_config
    if tc.input_norm == "none":
        return None
    try:
        return fit_norm(task.x_train, tc.input_norm, tuple(tc.input_shape))
    except InputError as exc:
        raise InputError(f"{_named(task)}: {exc}") from None


class HNetMethod(ContinualMethod):
    """The paper's method on an :class:`HNetModel` (which may already hold trained tasks)."""

    name = "hnet"

    def __init__(self, model: HNetModel, config: TrainConfig) -> None:
        if config.method_options:
            raise ConfigError(
                f"the hnet method takes no method_options, got {sorted(config.method_options)}"
            )
        if config.train_old_embeddings and model.hypernet_config.adapter_rank:
            raise ConfigError("train_old_embeddings cannot be combined with adapter_rank: the "
                              "regularizer does not cover old tasks' private corrections")
        if config.train_old_embeddings and model.hypernet_config.freeze != "never":
            raise ConfigError("train_old_embeddings cannot be combined with a hypernetwork "
                              "frozen after its first task: old tasks would move unregularized")
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)  # snapshots and regularizer follow the hypernetwork
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
        head = check_room(model, task)
        norm = task_norm(model, task)
        self.generator.manual_seed(task_seed(cfg.seed, 1_000 + len(old)))
        start = (model.hypernet.task_embs[old[-1]].detach().clone()
                 if cfg.emb_init == "previous" and old else None)
        info = model.add_task(task.name, num_classes=task.num_classes,
                              label_names=task.label_names, head=head, generator=self.generator,
                              input_norm=norm, embedding=start)
        hn = model.hypernet
        self.row, self.head, self.num_classes = info.index, head, task.num_classes
        self.buffers = model.task_buffers[task.name] or None
        # freeze "after-first-task": the shared weights stay as the first task left them and
        # only this task's row learns, so no old task can move and no regularizer is needed
        frozen = bool(old) and hn.config.freeze == "after-first-task"
        for p in hn.shared_parameters():
            p.requires_grad_(not frozen)  # (no gradients computed for them: end_task restores)
        if frozen and start is None:  # start from what the generator learned: the first
            with torch.no_grad():  # task's embedding, with fresh private factors
                hn.task_embs[self.row][: hn.code_dim] = hn.task_embs[old[0]][: hn.code_dim]
        self.snapshot = make_snapshot(hn, old) if old and cfg.beta > 0 and not frozen else None
        params = [*([] if frozen else hn.shared_parameters()), hn.task_embs[self.row]]
        if cfg.train_old_embeddings:
            params += [hn.task_embs[j] for j in old]
        self.optimizer = make_adam(params, cfg.lr)
        self._shared = {n: p for n, p in hn.named_parameters() if not n.startswith("task_embs")}

    def _subset(self) -> torch.Tensor | None:
        k = self.snapshot.num_tasks if self.snapshot else 0
        n = self.config.reg_tasks
        if n is None or n == "all" or n >= k:
            return None
        return torch.randperm(k, generator=self.generator)[:n]

    def _chunks(self, tasks: int) -> torch.Tensor | None:
        """A fresh random set of ceil(reg_pairs / tasks) chunks, the same for every old task
        regularized this step (None: every chunk)."""
        n, c = self.config.reg_pairs, self.snapshot.num_chunks if self.snapshot else 0
        if n == "auto":  # the explicit form (the reference) sees every pair
            n = "all" if self.config.reg_method == "explicit" else REG_PAIRS_TASKS * c
        if n == "all" or tasks * c <= n:
            return None
        return torch.randperm(c, generator=self.generator)[:max(1, -(-n // tasks))]

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
            subset = self._subset()
            chunks = self._chunks(self.snapshot.num_tasks if subset is None else len(subset))
            reg = output_regularizer(hn, self.snapshot, embeddings=emb, delta=delta,
                                     subset=subset, chunks=chunks, method=cfg.reg_method)
            (cfg.beta * reg).backward()
            reg_value = reg.item()
        opt.step()
        return StepStats(loss.item(), reg_value)

    def end_task(self, index: int, task: TaskData) -> None:
        for p in self.model.hypernet.shared_parameters():
            p.requires_grad_(True)
        self.snapshot = None
        self.optimizer = None

    def predictor(self, task_name: str) -> Predict:
        return predictor(self.model, task_name)
