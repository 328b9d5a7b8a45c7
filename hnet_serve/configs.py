"""Typed settings: validating pydantic configs into one-line errors, and reading config files.

Every part of hnet-serve has one pydantic model for its settings (target, hypernetwork,
training, serving, scoring). This module is the one place where a validation failure becomes an
:class:`~hnet_serve.errors.HNetError` whose message names the field and the bad value, and where
a YAML or JSON settings file is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hnet_serve.errors import ConfigError, HNetError

M = TypeVar("M", bound=BaseModel)


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """``(dotted field, message)`` of a validation error's first problem; the field is ``""``
    for a problem of the whole model (e.g. two fields that exclude each other)."""
    first = exc.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")


def describe_error(exc: ValidationError) -> str:
    """``<field>=<value>: <message>`` of a validation error's first problem (``<message>``
    alone for a problem of the whole model)."""
    loc, msg = first_problem(exc)
    if not loc:
        return msg
    bad = repr(exc.errors()[0].get("input"))
    bad = bad if len(bad) <= 80 else bad[:77] + "..."  # a hostile file's value can be huge
    return f"{loc}={bad}: {msg}"


def validate(
    cls: type[M],
    data: Any,
    what: str,
    *,
    error: type[HNetError] = ConfigError,
) -> M:
    """``cls.model_validate(data)``; a failure raises ``error("<what> <field>=<value>: <msg>")``."""
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise error(f"{what} {describe_error(exc)}") from None


def read_mapping_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML (or, by its ``.json`` suffix, JSON) file holding one mapping; ``{}`` when empty."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(p)!r} ({exc})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json and yaml raise different types
        raise ConfigError(f"{what} {str(p)!r} is not valid {p.suffix or 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of settings")
    return data
