"""File formats for batch scoring: inputs streamed in chunks, outputs written atomically.

Inputs (``.npy``, ``.npz``, ``.csv``, ``.parquet``) are read a chunk at a time, so memory depends
on the chunk size and never on the file size. Every chunk arrives as a :class:`Chunk`: a float32
feature matrix, the input row number of each row, an optional per-row task, and the rows that
cannot be scored (wrong width, non-numeric or missing values, NaN/inf) with the reason why.

Row numbers are 0-based data rows in file order (a CSV header is not a row: row ``r`` is on line
``r + 2``). Features come either from one list/array column named ``input`` or, without one,
from every column except the task column, in file order.

Outputs (``.parquet``, ``.csv``, ``.npy``) and the rejects file (JSON lines) are written to a
temporary sibling and renamed into place on :meth:`AtomicOutput.commit`; :meth:`abort` (or an
exception inside ``with``) removes the temporary file, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import mmap
import os
import tokenize
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.fsutil import fsync_path, temp_sibling

INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".csv", ".npy")
INPUT_COLUMN = "input"  # the list/array feature column
_NPZ_TASKS_KEY = "task"  # default npz member holding per-row task names


# -- chunks -------------------------------------------------------------------------------
@dataclass
class Reject:
    """A row that was not scored: its input row number, why, and the row as read."""

    row: int
    reason: str
    raw: Any = None

    def to_json(self) -> str:
        return json.dumps({"row": self.row, "reason": self.reason, "raw": _jsonable(self.raw)})


@dataclass
class Chunk:
    """Consecutive input rows, ready to score.

    ``features`` rows listed in ``bad`` hold placeholders and must not be scored. NaN/inf are
    not looked for here: the runtime refuses them anyway, so the scorer finds the rows only when
    it does (:func:`mark_nonfinite`), and a clean chunk is not read one extra time. The arrays
    may be reused by the reader for the next chunk: consume a chunk before asking for the next.
    """

    rows: np.ndarray  # (n,) int64 input row numbers, ascending
    features: np.ndarray  # (n, d) float32
    tasks: list[str | None] | None = None  # per-row task (None = infer) or no task column
    bad: dict[int, str] = field(default_factory=dict)  # position in chunk -> reason
    raw: Callable[[int], Any] = lambda i: None  # position -> the row as read
    rejects: list[Reject] = field(default_factory=list)  # rows the reader itself dropped

    def __len__(self) -> int:
        return len(self.rows)


def mark_nonfinite(features: np.ndarray, bad: dict[int, str]) -> None:
    """Add every row of ``features`` (n, d) holding NaN or inf to ``bad`` (naming the column)."""
    if features.size == 0:
        return
    # A row sum is one cheap pass; a non-finite sum flags the row (NaN/inf, or an overflow of
    # large finite values, which the exact check below clears again).
    sums = features.sum(axis=1, dtype=np.float32)  # (n,)
    for i in np.flatnonzero(~np.isfinite(sums)).tolist():
        cols = np.flatnonzero(~np.isfinite(features[i]))
        if len(cols) and i not in bad:
            bad[i] = f"non-finite value ({features[i, cols[0]]}) in column {int(cols[0])}"


def _jsonable(v: Any) -> Any:
    """Raw values for the rejects file: NaN/inf as strings, arrays as lists, bytes decoded."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


# -- features from numpy arrays -----------------------------------------------------------
def check_array_width(shape: tuple[int, ...], input_shape: tuple[int, ...], what: str) -> None:
    """An array of rows must be ``(N, d)`` or ``(N, *input_shape)`` with ``d = prod(input_shape)``."""
    width = math.prod(input_shape)
    if len(shape) == 2 and shape[1] == width:
        return
    if tuple(shape[1:]) == tuple(input_shape):
        return
    raise InputError(
        f"{what} has shape {list(shape)}: expected rows of {width} features, i.e. "
        f"(N, {width})" + (f" or (N, {', '.join(map(str, input_shape))})" if len(input_shape) > 1 else "")
    )


def check_numeric_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise InputError(f"{what} holds {dtype} values, expected numbers (float or int)")


