"""Serving: the runtime (task router, byte-bounded weight cache, backends) and the BentoML service.

``Runtime`` is usable without BentoML; ``service`` wraps it in HTTP. Nothing here imports
``hnet_serve.training`` or ``hnet_serve.export``: a serving image carries neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Prediction", "Runtime", "ServingConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import hnet_serve.serving.cli` (building the CLI parser) stays light.
    if name in ("Prediction", "Runtime"):
        from hnet_serve.serving import runtime

        return getattr(runtime, name)
    if name == "ServingConfig":
        from hnet_serve.serving.config import ServingConfig

        return ServingConfig
    raise AttributeError(f"module 'hnet_serve.serving' has no attribute {name!r}")
