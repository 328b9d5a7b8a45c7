"""The serving runtime: task router, LRU weight cache and backends, usable without BentoML.

``Runtime.predict(task, x)`` routes rows to a task, fetching that task's generated weights (torch
backend) or ONNX Runtime session (onnx backend) from a byte-bounded LRU cache and generating them
on a miss. ``predict(None, x)`` infers the task per row (the paper's HNET+ENT rule, see
:func:`infer_tasks`). ``predict_mixed`` serves a batch whose rows belong to different tasks,
grouped by task, with stacked weights and one batched matmul per layer for MLP targets.

The service (``service.py``) and batch scoring are thin layers over this module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hnet_serve.backends import Group, make_backend, nbytes_estimate, run_generated
from hnet_serve.cache import WeightCache
from hnet_serve.errors import ConfigError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.registry import TaskInfo

MiB = 1024 * 1024
# A batch (or a task inference) over more tasks than this many bytes of weights fetches and runs
# them in steps: the cache bounds the weights it keeps, this bounds the ones alive for one
# request, whatever the number of tasks or concurrent requests (docs/reliability.md).
STEP_BYTES = 64 * MiB
ENV_PREFIX = "HNET_"
CONFIG_ENV = "HNET_CONFIG"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> int:
    """``536870912``, ``"512MiB"``, ``"1.5 GB"`` -> bytes (int)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"byte size must be >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"expected a byte size like 536870912 or '512MiB', got {value!r}")


class ServingConfig(BaseModel):
    """How the runtime (and the service) serves a checkpoint.

    Every field can come from an environment variable ``HNET_<FIELD>`` (upper case; lists are
    comma-separated) or from a YAML/JSON file named by ``HNET_CONFIG``; see
    :meth:`from_env` and docs/serving.md.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = None
    backend: Literal["torch", "onnx"] = "torch"
    cache_bytes: int = Field(default=512 * MiB, ge=0)
    pinned: list[str] = Field(default_factory=list)
    warm: list[str] = Field(default_factory=list)
    max_rows: int = Field(default=4096, gt=0)
    max_request_bytes: int = Field(default=64 * MiB, gt=0)
    intra_op_threads: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, gt=0)

    @field_validator("cache_bytes", "max_request_bytes", mode="before")
    @classmethod
    def _sizes(cls, v: object) -> int:
        return parse_bytes(v)

    @field_validator("pinned", "warm", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @classmethod
    def build(cls, **values: Any) -> ServingConfig:
        """Validate ``values``; errors become :class:`ConfigError` naming the field and value."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "config"
            bad = first.get("input")
            raise ConfigError(f"serving config: {field}={bad!r}: {first['msg']}") from None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServingConfig:
        """Defaults < config file (``HNET_CONFIG``) < ``HNET_*`` variables < ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get(CONFIG_ENV):
            values.update(read_config_file(env[CONFIG_ENV]))
        for field in cls.model_fields:
            raw = env.get(ENV_PREFIX + field.upper())
            if raw is not None and raw != "":
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping of ServingConfig fields (an optional top-level ``serving:`` key)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serving config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
        raise ConfigError(f"serving config file {str(p)!r} is not valid YAML/JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("serving"), dict):
        data = data["serving"]
    if not isinstance(data, dict):
        raise ConfigError(f"serving config file {str(p)!r} must hold a mapping of fields")
    return data


@dataclass
class Prediction:
    """The runtime's answer, the same shape whether the task was given or inferred."""

    tasks: list[str]  # per row (given or inferred)
    predictions: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, C) float32, C = max classes of the tasks involved, 0-padded
    inferred: bool
    confidence: np.ndarray | None = None  # (N,) float32 when inferred

    def to_json(self) -> dict[str, Any]:
        """The service's response body.

        ``task`` is the task's name when one task was given for every row, else a per-row list
        of names; when tasks were inferred, ``inferred`` is true and ``confidence`` is per row.
        """
        single = not self.inferred and len(set(self.tasks)) == 1
        body: dict[str, Any] = {
            "task": self.tasks[0] if single else list(self.tasks),
            "predictions": self.predictions.tolist(),
            "probabilities": self.probabilities.tolist(),
        }
        if self.inferred:
            body["inferred"] = True
            # NaN (rows whose task was given, in a mixed batch) is not JSON: null instead.
            conf = self.confidence if self.confidence is not None else np.full(len(self.tasks), np.nan)
            body["confidence"] = [None if math.isnan(c) else c for c in conf.tolist()]
        return body