def array_chunk(values: np.ndarray, start: int, tasks: list[str | None] | None = None) -> Chunk:
    """A chunk from numeric rows ``values`` (n, ...) that start at input row ``start``."""
    n = values.shape[0]
    feats = np.ascontiguousarray(values.reshape(n, -1), dtype=np.float32)  # (n, d)
    return Chunk(
        rows=np.arange(start, start + n, dtype=np.int64),
        features=feats,
        tasks=tasks,
        raw=lambda i: values[i].reshape(-1),
    )


# -- features from Arrow tables -----------------------------------------------------------
@dataclass(frozen=True)
class Columns:
    """Where a table keeps its features: the ``input`` list column or the numeric columns."""

    features: list[str]
    task: str | None
    list_column: bool

    @classmethod
    def resolve(cls, names: list[str], width: int, task_column: str | None) -> Columns:
        if task_column is not None and task_column not in names:
            raise InputError(f"task column {task_column!r} not found (columns: {_show(names)})")
        if INPUT_COLUMN in names and task_column != INPUT_COLUMN:
            return cls([INPUT_COLUMN], task_column, True)
        feats = [n for n in names if n != task_column]
        if len(feats) != width:
            hint = "" if task_column else "; name a task column with --task-column"
            raise InputError(
                f"the input has {len(feats)} feature columns ({_show(feats)}) but the model "
                f"takes {width} features: give {width} numeric columns or one list column "
                f"named {INPUT_COLUMN!r}{hint}"
            )
        return cls(feats, task_column, False)


