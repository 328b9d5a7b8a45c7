"""How a file or batch is scored: :class:`ScoringConfig` (the flags of ``hnet-serve score``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hnet_serve.configs import validate
from hnet_serve.devices import DeviceName

# Rows per chunk: memory scales with it.
DEFAULT_BATCH_SIZE = 8192


class ScoringConfig(BaseModel):
    """How a file or batch is scored (the CLI flags of ``hnet-serve score``)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = None
    task_column: str | None = None
    # ONNX Runtime by default: on shared CPUs it kept its speed where torch's OpenMP threads did
    # not (docs/benchmarks.md, "Batch scoring"); both give the same predictions.
    backend: Literal["torch", "onnx"] = "onnx"
    threads: int | None = Field(default=None, gt=0, le=1024)  # intra-op threads (None: CPUs)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, gt=0, le=10_000_000)
    probabilities: bool = False
    on_error: Literal["stop", "skip"] = "stop"
    rejects: str | None = None
    row_numbers: bool = False
    # Task inference: rows less confident than this abstain (null task, prediction and label).
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # Columns passed through to the output unchanged, in the input's order (an id to join on).
    keep_columns: list[str] = Field(default_factory=list)
    # where weights are generated and run (hnet_serve.devices: auto, cpu, cuda, cuda:N)
    device: DeviceName = "auto"

    @field_validator("keep_columns", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="before")
    @classmethod
    def _rejects_imply_skip(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("rejects") and values.get("on_error") is None:
            values = {**values, "on_error": "skip"}
        return values

    @model_validator(mode="after")
    def _check(self) -> ScoringConfig:
        if self.task is not None and self.task_column is not None:
            raise ValueError("give either task or task_column, not both")
        if self.rejects and self.on_error == "stop":
            raise ValueError("a rejects file needs on_error='skip' (stop never skips a row)")
        return self

    @classmethod
    def build(cls, **values: Any) -> ScoringConfig:
        """Validate ``values``; errors become :class:`ConfigError` naming the field and value."""
        return validate(cls, {k: v for k, v in values.items() if v is not None}, "scoring:")
