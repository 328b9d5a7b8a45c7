"""Self-generated outliers: an optional training loss that sharpens task inference by entropy.

HNET+ENT (and independent networks under the same rule) picks, per input, the task whose network
is most certain. A network that has only ever seen its own task can be just as certain on another
task's inputs: on SplitMNIST the 0-vs-1 network calls most 2s..9s a confident "0" or "1" and wins
the comparison for them (docs/reproduction.md). With ``outlier_weight`` w > 0 every training step
adds

    w * CE(uniform, softmax(f(x_out)))

on outliers made from the batch itself, so the network learns to be uncertain off its task's
data. Only the current task's inputs are used: nothing of an old task is stored or replayed, so
the continual-learning setting is unchanged. This is not in the paper (which trains on the task
loss alone); it is off by default.

Outliers come from one kind per step, drawn at random from ``outlier_kinds``; inputs are read as
images ``(C, H, W)`` (``(H, W)`` and flat inputs of a square length, e.g. 784 = 28x28, as one
channel):

* ``rotate``: a quarter turn (either way; square images only);
* ``flip``: a half turn;
* ``patches``: the image cut into a 4x4 grid whose patches are shuffled;
* ``splice``: the top half of one example over the bottom half of another;
* ``bands``: the flattened input cut into 16 bands of features, shuffled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hnet_serve.errors import ConfigError
from hnet_serve.training import OUTLIER_KINDS

if TYPE_CHECKING:
    from hnet_serve.training.config import TrainConfig

GRID = 4  # patches: a GRID x GRID grid
BANDS = 16


def image_geometry(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an input shape: images as they are (``(H, W)``: one channel), flat inputs
    of square length as one channel. Anything else has no geometry to make outliers from
    (ConfigError)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3 and min(shape[1:]) >= GRID:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2 and min(shape) >= GRID:  # one-channel images without a channel axis
        return 1, shape[0], shape[1]
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0] and side >= GRID:
            return 1, side, side
    raise ConfigError(
        f"self-generated outliers (outlier_weight > 0) need image inputs: (C, H, W), (H, W) or "
        f"flat inputs of a square length such as 784 = 28x28; these inputs are shaped "
        f"{list(shape)}"
    )


class OutlierMaker:
    """Makes outliers from a batch of one task's inputs (see the module docstring)."""

    def __init__(self, input_shape: Sequence[int], kinds: Sequence[str],
                 generator: torch.Generator) -> None:
        unknown = [k for k in kinds if k not in OUTLIER_KINDS]
        if not kinds or unknown:
            raise ConfigError(f"outlier kinds must be some of {', '.join(OUTLIER_KINDS)}; "
                              f"got {list(kinds)}")
        self.c, self.h, self.w = image_geometry(input_shape)
        if "rotate" in kinds and self.h != self.w:
            raise ConfigError(f"outlier kind 'rotate' needs square images, these are "
                              f"{self.h}x{self.w}")
        self.kinds = list(kinds)
        self.generator = generator

    def _perm(self, n: int) -> torch.Tensor:
        """A random permutation of ``n`` that moves something (never the identity)."""
        perm = torch.randperm(n, generator=self.generator)
        if bool((perm == torch.arange(n)).all()):
            perm = perm.roll(1)
        return perm

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outliers shaped like ``x`` ``(B, *input_shape)``."""
        kind = self.kinds[self._randint(0, len(self.kinds))]
        b = x.shape[0]
        if kind == "splice" and b < 2:
            kind = "flip"  # nothing to splice with
        img = x.reshape(b, self.c, self.h, self.w)
        if kind == "rotate":
            out = torch.rot90(img, 1 if self._randint(0, 2) else 3, dims=(2, 3))
        elif kind == "flip":
            out = img.flip(2, 3)
        elif kind == "patches":
            ph, pw = self.h // GRID, self.w // GRID
            out = img.clone()
            grid = img[:, :, : GRID * ph, : GRID * pw].reshape(b, self.c, GRID, ph, GRID, pw)
            tiles = grid.permute(0, 1, 2, 4, 3, 5).reshape(b, self.c, GRID * GRID, ph, pw)
            tiles = tiles[:, :, self._perm(GRID * GRID)]
            out[:, :, : GRID * ph, : GRID * pw] = (
                tiles.reshape(b, self.c, GRID, GRID, ph, pw).permute(0, 1, 2, 4, 3, 5)
                .reshape(b, self.c, GRID * ph, GRID * pw))
        elif kind == "splice":
            other = (torch.arange(b) + self._randint(1, b)) % b  # never the row itself
            out = img.clone()
            out[:, :, self.h // 2 :] = img[other, :, self.h // 2 :]
        else:  # bands
            flat = x.reshape(b, -1)
            d = flat.shape[1] - flat.shape[1] % BANDS
            out = flat.clone()
            out[:, :d] = flat[:, :d].reshape(b, BANDS, -1)[:, self._perm(BANDS)].reshape(b, d)
        return out.reshape(x.shape)


def make_outlier_maker(config: TrainConfig, input_shape: Sequence[int],
                       generator: torch.Generator) -> OutlierMaker | None:
    """The outlier maker of a training method (None when ``outlier_weight`` is 0); ConfigError,
    before any training, for inputs it cannot make outliers from."""
    if config.outlier_weight <= 0:
        return None
    return OutlierMaker(tuple(input_shape), config.outlier_kinds, generator)


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(B, C)`` against the uniform distribution (its minimum,
    log C, is reached by equal logits)."""
    return -F.log_softmax(logits, dim=-1).mean(dim=-1).mean()


def outlier_loss(maker: OutlierMaker | None, weight: float, x: torch.Tensor,
                 logits_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """``weight`` x the uniform loss of ``logits_of`` on outliers made from ``x``; None when
    the option is off."""
    if maker is None or weight <= 0:
        return None
    return weight * uniform_loss(logits_of(maker(x)))
