"""Live versions: the served checkpoint, a reload to another one, and a rollback.

A :class:`LiveVersion` is everything one checkpoint serves with: its runtime (model + weight
cache), its own batcher and its version record. The service holds exactly one as ``current``
and every request takes it once, at its start, so a request (and every batch, each batcher
belonging to one version) runs on one version from start to end.

:meth:`VersionSwitch.reload` loads and checks a candidate in a worker thread while the current
version keeps serving, then swaps by assigning ``current`` on the event loop (atomic for every
request handler there). The old version finishes the requests it already holds and is dropped;
its cache is shrunk to what the new warm tasks leave of the byte budget while the candidate
warms, and to nothing after the swap, so two versions are resident only during the swap and
their caches together stay within the budget (pinned tasks aside, which both keep). Only the
previous version's *location* is remembered (a model-store tag or a directory, with its
content hash): a rollback reloads it and refuses if its content changed.

Checks (docs/serving.md, "Live versions"):

* 400 (:class:`InputError`): not a checkpoint, unreadable, wrong content hash, another input
  shape or another target architecture (its generated weights could not be compared);
* 409 (:class:`VersionConflictError` / :class:`ForgettingError`), unless ``force``: a served
  task is missing, an old task's classes or input shape changed, or its generated weights moved
  more than ``add-task``'s tolerance (:data:`hnet_serve.drift.DEFAULT_MAX_DRIFT`, relative L2).
  The check is on the weights: the recorded test rows live with the training data, which the
  serving layer does not read (the same weights give the same predictions).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hnet_serve.checkpoint import load_checkpoint, not_a_checkpoint, read_manifest
from hnet_serve.drift import DEFAULT_MAX_DRIFT, weight_drift
from hnet_serve.errors import (
    CheckpointError,
    ForgettingError,
    InputError,
    VersionConflictError,
)
from hnet_serve.model import HNetModel
from hnet_serve.serving.backends import nbytes_estimate
from hnet_serve.serving.batching import AdaptiveBatcher, release_free_memory
from hnet_serve.serving.config import ServingConfig
from hnet_serve.serving.runtime import STEP_BYTES, Runtime

logger = logging.getLogger("bentoml.hnet_serve")

# Old requests get this long to finish on a replaced version (the service's request timeout).
DRAIN_SECONDS = 300.0
# Weights generated at once per version when comparing versions: small beside the cache and
# the request path's steps, since a reload runs while the old version serves at full load.
DRIFT_STEP_BYTES = STEP_BYTES // 4


@dataclass(frozen=True)
class LiveVersion:
    """One checkpoint ready to serve: runtime, batcher, and ``info`` (``GET /version``)."""

    runtime: Runtime
    batcher: AdaptiveBatcher
    info: dict[str, Any]  # {"version", "previous", "tasks", "loaded_at", "source"}
    path: str  # the checkpoint directory it was loaded from

    @property
    def version(self) -> str:
        return self.info["version"]


@dataclass(frozen=True)
class Changes:
    """What a candidate changes: task names added and removed, old tasks moved (why)."""

    added: list[str]
    removed: list[str]
    moved: dict[str, str]


def resolve_checkpoint(spec: str) -> tuple[str, str]:
    """``(directory, source)`` of a reload's ``checkpoint``: a directory (absolute, or relative
    to the server's working directory, as the CLI reads it) or a model-store tag
    (``hnet:<version>``). :class:`InputError` if it is neither a checkpoint nor a stored one."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("checkpoint must be a checkpoint directory or a model tag (a string)")
    path = Path(spec).expanduser()
    if path.is_dir():
        problem = not_a_checkpoint(path)
        if problem is not None:
            raise InputError(f"{spec} is not a checkpoint: {problem}")
        return str(path.resolve()), str(path.resolve())
    if path.exists():
        raise InputError(f"{spec} is not a checkpoint directory")
    if ":" in spec and "/" not in spec:
        import bentoml
        from bentoml.exceptions import BentoMLException

        from hnet_serve.serving.store import checkpoint_dir

        try:
            stored = bentoml.models.get(spec)
        except (BentoMLException, ValueError):
            raise InputError(f"no checkpoint directory or model {spec} in the model store") from None
        try:
            return str(checkpoint_dir(stored)), str(stored.tag)
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
    raise InputError(f"checkpoint {spec} does not exist (a directory or a model tag hnet:<version>)")