def _show(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _unwrap(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if isinstance(arr.type, pa.BaseExtensionType):  # e.g. Ray's tensor columns
        arr = arr.storage
    return arr


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


def _parse_strings(arr: pa.Array, name: str, bad: dict[int, str]) -> np.ndarray:
    """Strings -> float32 (n,); unparsable or missing values mark their rows bad."""
    try:
        return pc.cast(arr, pa.float32()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out = np.zeros(len(arr), dtype=np.float32)
    for i, s in enumerate(arr.to_pylist()):
        try:
            out[i] = float(s)
        except (TypeError, ValueError):
            bad.setdefault(i, f"non-numeric value {s!r} in column {name!r}")
    return out


def _column_values(arr: pa.Array, name: str, bad: dict[int, str]) -> np.ndarray:
    """One feature column -> float32 (n,), marking rows with missing/non-numeric values."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_null(t):  # a column with no values at all
        for i in range(len(arr)):
            bad.setdefault(i, f"missing value in column {name!r}")
        return np.zeros(len(arr), dtype=np.float32)
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or _is_numeric(t)):
        raise InputError(f"feature column {name!r} has type {t}, expected numbers")
    if arr.null_count:
        for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
            bad.setdefault(i, f"missing value in column {name!r}")
        arr = arr.fill_null(pa.scalar("0", arr.type) if pa.types.is_string(arr.type) else 0)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _parse_strings(arr, name, bad)
    if _is_numeric(t):
        return pc.cast(arr, pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    raise InputError(f"feature column {name!r} has type {t}, expected numbers")


def _list_values(arr: pa.Array, width: int, bad: dict[int, str]) -> np.ndarray:
    """The ``input`` list column -> float32 (n, width), marking rows of the wrong length."""
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise InputError(
            f"column {INPUT_COLUMN!r} has type {t}: expected a list of {width} numbers per row"
        )
    if not _is_numeric(t.value_type):
        raise InputError(f"column {INPUT_COLUMN!r} holds {t.value_type} values, expected numbers")
    n = len(arr)
    if arr.null_count:
        for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
            bad[i] = f"missing value in column {INPUT_COLUMN!r}"
    if pa.types.is_fixed_size_list(t):
        if t.list_size != width:
            raise InputError(
                f"column {INPUT_COLUMN!r} holds lists of {t.list_size} values, the model takes {width}"
            )
        starts = np.arange(n, dtype=np.int64) * width + arr.offset * width
        values = arr.values  # every slot, nulls included
    else:
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(lengths != width).tolist():
            bad.setdefault(i, f"wrong width: {int(lengths[i])} values, expected {width}")
        offsets = arr.offsets.to_numpy(zero_copy_only=False)
        starts = offsets[:-1].astype(np.int64)
        values = arr.values
    vals = pc.cast(values, pa.float32(), safe=False)
    if vals.null_count:
        vals = vals.fill_null(np.nan)
    flat = vals.to_numpy(zero_copy_only=False)  # (total,) missing -> NaN
    good = np.array([i not in bad for i in range(n)], dtype=bool) if bad else None
    if good is None and len(flat) == n * width and (n == 0 or starts[0] == 0):
        feats = flat.reshape(n, width)
        if not feats.flags.writeable:  # a zero-copy view of Arrow memory; torch wants to own it
            feats = feats.copy()
    else:
        feats = np.zeros((n, width), dtype=np.float32)
        sel = np.arange(n) if good is None else np.flatnonzero(good)
        idx = starts[sel, None] + np.arange(width)[None, :]  # (m, width)
        feats[sel] = flat[idx]
    if values.null_count:
        for i in np.flatnonzero(np.isnan(feats).any(axis=1)).tolist():
            row = arr[i].values
            if row is not None and row.null_count:
                bad.setdefault(i, f"missing value in column {INPUT_COLUMN!r}")
    return feats


def task_values(arr: pa.Array) -> list[str | None]:
    """Per-row task names; null or empty means: infer the task."""
    arr = _unwrap(arr)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        try:
            arr = pc.cast(
                arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr, pa.string()
            )
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            raise InputError(f"the task column has type {arr.type}: expected task names") from None
    return [s or None for s in arr.to_pylist()]


def table_chunk(
    table: pa.Table | pa.RecordBatch, columns: Columns, width: int, start: int | np.ndarray
) -> Chunk:
    """A chunk from an Arrow batch; ``start`` is the first row number (or every row number)."""
    n = table.num_rows
    bad: dict[int, str] = {}
    if columns.list_column:
        feats = _list_values(_unwrap(table.column(INPUT_COLUMN)), width, bad)
    else:
        feats = np.empty((n, width), dtype=np.float32)  # (n, d)
        for j, name in enumerate(columns.features):
            feats[:, j] = _column_values(_unwrap(table.column(name)), name, bad)
    rows = (
        np.arange(start, start + n, dtype=np.int64)
        if isinstance(start, (int, np.integer))
        else np.asarray(start, dtype=np.int64)
    )
    tasks = task_values(table.column(columns.task)) if columns.task else None
    return Chunk(rows, feats, tasks, bad, raw=lambda i: table.slice(i, 1).to_pylist()[0])


# -- readers ------------------------------------------------------------------------------
def suffix_of(path: str | os.PathLike, allowed: tuple[str, ...], what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ConfigError(
            f"{what} {str(path)!r}: unsupported format {suffix or '(no suffix)'!r}; use one of "
            f"{', '.join(allowed)}"
        )
    return suffix


class _NpyStream:
    """Rows of a C-ordered ``.npy`` payload read from a file object a few at a time."""

    def __init__(self, f: IO[bytes], what: str) -> None:
        self.f = f
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            self.shape, self.fortran, self.dtype = read_header(f)
        # numpy parses the header with the tokenizer: garbage can raise any of these.
        except (ValueError, SyntaxError, TypeError, OverflowError, EOFError,
                tokenize.TokenError) as exc:
            raise InputError(f"{what}: not a valid .npy array ({exc})") from None
        if self.dtype.hasobject:
            raise InputError(f"{what}: object arrays need pickle, which is not loaded")
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        self.n = int(self.shape[0]) if self.shape else 0
        self.pos = 0

    def read(self, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next ``min(k, left)`` rows, ``(k, *row_shape)`` (into ``out`` when given)."""
        k = min(k, self.n - self.pos)
        if out is None or out.shape[0] < k:
            out = np.empty((k, *self.row_shape), dtype=self.dtype)
        view = out[:k]
        nbytes = k * self.row_bytes
        got = self.f.readinto(memoryview(view.reshape(-1).view(np.uint8))) if nbytes else 0
        if got != nbytes:
            raise InputError(f"array file truncated at row {self.pos + got // max(self.row_bytes, 1)}")
        self.pos += k
        return view


def _check_rows_array(shape: tuple[int, ...], dtype: np.dtype, what: str,
                      input_shape: tuple[int, ...]) -> None:
    if len(shape) < 2:
        raise InputError(f"{what} has shape {list(shape)}: expected a 2-D array of rows")
    check_numeric_dtype(dtype, what)
    check_array_width(shape, input_shape, what)


def _npy_chunks(
    stream: _NpyStream, what: str, input_shape: tuple[int, ...], batch_size: int,
    tasks: _NpyStream | None = None,
) -> Iterator[Chunk]:
    """Chunks read from a stream (``.npz`` members), with per-row tasks from a second one."""
    _check_rows_array(stream.shape, stream.dtype, what, input_shape)
    if tasks is not None and (tasks.dtype.kind not in "US" or tasks.shape != (stream.n,)):
        raise InputError(
            f"{what}: the task array must be 1-D strings with one entry per row, got "
            f"{tasks.dtype} {list(tasks.shape)}"
        )
    buf: np.ndarray | None = None
    start = 0
    while stream.pos < stream.n:
        buf = stream.read(batch_size, buf)
        names = None
        if tasks is not None:
            names = [(s.decode() if isinstance(s, bytes) else str(s)) or None
                     for s in tasks.read(len(buf)).tolist()]
        yield array_chunk(buf, start, names)
        start += len(buf)


def _read_npy(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None):
    """Chunks as views of the memory-mapped file, unmapped once consumed.

    No copy for float32 data (the model reads the page cache directly), and RSS stays about
    one chunk: after each chunk, ``MADV_DONTNEED`` drops its pages from this process (they stay
    in the page cache). The mapping is private (copy-on-write) so the arrays are writable
    without ever writing to the file.
    """
    if task_column is not None:
        raise ConfigError("a .npy input holds features only: use .npz, .csv or .parquet for a task column")
    with open(path, "rb") as f:
        stream = _NpyStream(f, str(path))
        _check_rows_array(stream.shape, stream.dtype, str(path), input_shape)
        offset = f.tell()
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    arr = None
    try:
        try:
            arr = np.frombuffer(mm, dtype=stream.dtype, count=math.prod(stream.shape), offset=offset)
        except ValueError:
            raise InputError(f"{path}: array file truncated (header says {list(stream.shape)})") from None
        arr = arr.reshape(stream.shape, order="F" if stream.fortran else "C")
        dropped = 0
        for start in range(0, stream.n, batch_size):
            yield array_chunk(arr[start : start + batch_size], start)
            # Back here, the consumer is done with the chunk. Fortran-ordered rows are spread
            # over the whole file: drop everything each time.
            end = len(mm) if stream.fortran else offset + min(stream.n, start + batch_size) * stream.row_bytes
            end -= end % mmap.PAGESIZE
            if end > dropped and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED, dropped, end - dropped)
                dropped = 0 if stream.fortran else end
    finally:
        del arr
        with contextlib.suppress(BufferError):  # a chunk still referenced: closed when freed
            mm.close()


def _npz_members(zf: zipfile.ZipFile, path: Path, task_column: str | None) -> tuple[str, str | None]:
    keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    task_key = task_column
    if task_key is not None and task_key not in keys:
        raise InputError(f"{path}: no array named {task_key!r} for the task column (arrays: {_show(keys)})")
    feats = [k for k in keys if k != task_key]
    if INPUT_COLUMN in feats:
        return INPUT_COLUMN, task_key
    if len(feats) == 1:
        return feats[0], task_key
    raise InputError(
        f"{path}: holds arrays {_show(keys)}; name the feature array {INPUT_COLUMN!r}"
        + ("" if task_column else f" (and pass --task-column {_NPZ_TASKS_KEY} for a task array)")
    )


def _read_npz(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None):
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a valid .npz file ({exc})") from None
    with zf:
        feat_key, task_key = _npz_members(zf, path, task_column)
        with zf.open(feat_key + ".npy") as ff:
            stream = _NpyStream(ff, f"{path}[{feat_key}]")
            if stream.fortran:
                raise InputError(f"{path}[{feat_key}]: Fortran-ordered arrays cannot be streamed; "
                                 "save a C-ordered array (np.ascontiguousarray)")
            if task_key is None:
                yield from _npy_chunks(stream, f"{path}[{feat_key}]", input_shape, batch_size)
                return
            with zf.open(task_key + ".npy") as tf:
                tasks = _NpyStream(tf, f"{path}[{task_key}]")
                yield from _npy_chunks(stream, f"{path}[{feat_key}]", input_shape, batch_size, tasks)


def _csv_header(path: Path) -> tuple[list[str], int, int]:
    """Column names, the header's length in bytes and the average length of the next lines."""
    with open(path, "rb") as f:
        sample = f.read(1 << 16)
    if not sample.strip():
        raise InputError(f"{path}: empty CSV file (expected a header line)")
    lines = sample.split(b"\n")
    try:
        names = next(csv.reader([lines[0].decode("utf-8-sig").rstrip("\r")]))
    except (csv.Error, StopIteration, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the CSV header ({exc})") from None
    if len(set(names)) != len(names):
        raise InputError(f"{path}: duplicate column names in the CSV header")
    body = lines[1:-1]  # the last piece may be cut short
    avg = sum(len(s) + 1 for s in body) // len(body) if body else len(lines[0]) + 1
    return names, len(lines[0]) + 1, max(avg, 16)


def _line_blocks(f: IO[bytes], block_bytes: int) -> Iterator[bytes]:
    """``f`` in pieces of about ``block_bytes`` that end at a line break."""
    rest = b""
    while True:
        data = f.read(block_bytes)
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a block: keep reading
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut]
    if rest.strip():
        yield rest


def _read_csv(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None):
    """CSV in blocks of about ``batch_size`` lines, each parsed on its own.

    We split the file ourselves rather than use pyarrow's streaming reader: that one reads ahead
    without bound (memory grows with the file when parsing is slower than the disk), and parsing
    one block at a time gives every rejected line its exact row number. Fields must not contain
    line breaks; row ``r`` is line ``r + 2`` of the file (blank lines are skipped, neither
    scored nor rejected, but keep their row numbers).
    """
    import pyarrow.csv as pacsv

    width = math.prod(input_shape)
    names, header_bytes, line_len = _csv_header(path)
    columns = Columns.resolve(names, width, task_column)
    if columns.list_column:
        raise InputError(
            f"{path}: a CSV cannot hold a list column {INPUT_COLUMN!r}; use one column per "
            "feature (or Parquet)"
        )
    block_bytes = int(min(max(batch_size * line_len, 1 << 16), 1 << 30))
    # Every field as text, converted per chunk: one bad value then rejects its row, not the file.
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                   strings_can_be_null=False)
    next_row = 0
    with open(path, "rb") as f:
        f.seek(header_bytes)
        for block in _line_blocks(f, block_bytes):
            dropped: list[tuple[int, Reject | None]] = []  # (line in block, reject or blank)

            def on_invalid(row, dropped=dropped, start=next_row) -> str:
                line = row.number - 1  # 1-based within the block, no header
                if not row.text.strip():
                    dropped.append((line, None))
                else:
                    dropped.append((line, Reject(
                        start + line, f"wrong width: {row.actual_columns} fields, expected "
                        f"{row.expected_columns}", row.text)))
                return "skip"

            try:
                table = pacsv.read_csv(
                    pa.py_buffer(block),
                    read_options=pacsv.ReadOptions(column_names=names, use_threads=False,
                                                   block_size=len(block) + 1),
                    parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid,
                                                     ignore_empty_lines=False),
                    convert_options=convert,
                )
            except pa.ArrowInvalid as exc:
                raise InputError(f"{path}: cannot parse CSV near row {next_row} ({exc})") from None
            lines = table.num_rows + len(dropped)
            rows = np.arange(next_row, next_row + lines, dtype=np.int64)
            if dropped:
                keep = np.ones(lines, dtype=bool)
                keep[[line for line, _ in dropped]] = False
                rows = rows[keep]
            chunk = table_chunk(table, columns, width, rows)
            chunk.rejects = [r for _, r in dropped if r is not None]
            next_row += lines
            yield chunk