# -- task inference (HNET+ENT) ------------------------------------------------------------
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
    conf = 1.0 - ent[np.arange(len(idx)), idx] / max_ent[idx]
    return TaskInference(idx.astype(np.int64), np.clip(conf, 0.0, 1.0).astype(np.float32), ent)


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
    infos = [model.registry.get(n) for n in names]
    x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs
    x = np.ascontiguousarray(x, dtype=np.float32)
    if weights is None:
        with torch.inference_mode():
            weights = model.generate(names)  # (T, n_params), one batched pass
    logits = run_generated(model, list(weights), [Group(i, x) for i in infos])
    return select_by_entropy(logits, temperature), logits


# -- the runtime --------------------------------------------------------------------------
class Runtime:
    """Routes rows to tasks and runs them through a cached backend; thread-safe."""

    def __init__(self, model: HNetModel, config: ServingConfig | None = None) -> None:
        self.model = model
        self.config = config or ServingConfig()
        if len(model.registry) == 0:
            raise ConfigError("the checkpoint holds no tasks to serve")
        for field in ("pinned", "warm"):
            unknown = [n for n in getattr(self.config, field) if n not in model.registry]
            if unknown:
                raise ConfigError(
                    f"serving config: {field} names unknown tasks {unknown} "
                    f"(known: {model.registry.names[:10]})"
                )
        threads = self.config.intra_op_threads
        if threads:
            torch.set_num_threads(threads)
        self.backend = make_backend(self.config.backend, model, threads=threads)
        self.cache: WeightCache[Any] = WeightCache(
            self.backend.build,
            capacity_bytes=self.config.cache_bytes,
            sizeof=self.backend.nbytes,
            pinned=self.config.pinned,
        )
        self._input_shape = tuple(model.target_config.input_shape)
        self._input_size = math.prod(self._input_shape)
        self._step_tasks = max(1, STEP_BYTES // max(1, nbytes_estimate(model)))
        start = list(dict.fromkeys([*self.config.pinned, *self.config.warm]))
        if start:
            self.cache.warm(start)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **config_overrides: Any) -> Runtime:
        from hnet_serve.checkpoint import load_checkpoint

        config = ServingConfig.build(checkpoint=str(path), **config_overrides)
        return cls(load_checkpoint(path), config)

    @property
    def task_names(self) -> list[str]:
        return self.model.registry.names

    def task(self, name: str) -> TaskInfo:
        """The task's registry entry; :class:`UnknownTaskError` naming it if there is none."""
        return self.model.registry.get(name)

    def output_classes(self, task: str | None) -> int:
        """Columns of ``probabilities`` for a request: the task's classes, or with task
        inference the most classes of any task (every task is a candidate)."""
        if task is not None:
            return self.task(task).num_classes
        return max(t.num_classes for t in self.model.registry)

    # -- inputs ------------------------------------------------------------------------------
    def validate_inputs(self, inputs: Any, task: str | None = None) -> np.ndarray:
        """Rows as float32 ``(N, *input_shape)``; :class:`InputError` says what is wrong.

        Accepts a list (or array) of rows, each shaped like the task's input or flattened.
        """
        shape = self.task(task).input_shape if task is not None else self._input_shape
        size = math.prod(shape)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.detach().cpu().numpy()
        if isinstance(inputs, np.ndarray) and inputs.dtype == np.float32:
            arr = inputs
        else:
            ragged = InputError(
                "inputs must be a list of numeric rows of equal length "
                f"(each row shaped {list(shape)} or flat with {size} values)"
            )
            try:
                arr = np.asarray(inputs)
            except (ValueError, TypeError):
                raise ragged from None
            if arr.dtype == object:
                raise ragged
            if arr.dtype.kind not in "iuf":
                raise InputError(f"inputs must be numbers, got {arr.dtype.name} values")
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise InputError("inputs must hold at least one row")
        n = arr.shape[0]
        if n > self.config.max_rows:
            raise InputError(f"too many rows: {n} > max_rows={self.config.max_rows}")
        if arr.shape[1:] != tuple(shape) and arr.shape[1:] != (size,):
            raise InputError(
                f"each row must have shape {list(shape)} (or {size} flat values), "
                f"got rows of shape {list(arr.shape[1:])}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(n, *shape)
        # One float64 reduction: NaN and inf propagate through a sum, and float32 values cannot
        # overflow a float64 sum, so a finite sum means every value is finite.
        if not math.isfinite(float(arr.sum(dtype=np.float64))):
            bad = int(np.argwhere(~np.isfinite(arr.reshape(n, -1)))[0, 0])
            raise InputError(f"inputs hold NaN or inf (first in row {bad}) or overflow float32")
        return arr

    # -- prediction --------------------------------------------------------------------------
    def predict(self, task: str | None, inputs: Any) -> Prediction:
        """Predict every row under ``task``, or infer the task per row when ``task`` is None."""
        if task is None:
            return self._infer(self.validate_inputs(inputs))
        info = self.task(task)
        x = self.validate_inputs(inputs, task)
        entry = self.cache.get(task)
        (logits,) = self.backend.logits([entry], [Group(info, x)])
        probs = softmax(logits)
        return Prediction([task] * x.shape[0], probs.argmax(1), probs, inferred=False)

    def predict_mixed(self, tasks: Sequence[str | None], inputs: Any) -> Prediction:
        """Row ``i`` under ``tasks[i]`` (None: inferred); rows are grouped by task.

        ``inferred`` is True when any row's task was inferred; ``confidence`` is then set for
        those rows and NaN for rows whose task was given.
        """
        x = self.validate_inputs(inputs)
        n = x.shape[0]
        if len(tasks) != n:
            raise InputError(f"{len(tasks)} task names for {n} rows")
        # group rows by task: one code per distinct task (first-seen order), then a stable sort
        code_of: dict[str | None, int] = {}
        codes = np.fromiter((code_of.setdefault(t, len(code_of)) for t in tasks),
                            dtype=np.int64, count=n)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(code_of) + 1))
        rows_by_task = {t: order[bounds[c] : bounds[c + 1]] for t, c in code_of.items()}
        infos = {t: self.task(t) for t in rows_by_task if t is not None}
        names = [t for t in rows_by_task if t is not None]
        c_max = max((i.num_classes for i in infos.values()), default=0)

        out_tasks = np.empty(n, dtype=object)
        preds = np.zeros(n, dtype=np.int64)
        conf: np.ndarray | None = None
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (row indices, probabilities)
        if names:
            idx = [rows_by_task[t] for t in names]
            groups = [Group(infos[t], x[r] if len(r) < n else x) for t, r in zip(names, idx)]
            logits = self._logits(names, groups)
            for t, r, z in zip(names, idx, logits):
                parts.append((r, softmax(z)))
                out_tasks[r] = t
        if None in rows_by_task:
            r = rows_by_task[None]
            sub = self._infer(x[r] if len(r) < n else x)
            parts.append((r, sub.probabilities))
            conf = np.full(n, np.nan, dtype=np.float32)
            conf[r] = sub.confidence
            out_tasks[r] = sub.tasks
        c_max = max([c_max, *(p.shape[1] for _, p in parts)])
        probs = np.zeros((n, c_max), dtype=np.float32)
        for r, p in parts:
            probs[r, : p.shape[1]] = p
            preds[r] = p.argmax(1)
        return Prediction(out_tasks.tolist(), preds, probs, inferred=conf is not None,
                          confidence=conf)

    def _logits(self, names: list[str], groups: list[Group]) -> list[np.ndarray]:
        """Each group's logits under its task (``names`` unique), in steps of at most
        ``STEP_BYTES`` of weights; each step's missing tasks are generated in one batched call."""
        out: list[np.ndarray] = []
        for i in range(0, len(names), self._step_tasks):
            step = names[i : i + self._step_tasks]
            entries = self.cache.get_many(step)
            out += self.backend.logits([entries[t] for t in step], groups[i : i + len(step)])
            del entries  # released before the next step is generated
        return out

    def _infer(self, x: np.ndarray) -> Prediction:
        """HNET+ENT over every task, with the candidates' weights/sessions from the cache."""
        names = self.task_names
        infos = [self.task(t) for t in names]
        logits = self._logits(names, [Group(i, x) for i in infos])
        choice = select_by_entropy(logits, self.config.temperature)
        c_max = self.output_classes(None)
        probs = np.zeros((x.shape[0], c_max), dtype=np.float32)
        for t, z in enumerate(logits):
            rows = np.flatnonzero(choice.task_index == t)
            if rows.size:
                probs[rows, : z.shape[1]] = softmax(z[rows])
        return Prediction(
            [names[t] for t in choice.task_index],
            probs.argmax(1),
            probs,
            inferred=True,
            confidence=choice.confidence,
        )

    def info(self) -> dict[str, Any]:
        """Tasks (with whether each is cached) and cache statistics, for ``GET /tasks``."""
        cached = set(self.cache.keys())
        pinned = set(self.cache.pinned)
        return {
            "backend": self.backend.name,
            "tasks": [
                {
                    "name": t.name,
                    "input_shape": list(t.input_shape),
                    "num_classes": t.num_classes,
                    "label_names": t.label_names,
                    "cached": t.name in cached,
                    "pinned": t.name in pinned,
                }
                for t in self.model.registry
            ],
            "cache": self.cache.stats(),
        }
