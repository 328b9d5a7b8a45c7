"""Crash-safe file writing shared by checkpoints, exports and scoring outputs, and the one rule
for where an output may be written (:func:`check_output_dir`, :func:`check_output_file`).

The pattern everywhere: write to a temporary sibling (same directory, so the final rename is
atomic), fsync the data, ``os.replace`` it into place, fsync the directory so the rename itself
survives a power loss. Readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from hnet_serve.errors import InputError


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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the complete directory ``tmp`` (a :func:`temp_sibling` of ``path``) at ``path`` in one
    atomic step (``renameat2(RENAME_EXCHANGE)``; two renames where unsupported), then delete what
    was at ``path`` and fsync the parent. Callers check first that ``path`` may be replaced
    (:func:`check_output_dir`)."""
    if not path.exists():
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # tmp now holds the previous directory
    else:
        old = temp_sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    fsync_path(path.parent)


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


# -- where an output may be written ---------------------------------------------------------
# One rule for every command that writes (train, add-task, export, score, eval reports):
# an output replaces only what we wrote there before, never a folder that holds anything else,
# the source it was made from, or a folder above the working directory or the home directory.
# Each command hands in what "ours" means for its kind of output.
Owned = Callable[[Path], "str | None"]


def _guarded_dirs() -> dict[str, Path]:
    """Folders an output may never be or contain: the working and home directories."""
    dirs = {"working": Path.cwd()}
    with contextlib.suppress(RuntimeError, KeyError):
        dirs["home"] = Path.home()
    return {k: d.resolve() for k, d in dirs.items()}


Protect = Mapping[str, "str | os.PathLike"]  # what it is (for the message) -> path


def _check_not_protected(path: Path, protect: Protect, flag: str) -> None:
    real = path.resolve()
    if real == Path(real.anchor):
        raise InputError(f"{flag} {str(path)!r} is a filesystem root; name a directory of its own")
    for name, guarded in _guarded_dirs().items():
        if guarded.is_relative_to(real):
            raise InputError(f"{flag} {str(path)!r} is or contains the {name} directory; "
                              "choose a directory of its own (nothing was written)")
    for label, source in protect.items():
        src = Path(source).resolve()
        if src.is_relative_to(real):
            raise InputError(f"{flag} {str(path)!r} is or contains the {label} {str(source)!r}; "
                             "write the output elsewhere (nothing was written)")
        if real.is_relative_to(src) and src.is_dir():
            raise InputError(f"{flag} {str(path)!r} is inside the {label} {str(source)!r}; "
                             "write the output elsewhere (nothing was written)")


def check_output_dir(out: str | os.PathLike, *, owned: Owned, overwrite: bool = True,
                     protect: Protect | None = None, flag: str = "--out",
                     what: str = "output") -> Path:
    """The absolute ``out`` path, if writing a directory output there loses nothing.

    Allowed: a path that does not exist, an empty directory, or (with ``overwrite``) a
    directory that ``owned`` accepts (``owned(path)`` returns None, or why it is not ours).
    Refused with :class:`InputError`, before anything is written: a symlink, a file, a
    directory ``owned`` rejects, a path that is, contains or lies inside a ``protect`` path, and
    a path that is or contains the working or home directory (or is a filesystem root).
    """
    path = Path(os.path.abspath(out))
    _check_not_protected(path, protect or {}, flag)
    if path.is_symlink():
        raise InputError(f"{flag} {str(out)!r} is a symbolic link; name the directory itself")
    if not path.exists():
        return path
    if not path.is_dir():
        raise InputError(f"{flag} {str(out)!r} exists and is not a directory")
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise InputError(f"{str(out)!r} already exists; choose another {flag} or pass --overwrite")
    why = owned(path)
    if why is not None:
        raise InputError(f"{flag} {str(out)!r} is not {what} directory ({why}); it is never "
                         "replaced: choose another path (nothing was written)")
    return path


def owned_files(allowed: Callable[[str], bool], kind: str) -> Owned:
    """An :data:`Owned` test: every member is a regular file (not a link) ``allowed`` names."""

    def check(path: Path) -> str | None:
        for entry in sorted(path.iterdir()):
            if entry.is_symlink() or not entry.is_file():
                return f"it holds {entry.name!r}, which is not a {kind} file"
            if not allowed(entry.name):
                return f"it holds {entry.name!r}, which is not a {kind} file"
        return None

    return check


def check_output_file(out: str | os.PathLike, *, protect: Protect | None = None,
                      flag: str = "--output") -> Path:
    """The absolute ``out`` path, if writing a single file there (replacing a file of that
    name) loses nothing: not a directory, not inside or equal to a ``protect`` path (compared
    after resolving symlinks and ``..``). Whether its directory exists is the writer's check."""
    path = Path(os.path.abspath(out))
    real = path.resolve()
    for label, source in (protect or {}).items():
        src = Path(source).resolve()
        if real == src or (src.is_dir() and real.is_relative_to(src)):
            raise InputError(f"{flag} {str(out)!r} is or lies inside the {label} "
                             f"{str(source)!r} (nothing was written)")
    if path.is_dir():
        raise InputError(f"{flag} {str(out)!r} is a directory")
    return path
