"""Batch offline scoring: files of rows (or in-memory batches) through the serving runtime.

``hnet-serve score CHECKPOINT --input FILE --output FILE`` and :func:`score_file` stream the input
in chunks (memory does not grow with the file), score each chunk through
:class:`hnet_serve.serving.runtime.Runtime` (the service's cache, backends and task inference, so batch
and online predictions agree), and write ``task`` and ``prediction`` per row, in input order, to a
temporary file that is renamed into place at the end. :func:`score_batch` scores one numpy array,
pandas DataFrame or pyarrow table in memory; ``hnet_serve.scoring.ray`` runs the same per-batch
code on Ray Data.

Which task scores a row: ``task`` (every row), ``task_column`` (per row; an empty value means
"infer it"), or neither (task inference per row, the paper's HNET+ENT rule). Rows that cannot be
scored (wrong width, non-numeric or missing values, NaN/inf, unknown task) stop the run with their
row numbers (``on_error="stop"``, the default) or are skipped and listed in a rejects file
(``on_error="skip"``, implied by ``rejects=FILE``). See docs/scoring.md.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hnet_serve.errors import ConfigError, InputError, OutputError
from hnet_serve.fsutil import check_output_file
from hnet_serve.scoring.config import ScoringConfig
from hnet_serve.scoring.results import ScoredBatch, ScoreReport, describe_rejects

if TYPE_CHECKING:
    import pyarrow as pa

    from hnet_serve.scoring.chunks import Chunk
    from hnet_serve.serving.runtime import Runtime

_SLICE_BYTES = 2 << 20


# -- the scorer ---------------------------------------------------------------------------
class Scorer:
    """Scores :class:`~hnet_serve.scoring.chunks.Chunk` s through a runtime: the one code path of
    the CLI, :func:`score_file`, :func:`score_batch` and the Ray Data class."""

    def __init__(self, runtime: Runtime, config: ScoringConfig) -> None:
        from hnet_serve.scoring.writers import OutputSchema

        self.runtime = runtime
        self.config = config
        registry = runtime.model.registry
        self.input_shape = tuple(runtime.model.target_config.input_shape)
        self.width = math.prod(self.input_shape)
        if config.task is not None:
            info = runtime.task(config.task)  # UnknownTaskError before any row is read
            names, classes = [info.name], info.num_classes
        else:
            names = registry.names
            classes = max(t.num_classes for t in registry)
        self.schema = OutputSchema(
            task_names=names,
            num_probabilities=classes if config.probabilities else None,
            row_numbers=config.row_numbers,
            class_names=[runtime.labels_of([n] * runtime.task(n).num_classes,
                                           np.arange(runtime.task(n).num_classes))
                         for n in names],
            task_inferred=config.task is None,
            may_abstain=config.task is None and config.min_confidence > 0,
        )
        self._index = {n: i for i, n in enumerate(names)}
        # Rows per runtime call: about _SLICE_BYTES of features, so that a slice stays in cache
        # from the runtime's validation through the model (measured faster than one call per
        # chunk), and never more than the runtime's max_rows (a serving limit).
        self.step = max(1, min(int(runtime.config.max_rows), _SLICE_BYTES // (4 * self.width)))

    def _task_problems(self, tasks: list[str | None], bad: dict[int, str]) -> None:
        registry = self.runtime.model.registry
        unknown = {t for t in set(tasks) if t is not None and t not in registry}
        if unknown:
            for i, t in enumerate(tasks):
                if t in unknown:
                    bad.setdefault(i, f"unknown task {t!r}")

    def score_chunk(self, chunk: Chunk) -> ScoredBatch:
        """Score the good rows of ``chunk``; bad ones raise (``stop``) or become rejects."""
        from hnet_serve.scoring.chunks import mark_nonfinite

        bad = dict(chunk.bad)
        if self.config.task_column is not None:
            if chunk.tasks is None:  # pragma: no cover - readers always fill it
                raise InputError("no task column in this batch")
            self._task_problems(chunk.tasks, bad)
        try:
            return self._score(chunk, bad)
        except InputError:
            # The runtime validates every row it gets and refuses NaN/inf, so only now do we
            # look for those rows (a pass over the chunk that clean chunks never pay). Nothing
            # found: the error was about something else, let it through.
            known = len(bad)
            mark_nonfinite(chunk.features, bad)
            if len(bad) == known:
                raise
            return self._score(chunk, bad)

    def _score(self, chunk: Chunk, bad: dict[int, str]) -> ScoredBatch:
        from hnet_serve.scoring.chunks import Reject
        from hnet_serve.task_inference import softmax

        column = self.config.task_column is not None
        rejects = sorted(
            [*chunk.rejects, *(Reject(int(chunk.rows[i]), why, chunk.raw(i)) for i, why in bad.items())],
            key=lambda r: r.row,
        )
        if rejects and self.config.on_error == "stop":
            raise InputError(
                f"{len(rejects)} bad row(s): {describe_rejects(rejects)} (to skip bad rows "
                "instead: --on-error skip [--rejects FILE], or on_error='skip')"
            )
        if bad:
            keep = np.ones(len(chunk), dtype=bool)
            keep[list(bad)] = False
            pos = np.flatnonzero(keep)
            x = chunk.features[pos]  # (m, d)
            tasks = [chunk.tasks[i] for i in pos.tolist()] if column else None
            rows = chunk.rows[pos]
            kept = chunk.kept.take(pos) if chunk.kept is not None else None
        else:
            x, tasks, rows = chunk.features, chunk.tasks if column else None, chunk.rows
            kept = chunk.kept
        m = x.shape[0]
        task_idx = np.empty(m, dtype=np.int32)
        preds = np.empty(m, dtype=np.int64)
        if self.config.task is not None:
            task_idx[:] = 0
        confidence = np.full(m, np.nan, dtype=np.float32)  # inferred rows' confidence
        probs = (
            np.zeros((m, self.schema.num_probabilities), dtype=np.float32)
            if self.schema.num_probabilities is not None else None
        )
        for lo in range(0, m, self.step):
            hi = min(m, lo + self.step)
            if self.config.task is not None and not column:
                # One given task: argmax of the logits (softmax keeps the order), probabilities
                # only when they are written.
                logits = self.runtime.task_logits(self.config.task, x[lo:hi])  # (b, C)
                preds[lo:hi] = logits.argmax(1)
                if probs is not None:
                    probs[lo:hi, : logits.shape[1]] = softmax(logits)
                continue
            if column:
                pred = self.runtime.predict_mixed(tasks[lo:hi], x[lo:hi])
            else:
                pred = self.runtime.predict(self.config.task, x[lo:hi])
            if self.config.task is None:
                task_idx[lo:hi] = [self._index[t] for t in pred.tasks]
            preds[lo:hi] = pred.predictions
            if pred.confidence is not None:
                confidence[lo:hi] = pred.confidence
            if probs is not None:
                probs[lo:hi, : pred.probabilities.shape[1]] = pred.probabilities
        if self.config.task is not None:
            inferred = None
        elif column:
            inferred = np.fromiter((t is None for t in tasks), dtype=bool, count=m)
        else:
            inferred = np.ones(m, dtype=bool)
        # Rows whose inferred task is less certain than min_confidence abstain: no task, no guess.
        abstained = (confidence < self.config.min_confidence) if inferred is not None else None
        return ScoredBatch(rows, task_idx, preds, probs, rejects, self.schema, kept, inferred,
                           abstained if abstained is not None and abstained.any() else None)


def runtime_for(checkpoint: Runtime | str | os.PathLike, config: ScoringConfig) -> Runtime:
    """``checkpoint`` if it is a runtime already, else the checkpoint loaded for ``config``."""
    from hnet_serve.serving.runtime import Runtime

    if isinstance(checkpoint, Runtime):
        return checkpoint
    # A batch-sized row limit: the service's max_rows guards requests, not files. Sessions
    # without the softmax output: probabilities are computed only when they are written.
    return Runtime.from_checkpoint(checkpoint, backend=config.backend, max_rows=config.batch_size,
                                   intra_op_threads=config.threads, device=config.device,
                                   onnx_softmax=False)


# -- in-memory batches --------------------------------------------------------------------
def _as_table(batch: Any) -> pa.Table:
    """A pandas DataFrame, dict of columns (Ray's numpy format) or list of rows -> Arrow."""
    import pyarrow as pa

    def column(values: Any) -> pa.Array:
        if isinstance(values, np.ndarray) and values.ndim >= 2 and values.dtype.kind in "fiub":
            flat = values.reshape(len(values), -1)  # (n, d): a fixed-size list per row
            return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        try:
            return pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types (e.g. numbers and words in one column): keep them as text, so the
            # non-numeric cells reject their own rows.
            return pa.array([None if _missing(v) else str(v) for v in values], pa.string())

    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return batch
    if isinstance(batch, dict):
        return pa.table({str(k): column(v) for k, v in batch.items()})
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is optional
        pd = None
    if pd is not None and isinstance(batch, pd.DataFrame):
        return pa.table({str(k): column(batch[k].to_numpy()) for k in batch.columns})
    if isinstance(batch, (list, tuple, np.ndarray)):
        try:
            return pa.table({"input": pa.array([np.asarray(r).reshape(-1) for r in batch])})
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise InputError(f"inputs must be rows of numbers ({exc})") from None
    raise InputError(
        f"cannot score a {type(batch).__name__}: pass a numpy array, pandas DataFrame, "
        "pyarrow Table/RecordBatch, a dict of columns or a list of rows"
    )


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def batch_chunk(batch: Any, scorer: Scorer, row_offset: int = 0) -> Chunk:
    """Any supported in-memory batch as a :class:`Chunk` for ``scorer``."""
    from hnet_serve.scoring.chunks import (
        Columns,
        array_chunk,
        check_array_width,
        table_chunk,
    )

    if isinstance(batch, np.ndarray) and batch.dtype.kind in "fiub" and batch.dtype.fields is None:
        if scorer.config.task_column is not None or scorer.config.keep_columns:
            raise ConfigError("a plain array has no named columns (task or kept columns): pass "
                              "a table or DataFrame")
        if batch.ndim < 2:
            raise InputError(f"expected a 2-D array of rows, got shape {list(batch.shape)}")
        check_array_width(batch.shape, scorer.input_shape, "the array")
        return array_chunk(batch, row_offset)
    table = _as_table(batch)
    columns = Columns.resolve(table.column_names, scorer.width, scorer.config.task_column,
                              scorer.config.keep_columns)
    return table_chunk(table, columns, scorer.width, row_offset)


def score_batch(
    runtime: Runtime | str | os.PathLike,
    batch: Any,
    *,
    task: str | None = None,
    task_column: str | None = None,
    probabilities: bool = False,
    on_error: Literal["stop", "skip"] = "stop",
    row_offset: int = 0,
) -> ScoredBatch:
    """Score a numpy array ``(N, d)``/``(N, *input_shape)``, a pandas DataFrame, a pyarrow
    Table/RecordBatch, a dict of columns or a list of rows, in memory.

    Tables take their features from an ``input`` list column or from every column except
    ``task_column``. Returns the scored rows (``rows`` are positions + ``row_offset``) and, with
    ``on_error="skip"``, the rejected ones; with ``"stop"`` a bad row raises :class:`InputError`.
    """
    config = ScoringConfig.build(
        task=task, task_column=task_column, probabilities=probabilities, on_error=on_error
    )
    scorer = Scorer(runtime_for(runtime, config), config)
    return scorer.score_chunk(batch_chunk(batch, scorer, row_offset))


# -- files --------------------------------------------------------------------------------
def _check_paths(input: Path, output: Path, rejects: Path | None,
                 checkpoint: Path | None = None) -> None:
    """Paths are compared resolved (symlinks, ``..``, ``./``): two spellings of one file are one
    file. Outputs follow the output rule of :func:`hnet_serve.fsutil.check_output_file`."""
    from hnet_serve.scoring.readers import INPUT_SUFFIXES, OUTPUT_SUFFIXES, suffix_of

    suffix_of(input, INPUT_SUFFIXES, "input")
    suffix_of(output, OUTPUT_SUFFIXES, "output")
    if not input.is_file():
        raise InputError(f"input file {str(input)!r} does not exist")
    same = [(output, "output")] + ([(rejects, "rejects file")] if rejects else [])
    for path, what in same:
        if path.resolve() == input.resolve():
            raise ConfigError(f"the {what} {str(path)!r} is the input file: it would be replaced")
    if rejects is not None and rejects.resolve() == output.resolve():
        raise ConfigError("the rejects file and the output must be different files "
                          f"({str(rejects)!r} and {str(output)!r} are the same file)")
    protect = {"checkpoint": checkpoint} if checkpoint is not None else None
    for path, flag in [(output, "--output")] + ([(rejects, "--rejects")] if rejects else []):
        check_output_file(path, protect=protect, flag=flag)


def _check_task(checkpoint: str | os.PathLike, task: str) -> None:
    from hnet_serve.checkpoint import read_manifest
    from hnet_serve.errors import UnknownTaskError

    names = [t.get("name") for t in read_manifest(checkpoint)["tasks"]]
    if task not in names:
        raise UnknownTaskError(task, names)


def score_file(
    checkpoint: Runtime | str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    progress: bool = True,
    **options: Any,
) -> ScoreReport:
    """Score every row of ``input`` into ``output``; see :class:`ScoringConfig` for ``options``.

    ``checkpoint`` is a checkpoint directory or a ready :class:`Runtime` (then ``backend`` and
    ``threads`` are the runtime's). Memory is bounded by ``batch_size`` (and a Parquet input's row-group size), not
    by the file. ``output`` (and the rejects file) appear only when the whole input was scored.
    """
    from tqdm import tqdm

    from hnet_serve.scoring.readers import count_rows, read_chunks
    from hnet_serve.scoring.writers import RejectsWriter, open_writer
    from hnet_serve.serving.runtime import Runtime

    config = ScoringConfig.build(**options)
    input, output = Path(input), Path(output)
    rejects_path = Path(config.rejects) if config.rejects else None
    _check_paths(input, output, rejects_path,
                 None if isinstance(checkpoint, Runtime) else Path(checkpoint))
    if config.task is not None and not isinstance(checkpoint, Runtime):
        _check_task(checkpoint, config.task)  # before the (slower) load and graph build
    runtime = runtime_for(checkpoint, config)
    scorer = Scorer(runtime, config)
    report = ScoreReport(str(input), str(output), rejects_file=config.rejects,
                         backend=runtime.config.backend, inferred=config.task is None)
    counts: Counter[int] = Counter()
    t0 = time.perf_counter()
    source = read_chunks(input, scorer.input_shape, batch_size=config.batch_size,
                         task_column=config.task_column, keep_columns=config.keep_columns)
    chunks: Iterator[Chunk] = source
    writers = []
    try:
        if config.keep_columns:
            # The kept columns' types come from the data (text in a CSV): from the first chunk.
            first = next(source, None)
            scorer.schema.kept = (first.kept.schema if first is not None and first.kept is not None
                                  else pa_schema_of_text(config.keep_columns))
            chunks = itertools.chain([first] if first is not None else [], source)
        writer = open_writer(output, scorer.schema)
        writers.append(writer)
        rejects_out = RejectsWriter(rejects_path) if rejects_path else None
        if rejects_out is not None:
            writers.append(rejects_out)
        with tqdm(total=count_rows(input), unit="rows", unit_scale=True, file=sys.stderr,
                  desc="scoring", disable=not progress, dynamic_ncols=True) as bar:
            for chunk in chunks:
                scored = scorer.score_chunk(chunk)
                writer.write(scored.rows, scored.task_index, scored.predictions,
                             scored.probabilities, scored.kept, scored.inferred,
                             scored.abstained)
                if rejects_out is not None:
                    rejects_out.write(scored.rejects)
                seen = len(chunk) + len(chunk.rejects)
                report.rows_read += seen
                report.rows_scored += len(scored.rows)
                report.rows_rejected += len(scored.rejects)
                room = 100 - len(report.rejected_rows)
                report.rejected_rows += [r.row for r in scored.rejects[:room]]
                if scored.abstained is not None:
                    report.rows_abstained += int(scored.abstained.sum())
                    counts.update(_count(scored.task_index[~scored.abstained]))
                else:
                    counts.update(_count(scored.task_index))
                bar.update(seen)
        # Rejects first: an output never appears without its rejects file.
        for w in reversed(writers):
            w.commit()
    except OSError as exc:  # the disk refused (full, read-only): one line, no partial output
        for w in writers:
            w.abort()
        raise OutputError(f"cannot write the output {str(output)!r}"
                          f"{' or its rejects file' if rejects_path else ''}: "
                          f"{exc.strerror or exc}") from None
    except BaseException:  # Ctrl-C included: leave no partial output behind
        for w in writers:
            w.abort()
        raise
    finally:
        source.close()
    report.seconds = time.perf_counter() - t0
    report.tasks = {scorer.schema.task_names[i]: n for i, n in sorted(counts.items())}
    return report


def pa_schema_of_text(names: list[str]) -> pa.Schema:
    """Kept columns of an input without rows: text columns."""
    import pyarrow as pa

    return pa.schema([(n, pa.string()) for n in names])


def _count(task_index: np.ndarray) -> dict[int, int]:
    if task_index.size == 0:
        return {}
    bins = np.bincount(task_index)
    return {int(i): int(bins[i]) for i in np.flatnonzero(bins)}
