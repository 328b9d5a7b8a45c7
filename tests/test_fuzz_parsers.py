"""Fuzzing the file parsers: IDX, CIFAR binary, user task files, and the scoring readers.

Every malformed input must raise the package's own error (an ``HNetError``), never an
unhandled exception, a hang or a huge allocation. Inputs are built from valid files by
truncation, byte flips, lying headers and random bytes; hypothesis keeps the runs bounded.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hnet_serve.errors import HNetError
from hnet_serve.scoring.readers import read_chunks
from hnet_serve.training.data import load_task_file, read_cifar_bin, read_idx

FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


VALID_IDX = _idx_bytes(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))


def _mutate(raw: bytes, mode: str, pos: int, data: bytes) -> bytes:
    if mode == "truncate":
        return raw[: pos % (len(raw) + 1)]
    if mode == "flip":
        i = pos % len(raw)
        return raw[:i] + bytes([raw[i] ^ (data[0] if data else 0xFF) or 1]) + raw[i + 1 :]
    if mode == "insert":
        i = pos % (len(raw) + 1)
        return raw[:i] + data + raw[i:]
    if mode == "append":
        return raw + data
    return data  # replace


mutations = st.tuples(
    st.sampled_from(["truncate", "flip", "insert", "append", "replace"]),
    st.integers(0, 10**6),
    st.binary(max_size=64),
)


def _expect_own_error_or_valid(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HNetError:
        return None


# -- IDX ------------------------------------------------------------------------------------
def test_idx_valid_round_trip(tmp_path):
    p = tmp_path / "ok-idx3-ubyte"
    p.write_bytes(VALID_IDX)
    np.testing.assert_array_equal(read_idx(p), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    g = tmp_path / "ok-idx3-ubyte.gz"
    g.write_bytes(gzip.compress(VALID_IDX))
    np.testing.assert_array_equal(read_idx(g), read_idx(p))


@FUZZ
@given(m=mutations, gz=st.booleans())
def test_idx_mutations(tmp_path, m, gz):
    raw = _mutate(VALID_IDX, *m)
    p = tmp_path / "f-idx3-ubyte"
    p.write_bytes(gzip.compress(raw) if gz else raw)
    out = _expect_own_error_or_valid(read_idx, p)
    if out is not None:  # a mutation that is still a valid IDX file must parse consistently
        assert out.size * out.itemsize == len(raw) - 4 - 4 * out.ndim


@FUZZ
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4), code=st.sampled_from([8, 9, 0xB, 0xC, 0xD, 0xE, 7]))
def test_idx_lying_headers_never_allocate(tmp_path, dims, code):
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    p = tmp_path / "lie-idx3-ubyte"
    p.write_bytes(header + b"\x00" * 16)
    out = _expect_own_error_or_valid(read_idx, p)
    if out is not None:
        assert out.nbytes == 16


def test_idx_gzip_bomb_is_refused(tmp_path):
    """A small gzip that declares and contains far more than the limit is refused early."""
    header = bytes([0, 0, 8, 1]) + struct.pack(">I", 200_000_000)
    p = tmp_path / "bomb-idx1-ubyte.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(header)
        f.write(b"\x00" * 1_000_000)
    p.write_bytes(buf.getvalue())
    with pytest.raises(HNetError):
        read_idx(p, max_bytes=10_000_000)


# -- CIFAR binary ---------------------------------------------------------------------------
def _cifar_records(n: int, label_bytes: int) -> bytes:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=(n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1).tobytes()


@FUZZ
@given(m=mutations, label_bytes=st.sampled_from([1, 2]))
def test_cifar_mutations(tmp_path, m, label_bytes):
    raw = _mutate(_cifar_records(3, label_bytes), *m)
    p = tmp_path / "data_batch_1.bin"
    p.write_bytes(raw)
    out = _expect_own_error_or_valid(read_cifar_bin, p, label_bytes=label_bytes, num_classes=10)
    if out is not None:
        x, y = out
        assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) == len(raw) // (3072 + label_bytes)
        assert y.max() < 10


# -- user task files (add-task / custom benchmark) --------------------------------------------
def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


VALID_NPZ = _npz_bytes(
    x_train=np.random.default_rng(0).random((8, 4), dtype=np.float32),
    y_train=np.array([0, 1] * 4),
    x_test=np.random.default_rng(1).random((4, 4), dtype=np.float32),
    y_test=np.array([0, 1] * 2),
)


@FUZZ
@given(m=mutations)
def test_task_npz_mutations(tmp_path, m):
    p = tmp_path / "task.npz"
    p.write_bytes(_mutate(VALID_NPZ, *m))
    _expect_own_error_or_valid(load_task_file, p)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.,-+eEnaif \n\"x")), max_size=300))
def test_task_csv_garbage(tmp_path, text):
    p = tmp_path / "task.csv"
    p.write_text(text)
    _expect_own_error_or_valid(load_task_file, p)


def test_task_file_with_pickled_object_array_is_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x_train=np.array([object()], dtype=object), y_train=np.zeros(1))
    with pytest.raises(HNetError):
        load_task_file(p)


# -- scoring readers ------------------------------------------------------------------------
def _drain(path: Path, shape=(4,), task_column=None):
    for chunk in read_chunks(path, shape, batch_size=3, task_column=task_column):
        assert chunk.features.shape[1:] == (int(np.prod(shape)),) or chunk.features.ndim >= 2


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.,-+eEnaif \n\"abt")), max_size=400),
       task_column=st.sampled_from([None, "t"]))
def test_scoring_csv_garbage(tmp_path, text, task_column):
    p = tmp_path / "in.csv"
    p.write_text(text)
    _expect_own_error_or_valid(_drain, p, task_column=task_column)


def _parquet_bytes() -> bytes:
    table = pa.table({"input": [[0.1, 0.2, 0.3, 0.4]] * 5, "t": ["a"] * 5})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


VALID_PARQUET = _parquet_bytes()


@FUZZ
@given(m=mutations, task_column=st.sampled_from([None, "t"]))
def test_scoring_parquet_mutations(tmp_path, m, task_column):
    p = tmp_path / "in.parquet"
    p.write_bytes(_mutate(VALID_PARQUET, *m))
    _expect_own_error_or_valid(_drain, p, task_column=task_column)


@FUZZ
@given(
    columns=st.dictionaries(
        st.sampled_from(["input", "a", "b", "c", "d", "t"]),
        st.sampled_from(["int", "float", "str", "list", "nested", "null", "bool"]),
        min_size=1, max_size=5,
    ),
    task_column=st.sampled_from([None, "t"]),
)
def test_scoring_parquet_odd_schemas(tmp_path, columns, task_column):
    values = {
        "int": pa.array([1, 2, 3]),
        "float": pa.array([0.5, float("nan"), 1e300]),
        "str": pa.array(["1.0", "x", None]),
        "list": pa.array([[1.0, 2.0, 3.0, 4.0], [1.0], None]),
        "nested": pa.array([[[1.0]], [[2.0]], [[3.0]]]),
        "null": pa.array([None, None, None]),
        "bool": pa.array([True, False, True]),
    }
    p = tmp_path / "odd.parquet"
    pq.write_table(pa.table({k: values[v] for k, v in columns.items()}), p)
    _expect_own_error_or_valid(_drain, p, task_column=task_column)


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((6, 4), dtype=np.float32))
    return buf.getvalue()


@FUZZ
@given(m=mutations)
def test_scoring_npy_mutations(tmp_path, m):
    p = tmp_path / "in.npy"
    p.write_bytes(_mutate(_npy_bytes(), *m))
    _expect_own_error_or_valid(_drain, p)
