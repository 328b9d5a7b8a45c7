"""Continual training: data, the output regularizer, the trainer, add-task and evaluation.

``hnet_serve.training.api`` is the entry point (``train_benchmark``, ``train_tasks``, ``add_task``,
``evaluate_checkpoint``); see docs/training.md. Importing this package stays light: the
submodules import torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# The no-forgetting tolerances of add-task (issue 7), shared with a live reload (issue 18).
from hnet_serve.drift import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_DRIFT  # noqa: F401

# Outliers a training run may generate from its own batches (training.outliers).
OutlierKind = Literal["rotate", "flip", "patches", "splice", "bands"]
OUTLIER_KINDS: tuple[str, ...] = get_args(OutlierKind)
DEFAULT_OUTLIER_KINDS: list[str] = list(OUTLIER_KINDS)
