"""Chunks of input rows for batch scoring, and the per-row checks that decide which rows can
be scored.

Every chunk arrives as a :class:`Chunk`: a float32 feature matrix, the input row number of each
row, an optional per-row task, and the rows that cannot be scored (wrong width, non-numeric or
missing values, NaN/inf) with the reason why. Row numbers are 0-based data rows in file order (a
CSV header is not a row: row ``r`` is on line ``r + 2``). Features come either from one
list/array column named ``input`` or, without one, from every column except the task column, in
file order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hnet_serve.errors import InputError

INPUT_COLUMN = "input"  # the list/array feature column


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
    kept: pa.Table | None = None  # (n rows) the columns passed through unchanged, if any

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
    keep: list[str] = field(default_factory=list)  # passed through, in the input's order

    @classmethod
    def resolve(cls, names: list[str], width: int, task_column: str | None,
                keep: list[str] | tuple[str, ...] = (), *, where: str = "the input",
                text: dict[str, str] | None = None) -> Columns:
        """``text``: columns known to hold text (name -> type), refused as features by name."""
        if task_column is not None and task_column not in names:
            raise InputError(f"task column {task_column!r} not found (columns: {show_names(names)})")
        missing = [k for k in keep if k not in names]
        if missing:
            raise InputError(f"--keep-columns names columns the input does not have: "
                             f"{show_names(missing)} (columns: {show_names(names)})")
        if task_column is not None and task_column in keep:
            raise InputError(f"the task column {task_column!r} cannot also be a kept column")
        kept = [n for n in names if n in keep]
        if INPUT_COLUMN in names and task_column != INPUT_COLUMN and INPUT_COLUMN not in keep:
            return cls([INPUT_COLUMN], task_column, True, kept)
        feats = [n for n in names if n != task_column and n not in keep]
        cls(feats, task_column, False, kept).refuse_non_numeric(text or {}, where)
        if len(feats) != width:
            hint = "" if task_column else "; name a task column with --task-column"
            raise InputError(
                f"the input has {len(feats)} feature columns ({show_names(feats)}) but the model "
                f"takes {width} features: give {width} numeric columns or one list column "
                f"named {INPUT_COLUMN!r}{hint}"
            )
        return cls(feats, task_column, False, kept)

    def refuse_non_numeric(self, types: dict[str, str], where: str) -> None:
        """Feature columns that hold text (an id, a category) are named, with the way out."""
        text = [n for n in self.features if n in types]
        if text:
            shown = ", ".join(f"{n!r} ({types[n]})" for n in text[:6])
            raise InputError(
                f"{where}: non-numeric column(s) {shown} would be model features: pass them "
                f"through with --keep-columns {','.join(text[:6])}, or drop them")


def show_names(names: list[str], k: int = 6) -> str:
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
    kept = table.select(columns.keep) if columns.keep else None
    if kept is not None and isinstance(kept, pa.RecordBatch):
        kept = pa.Table.from_batches([kept])
    return Chunk(rows, feats, tasks, bad, raw=lambda i: table.slice(i, 1).to_pylist()[0],
                 kept=kept)


