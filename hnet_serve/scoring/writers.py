"""Outputs of batch scoring (``.parquet``, ``.csv``, ``.npy``) and the rejects file (JSON lines),
written to a temporary sibling and renamed into place on :meth:`AtomicOutput.commit`;
:meth:`AtomicOutput.abort` (or an exception inside ``with``) removes the temporary file, so an
interrupted run leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from hnet_serve.errors import ConfigError
from hnet_serve.fsutil import fsync_path, temp_sibling
from hnet_serve.scoring.chunks import Reject
from hnet_serve.scoring.readers import OUTPUT_SUFFIXES, suffix_of


# -- writers ------------------------------------------------------------------------------
@dataclass
class OutputSchema:
    """What every output row holds: task, prediction, its class name (``label``), and
    optionally row number/probabilities."""

    task_names: list[str]  # tasks are written by index into this list
    num_probabilities: int | None = None  # None: no probabilities column
    row_numbers: bool = False
    # Class names per task (same order as task_names); None: the class index as text.
    class_names: list[list[str]] | None = None
    kept: pa.Schema | None = None  # columns passed through unchanged, first in every row
    task_inferred: bool = False  # a task_inferred column (the task may be inferred)
    may_abstain: bool = False  # min_confidence > 0: task/prediction/label may be null

    def __post_init__(self) -> None:
        names = self.class_names or [[] for _ in self.task_names]
        # Every (task, class) name in one flat list: a row's label is entry
        # label_offsets[task] + prediction, so labels are a dictionary column for free.
        self.label_names = [n for task in names for n in task]
        self.label_offsets = np.cumsum([0, *(len(t) for t in names[:-1])]).astype(np.int64)

    def label_index(self, task_idx: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        return self.label_offsets[task_idx] + predictions  # (m,) into label_names


def score_columns(
    schema: OutputSchema,
    rows: np.ndarray,  # (m,) int64
    task_idx: np.ndarray,  # (m,) int32 into schema.task_names
    predictions: np.ndarray,  # (m,) int64
    probabilities: np.ndarray | None,  # (m, C) float32
    *,
    csv: bool = False,
    kept: pa.Table | None = None,  # (m rows) schema.kept's columns
    inferred: np.ndarray | None = None,  # (m,) bool: was the row's task inferred
    abstained: np.ndarray | None = None,  # (m,) bool: task, prediction and label are null
) -> dict[str, pa.Array]:
    """The output columns as Arrow arrays: ``[kept...], [row], task, [task_inferred],
    prediction, label, [probabilities]``.

    ``task`` is dictionary-encoded (a few distinct names over many rows). A CSV cell holds one
    value, so for CSV ``task`` is plain strings and ``probabilities`` a JSON list per row.
    """
    cols: dict[str, pa.Array] = {}
    if schema.kept is not None:
        source = kept if kept is not None else schema.kept.empty_table()
        for name in schema.kept.names:
            cols[name] = source.column(name).combine_chunks().cast(schema.kept.field(name).type)
    if schema.row_numbers:
        cols["row"] = pa.array(rows, pa.int64())
    tasks = pa.DictionaryArray.from_arrays(
        pa.array(task_idx, pa.int32(), mask=abstained), pa.array(schema.task_names, pa.string())
    )
    cols["task"] = tasks.dictionary_decode() if csv else tasks
    if schema.task_inferred:
        cols["task_inferred"] = pa.array(
            inferred if inferred is not None else np.zeros(len(rows), bool), pa.bool_())
    cols["prediction"] = pa.array(predictions, pa.int64(), mask=abstained)
    labels = pa.DictionaryArray.from_arrays(
        pa.array(schema.label_index(task_idx, predictions), pa.int32(), mask=abstained),
        pa.array(schema.label_names, pa.string()),
    )
    cols["label"] = labels.dictionary_decode() if csv else labels
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
        kept: pa.Table | None = None,  # (m rows) the passed-through columns
        inferred: np.ndarray | None = None,  # (m,) bool
        abstained: np.ndarray | None = None,  # (m,) bool
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

    def _table(self, rows, task_idx, predictions, probabilities, kept=None, inferred=None,
               abstained=None) -> pa.Table:
        return pa.table(score_columns(self.schema, rows, task_idx, predictions, probabilities,
                                      csv=self.csv, kept=kept, inferred=inferred,
                                      abstained=abstained))

    def write(self, rows, task_idx, predictions, probabilities, kept=None, inferred=None,
              abstained=None) -> None:
        self.writer.write_table(self._table(rows, task_idx, predictions, probabilities, kept,
                                            inferred, abstained))
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
    """The structured record of a ``.npy`` output: ``[row], task, prediction, [probabilities]``
    (the documented layout: no ``label`` field; the task's ``label_names`` map predictions)."""
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

    def write(self, rows, task_idx, predictions, probabilities, kept=None, inferred=None,
              abstained=None) -> None:
        if abstained is not None:  # pragma: no cover - open_writer refuses min_confidence here
            raise ConfigError("a .npy output has no null: it cannot hold abstained rows")
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
    """The atomic writer for ``path``'s format (``.parquet``, ``.csv`` or ``.npy``; a ``.npy``
    output keeps its documented fixed layout, so it takes no kept columns)."""
    if schema.kept is not None and str(path).lower().endswith(".npy"):
        raise ConfigError("--keep-columns needs a table output (.parquet or .csv), not .npy")
    if schema.may_abstain and str(path).lower().endswith(".npy"):
        raise ConfigError("--min-confidence needs a table output (.parquet or .csv): a .npy "
                          "output has no null for an abstained row")
    return _WRITERS[suffix_of(path, OUTPUT_SUFFIXES, "output")](path, schema)

