"""One worker's limits (contract §5.5), built once per config from the host's shared tables.

Theory of operation
-------------------
:class:`WorkerLimits` is what the gateway asks about limits; it holds no policy of its own but
wires the pieces of :mod:`jwtproxy.ratelimit` and :mod:`jwtproxy.connlimits` to one config:

* a :class:`~jwtproxy.ratelimit.Policy` per route with a ``rate_limit`` (:meth:`policy`), scoped
  by the route's label so routes never share counts;
* the limiter: ``local`` decides on the host's rate table, synchronously (:meth:`check`);
  ``redis`` decides on Redis (:meth:`check_redis`, awaited) and falls back to the local table
  while Redis is away. Redis is contacted only from the worker's loop (:meth:`start`);
* the failure budget (``failures_per_ip`` > 0) on the host's failure table;
* :class:`~jwtproxy.connlimits.UpstreamSlots` per upstream (:meth:`slots`) on the host's
  connection counters, in this worker's column;
* ``max_connections``, the per-worker cap on client connections.

A gateway without a supervisor (``jwtproxy verify``, in-process tests) gets tables of its own:
the limits then hold for that one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .config import Config, RouteConfig, UpstreamConfig
from .connlimits import HostTables, UpstreamSlots
from .ratelimit import FailureBudget, LocalLimiter, Policy, RedisLimiter, retry_after_seconds
from .sharedtable import SharedTableBusy

__all__ = ["WorkerLimits"]

log = logging.getLogger("jwtproxy.limits")

#: Redis command and connect timeout for rate-limit decisions: a request waits at most this long
#: for Redis before the local table decides it.
REDIS_TIMEOUT = 0.25
#: Connections to Redis per worker: decisions beyond these in flight wait for one.
REDIS_CONNECTIONS = 256


class WorkerLimits:
    """The limits of one worker for one config (see the module docstring)."""

    def __init__(self, config: Config, tables: HostTables | None = None, column: int = 0, *,
                 on_backend_state: Callable[[bool, str], None] | None = None) -> None:
        limits = config.limits
        self.config = limits
        # Without a supervisor's tables the worker makes (and closes) small ones of its own.
        self._own_tables = tables is None
        self.tables = tables if tables is not None else HostTables.create(workers=1)
        self.column = column
        self.max_connections = limits.max_connections
        self.local = LocalLimiter(self.tables.rates)
        self.redis: RedisLimiter | None = None
        self.on_backend_state = on_backend_state
        self.budget = (
            FailureBudget(self.tables.failures, limits.failures_per_ip) if limits.failures_per_ip else None
        )

    @property
    def uses_redis(self) -> bool:
        """True when decisions are awaited on Redis (``[limits] backend = "redis"``)."""
        return self.config.backend == "redis"

    # -- building ------------------------------------------------------------------------------

    def policy(self, route: RouteConfig, label: str) -> Policy | None:
        """The compiled rate limit of ``route`` (labelled ``label`` in metrics), or None."""
        spec = route.rate_limit
        if spec is None:
            return None
        return Policy(spec.requests, spec.per, spec.burst, spec.key, scope=label)

    def slots(self, upstream: UpstreamConfig) -> UpstreamSlots:
        """Connection slots of ``upstream``'s targets, shared by the host's workers."""
        keys = [f"{t.scheme}://{t.host}:{t.port}".encode() for t in upstream.targets]
        return UpstreamSlots(self.tables.connections, self.column, self.config.upstream_max_connections, keys)

    # -- deciding ------------------------------------------------------------------------------

    def check(self, policy: Policy, key: bytes, now: float) -> float:
        """Local decision: seconds to wait, 0.0 = admitted. A stripe stuck past its timeout (a
        stopped worker) admits: the limit is a protection, its failure must not be an outage."""
        try:
            return self.local.check(policy, key, now)
        except SharedTableBusy:
            log.warning("rate limit table busy; request admitted")
            return 0.0

    async def check_redis(self, policy: Policy, key: bytes, now: float) -> float:
        """Decision on Redis (local while Redis is away): seconds to wait, 0.0 = admitted."""
        redis = self.redis
        if redis is None:
            return self.check(policy, key, now)
        try:
            return await redis.check(policy, key, now)
        except SharedTableBusy:
            log.warning("rate limit table busy; request admitted")
            return 0.0

    def failure_wait(self, client: str, now: float) -> float:
        """Seconds until ``client`` may have signature work again (0.0: now)."""
        if self.budget is None:
            return 0.0
        try:
            return self.budget.wait(client, now)
        except SharedTableBusy:
            return 0.0

    def record_failure(self, client: str, now: float) -> None:
        """Count one failed verification from ``client``."""
        if self.budget is not None:
            try:
                self.budget.record_failure(client, now)
            except SharedTableBusy:
                pass

    def failure_headers(self, wait: float) -> tuple[tuple[bytes, bytes], ...]:
        """The fields of the failure budget's 429."""
        if self.budget is None:  # not asked without a budget; a plain Retry-After would do
            return ((b"retry-after", b"%d" % retry_after_seconds(wait)),)
        return self.budget.headers(wait)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the Redis backend (in the worker's loop); nothing to do for ``local``."""
        if not self.uses_redis or self.redis is not None:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        pool: Any = aioredis.BlockingConnectionPool.from_url(
            self.config.redis_url,
            max_connections=REDIS_CONNECTIONS,
            timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self.redis = RedisLimiter(aioredis.Redis(connection_pool=pool), self.local,
                                  on_state=self.on_backend_state)

    @property
    def fallbacks(self) -> int:
        """Decisions made locally because Redis was away, since start."""
        return self.redis.fallbacks if self.redis is not None else 0

    @property
    def backend_up(self) -> bool | None:
        """Whether Redis answers (None with the local backend)."""
        return self.redis.up if self.redis is not None else None

    async def close(self) -> None:
        """Close the Redis client, and the tables if this worker made them."""
        if self.redis is not None:
            client = self.redis.client
            self.redis = None
            await client.aclose()
        if self._own_tables:
            self._own_tables = False
            self.tables.close()
