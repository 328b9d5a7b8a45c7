"""The serving runtime: task router, LRU weight cache and backends, usable without BentoML.

``Runtime.predict(task, x)`` routes rows to a task, fetching that task's generated weights (torch
backend) or ONNX Runtime session (onnx backend) from a byte-bounded LRU cache and generating them
on a miss. ``predict(None, x)`` infers the task per row (the paper's HNET+ENT rule, see
:mod:`hnet_serve.task_inference`). ``predict_mixed`` serves a batch whose rows belong to different tasks,
grouped by task (stacked weights and one batched matmul per layer for small MLP targets, one
call per task group otherwise; see ``backends``).

The service (``service.py``) and batch scoring are thin layers over this module.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hnet_serve.devices import resolve_device, resolve_dtype
from hnet_serve.errors import ConfigError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.registry import TaskInfo
from hnet_serve.serving.backends import Group, make_backend, nbytes_estimate
from hnet_serve.serving.cache import WeightCache
from hnet_serve.serving.config import MiB, ServingConfig
from hnet_serve.task_inference import select_by_entropy, softmax

# A batch (or a task inference) over more tasks than this many bytes of weights fetches and runs
# them in steps: the cache bounds the weights it keeps, this bounds the ones alive for one
# request, whatever the number of tasks or concurrent requests (docs/reliability.md).
STEP_BYTES = 64 * MiB
# Inputs of at most this many values are checked for NaN/inf with np.isfinite (no floating-point
# state to save and restore); larger ones with one dot product (see validate_inputs).
_SMALL_VALUES = 1 << 16
_FLOAT32 = np.dtype(np.float32)

@dataclass
class Prediction:
    """The runtime's answer, the same shape whether the task was given or inferred."""

    tasks: list[str]  # per row (given or inferred)
    predictions: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, C) float32, C = max classes of the tasks involved, 0-padded
    inferred: bool
    confidence: np.ndarray | None = None  # (N,) float32 when inferred
    labels: list[str] = field(default_factory=list)  # (N,) the predicted class's name
    # (N, T) every candidate task's confidence for inferred rows (NaN for given tasks), T the
    # runtime's inference_tasks; what top_tasks and abstention are decided from
    task_confidence: np.ndarray | None = None
    abstained: np.ndarray | None = None  # (N,) bool, after Runtime.decide()
    top_tasks: list[list[dict[str, Any]] | None] | None = None  # (N,) after Runtime.decide()

    def to_json(self) -> dict[str, Any]:
        """The service's response body.

        ``task`` is the task's name when one task was given for every row, else a per-row list
        of names; when tasks were inferred, ``inferred`` is true and ``confidence`` is per row.
        """
        single = not self.inferred and len(set(self.tasks)) == 1
        body: dict[str, Any] = {
            "task": self.tasks[0] if single else list(self.tasks),
            "predictions": self.predictions.tolist(),
            "labels": list(self.labels),
            "probabilities": self.probabilities.tolist(),
        }
        if self.inferred:
            body["inferred"] = True
            # NaN (rows whose task was given, in a mixed batch) is not JSON: null instead.
            conf = self.confidence if self.confidence is not None else np.full(len(self.tasks), np.nan)
            body["confidence"] = [None if math.isnan(c) else c for c in conf.tolist()]
            if self.abstained is not None:
                body["abstained"] = self.abstained.tolist()
                for key in ("predictions", "labels", "probabilities"):  # no guess where abstained
                    body[key] = [None if a else v for a, v in zip(self.abstained, body[key])]
            if self.top_tasks is not None:
                body["top_tasks"] = self.top_tasks
        return body


def _refuse_booleans(inputs: Any, arr: np.ndarray) -> None:
    """:class:`InputError` if the nested lists ``inputs`` hold a boolean anywhere.

    numpy turns ``[true, 0.5]`` into ``[1.0, 0.5]``: a boolean mixed with numbers would be
    served as a number. Only rows holding an exact 0 or 1 can hide one, so only they are walked
    in Python (a 4096 x 784 request of such rows: about 0.1 s, the cost of np.asarray).
    """
    if not isinstance(inputs, list):
        return  # an array: numpy already gave the booleans away in its dtype
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    suspects = np.flatnonzero(((flat == 0) | (flat == 1)).any(axis=1))
    for i in suspects.tolist():
        level = [inputs[i]]
        for _ in range(arr.ndim - 1):
            level = list(itertools.chain.from_iterable(level))
        if bool in set(map(type, level)):
            raise InputError(f"inputs must be numbers, got a boolean in row {i}")


