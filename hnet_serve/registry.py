"""The task registry: named tasks mapped to rows of the hypernetwork's embedding table."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hnet_serve.errors import InputError, TaskExistsError, UnknownTaskError

TASK_NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
_NAME_RE = re.compile(rf"^{TASK_NAME_PATTERN}$")


def validate_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name; raise :class:`InputError` otherwise.

    Names are also used as file names (``<task>.onnx``), so ``.`` and ``..`` are refused too.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InputError(
            f"invalid task name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(and not '.' or '..')"
        )
    return name


class TaskInfo(BaseModel):
    """One task: its embedding row and what a user needs to call it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    index: int = Field(ge=0)
    input_shape: tuple[int, ...]
    num_classes: int = Field(gt=0)
    label_names: list[str] | None = None
    head: int = Field(default=0, ge=0)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_task_name(v)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _labels(self):
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.label_names)} label names for "
                f"{self.num_classes} classes"
            )
        return self

    def summary(self) -> dict[str, Any]:
        """What ``info`` and ``GET /tasks`` show of a task."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "label_names": self.label_names,
        }


class TaskRegistry:
    """Ordered tasks; ``tasks[i].index == i`` always holds (row i of the embedding table)."""

    def __init__(self, tasks: list[TaskInfo] | None = None) -> None:
        self._tasks: list[TaskInfo] = []
        self._by_name: dict[str, TaskInfo] = {}
        for t in tasks or []:
            if t.index != len(self._tasks):
                raise InputError(
                    f"task {t.name!r} has index {t.index}, expected {len(self._tasks)}"
                )
            self._insert(t)

    def _insert(self, task: TaskInfo) -> None:
        if task.name in self._by_name:
            raise TaskExistsError(f"task {task.name!r} already exists")
        self._tasks.append(task)
        self._by_name[task.name] = task

    def add(self, name: str, **fields: Any) -> TaskInfo:
        validate_task_name(name)
        if name in self._by_name:
            raise TaskExistsError(f"task {name!r} already exists")
        task = TaskInfo(name=name, index=len(self._tasks), **fields)
        self._insert(task)
        return task

    def get(self, name: str) -> TaskInfo:
        try:
            return self._by_name[name]
        except (KeyError, TypeError):
            raise UnknownTaskError(str(name), self.names) from None

    def index_of(self, name: str) -> int:
        return self.get(name).index

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._by_name

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self):
        return iter(self._tasks)

    def __getitem__(self, i: int) -> TaskInfo:
        return self._tasks[i]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    def to_list(self) -> list[dict[str, Any]]:
        return [t.model_dump(mode="json") for t in self._tasks]

    @classmethod
    def from_list(cls, items: list[dict[str, Any]]) -> TaskRegistry:
        return cls([TaskInfo.model_validate(i) for i in items])
