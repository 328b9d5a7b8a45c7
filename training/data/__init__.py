"""Data for continual learning: tasks, file readers, data sources, benchmarks and provenance.

``task`` (:class:`TaskData`, the checks on inputs and labels) <- ``readers`` (IDX, CIFAR binary,
user arrays; untrusted files) <- ``sources`` (data sets and task files) <- ``benchmarks``
(PermutedMNIST, SplitMNIST, Split CIFAR, custom) <- ``provenance`` (a checkpoint's recorded data).
The names below are the package's public API.
"""

from __future__ import annotations

from hnet_serve.training.data.benchmarks import (
    build_benchmark,
    input_stats,
    permuted,
    split_classes,
)
from hnet_serve.training.data.provenance import recorded_tasks
from hnet_serve.training.data.readers import file_sha256, read_cifar_bin, read_idx
from hnet_serve.training.data.sources import (
    DataSource,
    find_fashion_mnist,
    load_cifar10,
    load_cifar100,
    load_idx_dir,
    load_source,
    load_task_file,
    mnist5k,
    task_name_from_path,
)
from hnet_serve.training.data.task import BENCHMARKS, DATASETS, DataError, Permute, TaskData

__all__ = [
    "BENCHMARKS", "DATASETS", "DataError", "DataSource", "Permute", "TaskData", "build_benchmark",
    "file_sha256", "find_fashion_mnist", "input_stats", "load_cifar10", "load_cifar100",
    "load_idx_dir", "load_source", "load_task_file", "mnist5k", "permuted", "read_cifar_bin",
    "read_idx", "recorded_tasks", "split_classes", "task_name_from_path",
]
