"""The ``.npy`` header of an untrusted file, read without unpickling or allocating anything.

Training's task-file reader and the scoring readers both stream user arrays; both check the
header here first (numpy parses it with the tokenizer, so garbage raises almost any exception).
"""

from __future__ import annotations

import tokenize
from typing import IO

import numpy as np

from hnet_serve.errors import HNetError, InputError


def read_npy_header(
    f: IO[bytes], what: str, *, error: type[HNetError] = InputError
) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the array whose ``.npy`` bytes ``f`` is at.

    Leaves ``f`` at the first data byte. Refuses anything that is not a plain ``.npy`` header and
    object arrays (loading those needs pickle) with ``error`` naming ``what``.
    """
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # pragma: no cover - numpy rejects other versions in read_magic
            raise error(f"{what}: unsupported .npy version {version}")
    except HNetError:
        raise
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError, KeyError,
            tokenize.TokenError) as exc:
        raise error(f"{what}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise error(f"{what}: object arrays are not allowed (they need pickle, which is never "
                    "loaded)")
    return tuple(shape), bool(fortran), dtype
