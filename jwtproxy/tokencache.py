"""The verified-token cache: a bounded LRU of verdicts keyed by a hash of the token.

Theory of operation
-------------------
* *Key.* ``sha256(token)`` (32 bytes, :func:`cache_key`): memory per entry is bounded by the
  digest rather than by an up-to-``max_bytes`` token string, and a lookup never compares whole
  tokens. Hashing costs ~0.7 µs for a 600-byte token against ~15 µs or more for
  the signature it saves. The caller computes the key once per request and uses it for both
  ``get`` and ``put``.
* *Expiry.* An entry carries ``issuer`` (name), ``exp`` and ``leeway``; ``get`` drops
  and misses an entry once ``now >= exp + leeway``, so an expired verdict is never served. The
  caller still checks revocation and route rules on every hit (contract §4).
* *Bound.* At most ``size`` entries; inserting beyond that evicts the least recently used.
  ``size == 0`` disables the cache (``get`` always misses, ``put`` stores nothing).
* *Key rotation.* ``evict_issuer(name)`` drops every verdict of that issuer (contract §4: a changed
  key set empties the issuer's cached verdicts).
* *Shared parts.* Most of an entry's bytes are the token's claims and the headers rendered from
  them, and many of those repeat from token to token (``iss``, ``aud``, a role, a scope string).
  :class:`Repeats` lets the verifier and the identity renderer keep one object per repeated value
  per kind (claim name, header), and gives up on a kind once it has seen
  :attr:`Repeats.per_kind` distinct values (``sub``, ``jti``), after which that kind costs one
  dict lookup. Only verified tokens reach it, so no client can fill it. ``bench/growth.py cache``
  measures the bytes per entry.

Sans-I/O: ``now`` is a parameter; no clock is read here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = ["CacheableVerdict", "Repeats", "TokenCache", "cache_key"]


class CacheableVerdict(Protocol):
    """What the cache reads of an entry (``auth.CachedToken`` is one)."""

    @property
    def issuer(self) -> str: ...
    @property
    def exp(self) -> float: ...
    @property
    def leeway(self) -> float: ...


E = TypeVar("E", bound=CacheableVerdict)
V = TypeVar("V")


def cache_key(token: str) -> bytes:
    """The cache key of ``token``: its sha256 digest."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenCache(Generic[E]):
    """Bounded LRU ``key -> entry`` (see the module docstring)."""

    __slots__ = ("size", "_entries")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("cache size must be >= 0")
        self.size = size
        self._entries: OrderedDict[bytes, E] = OrderedDict()

    def get(self, key: bytes, now: float) -> E | None:
        """The live entry for ``key`` (a digest from :func:`cache_key`), else None."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        if now >= entry.exp + entry.leeway:
            del entries[key]
            return None
        entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: E) -> None:
        """Store ``entry`` under ``key``; evicts the least recently used entry beyond ``size``."""
        if self.size == 0:
            return
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def evict_issuer(self, name: str) -> int:
        """Drop every entry of issuer ``name``; returns how many were dropped."""
        doomed = [k for k, e in self._entries.items() if e.issuer == name]
        for k in doomed:
            del self._entries[k]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_GIVEN_UP: Final[dict[Any, Any]] = {}  # marks a kind whose values do not repeat (never written to)


class Repeats:
    """One shared object per (kind, key) for kinds whose keys repeat (see the module docstring)."""

    __slots__ = ("per_kind", "max_kinds", "_memo")

    def __init__(self, per_kind: int = 64, max_kinds: int = 256) -> None:
        self.per_kind = per_kind
        self.max_kinds = max_kinds
        self._memo: dict[str, dict[Any, Any]] = {}

    def lookup(self, kind: str, key: Any) -> Any:
        """The object remembered for ``key`` of ``kind``, else None."""
        memo = self._memo.get(kind)
        return None if memo is None else memo.get(key)

    def remember(self, kind: str, key: Any, value: V) -> V:
        """Remember ``value`` for ``key`` unless ``kind`` has proved not to repeat; returns ``value``."""
        memo = self._memo.get(kind)
        if memo is None:
            if len(self._memo) >= self.max_kinds:
                return value
            memo = self._memo[kind] = {}
        elif memo is _GIVEN_UP:
            return value
        if len(memo) >= self.per_kind:
            self._memo[kind] = _GIVEN_UP  # a per-token value (sub, jti): stop paying for it
            return value
        memo[key] = value
        return value

    def share_strings(self, claims: dict[str, Any]) -> None:
        """Replace each string value of ``claims`` by the equal string seen before for that claim."""
        memo = self._memo
        for name, value in claims.items():
            if type(value) is not str:
                continue
            seen = memo.get(name)
            if seen is None:
                self.remember(name, value, value)  # the first value of a new kind
            elif seen is not _GIVEN_UP:
                shared = seen.setdefault(value, value)
                if shared is not value:
                    claims[name] = shared  # same keys: allowed while iterating
                elif len(seen) > self.per_kind:
                    memo[name] = _GIVEN_UP  # a per-token value (sub, jti): stop paying for it
