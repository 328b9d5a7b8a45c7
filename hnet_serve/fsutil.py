"""Crash-safe file writing shared by checkpoints, exports and scoring outputs.

The pattern everywhere: write to a temporary sibling (same directory, so the final rename is
atomic), fsync the data, ``os.replace`` it into place, fsync the directory so the rename itself
survives a power loss. Readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_sibling(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden, unique name next to ``path``: ``.NAME.tmp-<host>-<pid>-<random>``.

    The host tag and process id let :func:`remove_stale_siblings` tell a leftover of a killed
    process from a write in progress.
    """
    path = Path(path)
    return path.with_name(
        f".{path.name}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` left by a process killed mid-write (SIGKILL
    runs no cleanup), and return them.

    Only names :func:`temp_sibling` makes are considered, and only those written on this host
    by a process that no longer exists: a write in progress (this or another process, or
    another machine sharing the directory) is never touched. A reused process id only means
    the leftover stays until a later call.
    """
    path = Path(path)
    pattern = re.compile(
        rf"\.{re.escape(path.name)}\.(?:tmp|old)-([0-9a-f]{{8}})-([0-9]{{1,10}})-[0-9a-f]{{8}}"
    )
    host = _host_tag()
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(1) != host or _pid_alive(int(m.group(2))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # best effort: a leftover is harmless, a failed save is not
        removed.append(entry)
    return removed


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
