"""File readers that never trust a file: every header is checked against the bytes that are
actually there *before* anything is allocated, so a truncated, foreign or hostile file raises
:class:`DataError` (an :class:`InputError`) instead of an unhandled exception or a huge
allocation. Nothing is unpickled: CIFAR comes from its binary distribution, user arrays are
loaded with ``allow_pickle=False``."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hnet_serve.npyfile import read_npy_header
from hnet_serve.training.data.task import (
    CIFAR_IMAGE_BYTES,
    MAX_ARRAY_BYTES,
    MAX_CSV_BYTES,
    DataError,
)

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
    return scale_images(images), labels


def _check_npy_header(fp: BinaryIO, available: int, what: str) -> None:
    """Refuse a .npy whose header declares more data than the file holds (before allocating)."""
    shape, _, dtype = read_npy_header(fp, what, error=DataError)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > min(available, MAX_ARRAY_BYTES):
        raise DataError(
            f"{what}: header declares {nbytes:,} bytes (shape {shape}) but the file holds "
            f"{available:,}"
        )


def load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    _check_npy_header(io.BytesIO(data), len(data), what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parse failure is bad data
        raise DataError(f"{what}: cannot read array ({exc})") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
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
                out[key] = load_npy_bytes(data, f"{path}[{key}]")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on hostile archives
        raise DataError(f"{path}: not a valid .npz archive ({exc})") from None
    return out


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CSV, one row per example: numeric features and a label, the column named ``label``
    (when there is a header) or the last column. Labels may be any text (class names) or
    numbers; they come back as strings, for :func:`encode_labels`."""
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DataError(
            f"{path}: CSV larger than {MAX_CSV_BYTES >> 20} MiB; convert it to .npy or .npz"
        )
    rows: list[list[float]] = []
    labels: list[str] = []
    header: list[str] | None = None
    label_col = -1
    width: int | None = None  # columns of the header or the first row
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or not any(v.strip() for v in row):
                    continue
                if width is None:
                    width = len(row)
                    if "label" in (names := [h.strip().lower() for h in row]):
                        header, label_col = names, names.index("label")
                        continue
                    if not _numeric(row[:-1]):  # a header without a "label" column
                        header = names
                        continue
                if len(row) != width:
                    raise DataError(f"{path}: line {i + 1} has {len(row)} columns, expected {width}")
                at = label_col % width
                try:
                    rows.append([float(v) for j, v in enumerate(row) if j != at])
                except ValueError:
                    j = next(j for j, v in enumerate(row) if j != at and not _numeric([v]))
                    col = repr(header[j]) if header else f"{j + 1}"
                    raise DataError(f"{path}: line {i + 1}, column {col} holds a non-numeric "
                                    f"feature value {row[j][:40]!r}") from None
                labels.append(row[at].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from None
    if not rows or not rows[0]:
        raise DataError(f"{path}: expected rows of features plus a label column")
    return np.asarray(rows, dtype=np.float64), np.asarray(labels)


def _numeric(values: list[str]) -> bool:
    try:
        for v in values:
            float(v)
    except ValueError:
        return False
    return True


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def scale_images(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255.0)
    x = raw.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError("image data holds NaN or inf values")
    return x
