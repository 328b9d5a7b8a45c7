"""WeightCache: LRU by bytes, pinning, batched and single-flight loads, thread safety."""

from __future__ import annotations

import threading
import time

import pytest

from hnet_serve.errors import ConfigError
from hnet_serve.serving.cache import WeightCache


class Loader:
    """Values are ``bytes`` of a per-key size; records every call."""

    def __init__(self, sizes: dict[str, int] | None = None, delay: float = 0.0) -> None:
        self.sizes = sizes or {}
        self.delay = delay
        self.calls: list[list[str]] = []
        self.fail: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, keys: list[str]) -> list[bytes]:
        with self._lock:
            self.calls.append(list(keys))
        if self.delay:
            time.sleep(self.delay)
        if self.fail & set(keys):
            raise RuntimeError(f"cannot load {sorted(self.fail & set(keys))}")
        return [bytes(self.sizes.get(k, 10)) for k in keys]

    @property
    def loaded(self) -> list[str]:
        return [k for call in self.calls for k in call]


def make(capacity: int, loader: Loader | None = None, **kw) -> tuple[WeightCache, Loader]:
    loader = loader or Loader()
    return WeightCache(loader, capacity_bytes=capacity, sizeof=len, **kw), loader


def test_hits_and_misses_are_counted():
    cache, loader = make(100)
    assert cache.get("a") == bytes(10)
    cache.get("a")
    cache.get("b")
    s = cache.stats()
    assert (s["hits"], s["misses"], s["generated"], s["bytes"], s["entries"]) == (1, 2, 2, 20, 2)
    assert loader.loaded == ["a", "b"]


def test_evicts_least_recently_used_by_bytes():
    cache, loader = make(30)
    for k in "abc":
        cache.get(k)  # 30 bytes: full
    cache.get("a")  # refresh a: b is now the least recently used
    cache.get("d")
    assert cache.keys() == ["c", "a", "d"]
    assert cache.stats()["evictions"] == 1
    # A 15-byte value needs 15 free bytes: evicts c then a (LRU first), keeps d.
    loader.sizes["big"] = 15
    cache.get("big")
    assert cache.keys() == ["d", "big"]
    assert cache.stats()["bytes"] == 25
    assert cache.stats()["evictions"] == 3


def test_value_larger_than_capacity_is_returned_but_not_stored():
    cache, _ = make(30, Loader({"huge": 31}))
    cache.get("a")
    assert len(cache.get("huge")) == 31
    assert "huge" not in cache and "a" in cache
    assert cache.stats()["rejected"] == 1


def test_pinned_keys_survive_pressure():
    cache, loader = make(30, pinned=["p"])
    cache.get("p")
    for k in "abcdefgh":
        cache.get(k)
    assert "p" in cache
    assert loader.loaded.count("p") == 1
    s = cache.stats()
    assert s["pinned_bytes"] == 10 and s["bytes"] <= 30
    # Pinned bytes are subtracted from what the others may use.
    cache.unpin("p")
    for k in "xyz":
        cache.get(k)
    assert "p" not in cache


def test_pinned_over_capacity_keeps_all_pinned():
    cache, _ = make(15, pinned=["p", "q"])
    cache.warm(["p", "q", "a"])
    assert set(cache.keys()) == {"p", "q"}
    assert cache.stats()["rejected"] == 1


def test_get_many_loads_all_misses_in_one_call():
    cache, loader = make(1000)
    cache.get("a")
    out = cache.get_many(["a", "b", "c", "b"])
    assert list(out) == ["a", "b", "c"]
    assert loader.calls == [["a"], ["b", "c"]]
    assert cache.stats()["loads"] == 2


def test_concurrent_misses_generate_once():
    cache, loader = make(1000, Loader(delay=0.2))
    n = 8
    barrier = threading.Barrier(n)
    results: list[bytes] = []

    def worker() -> None:
        barrier.wait()
        results.append(cache.get("t"))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == n
    assert loader.loaded == ["t"]
    s = cache.stats()
    assert s["generated"] == 1 and s["misses"] == n and s["coalesced"] == n - 1


def test_many_threads_many_keys_stay_consistent():
    cache, loader = make(50)
    keys = [f"k{i}" for i in range(12)]

    def worker(seed: int) -> None:
        for i in range(200):
            assert len(cache.get(keys[(seed * 7 + i) % len(keys)])) == 10

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    s = cache.stats()
    assert s["bytes"] == 10 * s["entries"] <= 50
    assert s["hits"] + s["misses"] == 6 * 200
    assert s["generated"] == len(loader.loaded)


def test_loader_error_reaches_waiters_and_is_not_cached():
    cache, loader = make(100, Loader(delay=0.1))
    loader.fail.add("bad")
    errors = []

    def worker() -> None:
        try:
            cache.get("bad")
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 3 and all("bad" in e for e in errors)
    assert "bad" not in cache
    loader.fail.clear()
    assert cache.get("bad") == bytes(10)


def test_invalidate_frees_bytes():
    cache, _ = make(100, pinned=["p"])
    cache.warm(["p", "a"])
    cache.invalidate("a")
    assert cache.stats()["bytes"] == 10
    cache.invalidate()
    assert cache.stats()["bytes"] == 0 and len(cache) == 0


def test_negative_capacity_is_a_config_error():
    with pytest.raises(ConfigError, match="capacity"):
        make(-1)
