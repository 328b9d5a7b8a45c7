"""The admin client (``hnet-serve reload``) and ``hnet-serve serve DIR --watch``.

:func:`admin_call` sends ``POST /admin/<action>`` with the token of ``HNET_ADMIN_TOKEN`` /
``HNET_ADMIN_TOKEN_FILE`` and turns every failure into one clear :class:`HNetError` line.

:class:`CheckpointWatcher` polls a checkpoint directory (a manifest read every ``interval``
seconds: no new dependency, and a rename-based replace is seen whatever the file system). When
it holds a new content hash, the checkpoint is imported into the model store first, which loads
and verifies it in full (a half-written directory fails there and is tried again on the next
poll, never reloaded), and the service reloads the stored copy by its tag: the previous
version stays in the store, so a rollback still finds it after the directory was replaced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from hnet_serve.checkpoint import read_manifest
from hnet_serve.errors import CheckpointError, ConfigError, HNetError, InputError
from hnet_serve.serving.admin import TOKEN_ENV, TOKEN_FILE_ENV, admin_token

logger = logging.getLogger("hnet_serve.watch")


class AdminCallError(HNetError):
    """The server refused or failed an admin call (its status and message)."""


def admin_call(url: str, action: str, body: Mapping[str, Any] | None = None, *,
               token: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """``POST {url}/admin/{action}`` with ``body``; the server's JSON answer, or an
    :class:`HNetError` saying in one line why not."""
    import httpx

    token = token or admin_token()
    if token is None:
        raise ConfigError(f"no admin token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} to the server's")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"URL must start with http:// or https://, got {url!r}")
    endpoint = f"{url.rstrip('/')}/admin/{action}"
    try:
        r = httpx.post(endpoint, json=dict(body or {}), timeout=timeout,
                       headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise AdminCallError(f"cannot reach {endpoint}: {exc}") from None
    try:
        answer = r.json()
    except ValueError:
        answer = {"error": r.text[:200]}
    if r.status_code != 200 or not isinstance(answer, dict):
        message = answer.get("error") if isinstance(answer, dict) else None
        err = AdminCallError(f"{action} refused ({r.status_code}): {message or r.text[:200]}")
        err.http_status = r.status_code
        raise err
    return answer


class CheckpointWatcher:
    """Reloads the service when the checkpoint at ``path`` is replaced by a complete one.

    ``stage(path)`` validates the directory in full and returns what to reload (the model-store
    tag); ``reload(target)`` asks the service (the admin call). Both are handed in, so the
    watcher is tested without a server.
    """

    def __init__(self, path: str, *, stage: Callable[[str], str],
                 reload: Callable[[str], dict[str, Any]], interval: float = 1.0) -> None:
        self.path = path
        self.stage = stage
        self.reload = reload
        self.interval = interval
        self.seen: str | None = self._hash()  # the version served at start
        self._failed: str | None = None
        self._stop = threading.Event()

    def _hash(self) -> str | None:
        try:
            return read_manifest(self.path)["content_hash"]
        except CheckpointError:  # missing or being replaced: look again later
            return None

    def poll(self) -> dict[str, Any] | None:
        """One look; the reload's answer when it reloaded, else None."""
        version = self._hash()
        if version is None or version == self.seen:
            return None
        try:
            target = self.stage(self.path)
        except HNetError as exc:  # incomplete or damaged: never reloaded; retried next poll
            if self._failed != version:
                logger.warning("hnet-serve watch: %s holds %s, not a complete checkpoint yet "
                               "(%s); not reloaded", self.path, version[:16], exc)
                self._failed = version
            return None
        self.seen = version  # refused or not, this content is decided
        try:
            answer = self.reload(target)
        except HNetError as exc:
            logger.error("hnet-serve watch: reload of %s (%s) refused: %s", self.path, target, exc)
            return None
        logger.warning("hnet-serve watch: reloaded %s: version %s (added %s, removed %s)",
                       self.path, answer.get("version", "?")[:16], answer.get("added"),
                       answer.get("removed"))
        return answer

    def run(self) -> None:
        """Poll until :meth:`stop`."""
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
