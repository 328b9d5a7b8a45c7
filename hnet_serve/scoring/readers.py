"""Input files for batch scoring (``.npy``, ``.npz``, ``.csv``, ``.parquet``), read a chunk at
a time, so memory depends on the chunk size and never on the file size (see
:mod:`hnet_serve.scoring.chunks` for what a chunk holds).
"""

from __future__ import annotations

import contextlib
import csv
import math
import mmap
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.npyfile import read_npy_header
from hnet_serve.scoring.chunks import (
    INPUT_COLUMN,
    Chunk,
    Columns,
    Reject,
    array_chunk,
    check_array_width,
    check_numeric_dtype,
    show_names,
    table_chunk,
)

INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".csv", ".npy")
_NPZ_TASKS_KEY = "task"  # default npz member holding per-row task names


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
        self.shape, self.fortran, self.dtype = read_npy_header(f, what)
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


def _read_npy(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None,
              keep: tuple[str, ...] = ()):
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
        raise InputError(f"{path}: no array named {task_key!r} for the task column (arrays: {show_names(keys)})")
    feats = [k for k in keys if k != task_key]
    if INPUT_COLUMN in feats:
        return INPUT_COLUMN, task_key
    if len(feats) == 1:
        return feats[0], task_key
    raise InputError(
        f"{path}: holds arrays {show_names(keys)}; name the feature array {INPUT_COLUMN!r}"
        + ("" if task_column else f" (and pass --task-column {_NPZ_TASKS_KEY} for a task array)")
    )


def _read_npz(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None,
              keep: tuple[str, ...] = ()):
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


def _csv_header(path: Path) -> tuple[list[str], int, int, list[str] | None]:
    """Column names, the header's length in bytes, the average length of the next lines and
    the first data row's fields (None when there is none in the first 64 KiB)."""
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
    first = next((b for b in body if b.strip()), None)
    try:
        row = next(csv.reader([first.decode("utf-8").rstrip("\r")])) if first else None
    except (csv.Error, StopIteration, UnicodeDecodeError):
        row = None
    return names, len(lines[0]) + 1, max(avg, 16), row


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


_BLANK_LINE = re.compile(rb"(?:^|\n)[ \t\r]*\n")


def _without_blank_lines(block: bytes) -> tuple[bytes, np.ndarray]:
    """``block`` without its blank lines, and the line number (0-based, in ``block``) of each
    line kept. The common case (no blank line) costs one regex scan and no copy."""
    n = block.count(b"\n") + (not block.endswith(b"\n"))
    if _BLANK_LINE.search(block) is None:
        return block, np.arange(n, dtype=np.int64)
    lines = block.split(b"\n")[:n]
    kept = [i for i, line in enumerate(lines) if line.strip(b" \t\r")]
    if not kept:
        return b"", np.zeros(0, dtype=np.int64)
    return b"\n".join(lines[i] for i in kept) + b"\n", np.asarray(kept, dtype=np.int64)


def _read_csv(path: Path, input_shape: tuple[int, ...], batch_size: int, task_column: str | None,
              keep: tuple[str, ...] = ()):
    """CSV in blocks of about ``batch_size`` lines, each parsed on its own.

    We split the file ourselves rather than use pyarrow's streaming reader: that one reads ahead
    without bound (memory grows with the file when parsing is slower than the disk), and parsing
    one block at a time gives every rejected line its exact row number. Fields must not contain
    line breaks; row ``r`` is line ``r + 2`` of the file (blank lines are skipped, neither
    scored nor rejected, but keep their row numbers).
    """
    import pyarrow.csv as pacsv

    width = math.prod(input_shape)
    names, header_bytes, line_len, first = _csv_header(path)
    text = ({n: "text" for n, v in zip(names, first) if v.strip() and not _is_number(v)}
            if first is not None and len(first) == len(names) else {})  # the first row's text
    columns = Columns.resolve(names, width, task_column, keep, where=str(path), text=text)
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
        for raw in _line_blocks(f, block_bytes):
            # Blank lines are skipped (neither scored nor rejected) but keep their numbers:
            # pyarrow would read one as a row of empty fields, so they are cut out first.
            block, line_of = _without_blank_lines(raw)
            n_lines = raw.count(b"\n") + (not raw.endswith(b"\n"))
            if not block:
                next_row += n_lines
                continue
            dropped: list[tuple[int, Reject | None]] = []  # (line in block, reject or blank)

            def on_invalid(row, dropped=dropped, start=next_row, line_of=line_of) -> str:
                line = int(line_of[row.number - 1])  # row.number: 1-based in the block
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
            rows = next_row + line_of[: table.num_rows + len(dropped)]
            if dropped:
                keep = np.ones(len(rows), dtype=bool)
                keep[np.searchsorted(line_of, [line for line, _ in dropped])] = False
                rows = rows[keep]
            chunk = table_chunk(table, columns, width, rows)
            chunk.rejects = [r for _, r in dropped if r is not None]
            next_row += n_lines
            yield chunk


def _read_parquet(path: Path, input_shape: tuple[int, ...], batch_size: int,
                  task_column: str | None, keep: tuple[str, ...] = ()):
    import pyarrow.parquet as pq

    width = math.prod(input_shape)
    try:
        # No pre-buffering: it would cache column chunks ahead (memory growing with the file).
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # garbled footers too
        raise InputError(f"{path}: not a valid Parquet file ({exc})") from None
    with pf:
        names = pf.schema_arrow.names
        text = {f.name: str(f.type) for f in pf.schema_arrow
                if not (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
                        or pa.types.is_boolean(f.type) or pa.types.is_null(f.type)
                        or pa.types.is_decimal(f.type) or pa.types.is_list(f.type)
                        or pa.types.is_large_list(f.type)
                        or pa.types.is_fixed_size_list(f.type))}
        columns = Columns.resolve(names, width, task_column, keep, where=str(path), text=text)
        wanted = [n for n in names if n in {*columns.features, columns.task, *columns.keep}]
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
    keep_columns: list[str] | tuple[str, ...] = (),
) -> Iterator[Chunk]:
    """Stream ``path`` as chunks of at most ``batch_size`` rows (memory independent of size);
    ``keep_columns`` (tables only: .csv, .parquet) come along unchanged in ``Chunk.kept``."""
    path = Path(path)
    suffix = suffix_of(path, INPUT_SUFFIXES, "input")
    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist")
    if keep_columns and suffix in (".npy", ".npz"):
        raise InputError(f"{path}: --keep-columns needs a table input (.csv or .parquet); an "
                         "array file has no named columns")
    return _READERS[suffix](path, tuple(input_shape), batch_size, task_column,
                            tuple(keep_columns))


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