def _as_array(inputs: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``inputs`` (nested lists, a tensor, an array of any numeric dtype) as a numeric array;
    :class:`InputError` for ragged rows, non-numbers and booleans (shapes are checked later)."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu().numpy()
    try:
        arr = np.asarray(inputs)  # an array subclass (np.matrix, ...) as a plain ndarray view
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype == object:
        raise InputError(
            "inputs must be a list of numeric rows of equal length "
            f"(each row shaped {list(shape)} or flat with {math.prod(shape)} values)"
        )
    if arr.dtype.kind not in "iuf":
        raise InputError(f"inputs must be numbers, got {arr.dtype.name} values")
    if arr.ndim > 0:
        _refuse_booleans(inputs, arr)
    return arr


# -- the runtime --------------------------------------------------------------------------
class Runtime:
    """Routes rows to tasks and runs them through a cached backend; thread-safe."""

    def __init__(self, model: HNetModel, config: ServingConfig | None = None) -> None:
        self.model = model
        self.config = config or ServingConfig()
        if len(model.registry) == 0:
            raise ConfigError("the checkpoint holds no tasks to serve")
        for setting in ("pinned", "warm", "exclude_from_inference"):
            unknown = [n for n in getattr(self.config, setting) if n not in model.registry]
            if unknown:
                raise ConfigError(
                    f"serving config: {setting} names unknown tasks {unknown} "
                    f"(known: {model.registry.names[:10]})"
                )
        excluded = set(self.config.exclude_from_inference)
        # The tasks task inference chooses among; excluded ones are still served by name.
        self.inference_tasks = [n for n in model.registry.names if n not in excluded]
        if not self.inference_tasks:
            raise ConfigError(
                "serving config: exclude_from_inference names every task: task inference "
                "would have no candidate"
            )
        threads = self.config.intra_op_threads
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.cache_dtype)
        model.to(self.device)
        self.backend = make_backend(self.config.backend, model, threads=threads,
                                    dtype=self.dtype, device=self.device,
                                    onnx_softmax=self.config.onnx_softmax)
        self.cache: WeightCache[Any] = WeightCache(
            self.backend.build,
            capacity_bytes=self.config.cache_bytes,
            sizeof=self.backend.nbytes,
            pinned=self.config.pinned,
        )
        self._input_shape = tuple(model.target_config.input_shape)
        # log C_t of every inference candidate: turns confidences back into entropies (decide)
        self._log_classes = np.log([max(self.task(t).num_classes, 2)
                                    for t in self.inference_tasks])  # (T,)
        self._class_names = {
            t.name: t.label_names or [str(i) for i in range(t.num_classes)] for t in model.registry
        }
        # read for every request body's bounds (http.BodyBounds): once, not per request
        self._input_shapes = list(dict.fromkeys(tuple(t.input_shape) for t in model.registry))
        self._input_size = math.prod(self._input_shape)
        self._step_tasks = max(1, STEP_BYTES // max(1, nbytes_estimate(model, self.dtype)))
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

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The distinct input shapes of the tasks (what a request's rows may be shaped as)."""
        return list(self._input_shapes)

    def task(self, name: str) -> TaskInfo:
        """The task's registry entry; :class:`UnknownTaskError` naming it if there is none."""
        return self.model.registry.get(name)

    def output_classes(self, task: str | None) -> int:
        """Columns of ``probabilities`` for a request: the task's classes, or with task
        inference the most classes of any candidate task (``inference_tasks``)."""
        if task is not None:
            return self.task(task).num_classes
        return max(self.task(t).num_classes for t in self.inference_tasks)

    # -- inputs ------------------------------------------------------------------------------
    def validate_inputs(self, inputs: Any, task: str | None = None) -> np.ndarray:
        """Rows as float32 ``(N, *input_shape)``; :class:`InputError` says what is wrong.

        Accepts a list (or array) of rows, each shaped like the task's input or flattened.
        """
        shape = self.task(task).input_shape if task is not None else self._input_shape
        return self._validate(inputs, shape)

    def _validate(self, inputs: Any, shape: tuple[int, ...]) -> np.ndarray:
        # A float32 array (what in-process callers and the service's decoders hand in) goes
        # straight to the shape and finiteness checks: at batch 1 every attribute lookup and
        # numpy call here is a visible share of the request (docs/benchmarks.md, "Serving").
        if type(inputs) is np.ndarray and inputs.dtype is _FLOAT32:
            arr = inputs
        else:
            arr = _as_array(inputs, shape)
        dims = arr.shape
        n = dims[0] if dims else 0
        if n == 0:
            raise InputError("inputs must hold at least one row")
        if n > self.config.max_rows:
            raise InputError(f"too many rows: {n} > max_rows={self.config.max_rows}")
        row = dims[1:]
        if row != shape:
            size = math.prod(shape)
            if row != (size,):
                raise InputError(
                    f"each row must have shape {list(shape)} (or {size} flat values), "
                    f"got rows of shape {list(row)}"
                )
            arr = arr.reshape(n, *shape)
        if arr.dtype is not _FLOAT32 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.size <= _SMALL_VALUES:  # a request: one pass, no temporaries worth avoiding
            # argmin (C code) finds the first False, if any; .all() goes through a Python
            # wrapper: 2.0 vs 4.0 us at batch 1 right after a run has emptied the CPU caches
            finite_each = np.isfinite(arr)
            finite = finite_each.item(finite_each.argmin())
        else:
            flat = arr.reshape(-1)  # a view: arr is contiguous
            # One BLAS dot product of the rows with themselves: a sum of squares has no
            # negative terms, so NaN and inf cannot cancel and a finite result means every
            # value is finite (8x cheaper than a float64 sum on 2 MiB slices). Squares above
            # float32's range only send the rows to the exact check below.
            with np.errstate(over="ignore", invalid="ignore"):  # decided below, never a warning
                finite = math.isfinite(float(np.dot(flat, flat)))
        if not finite:
            nonfinite = np.argwhere(~np.isfinite(arr.reshape(n, -1)))
            if len(nonfinite):
                raise InputError(f"inputs hold NaN or inf (first in row {int(nonfinite[0, 0])}) "
                                 "or overflow float32")
        return arr

    # -- prediction --------------------------------------------------------------------------
    def predict(self, task: str | None, inputs: Any, *, validated: bool = False) -> Prediction:
        """Predict every row under ``task``, or infer the task per row when ``task`` is None.

        ``validated``: ``inputs`` is what :meth:`validate_inputs` returned for this task (the
        service validates before queueing a request; the rows are not checked twice)."""
        if task is None:
            return self._infer(inputs if validated else self.validate_inputs(inputs))
        info = self.task(task)
        x = inputs if validated else self._validate(inputs, info.input_shape)
        logits, probs = self.backend.output(self.cache.get(task), Group(info, x))
        # argmax of the logits, not of the rounded probabilities: near-ties stay decided alike
        # on every path (batch scoring never computes probabilities it does not write)
        preds = logits.argmax(1)
        return Prediction([task] * len(x), preds, probs, inferred=False,
                          labels=list(map(self._class_names[task].__getitem__, preds.tolist())))

    def task_logits(self, task: str, inputs: Any, *, validated: bool = False) -> np.ndarray:
        """Raw logits ``(N, C_task)`` of every row under ``task``: :meth:`predict` without the
        softmax and labels (batch scoring takes the argmax and computes probabilities only
        when it writes them)."""
        info = self.task(task)
        x = inputs if validated else self.validate_inputs(inputs, task)
        (logits,) = self.backend.logits([self.cache.get(task)], [Group(info, x)])
        return logits

    def predict_mixed(self, tasks: Sequence[str | None], inputs: Any, *,
                      validated: bool = False) -> Prediction:
        """Row ``i`` under ``tasks[i]`` (None: inferred); rows are grouped by task.

        ``inferred`` is True when any row's task was inferred; ``confidence`` is then set for
        those rows and NaN for rows whose task was given. ``validated`` as in :meth:`predict`.
        """
        x = inputs if validated else self.validate_inputs(inputs)
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
            # probabilities as predict() computes them (a request answers the same whether
            # the batcher ran it alone or with others)
            outputs = self._logits(names, groups, probabilities=True)
            for t, r, (z, p) in zip(names, idx, outputs):
                parts.append((r, p))
                preds[r] = z.argmax(1)
                out_tasks[r] = t
        if None in rows_by_task:
            r = rows_by_task[None]
            sub = self._infer(x[r] if len(r) < n else x)
            parts.append((r, sub.probabilities))
            preds[r] = sub.predictions
            conf = np.full(n, np.nan, dtype=np.float32)
            conf[r] = sub.confidence
            every = np.full((n, len(self.inference_tasks)), np.nan, dtype=np.float32)
            every[r] = sub.task_confidence
            out_tasks[r] = sub.tasks
        c_max = max([c_max, *(p.shape[1] for _, p in parts)])
        probs = np.zeros((n, c_max), dtype=np.float32)
        for r, p in parts:
            probs[r, : p.shape[1]] = p
        tasks_out = out_tasks.tolist()
        return Prediction(tasks_out, preds, probs, inferred=conf is not None, confidence=conf,
                          labels=self.labels_of(tasks_out, preds),
                          task_confidence=every if conf is not None else None)

    def _logits(self, names: list[str], groups: list[Group], *, probabilities: bool = False
                ) -> list[Any]:
        """Each group's logits under its task (``names`` unique), in steps of at most
        ``STEP_BYTES`` of weights; each step's missing tasks are generated in one batched call.
        ``probabilities``: each group's ``(logits, probabilities)`` (``backend.outputs``)."""
        run = self.backend.outputs if probabilities else self.backend.logits
        out: list[Any] = []
        for i in range(0, len(names), self._step_tasks):
            step = names[i : i + self._step_tasks]
            entries = self.cache.get_many(step)
            out += run([entries[t] for t in step], groups[i : i + len(step)])
            del entries  # released before the next step is generated
        return out

    def _infer(self, x: np.ndarray) -> Prediction:
        """HNET+ENT over every task, with the candidates' weights/sessions from the cache."""
        names = self.inference_tasks
        infos = [self.task(t) for t in names]
        logits = self._logits(names, [Group(i, x) for i in infos])
        choice = select_by_entropy(logits, self.config.temperature)
        c_max = self.output_classes(None)
        probs = np.zeros((x.shape[0], c_max), dtype=np.float32)
        preds = np.zeros(x.shape[0], dtype=np.int64)
        for t, z in enumerate(logits):
            rows = np.flatnonzero(choice.task_index == t)
            if rows.size:
                probs[rows, : z.shape[1]] = softmax(z[rows])
                preds[rows] = z[rows].argmax(1)
        tasks = [names[t] for t in choice.task_index]
        return Prediction(tasks, preds, probs, inferred=True, confidence=choice.confidence,
                          labels=self.labels_of(tasks, preds),
                          task_confidence=choice.confidences)

    def decide(self, pred: Prediction, *, min_confidence: float = 0.0, top_k: int = 0
               ) -> Prediction:
        """Honest task inference for ``pred``'s inferred rows: those whose confidence is below
        ``min_confidence`` abstain (their task is None: no guess), and each inferred row lists
        its ``top_k`` most likely tasks with their confidence. Rows whose task was given are
        left as they are (``None`` in both)."""
        if not pred.inferred or pred.task_confidence is None:
            return pred
        conf = pred.confidence if pred.confidence is not None else np.ones(len(pred.tasks))
        inferred = ~np.isnan(conf)
        abstained = inferred & (conf < min_confidence)
        tasks = [None if a else t for a, t in zip(abstained.tolist(), pred.tasks)]
        top = None
        if top_k > 0:
            names = self.inference_tasks
            # Ranked as they were chosen, by entropy H = (1 - confidence) log C_t (confidence is
            # H normalized by each task's own maximum, so it alone can rank differently).
            entropy = np.nan_to_num((1.0 - pred.task_confidence) * self._log_classes, nan=np.inf)
            best = np.argsort(entropy, axis=1, kind="stable")[:, :top_k]
            top = [[{"task": names[j], "confidence": float(pred.task_confidence[i, j])}
                    for j in best[i]] if inferred[i] else None for i in range(len(tasks))]
        return dataclasses.replace(pred, tasks=tasks, abstained=abstained, top_tasks=top)

    def labels_of(self, tasks: Sequence[str], predictions: np.ndarray) -> list[str]:
        """The name of each row's predicted class under its task (``"3"`` without names)."""
        names = self._class_names
        return [names[t][p] for t, p in zip(tasks, predictions.tolist(), strict=True)]

    def info(self) -> dict[str, Any]:
        """Tasks (with whether each is cached) and cache statistics, for ``GET /tasks``."""
        cached = set(self.cache.keys())
        pinned = set(self.cache.pinned)
        return {
            "backend": self.backend.name,
            "device": str(self.device),
            "cache_dtype": self.config.cache_dtype,
            "tasks": [
                {**t.summary(), "cached": t.name in cached, "pinned": t.name in pinned}
                for t in self.model.registry
            ],
            "cache": self.cache.stats(),
        }
