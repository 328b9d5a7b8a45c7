"""Kept for the import path the first releases documented: ``from hnet_serve.runtime import
Runtime``. The runtime lives in :mod:`hnet_serve.serving.runtime`."""

from __future__ import annotations

from hnet_serve.serving.config import ServingConfig
from hnet_serve.serving.runtime import Prediction, Runtime

__all__ = ["Prediction", "Runtime", "ServingConfig"]
