"""What scoring produces: the scores of one batch (:class:`ScoredBatch`) and the report of a
whole file (:class:`ScoreReport`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from hnet_serve.scoring.chunks import Reject
    from hnet_serve.scoring.writers import OutputSchema

_SHOW_REJECTS = 5  # rows named in an error message


@dataclass
class ScoredBatch:
    """Scores of the rows of one batch that were scored, in input order, plus the rejects."""

    rows: np.ndarray  # (m,) int64 row numbers of the scored rows
    task_index: np.ndarray  # (m,) int32 into schema.task_names
    predictions: np.ndarray  # (m,) int64
    probabilities: np.ndarray | None  # (m, C) float32, zero-padded; None unless requested
    rejects: list[Reject]
    schema: OutputSchema
    kept: pa.Table | None = None  # (m rows) the kept columns of the scored rows
    inferred: np.ndarray | None = None  # (m,) bool: the row's task was inferred
    abstained: np.ndarray | None = None  # (m,) bool: below min_confidence (task, prediction null)

    @property
    def tasks(self) -> list[str]:
        """Per scored row, the task (given or inferred)."""
        names = self.schema.task_names
        return [names[i] for i in self.task_index.tolist()]

    def to_arrow(self) -> pa.Table:
        """``[row], task, prediction, [probabilities]`` as a pyarrow table."""
        import pyarrow as pa

        from hnet_serve.scoring.writers import score_columns

        return pa.table(score_columns(
            self.schema, self.rows, self.task_index, self.predictions, self.probabilities,
            kept=self.kept, inferred=self.inferred, abstained=self.abstained,
        ))

    def to_pandas(self):
        return self.to_arrow().to_pandas()


@dataclass
class ScoreReport:
    """What :func:`score_file` did (also the ``--json`` output of ``hnet-serve score``)."""

    input: str
    output: str
    rows_read: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    rows_abstained: int = 0  # inferred below min_confidence: scored without a task
    rejected_rows: list[int] = field(default_factory=list)  # the first 100
    rejects_file: str | None = None
    tasks: dict[str, int] = field(default_factory=dict)  # rows scored per task
    inferred: bool = False
    backend: str = "onnx"
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["rows_per_second"] = round(self.rows_per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


def describe_rejects(rejects: Sequence[Reject], total: int | None = None) -> str:
    shown = "; ".join(f"row {r.row}: {r.reason}" for r in rejects[:_SHOW_REJECTS])
    n = len(rejects) if total is None else total
    more = f" (and {n - _SHOW_REJECTS} more)" if n > _SHOW_REJECTS else ""
    return shown + more
