"""Crash-safe file writing shared by checkpoints, exports and scoring outputs.

The pattern everywhere: write to a temporary sibling (same directory, so the final rename is
atomic), fsync the data, ``os.replace`` it into place, fsync the directory so the rename itself
survives a power loss. Readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def temp_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden, unique name next to ``path``: ``.NAME.tmp-1a2b3c4d``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: for files inside a temporary dir)."""
    with open(path, "xb" if exclusive else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary sibling, fsync, rename, fsync dir).

    Raises ``OSError`` on failure; the temporary file never survives.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write_synced(tmp, data, exclusive=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
