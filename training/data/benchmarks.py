"""The benchmark builders: a benchmark is a list of :class:`TaskData`.

Permuted tasks share one base array and apply their permutation when their arrays are read, so
PermutedMNIST-100 does not hold 100 copies of MNIST. Inputs are what the benchmark's own
transform produces (pixels scaled to [0, 1], permuted, padded); further normalization is
recorded in the model (see :func:`input_stats`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hnet_serve.training.data.sources import (
    DataSource,
    load_cifar10,
    load_cifar100,
    load_source,
    load_task_file,
)
from hnet_serve.training.data.task import BENCHMARKS, DataError, Permute, TaskData


def _pad32(x: np.ndarray) -> np.ndarray:
    """Zero-pad (N, 1, H, W) images to 32x32 (the paper pads MNIST 28x28 -> 32x32)."""
    h, w = x.shape[-2:]
    if h > 32 or w > 32:
        raise DataError(f"cannot pad {h}x{w} images to 32x32")
    top, left = (32 - h) // 2, (32 - w) // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(top, 32 - h - top), (left, 32 - w - left)]
    return np.pad(x, pad)


def permuted(
    source: DataSource, tasks: int, seed: int, *, first_identity: bool = True, pad: bool = False,
    benchmark: str = "permuted-mnist",
) -> list[TaskData]:
    """PermutedMNIST-N: task t sees the pixels of every image in its own fixed random order.

    Permutation t depends only on (seed, t), not on the number of tasks, so a benchmark task
    can be added to an existing checkpoint later.
    """
    xtr, xte = source.x_train, source.x_test
    if pad:
        xtr, xte = _pad32(xtr), _pad32(xte)
    xtr = np.ascontiguousarray(xtr.reshape(len(xtr), -1))
    xte = np.ascontiguousarray(xte.reshape(len(xte), -1))
    dim = xtr.shape[1]
    rng = np.random.default_rng(seed)
    out = []
    for t in range(tasks):
        perm = rng.permutation(dim)
        transform = None if (t == 0 and first_identity) else Permute(perm)
        out.append(TaskData(
            f"{benchmark}-{t}", xtr, source.y_train, xte, source.y_test,
            num_classes=len(source.label_names), label_names=source.label_names,
            transform=transform,
        ))
    return out


def split_classes(
    source: DataSource, groups: list[list[int]], benchmark: str, flatten: bool, start: int = 0
) -> list[TaskData]:
    """One task per group of classes, with task-local labels 0..len(group)-1."""
    out = []
    for t, group in enumerate(groups, start=start):
        arrays = []
        for x, y in ((source.x_train, source.y_train), (source.x_test, source.y_test)):
            mask = np.isin(y, group)
            lookup = np.full(max(int(y.max()), *group) + 1, -1, dtype=np.int64)
            lookup[group] = np.arange(len(group))
            xs = x[mask]
            arrays += [xs.reshape(len(xs), -1) if flatten else xs, lookup[y[mask]]]
        out.append(TaskData(
            f"{benchmark}-{t}", *arrays, num_classes=len(group),
            label_names=[source.label_names[c] for c in group],
        ))
    return out


def build_benchmark(
    name: str,
    dataset: str = "mnist5k",
    tasks: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    *,
    pad: bool = False,
    first_identity: bool = True,
    data_files: list[str] | None = None,
    data_names: list[str] | None = None,
) -> list[TaskData]:
    """The tasks of a benchmark, deterministically from ``seed``.

    * ``permuted-mnist``: ``tasks`` permutations (default 10) of any IDX-style data set;
    * ``split-mnist``: 5 tasks of 2 classes (0/1, 2/3, ...), labels local to the task;
    * ``split-cifar``: CIFAR-10, then 5 x 10 CIFAR-100 classes (``data_dir`` holds both binary
      distributions);
    * ``custom``: one task per file in ``data_files`` (.npz/.npy/.csv), named by ``data_names``
      (default: the file names).
    """
    if tasks is not None and tasks <= 0:
        raise DataError(f"tasks must be positive, got {tasks}")
    out = _build(name, dataset, tasks, seed, data_dir, pad, first_identity, data_files,
                 data_names)
    spec = {
        "kind": "benchmark", "benchmark": name, "dataset": dataset, "seed": seed,
        "data_dir": str(Path(data_dir).absolute()) if data_dir else None,
        "pad": pad, "first_identity": first_identity,
    }
    for i, task in enumerate(out):
        if not task.source:  # custom tasks already record their file
            task.source = {**spec, "index": i}
    return out


def _build(
    name: str, dataset: str, tasks: int | None, seed: int, data_dir: str | os.PathLike | None,
    pad: bool, first_identity: bool, data_files: list[str] | None,
    data_names: list[str] | None = None,
) -> list[TaskData]:
    if name == "permuted-mnist":
        src = load_source(dataset, data_dir)
        return permuted(src, tasks or 10, seed, first_identity=first_identity, pad=pad)
    if name == "split-mnist":
        n = tasks or 5
        src = load_source(dataset, data_dir)
        n_classes = len(src.label_names)
        if 2 * n > n_classes:
            raise DataError(f"split-mnist has at most {n_classes // 2} tasks, got {n}")
        groups = [[2 * t, 2 * t + 1] for t in range(n)]
        return split_classes(src, groups, "split-mnist", flatten=True)
    if name == "split-cifar":
        n = tasks or 6
        if n > 6:
            raise DataError(f"split-cifar has at most 6 tasks, got {n}")
        if not data_dir:
            raise DataError("split-cifar needs --data-dir with the CIFAR-10 and CIFAR-100 binaries")
        first = split_classes(load_cifar10(data_dir), [list(range(10))], "split-cifar", False)
        if n == 1:
            return first
        c100 = load_cifar100(data_dir)
        groups = [list(range(10 * k, 10 * k + 10)) for k in range(n - 1)]
        return first + split_classes(c100, groups, "split-cifar", False, start=1)
    if name == "custom":
        if not data_files:
            raise DataError("the custom benchmark needs data files (--data FILE ...)")
        given = list(data_names or []) or [""] * len(data_files)
        if len(given) != len(data_files):
            raise DataError(f"{len(given)} task names for {len(data_files)} data files")
        out = [load_task_file(f, n or None, seed=seed) for f, n in zip(data_files, given)]
        names = [t.name for t in out]
        if len(set(names)) != len(names):
            raise DataError(f"custom task names must be unique (name them with --data "
                            f"NAME=FILE): {names}")
        return out
    raise DataError(f"unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")


def input_stats(task: TaskData) -> tuple[list[float], list[float]]:
    """Normalization recorded in the target config: one mean/std for flat inputs, per channel
    for images ``(C, H, W)``; computed on the training inputs of ``task``."""
    x = task.x_train
    if x.ndim == 4:
        mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
        std = x.std(axis=(0, 2, 3), dtype=np.float64)
    else:
        mean = np.array([x.mean(dtype=np.float64)])
        std = np.array([x.std(dtype=np.float64)])
    std = np.where(std > 1e-6, std, 1.0)
    return [float(m) for m in mean], [float(s) for s in std]