def _read_parquet(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None):
    import pyarrow.parquet as pq

    width = math.prod(input_shape)
    try:
        # No pre-buffering: it would cache column chunks ahead (memory growing with the file).
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # garbled footers too
        raise InputError(f"{path}: not a valid Parquet file ({exc})") from None
    with pf:
        names = pf.schema_arrow.names
        columns = Columns.resolve(names, width, task_column)
        wanted = columns.features + ([columns.task] if columns.task else [])
        start = 0
        batches = pf.iter_batches(batch_size=batch_size, columns=wanted)
        while True:
            try:  # corrupt pages only show up when they are decoded
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: corrupt Parquet data after row {start} ({exc})") from None
            yield table_chunk(batch, columns, width, start)
            start += batch.num_rows


_READERS = {".npy": _read_npy, ".npz": _read_npz, ".csv": _read_csv, ".parquet": _read_parquet}


def read_chunks(
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    batch_size: int,
    task_column: str | None = None,
) -> Iterator[Chunk]:
    """Stream ``path`` as chunks of at most ``batch_size`` rows (memory independent of size)."""
    path = Path(path)
    suffix = suffix_of(path, INPUT_SUFFIXES, "input")
    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist")
    return _READERS[suffix](path, tuple(input_shape), batch_size, task_column)


