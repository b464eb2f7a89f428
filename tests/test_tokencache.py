"""tokencache.TokenCache: LRU bound, expiry on get, issuer eviction, size 0."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from jwtproxy.tokencache import TokenCache, cache_key


@dataclass(frozen=True)
class Entry:
    issuer: str
    exp: float
    leeway: float = 0.0


class Cache:
    """The cache under test, addressed by token for brevity (the gateway passes cache_key()).

    A wrapper rather than a subclass: TokenCache may be compiled (jwtproxy.compiled), and a
    compiled class takes no subclasses from plain Python."""

    def __init__(self, size: int) -> None:
        self.real: TokenCache[Entry] = TokenCache(size)

    def put(self, key: bytes | str, entry: Entry) -> None:
        self.real.put(cache_key(key) if isinstance(key, str) else key, entry)

    def get(self, key: bytes | str, now: float) -> Entry | None:
        return self.real.get(cache_key(key) if isinstance(key, str) else key, now)

    def __len__(self) -> int:
        return len(self.real)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_cache_key_is_the_sha256_of_the_token() -> None:
    assert cache_key("tok") == hashlib.sha256(b"tok").digest()
    assert cache_key("\ud800") == hashlib.sha256("\ud800".encode("utf-8", "surrogatepass")).digest()


def test_put_get_by_digest() -> None:
    cache: TokenCache[Entry] = TokenCache(10)
    e = Entry("corp", 1000.0, 30.0)
    cache.put(cache_key("tok"), e)
    assert cache.get(cache_key("tok"), 0.0) is e
    assert cache.get(cache_key("other"), 0.0) is None
    assert len(cache) == 1


def test_keys_are_digests_not_tokens() -> None:
    cache = Cache(10)
    token = "a" * 5000
    cache.put(token, Entry("corp", 100.0))
    assert all(len(k) == 32 for k in cache._entries)


def test_expired_entries_miss_and_are_dropped() -> None:
    cache = Cache(10)
    cache.put("a", Entry("corp", 100.0))
    cache.put("b", Entry("corp", 100.0, 30.0))
    assert cache.get("a", 99.9) is not None
    assert cache.get("a", 100.0) is None  # now >= exp (no leeway on this entry)
    assert len(cache) == 1
    assert cache.get("b", 129.9) is not None  # leeway honoured
    assert cache.get("b", 130.0) is None
    assert len(cache) == 0


def test_lru_bound_evicts_least_recently_used() -> None:
    cache = Cache(3)
    for t in "abc":
        cache.put(t, Entry("corp", 100.0))
    assert cache.get("a", 0.0) is not None  # a is now most recent
    cache.put("d", Entry("corp", 100.0))
    assert len(cache) == 3
    assert cache.get("b", 0.0) is None
    assert all(cache.get(t, 0.0) is not None for t in "acd")
    cache.put("a", Entry("corp", 200.0))  # overwrite keeps the size
    assert len(cache) == 3 and cache.get("a", 150.0) is not None


def test_evict_issuer() -> None:
    cache = Cache(10)
    cache.put("a", Entry("corp", 100.0))
    cache.put("b", Entry("other", 100.0))
    cache.put("c", Entry("corp", 100.0))
    assert cache.evict_issuer("corp") == 2
    assert cache.get("a", 0.0) is None and cache.get("c", 0.0) is None
    assert cache.get("b", 0.0) is not None
    cache.clear()
    assert len(cache) == 0


def test_size_zero_disables() -> None:
    cache = Cache(0)
    cache.put("a", Entry("corp", 100.0))
    assert cache.get("a", 0.0) is None and len(cache) == 0


def test_negative_size_is_an_error() -> None:
    import pytest

    with pytest.raises(ValueError):
        TokenCache[Entry](-1)
