"""How far a new checkpoint may move an old task: the tolerances of ``add-task`` and of a live
reload (``POST /admin/reload``), and the measure they are checked with.

Both gates use the same numbers so that a checkpoint ``add-task`` wrote without ``--force`` is
also accepted by a running service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing this module stays light (hnet_serve.training reads the numbers)
    import torch

# The no-forgetting guarantee of add-task (issue 7): refuse to write the new checkpoint when an
# old task's generated weights move more than this (relative L2; adding SplitMNIST's 5th task
# with the preset's beta moves the old ones by ~0.03 without changing their accuracy) ...
DEFAULT_MAX_DRIFT = 0.1
# ... or its held-out accuracy drops by more than this fraction.
DEFAULT_MAX_ACCURACY_DROP = 0.02


def weight_drift(before: torch.Tensor, after: torch.Tensor) -> list[float]:
    """Relative change of generated weights per task: ``||after - before|| / ||before||``."""
    num = (after - before).norm(dim=1)  # (K,)
    den = before.norm(dim=1).clamp_min(1e-12)
    return (num / den).tolist()