def count_rows(path: str | os.PathLike) -> int | None:
    """Rows in ``path`` when the format records it cheaply (None for CSV)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                return _NpyStream(f, str(path)).n
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as zf:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                key = INPUT_COLUMN if INPUT_COLUMN in keys else keys[0]
                with zf.open(key + ".npy") as f:
                    return _NpyStream(f, str(path)).n
    except (OSError, ValueError, IndexError, zipfile.BadZipFile):  # the reader reports it
        return None
    return None


# -- writers ------------------------------------------------------------------------------
@dataclass
class OutputSchema:
    """What every output row holds: task, prediction, and optionally row number/probabilities."""

    task_names: list[str]  # tasks are written by index into this list
    num_probabilities: int | None = None  # None: no probabilities column
    row_numbers: bool = False


def score_columns(
    schema: OutputSchema,
    rows: np.ndarray,  # (m,) int64
    task_idx: np.ndarray,  # (m,) int32 into schema.task_names
    predictions: np.ndarray,  # (m,) int64
    probabilities: np.ndarray | None,  # (m, C) float32
    *,
    csv: bool = False,
) -> dict[str, pa.Array]:
    """The output columns as Arrow arrays: ``[row], task, prediction, [probabilities]``.

    ``task`` is dictionary-encoded (a few distinct names over many rows). A CSV cell holds one
    value, so for CSV ``task`` is plain strings and ``probabilities`` a JSON list per row.
    """
    cols: dict[str, pa.Array] = {}
    if schema.row_numbers:
        cols["row"] = pa.array(rows, pa.int64())
    tasks = pa.DictionaryArray.from_arrays(
        pa.array(task_idx, pa.int32()), pa.array(schema.task_names, pa.string())
    )
    cols["task"] = tasks.dictionary_decode() if csv else tasks
    cols["prediction"] = pa.array(predictions, pa.int64())
    if schema.num_probabilities is not None:
        probs = np.ascontiguousarray(probabilities, dtype=np.float32).reshape(
            len(rows), schema.num_probabilities
        )
        if csv:
            cols["probabilities"] = pa.array(
                ["[" + ",".join(f"{v:.7g}" for v in row) + "]" for row in probs.tolist()],
                pa.string(),
            )
        else:
            cols["probabilities"] = pa.FixedSizeListArray.from_arrays(
                pa.array(probs.reshape(-1), pa.float32()), schema.num_probabilities
            )
    return cols


class AtomicOutput:
    """A file written to a temporary sibling and renamed into place by :meth:`commit`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        if not self.path.parent.is_dir():
            raise ConfigError(f"output directory {str(self.path.parent)!r} does not exist")
        if self.path.is_dir():
            raise ConfigError(f"output {str(self.path)!r} is a directory")
        self.tmp = temp_sibling(self.path)
        self.done = False
        self._closed = False

    def _close(self) -> None:  # subclasses flush and close their handle
        raise NotImplementedError

    def _close_once(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def commit(self) -> None:
        self._close_once()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        # We are cleaning up after another error already: do not mask it.
        with contextlib.suppress(Exception):
            self._close_once()
        self.tmp.unlink(missing_ok=True)
        self.done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class RejectsWriter(AtomicOutput):
    """JSON lines: ``{"row": int, "reason": str, "raw": the row as read}``."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.f = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed by commit/abort

    def write(self, rejects: list[Reject]) -> None:
        for r in rejects:
            self.f.write(r.to_json() + "\n")

    def _close(self) -> None:
        self.f.close()


class ScoreWriter(AtomicOutput):
    """Base of the scored-output writers: one :meth:`write` per chunk, rows in order."""

    def __init__(self, path: str | os.PathLike, schema: OutputSchema) -> None:
        super().__init__(path)
        self.schema = schema
        self.rows_written = 0

    def write(
        self,
        rows: np.ndarray,  # (m,) int64
        task_idx: np.ndarray,  # (m,) int32 into schema.task_names
        predictions: np.ndarray,  # (m,) int64
        probabilities: np.ndarray | None,  # (m, C) float32
    ) -> None:
        raise NotImplementedError


class _ArrowScoreWriter(ScoreWriter):
    """Parquet or CSV through pyarrow's streaming writers (one row group / block per chunk)."""

    csv = False

    def __init__(self, path: str | os.PathLike, schema: OutputSchema) -> None:
        super().__init__(path, schema)
        empty = self._table(
            np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
            np.zeros((0, schema.num_probabilities or 0), np.float32),
        )
        self.arrow_schema = empty.schema
        self.writer = self._open()
        self.writer.write_table(empty)  # a valid file (with its columns) even with zero rows

    def _open(self):
        raise NotImplementedError

    def _table(self, rows, task_idx, predictions, probabilities) -> pa.Table:
        return pa.table(
            score_columns(self.schema, rows, task_idx, predictions, probabilities, csv=self.csv)
        )

    def write(self, rows, task_idx, predictions, probabilities) -> None:
        self.writer.write_table(self._table(rows, task_idx, predictions, probabilities))
        self.rows_written += len(rows)

    def _close(self) -> None:
        self.writer.close()


class ParquetScoreWriter(_ArrowScoreWriter):
    def _open(self):
        import pyarrow.parquet as pq

        return pq.ParquetWriter(self.tmp, self.arrow_schema)


class CsvScoreWriter(_ArrowScoreWriter):
    csv = True

    def _open(self):
        import pyarrow.csv as pacsv

        return pacsv.CSVWriter(str(self.tmp), self.arrow_schema)


def npy_output_dtype(schema: OutputSchema) -> np.dtype:
    """The structured record of a ``.npy`` output: ``[row], task, prediction, [probabilities]``."""
    fields: list[tuple] = []
    if schema.row_numbers:
        fields.append(("row", "<i8"))
    fields.append(("task", f"<U{max((len(t) for t in schema.task_names), default=1)}"))
    fields.append(("prediction", "<i8"))
    if schema.num_probabilities is not None:
        fields.append(("probabilities", "<f4", (schema.num_probabilities,)))
    return np.dtype(fields)


class NpyScoreWriter(ScoreWriter):
    """A 1-D structured ``.npy`` array, streamed: the header's row count is patched on commit."""

    _HEADER_BYTES_SPARE = 24  # room for a 20-digit row count

    def __init__(self, path: str | os.PathLike, schema: OutputSchema) -> None:
        super().__init__(path, schema)
        self.dtype = npy_output_dtype(schema)
        self.names = np.array(schema.task_names, dtype=self.dtype["task"])
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort
        self.header_len = len(self._header(0)) + self._HEADER_BYTES_SPARE
        self.header_len += -self.header_len % 64  # keep the data 64-byte aligned
        self.f.write(self._header(0, self.header_len))

    def _header(self, n: int, total: int | None = None) -> bytes:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        text = repr(d)
        prefix_len = 10  # magic (6) + version (2) + header length (2)
        if total is None:
            return b"\x00" * prefix_len + text.encode() + b"\n"
        body = text.ljust(total - prefix_len - 1) + "\n"
        return np.lib.format.magic(1, 0) + len(body).to_bytes(2, "little") + body.encode("latin1")

    def write(self, rows, task_idx, predictions, probabilities) -> None:
        rec = np.empty(len(rows), dtype=self.dtype)
        if self.schema.row_numbers:
            rec["row"] = rows
        rec["task"] = self.names[task_idx]
        rec["prediction"] = predictions
        if self.schema.num_probabilities is not None:
            rec["probabilities"] = probabilities
        self.f.write(rec.tobytes())
        self.rows_written += len(rows)

    def _close(self) -> None:
        self.f.seek(0)
        self.f.write(self._header(self.rows_written, self.header_len))
        self.f.flush()
        self.f.close()


_WRITERS = {".parquet": ParquetScoreWriter, ".csv": CsvScoreWriter, ".npy": NpyScoreWriter}


def open_writer(path: str | os.PathLike, schema: OutputSchema) -> ScoreWriter:
    """The atomic writer for ``path``'s format (``.parquet``, ``.csv`` or ``.npy``)."""
    return _WRITERS[suffix_of(path, OUTPUT_SUFFIXES, "output")](path, schema)

