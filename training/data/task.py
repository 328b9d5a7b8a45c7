"""A task's data: :class:`TaskData` (train/test arrays, label names, provenance) and the
checks every reader applies to inputs and labels."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from hnet_serve.errors import InputError
from hnet_serve.registry import validate_task_name

BENCHMARKS = ("permuted-mnist", "split-mnist", "split-cifar", "custom")


DATASETS = ("mnist5k", "fashion-mnist", "idx-dir", "cifar")


FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


# Upper bound on one array a reader will allocate (EMNIST-byclass is ~550 MB as uint8).
MAX_ARRAY_BYTES = 4 << 30


CIFAR_IMAGE_BYTES = 3 * 32 * 32


MAX_CLASSES = 100_000  # as the target configs allow


MAX_CSV_BYTES = 256 << 20  # parsed into Python lists first: keep it bounded


FASHION_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class DataError(InputError):
    """A data file or data set that is missing, malformed or inconsistent."""


class Permute:
    """Feature permutation of flat inputs: ``(N, D)`` -> ``(N, D)``."""

    def __init__(self, perm: np.ndarray) -> None:
        self.perm = np.asarray(perm, dtype=np.int64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, self.perm])


class TaskData:
    """One task: train/test arrays (float32 inputs, int64 labels) and what the labels mean.

    ``x_train``/``x_test`` are computed on access when a ``transform`` is given (the shared base
    arrays are never modified); read them once per use, not once per batch.
    """

    def __init__(
        self,
        name: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        *,
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.name = validate_task_name(name)
        self._x_train, self._x_test = x_train, x_test
        self.y_train = check_labels(y_train, f"{name}: y_train")
        self.y_test = check_labels(y_test, f"{name}: y_test")
        for split, x, y in (("train", x_train, self.y_train), ("test", x_test, self.y_test)):
            if x.dtype != np.float32:
                raise DataError(f"{name}: x_{split} must be float32, got {x.dtype}")
            if x.ndim < 2 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{name}: x_{split} {x.shape} and y_{split} {y.shape} do not match"
                )
            if x.shape[0] == 0:
                raise DataError(f"{name}: the {split} split is empty")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(
                f"{name}: train inputs {x_train.shape[1:]} and test inputs {x_test.shape[1:]} "
                "have different shapes"
            )
        seen = int(max(self.y_train.max(), self.y_test.max())) + 1
        if max(seen, num_classes or 0) > MAX_CLASSES:
            raise DataError(f"{name}: {max(seen, num_classes or 0)} classes (at most {MAX_CLASSES})")
        self.num_classes = int(num_classes or seen)
        if seen > self.num_classes:
            raise DataError(f"{name}: label {seen - 1} >= num_classes {self.num_classes}")
        self.label_names = list(label_names or [str(i) for i in range(self.num_classes)])
        if len(self.label_names) != self.num_classes:
            raise DataError(
                f"{name}: {len(self.label_names)} label names for {self.num_classes} classes"
            )
        self.transform = transform
        self.source = dict(source or {})

    @property
    def x_train(self) -> np.ndarray:
        return self.transform(self._x_train) if self.transform else self._x_train

    @property
    def x_test(self) -> np.ndarray:
        return self.transform(self._x_test) if self.transform else self._x_test

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._x_train.shape[1:])

    def with_test_rows(self, n: int) -> TaskData:
        """The same task with its test split cut to the first ``n`` examples (a cheaper
        evaluation, e.g. after every task of a long run); arrays are shared, not copied."""
        if n <= 0:
            raise DataError(f"{self.name}: with_test_rows needs n > 0, got {n}")
        view = copy.copy(self)
        view._x_test = self._x_test[:n]  # the transform still applies on access
        view.y_test = self.y_test[:n]
        return view

    def check_trainable(self, min_rows: int, min_classes: int) -> None:
        """Refuse a task too small to learn anything: fewer than ``min_rows`` training rows or
        fewer than ``min_classes`` distinct training labels. A one-class task scores accuracy
        1.0 and, being certain of everything, wins the lowest-entropy task inference for almost
        every input (issue 14: correct inference fell from 39.5 % to 0.5 %)."""
        where = f" ({self.source['path']})" if self.source.get("path") else ""
        rows = len(self.y_train)
        if rows < min_rows:
            raise DataError(f"task {self.name!r}{where}: {rows} training rows, fewer than the "
                            f"minimum {min_rows} (--min-task-rows)")
        classes = np.unique(self.y_train)
        if len(classes) < min_classes:
            raise DataError(
                f"task {self.name!r}{where}: its training labels hold {len(classes)} class(es) "
                f"{classes[:10].tolist()}, fewer than the minimum {min_classes} "
                "(--min-task-classes); a task that knows one answer captures task inference")

    def __repr__(self) -> str:
        return (
            f"TaskData({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input={self.input_shape}, classes={self.num_classes})"
        )


def check_labels(y: np.ndarray, what: str, *, allow_negative: bool = False) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {y.shape}")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y)))
        and bool(np.all(y == np.round(y)))
    )
    if y.size and not integral:
        raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if y.size and np.abs(y).max() >= 2**31:
        raise DataError(f"{what}: label {y.max()} is out of range")
    y = y.astype(np.int64)
    if y.size and y.min() < 0 and not allow_negative:
        raise DataError(f"{what}: labels must be >= 0, got {int(y.min())}")
    return y


def encode_labels(
    y_train: np.ndarray, y_test: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Class indices ``0..C-1`` and the class names for any labels a user's file holds.

    Integer labels that already are ``0..C-1`` stay as they are (names ``None``: the default
    ``"0"..``). Any other labels (class names as strings, integers such as 5..9, numbers
    written as text) become indices in sorted order, named by their value: ``["5", ..., "9"]``
    or ``["cat", "dog"]``.
    """
    both = np.concatenate([np.asarray(y_train).reshape(-1), np.asarray(y_test).reshape(-1)])
    if both.dtype.kind in "US":
        values = np.char.strip(both.astype(str))
        if all(_is_int(v) for v in np.unique(values)):
            both = values.astype(np.float64)  # numbers written as text
        else:
            if (values == "").any():
                raise DataError(f"{what}: a label is empty")
            names, idx = np.unique(values, return_inverse=True)
            n = len(y_train)
            return idx[:n].astype(np.int64), idx[n:].astype(np.int64), [str(s) for s in names]
    ytr = check_labels(both[: len(y_train)], what, allow_negative=True)
    yte = check_labels(both[len(y_train):], what, allow_negative=True)
    uniq = np.unique(np.concatenate([ytr, yte]))
    if uniq.size and (uniq[0] != 0 or uniq[-1] != uniq.size - 1):
        mapping = {int(v): i for i, v in enumerate(uniq)}
        remap = np.vectorize(mapping.__getitem__, otypes=[np.int64])
        return remap(ytr), remap(yte), [str(int(v)) for v in uniq]
    return ytr, yte, None


def _is_int(v: str) -> bool:
    try:
        return float(v) == int(float(v))
    except (ValueError, OverflowError):
        return False


def check_inputs(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{what}: inputs must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.ndim < 2:
        raise DataError(f"{what}: inputs must be (rows, features...), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: inputs hold NaN or inf values")
    return x
