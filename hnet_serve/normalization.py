"""Per-task input normalization: which statistics, their shapes, and how they are fitted.

A task's inputs are standardized with statistics of *its own* training inputs, stored per task
as two target buffers (``input_mean``, ``input_std``) next to batch-norm statistics: they travel
through ``functional_call``, the checkpoint (``buffers/<task>/input_mean``), the per-task ONNX
graphs and the dynamic graph (as initializers / per-task tables) exactly like batch-norm state,
so every consumer keeps taking raw inputs.

Modes (``--normalize``): ``per-feature`` (one mean/std per input value), ``per-channel`` (one
per channel of ``(C, ...)`` inputs; a flat input is one channel), ``global`` (one of each) and
``none``. ``auto`` resolves to per-channel for images (inputs with more than one dimension, and
the built-in benchmarks' flattened digits) and per-feature for flat inputs: tabular columns
live on unrelated scales (1e-2 next to 1e3), while the pixels of a channel share one (and a
pixel that is almost always blank would otherwise be scaled up a hundredfold). The buffers' shapes keep one axis per input axis, so they broadcast
against ``(B, *input_shape)`` in PyTorch and ONNX alike (``(C, 1, 1)`` for per-channel images).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from hnet_serve.errors import InputError

NormMode = Literal["per-feature", "per-channel", "global", "none"]
NORM_MODES: tuple[str, ...] = ("auto", "per-feature", "per-channel", "global", "none")
MEAN, STD = "input_mean", "input_std"

# Below this spread (relative to the value's own magnitude, plus an absolute floor) a column
# counts as constant in training (see fit_norm).
STD_REL_FLOOR = 1e-3
STD_ABS_FLOOR = 1e-6


def resolve_mode(mode: str, input_shape: tuple[int, ...], *, image: bool = False) -> NormMode:
    """``auto`` -> per-channel for images (``(C, ...)`` inputs, or flattened pixels when
    ``image``), per-feature for flat inputs; other modes as given."""
    if mode not in NORM_MODES:
        raise InputError(f"--normalize must be one of {', '.join(NORM_MODES)}, got {mode!r}")
    if mode == "auto":
        return "per-channel" if image or len(input_shape) > 1 else "per-feature"
    return mode  # type: ignore[return-value]


def norm_shape(mode: NormMode, input_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shape of a task's ``input_mean``/``input_std`` buffers (None for ``none``)."""
    rest = (1,) * (len(input_shape) - 1)
    if mode == "per-feature":
        return tuple(input_shape)
    if mode == "per-channel":
        return (input_shape[0], *rest) if len(input_shape) > 1 else (1,)
    if mode == "global":
        return (1, *rest)
    return None


def fit_norm(x: np.ndarray, mode: NormMode, input_shape: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and floored std of training inputs ``x`` ``(N, *input_shape)`` for ``mode``.

    Computed in float64 (squares of values near 1e19 would overflow float32). A column whose
    std is at most ``STD_REL_FLOOR * |mean| + STD_ABS_FLOOR`` is constant in training: its std
    (0, or rounding noise) would divide by ~0 and turn any other value seen later into inf or
    a 1e6-fold outlier (a blank border pixel of a digit that a test digit touches). Such a
    column is scaled by its own magnitude, ``max(|mean|, 1)``, instead: the rule stays
    scale-free (a column at 1e3 keeps relative deviations), an all-zero column passes values
    through unchanged, and every other column keeps its true std. Outliers in the training
    rows only widen a std; nothing here yields inf or NaN.
    """
    shape = norm_shape(mode, input_shape)
    if shape is None:
        raise InputError("normalization mode 'none' has no statistics")
    x = np.asarray(x, dtype=np.float64).reshape(-1, *input_shape)
    if x.shape[0] == 0:
        raise InputError("cannot compute input normalization from 0 training rows")
    axes = (0, *(1 + i for i, (s, full) in enumerate(zip(shape, input_shape)) if s != full))
    if mode == "global":
        axes = tuple(range(x.ndim))
    mean = x.mean(axis=axes).reshape(shape)
    std = x.std(axis=axes).reshape(shape)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise InputError("training inputs hold values too large to normalize (inf)")
    constant = std <= STD_REL_FLOOR * np.abs(mean) + STD_ABS_FLOOR
    std = np.where(constant, np.maximum(np.abs(mean), 1.0), std)
    return mean.astype(np.float32), std.astype(np.float32)
