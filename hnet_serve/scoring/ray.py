"""Batch scoring on Ray Data: the same per-batch scorer as ``hnet-serve score``, on many workers.

:class:`HNetScorer` is a callable class for ``ray.data.Dataset.map_batches``: each actor loads
the checkpoint once (runtime, weight cache, backend) and scores every batch it is given, with a
fixed task, a task column, or task inference. It imports nothing from Ray, so it can be tested
and used without it; :func:`score_dataset` wires it into ``map_batches`` (``pip install
'hnet-serve[ray]'``). See docs/scoring.md for a Parquet-in, Parquet-out example.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hnet_serve.scoring.config import DEFAULT_BATCH_SIZE
from hnet_serve.scoring.scorer import (
    Scorer,
    ScoringConfig,
    batch_chunk,
    runtime_for,
)


class HNetScorer:
    """``batch -> scores`` for ``map_batches``; one runtime per actor (constructed once).

    Output columns: ``keep_columns`` (passed through, e.g. an id to join on), ``task``,
    ``prediction`` and, with ``probabilities=True``, ``probabilities``; one row per scored input
    row, in batch order. Batches may be pyarrow tables (``batch_format="pyarrow"``, the fastest),
    pandas DataFrames or dicts of numpy arrays; the result has the same format. With
    ``on_error="skip"`` bad rows are dropped (keep an id column to see which); ``"stop"`` fails
    the task with the rows' positions and reasons.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        task: str | None = None,
        task_column: str | None = None,
        backend: Literal["torch", "onnx"] | None = None,
        threads: int | None = None,
        probabilities: bool = False,
        on_error: Literal["stop", "skip"] = "stop",
        keep_columns: Sequence[str] = (),
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        config = ScoringConfig.build(
            task=task, task_column=task_column, backend=backend, threads=threads,
            probabilities=probabilities, on_error=on_error, batch_size=batch_size,
            keep_columns=list(keep_columns),
        )
        self.scorer = Scorer(runtime_for(checkpoint, config), config)

    def __call__(self, batch: Any) -> Any:
        chunk = batch_chunk(batch, self.scorer)
        if chunk.kept is not None:
            self.scorer.schema.kept = chunk.kept.schema
        return _like(batch, self.scorer.score_chunk(chunk).to_arrow())


def _like(batch: Any, table: Any) -> Any:
    """``table`` in the format ``batch`` came in."""
    import pyarrow as pa

    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return table
    if isinstance(batch, dict):
        out = {}
        for name in table.column_names:
            col = table[name].combine_chunks()
            if pa.types.is_fixed_size_list(col.type):  # probabilities -> (n, C)
                out[name] = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
            elif pa.types.is_dictionary(col.type):
                out[name] = np.asarray(col.dictionary_decode().to_pylist(), dtype=object)
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        return out
    return table.to_pandas()


def score_dataset(
    ds: Any,
    checkpoint: str | os.PathLike,
    *,
    concurrency: int = 2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_cpus: float | None = None,
    **options: Any,
) -> Any:
    """``ds.map_batches(HNetScorer, ...)`` on a pool of ``concurrency`` actors.

    ``options`` are :class:`HNetScorer`'s (task, task_column, backend, threads, probabilities,
    on_error, keep_columns). The checkpoint path must be readable from every worker.
    ``num_cpus`` per actor defaults to what leaves one CPU of the cluster to the read and write
    tasks (actors that reserve every CPU starve the reads, and the pipeline never finishes);
    ``threads`` defaults to ``num_cpus`` rounded up, so actors do not fight over cores.
    """
    import ray

    options = {"batch_size": batch_size, **options}
    ScoringConfig.build(**{k: v for k, v in options.items() if k != "keep_columns"})  # fail early
    if num_cpus is None:
        cpus = float(ray.cluster_resources().get("CPU", concurrency + 1))
        num_cpus = max(0.25, min(1.0, (cpus - 1) / concurrency))
    options.setdefault("threads", max(1, math.ceil(num_cpus)))
    return ds.map_batches(
        HNetScorer,
        fn_constructor_args=(str(checkpoint),),
        fn_constructor_kwargs=options,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
