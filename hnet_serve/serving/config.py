"""How the runtime and the service serve a checkpoint: :class:`ServingConfig`.

Defaults < a YAML/JSON file named by ``HNET_CONFIG`` < ``HNET_<FIELD>`` variables < explicit
overrides (CLI flags); see docs/serving.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hnet_serve.configs import read_mapping_file, validate
from hnet_serve.devices import DeviceName
from hnet_serve.errors import ConfigError

MiB = 1024 * 1024
# Task inference compares the entropies of float32 softmax(logits / T). Below T_MIN the softmax of
# typical logits (gaps of a few units) underflows to one-hot under every task, so every entropy is
# 0 and the tie sends every row to the first task; above T_MAX every softmax is uniform to float32
# precision (the same tie). Outside the range (inf, 1e308, 1e-45, ...) is refused.
TEMPERATURE_MIN = 0.01
TEMPERATURE_MAX = 100.0
ENV_PREFIX = "HNET_"
CONFIG_ENV = "HNET_CONFIG"

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object) -> int:
    """``536870912``, ``"512MiB"``, ``"1.5 GB"`` -> bytes (int)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"byte size must be >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"expected a byte size like 536870912 or '512MiB', got {value!r}")


class ServingConfig(BaseModel):
    """How the runtime (and the service) serves a checkpoint.

    Every field can come from an environment variable ``HNET_<FIELD>`` (upper case; lists are
    comma-separated) or from a YAML/JSON file named by ``HNET_CONFIG``; see
    :meth:`from_env` and docs/serving.md.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = None
    # ONNX Runtime by default: within 1.2x of a bare ORT session at batch 1 and 64, where the
    # torch path measured 1.56x / 2.16x (issue 17; benchmarks/bench_serving.py)
    backend: Literal["torch", "onnx"] = "onnx"
    cache_bytes: int = Field(default=512 * MiB, ge=0)
    pinned: list[str] = Field(default_factory=list)
    warm: list[str] = Field(default_factory=list)
    max_rows: int = Field(default=4096, gt=0)
    max_request_bytes: int = Field(default=64 * MiB, gt=0)
    intra_op_threads: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX,
                               allow_inf_nan=False)
    exclude_from_inference: list[str] = Field(default_factory=list)
    # task inference: rows less confident than this abstain (request field min_confidence)
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # the Open Inference Protocol's name of the task-inference model (serving/oip.py)
    oip_infer_model: str = Field(default="_infer", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # where the hypernetwork, the cached weights and the backends run (hnet_serve.devices)
    device: DeviceName = "auto"
    # the dtype cached weights are stored and multiplied in (torch backend; docs/serving.md)
    cache_dtype: Literal["float32", "bfloat16"] = "float32"
    # onnx backend: each task's session also outputs the softmax of its logits, so one run
    # answers a request (numpy's softmax cost 5-8 us at batch 1). ORT runs every node whatever
    # the outputs asked for, so batch scoring, which writes probabilities only on request,
    # builds its sessions without it.
    onnx_softmax: bool = True

    @field_validator("cache_bytes", "max_request_bytes", mode="before")
    @classmethod
    def _sizes(cls, v: object) -> int:
        return parse_bytes(v)

    @field_validator("pinned", "warm", "exclude_from_inference", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _bf16_runs_on_torch(self) -> ServingConfig:
        # Only the torch backend has a bfloat16 path: bfloat16 alone picks it, bfloat16 with an
        # explicit onnx backend is refused.
        if self.cache_dtype == "bfloat16" and self.backend != "torch":
            if "backend" in self.model_fields_set:
                raise ValueError("cache_dtype bfloat16 needs backend 'torch' (the onnx "
                                 "backend's sessions run float32 graphs)")
            self.backend = "torch"
        return self

    @classmethod
    def build(cls, **values: Any) -> ServingConfig:
        """Validate ``values``; errors become :class:`ConfigError` naming the field and value."""
        return validate(cls, values, "serving config:")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServingConfig:
        """Defaults < config file (``HNET_CONFIG``) < ``HNET_*`` variables < ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get(CONFIG_ENV):
            values.update(read_config_file(env[CONFIG_ENV]))
        for field in cls.model_fields:
            raw = env.get(ENV_PREFIX + field.upper())
            if raw is not None and raw != "":
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping of ServingConfig fields (an optional top-level ``serving:`` key)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serving config file {str(p)!r} does not exist")
    data = read_mapping_file(p, "serving config file")
    if isinstance(data.get("serving"), dict):
        data = data["serving"]
    return data
