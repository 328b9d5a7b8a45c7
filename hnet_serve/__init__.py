"""hnet-serve: train, export and serve task-conditioned hypernetworks for continual learning."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
