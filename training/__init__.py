"""Continual training: data, the output regularizer, the trainer, add-task and evaluation.

``hnet_serve.training.api`` is the entry point (``train_benchmark``, ``train_tasks``, ``add_task``,
``evaluate_checkpoint``); see docs/training.md. Importing this package stays light: the
submodules import torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# The no-forgetting guarantee of add-task (issue 7): refuse to write the new checkpoint when an
# old task's generated weights move more than this (relative L2; adding SplitMNIST's 5th task
# with the preset's beta moves the old ones by ~0.03 without changing their accuracy) ...
DEFAULT_MAX_DRIFT = 0.1
# ... or its held-out accuracy drops by more than this fraction.
DEFAULT_MAX_ACCURACY_DROP = 0.02

# Outliers a training run may generate from its own batches (training.outliers).
OutlierKind = Literal["rotate", "flip", "patches", "splice", "bands"]
OUTLIER_KINDS: tuple[str, ...] = get_args(OutlierKind)
DEFAULT_OUTLIER_KINDS: list[str] = list(OUTLIER_KINDS)
