"""An LRU cache of per-task values (generated weights, ONNX Runtime sessions) bounded by bytes.

The runtime keeps the hot tasks' generated weights here, the way LoRA servers keep hot adapters:

* **bounded by bytes**, not entries: a ResNet-32 task and an MNIST MLP task differ 50x in size;
* **pinned** keys are never evicted (they still count towards ``bytes``);
* **batched misses**: ``get_many`` hands every missing key of one call to the loader at once, so
  the hypernetwork generates them in one batched pass;
* **single flight**: concurrent misses for the same key wait for the one load already in
  flight (a per-key future) instead of generating the task again;
* **thread-safe**: one lock guards the bookkeeping; loads run outside it.

A value larger than the whole unpinned capacity is returned to the caller but not stored
(counted in ``rejected``), so one oversized task cannot flush everything else.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from hnet_serve.errors import ConfigError

V = TypeVar("V")

Loader = Callable[[list[str]], Sequence[V]]


class WeightCache(Generic[V]):
    """LRU over string keys; ``loader(keys)`` returns one value per key, in order."""

    def __init__(
        self,
        loader: Loader[V],
        *,
        capacity_bytes: int,
        sizeof: Callable[[V], int],
        pinned: Iterable[str] = (),
    ) -> None:
        if capacity_bytes < 0:
            raise ConfigError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self._loader = loader
        self._sizeof = sizeof
        self.capacity_bytes = int(capacity_bytes)
        self._pinned: set[str] = set(pinned)
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()  # LRU first
        self._inflight: dict[str, Future[V]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._counts = dict.fromkeys(
            ("hits", "misses", "coalesced", "evictions", "rejected", "loads", "generated"), 0
        )

    # -- lookups -----------------------------------------------------------------------------
    def get(self, key: str) -> V:
        with self._lock:  # the hit path, without get_many's bookkeeping
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._counts["hits"] += 1
                return entry[0]
        return self.get_many([key])[key]

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        """Values for ``keys``; all missing keys are loaded in ONE loader call."""
        found: dict[str, V] = {}
        waits: dict[str, Future[V]] = {}
        to_load: list[str] = []
        with self._lock:
            for key in dict.fromkeys(keys):  # unique, order kept
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._counts["hits"] += 1
                    found[key] = entry[0]
                elif key in self._inflight:
                    self._counts["misses"] += 1
                    self._counts["coalesced"] += 1
                    waits[key] = self._inflight[key]
                else:
                    self._counts["misses"] += 1
                    self._inflight[key] = Future()
                    to_load.append(key)
        if to_load:
            found.update(self._load(to_load))
        for key, fut in waits.items():
            found[key] = fut.result()  # re-raises the loader's error, if any
        return found

    def _load(self, keys: list[str]) -> dict[str, V]:
        try:
            values = list(self._loader(keys))
            if len(values) != len(keys):
                raise RuntimeError(f"cache loader returned {len(values)} values for {len(keys)} keys")
            sizes = [int(self._sizeof(v)) for v in values]
        except BaseException as exc:
            with self._lock:
                for key in keys:
                    self._inflight.pop(key).set_exception(exc)
            raise
        with self._lock:
            self._counts["loads"] += 1
            self._counts["generated"] += len(keys)
            for key, value, size in zip(keys, values, sizes):
                self._insert(key, value, size)
                self._inflight.pop(key).set_result(value)
        return dict(zip(keys, values))

    def _insert(self, key: str, value: V, size: int) -> None:
        # Called with the lock held.
        if key in self._pinned:
            self._entries[key] = (value, size)
            self._bytes += size
            self._evict_to(self.capacity_bytes)
            return
        pinned_bytes = self._pinned_bytes()
        if size > self.capacity_bytes - pinned_bytes:
            self._counts["rejected"] += 1
            return
        self._evict_to(self.capacity_bytes - size)
        self._entries[key] = (value, size)
        self._bytes += size

    def _evict_to(self, limit: int) -> None:
        """Drop least recently used unpinned entries until ``bytes <= limit`` (or none is left)."""
        if self._bytes <= limit:
            return
        for key in [k for k in self._entries if k not in self._pinned]:
            if self._bytes <= limit:
                break
            _, size = self._entries.pop(key)
            self._bytes -= size
            self._counts["evictions"] += 1

    def _pinned_bytes(self) -> int:
        return sum(size for k, (_, size) in self._entries.items() if k in self._pinned)

    # -- management --------------------------------------------------------------------------
    def warm(self, keys: Iterable[str]) -> None:
        """Load ``keys`` now (one batched load for the missing ones)."""
        self.get_many(keys)

    def resize(self, capacity_bytes: int) -> None:
        """A new byte budget; unpinned entries over it are evicted now, least recent first (a
        replaced version's cache is resized to 0 while its last requests finish)."""
        with self._lock:
            self.capacity_bytes = max(0, int(capacity_bytes))
            self._evict_to(self.capacity_bytes)

    def pin(self, key: str) -> None:
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pinned.discard(key)
            self._evict_to(self.capacity_bytes)

    def invalidate(self, key: str | None = None) -> None:
        """Drop one key (or everything when ``key`` is None); pinned keys included."""
        with self._lock:
            keys = list(self._entries) if key is None else [key]
            for k in keys:
                entry = self._entries.pop(k, None)
                if entry is not None:
                    self._bytes -= entry[1]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def pinned(self) -> list[str]:
        with self._lock:
            return sorted(self._pinned)

    def stats(self) -> dict[str, Any]:
        """Counters and sizes: hits, misses (coalesced: misses that waited for a load already in
        flight), evictions, rejected (too large to cache), loads (loader calls), generated (keys
        loaded), bytes, pinned_bytes, capacity_bytes, entries."""
        with self._lock:
            return {
                **self._counts,
                "bytes": self._bytes,
                "pinned_bytes": self._pinned_bytes(),
                "capacity_bytes": self.capacity_bytes,
                "entries": len(self._entries),
            }
