"""Devices and dtypes, resolved in one place: ``--device {auto,cpu,cuda,cuda:N}`` and
``--cache-dtype {float32,bfloat16}`` for every command.

``auto`` picks CUDA when torch sees a GPU, else the CPU. A CUDA device on a machine without
one is a :class:`ConfigError` naming what torch sees, not a traceback from the first ``.to()``.
Host-to-GPU copies of data batches go through pinned memory with ``non_blocking=True``
(:func:`to_device`), so the copy overlaps the GPU work queued before it.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Annotated

from pydantic import BeforeValidator

from hnet_serve.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: CLI parsers stay light
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default auto)"
CACHE_DTYPES = ("float32", "bfloat16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` as a :class:`torch.device` (None and ``auto``: CUDA when available, else CPU);
    :class:`ConfigError` for an unknown name or a CUDA device this machine does not have."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    m = _DEVICE_RE.match(text)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ConfigError(f"device must be one of {DEVICE_CHOICES}, got {spec!r}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ConfigError(f"device {spec!r} asked for, but only {count} CUDA device(s) exist "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")


def check_device(spec: object) -> str:
    """Validate a device string's syntax only (a config read on a machine other than the one
    that runs it, e.g. the ``serve`` parent): the normalized string."""
    if not isinstance(spec, str) or _DEVICE_RE.match(spec.strip().lower()) is None:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {spec!r}")
    text = spec.strip().lower()
    if not text.startswith("cuda") and ":" in text:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {spec!r}")
    return text


# A config field holding a device name, checked (syntax only) and normalized by check_device.
DeviceName = Annotated[str, BeforeValidator(check_device)]


def device_arg(value: str) -> str:
    """argparse type for ``--device``: the syntax is checked at parse time; whether the device
    exists is checked when the command runs (:func:`resolve_device`)."""
    try:
        return check_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` -> the torch dtype; :class:`ConfigError` otherwise."""
    import torch

    if name not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype must be one of {list(CACHE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for CUDA is pinned first and copied without
    blocking (the copy is ordered on the current stream, so later kernels see the data)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