def load_candidate(path: str) -> tuple[HNetModel, str]:
    """The model at ``path`` and its content hash, fully validated (400 if it is not usable)."""
    try:
        before = read_manifest(path)["content_hash"]
        model = load_checkpoint(path)
        after = read_manifest(path)["content_hash"]
    except CheckpointError as exc:
        raise InputError(f"the candidate checkpoint is not usable: {exc}") from None
    if before != after:  # replaced while it was read: neither version is known to be whole
        raise InputError(f"the checkpoint at {path} changed while it was loaded; try again")
    return model, after


def compare(old: HNetModel, new: HNetModel, *, max_drift: float = DEFAULT_MAX_DRIFT) -> Changes:
    """What ``new`` changes for ``old``'s tasks; :class:`InputError` (400) if it serves other
    inputs or another target, so that nothing of it can be compared."""
    old_shape, new_shape = list(old.target_config.input_shape), list(new.target_config.input_shape)
    if old_shape != new_shape:
        raise InputError(f"the candidate takes inputs of shape {new_shape}, the served "
                         f"checkpoint {old_shape}")
    if dict(old.target.param_shapes) != dict(new.target.param_shapes):
        raise InputError("the candidate's target network has another architecture "
                         f"({new.target.n_params} parameters, served: {old.target.n_params})")
    old_names, new_names = old.task_names, set(new.task_names)
    kept = [n for n in old_names if n in new_names]
    moved: dict[str, str] = {}
    for name in kept:
        a, b = old.registry.get(name), new.registry.get(name)
        if (a.num_classes, list(a.input_shape), a.head) != (b.num_classes, list(b.input_shape),
                                                            b.head):
            moved[name] = "its classes, input shape or head changed"
    step = max(1, DRIFT_STEP_BYTES // max(1, nbytes_estimate(old)))
    with torch.no_grad():
        for i in range(0, len(kept), step):
            names = kept[i : i + step]
            drift = weight_drift(old.generate(names), new.generate(names))  # (k,)
            for name, d in zip(names, drift):
                if d > max_drift and name not in moved:
                    moved[name] = f"weight drift {d:.4f} > max {max_drift:g}"
    return Changes(added=[n for n in new.task_names if n not in set(old_names)],
                   removed=[n for n in old_names if n not in new_names], moved=moved)


def check_changes(changes: Changes, *, force: bool) -> None:
    """409 for a candidate that drops a served task or moves an old one, unless ``force``."""
    if force:
        return
    if changes.removed:
        raise VersionConflictError(
            f"the candidate drops served tasks {changes.removed[:10]}; nothing changed "
            '(send "force": true to reload anyway)')
    if changes.moved:
        reasons = "; ".join(f"task {n!r}: {why}" for n, why in list(changes.moved.items())[:10])
        raise ForgettingError(f"the candidate changes old tasks beyond add-task's tolerance: "
                              f'{reasons}; nothing changed (send "force": true to reload anyway)')


def build_version(model: HNetModel, version: str, path: str, source: str, config: ServingConfig,
                  previous: str | None = None) -> LiveVersion:
    """A runtime and batcher for ``model`` (its pinned and warm tasks generated now)."""
    runtime = Runtime(model, config.model_copy(update={"checkpoint": path}))
    info = {"version": version, "previous": previous, "tasks": list(model.task_names),
            "source": source,
            "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return LiveVersion(runtime, AdaptiveBatcher(runtime), info, path)


def config_for(config: ServingConfig, model: HNetModel) -> ServingConfig:
    """``config`` with its task lists cut to ``model``'s tasks (a forced reload may drop a
    pinned one; the initial load still refuses unknown names)."""
    known = set(model.task_names)
    return config.model_copy(update={
        key: [n for n in getattr(config, key) if n in known]
        for key in ("pinned", "warm", "exclude_from_inference")})


def retire_cache(cache: Any) -> None:
    """Empty a replaced version's cache, pinned tasks included, and keep it empty."""
    for key in cache.pinned:
        cache.unpin(key)
    cache.resize(0)


class VersionSwitch:
    """The served :class:`LiveVersion`, reloads and rollbacks (one at a time)."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.current: LiveVersion | None = None
        self.previous: tuple[str, str, str] | None = None  # (path, source, version)
        self._busy = threading.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self, checkpoint: str | None, *, force: bool = False) -> dict[str, Any]:
        """Load ``checkpoint`` (default: the current one's source again), check it and swap."""
        cur = self._serving()
        spec = cur.info["source"] if checkpoint is None else checkpoint
        path, source = await asyncio.to_thread(resolve_checkpoint, spec)
        return await self._switch(path, source, force=force, expect=None)

    async def rollback(self) -> dict[str, Any]:
        """Swap back to the version served before the current one (reloaded from its tag or
        directory; refused if its content changed since)."""
        self._serving()
        if self.previous is None:
            raise VersionConflictError("there is no previous version to roll back to")
        path, source, version = self.previous
        return await self._switch(path, source, force=True, expect=version)

    def _serving(self) -> LiveVersion:
        if self.current is None:
            raise VersionConflictError("the service is not serving a version yet")
        return self.current

    async def _switch(self, path: str, source: str, *, force: bool, expect: str | None
                      ) -> dict[str, Any]:
        if not self._busy.acquire(blocking=False):
            raise VersionConflictError("another reload or rollback is running; try again")
        try:
            for task in list(self._retiring):  # at most two versions resident
                await task
            old = self._serving()
            started = time.perf_counter()
            budget = old.runtime.cache.capacity_bytes
            try:
                new, changes = await asyncio.to_thread(self._prepare, old, path, source, force,
                                                       expect)
            except BaseException:  # refused, failed, or the caller went away: nothing changes
                old.runtime.cache.resize(budget)
                raise
            if new is None:  # the same content: nothing to swap
                return self._answer(old, changes, unchanged=True)
            self.current = new  # the swap: new requests take this one from now on
            self.previous = (old.path, old.info["source"], old.version)
            retire_cache(old.runtime.cache)  # old requests still finish, without caching more
            retire = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            logger.info("hnet-serve: now serving version %s (%s; was %s) after %.2f s: added %s, "
                        "removed %s", new.version, source, old.version,
                        time.perf_counter() - started, changes.added, changes.removed)
            return self._answer(new, changes)
        finally:
            self._busy.release()

    def _prepare(self, old: LiveVersion, path: str, source: str, force: bool,
                 expect: str | None) -> tuple[LiveVersion | None, Changes]:
        """In a worker thread: load, check and warm the candidate (the old one serves on)."""
        model, version = load_candidate(path)
        if expect is not None and version != expect:
            raise VersionConflictError(
                f"the previous version {expect[:16]} is no longer at {source} (it holds "
                f"{version[:16]}); nothing changed")
        changes = compare(old.runtime.model, model)
        check_changes(changes, force=force)
        if version == old.version:
            return None, changes
        config = config_for(self.config, model)
        warm = len(set(config.pinned) | set(config.warm)) * nbytes_estimate(model)
        # room for the candidate's warm tasks (the caller restores the budget if this fails)
        old.runtime.cache.resize(max(0, old.runtime.cache.capacity_bytes - warm))
        return build_version(model, version, path, source, config, previous=old.version), changes

    @staticmethod
    def _answer(live: LiveVersion, changes: Changes, unchanged: bool = False) -> dict[str, Any]:
        body = {"version": live.version, "previous": live.info["previous"],
                "added": changes.added, "removed": changes.removed,
                "tasks": list(live.info["tasks"])}
        if changes.moved:
            body["moved"] = changes.moved  # accepted with force
        if unchanged:
            body["unchanged"] = True
        return body

    @staticmethod
    async def _retire(old: LiveVersion) -> None:
        """Let ``old`` finish its requests, then free it."""
        deadline = time.monotonic() + DRAIN_SECONDS
        while old.batcher.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        old.batcher.close()
        old.runtime.cache.invalidate()
        release_free_memory()


__all__ = ["Changes", "LiveVersion", "VersionSwitch", "build_version", "compare",
           "resolve_checkpoint"]
