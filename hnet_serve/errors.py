"""The exceptions hnet-serve raises for users.

Every error a user can cause is an :class:`HNetError` with a message that names the problem.
The service maps them to HTTP codes (see ``http_status``), the CLI prints the message and exits
non-zero. Asserts are never used for user-facing checks: they vanish under ``python -O``.
"""

from __future__ import annotations


class HNetError(Exception):
    """Base class of every error hnet-serve raises on purpose."""

    http_status = 400


class InputError(HNetError, ValueError):
    """Bad input data or arguments: wrong shape, dtype, NaN/inf, empty, too many rows."""

    http_status = 400


class ConfigError(HNetError, ValueError):
    """An invalid configuration value (names the field and the bad value)."""

    http_status = 400


# A name the registry does not hold can be anything a client sent (a 10 MB string): messages
# show at most this many characters of it. Valid names have at most 64 (registry.py).
SHOWN_NAME_CHARS = 64


def shorten(text: str, limit: int = SHOWN_NAME_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with ``…`` where it was cut."""
    return text if len(text) <= limit else text[:limit] + "…"


class UnknownTaskError(HNetError, KeyError):
    """A task name that the registry does not hold (shown cut to 64 characters)."""

    http_status = 404

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        self.known = list(known or [])
        shown = ", ".join(self.known[:10]) + (" ..." if len(self.known) > 10 else "")
        msg = f"unknown task {shorten(name)!r}" + (
            f" (known tasks: {shown})" if self.known else "")
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class TaskExistsError(HNetError, ValueError):
    """Adding a task whose name is already registered."""

    http_status = 409


class CheckpointError(HNetError):
    """A checkpoint that is missing, malformed, from another format version or corrupted."""

    http_status = 500


class ExportError(HNetError):
    """An export that could not be written or failed verification."""

    http_status = 500


class OutputError(HNetError):
    """An output that could not be written: the disk is full, the directory read-only. (A path
    refused because writing there could lose data is an :class:`InputError`.)"""

    http_status = 500


class ForgettingError(HNetError):
    """Adding a task would change old tasks beyond the configured tolerance."""

    http_status = 409


class VersionConflictError(HNetError):
    """A reload or rollback that cannot happen now: the candidate drops a served task, there is
    no previous version, or another reload is running."""

    http_status = 409
