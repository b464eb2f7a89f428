"""DPoP proof replay guards: a proof's ``jti`` is accepted once per host, and once across nodes.

Theory of operation
-------------------
:meth:`jwtproxy.dpop.ProofChecker.check` ends with an :class:`~jwtproxy.dpop.AcceptedProof` whose
``replay_key`` (a digest of the ``jti``) must now be recorded as used until ``replay_until``. The
first request to record it wins; every later one is a replay (``dpop_replay``).

* *Host-wide* (:class:`HostReplayGuard`): an ``insert_if_absent`` on the shared-memory table the
  supervisor creates before it forks (:mod:`jwtproxy.sharedtable`), so two workers of one host
  never both accept one proof, and a reload's new workers still remember the old ones' proofs.
  Synchronous, a few microseconds. The table never grows: when a bucket is full of live entries
  the entry expiring first is evicted, which could let a proof whose entry was evicted be replayed
  before its window ends. :data:`TABLE_CAPACITY` is sized so that this takes ~10,000 proofs a
  second sustained per host; evictions are counted (``evictions``) and reported in the metrics
  so an operator sees it happen. A stripe lock held past its timeout (a stopped worker) raises
  :class:`ReplayCheckUnavailable`.
* *Across nodes* (:class:`RedisReplayGuard`, with ``[revocation] backend = "redis"``):
  ``SET jwtproxy:dpop:jti:<hex> 1 NX PX <ms until replay_until>`` on the revocation Redis; Redis
  answers OK to exactly one caller. One round trip per DPoP request; the key expires by itself.
* *Fail closed.* If the check cannot be made (Redis unreachable or slow, a wedged stripe), the
  proof is not accepted: :class:`ReplayCheckUnavailable` becomes a 503 with ``Retry-After``, never
  a pass that could be a replay.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .sharedtable import SharedTableBusy

__all__ = [
    "REDIS_PREFIX",
    "TABLE_CAPACITY",
    "HostReplayGuard",
    "RedisReplayGuard",
    "ReplayCheckUnavailable",
    "ReplayTable",
]

#: Slots of the host-wide table (24 bytes each, pages allocated only when first written).
TABLE_CAPACITY: Final = 1 << 20
REDIS_PREFIX: Final = "jwtproxy:dpop:jti:"
#: A Redis answer slower than this fails the request (503) rather than holding it.
REDIS_TIMEOUT: Final = 1.0


class ReplayCheckUnavailable(Exception):
    """The replay check could not be made; the request must fail (503), never pass."""


class ReplayTable(Protocol):
    """What the host-wide guard needs of :class:`jwtproxy.sharedtable.SharedTable`."""

    @property
    def evictions(self) -> int: ...

    def insert_if_absent(self, key: bytes, expires: float, now: float) -> bool: ...


class HostReplayGuard:
    """Single use per host, on a table shared by every worker (see the module docstring)."""

    __slots__ = ("table",)

    def __init__(self, table: ReplayTable) -> None:
        self.table = table

    def first_use(self, key: bytes, until: float, now: float) -> bool:
        """True if ``key`` was not seen before on this host (it is now recorded until ``until``)."""
        try:
            return self.table.insert_if_absent(key, until, now)
        except (SharedTableBusy, OSError) as exc:
            raise ReplayCheckUnavailable(f"host replay table: {exc}") from None

    @property
    def evictions(self) -> int:
        """Live entries this process pushed out of a full bucket (should stay 0)."""
        return self.table.evictions


class RedisReplayGuard:
    """Single use across every node sharing one Redis (see the module docstring)."""

    __slots__ = ("_client", "_prefix")

    def __init__(self, url: str, prefix: str = REDIS_PREFIX, timeout: float = REDIS_TIMEOUT) -> None:
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry covers a pooled connection Redis closed meanwhile (a restart);
            # more would hold the request past the timeout for an outage.
            retry=Retry(NoBackoff(), 1),
        )
        self._prefix = prefix

    async def first_use(self, key: bytes, until: float, now: float) -> bool:
        """True if no node recorded ``key`` before; raises :class:`ReplayCheckUnavailable`."""
        ttl_ms = max(1, int((until - now) * 1000))
        try:
            stored = await self._client.set(self._prefix + key.hex(), b"1", nx=True, px=ttl_ms)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise ReplayCheckUnavailable(f"redis replay check: {type(exc).__name__}") from None
        return bool(stored)

    async def close(self) -> None:
        await self._client.aclose()
