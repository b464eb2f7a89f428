"""Rate limits per identity and the verification-failure budget: GCRA, keys, 429 fields, backends.

Theory of operation
-------------------
* *The algorithm.* GCRA, the generic cell rate algorithm (ATM Forum TM 4.0; the "virtual
  scheduling" form, as in redis-cell and Envoy's rate limit service): a limit of ``requests`` per
  ``per`` seconds with ``burst`` has an emission interval ``T = per / requests`` and a tolerance
  ``tau = burst * T``. Its whole state per key is one number, the theoretical arrival time
  ``TAT``. A request at ``now`` is admitted iff ``TAT - now <= tau`` (with ``TAT = max(TAT, now)``),
  and then ``TAT += T``; a refused request changes nothing and may retry after
  ``TAT - tau - now`` seconds. This is a token bucket of ``burst + 1`` tokens refilled one per
  ``T``, kept as a single timestamp, so one read-modify-write decides a request.
* *What it guarantees* (contract §5.5). If ``n`` requests are admitted at ``t1 <= .. <= tn``,
  each admission moved ``TAT`` by ``T``, so admitting the last needed
  ``t1 + (n - 1) T - tn <= tau``, i.e. ``n <= 1 + burst + (tn - t1) / T``. Within any window of
  ``per`` seconds (``tn - t1 < per``) that is at most ``requests + burst``; a client sending
  steadily faster than ``T`` is admitted once per ``T``: ``requests`` per ``per``. A fresh key
  admits ``burst + 1`` at once (``burst = 0`` means strictly one per ``T``). Comparisons carry
  1 ns of slack so float rounding of ``TAT`` never refuses a request sent exactly on time.
* *Sans-I/O.* :class:`Policy` (one per route with a ``rate_limit``) holds ``T``, ``tau``, its key
  rule and its pre-rendered fields; :meth:`Policy.step` is the pure transition ``(state, now) ->
  (new state, expiry, wait)``. ``now`` is always a parameter. The backends run that step where the
  state lives:

  - :class:`LocalLimiter`: the host's :class:`~jwtproxy.sharedtable.SharedTable`, under its stripe
    lock, so the limit holds across every worker of the host exactly (not a per-worker guess). The
    slot expires at ``TAT``: past it, a fresh key and an expired one are the same state.
  - :class:`RedisLimiter`: the same step as one Lua script (``EVALSHA``, loaded once) on Redis,
    atomic across every node; ``now`` there is Redis's own ``TIME``, one clock for all nodes.
    When Redis cannot be reached (refused, timed out, broken), the request is decided by the
    local limiter instead, never answered 5xx; the outage is logged once when it starts and once
    when it ends, each locally decided request counts in :attr:`RedisLimiter.fallbacks`, and Redis
    is tried again ``retry_interval`` after the last failure (one request probes it).
* *Keys* (:meth:`Policy.key_for`). ``key`` names a claim (``sub``, ``client_id``, ``azp``, ...),
  ``client_ip`` (the client address, from a trusted proxy's ``X-Forwarded-For`` where configured)
  or ``token`` (the token's SHA-256, as the verified-token cache keys it). A request without the
  claim or without a token is keyed by its client address, as Kong's ``limit_by = consumer``
  falls back to the IP: a client cannot escape its limit by leaving the claim out. Every key is
  prefixed with the route's scope, so two routes keep separate counts. Table slots and Redis keys
  hold only digests of keys, never a token or a claim value.
* *Answers.* A refused request gets ``429`` with ``Retry-After`` (whole seconds, rounded up, at
  least 1) and the IETF fields of draft-ietf-httpapi-ratelimit-headers-10 (Structured Fields,
  RFC 9651)::

      RateLimit-Policy: "sub";q=100;w=60;jwtproxy-burst=20
      RateLimit: "sub";r=0;t=3

  ``q``/``w`` are the steady quota and window (``w`` only when ``per`` is whole seconds, the draft
  has no fractions), ``jwtproxy-burst`` the vendor-prefixed burst the draft asks for, ``r`` the
  quota left (0), ``t`` the same seconds as ``Retry-After``. No partition key (``pk``) is sent: it
  would echo the identity the limit is keyed on.
* *Failure budget* (:class:`FailureBudget`, ``[limits] failures_per_ip``). Failed verifications
  are counted per client address in fixed one-second windows in the shared table (host-wide: it
  protects this host's CPU, whose signature work it saves). Once an address has more than the
  budget in the current window, its requests that would need signature work (a token not in the
  verified cache) are refused with 429 before any decoding, until the window ends; requests with a
  cached valid token still pass, and refused requests do not count as failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from redis.exceptions import RedisError

from .sharedtable import SharedTable

__all__ = [
    "CLIENT_IP",
    "FailureBudget",
    "LocalLimiter",
    "Policy",
    "RedisLimiter",
    "TOKEN",
    "retry_after_seconds",
]

CLIENT_IP: Final = "client_ip"
TOKEN: Final = "token"
SLACK: Final = 1e-9  # seconds of float rounding forgiven at the admission boundary
IETF_DRAFT: Final = "draft-ietf-httpapi-ratelimit-headers-10"

State = tuple[float, ...]

log = logging.getLogger("jwtproxy.ratelimit")


def retry_after_seconds(wait: float) -> int:
    """``wait`` as ``Retry-After`` delay-seconds: rounded up, at least 1."""
    return max(1, math.ceil(wait - SLACK))


def _sf_string(text: str) -> bytes:
    """``text`` as a Structured Field String (RFC 9651 §3.3.3): printable ASCII, quoted."""
    if not text.isascii() or not text.isprintable():
        raise ValueError(f"{text!r} is not printable ASCII")
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def _claim_bytes(value: object) -> bytes | None:
    """A claim value as key material; None for values that cannot identify a client."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return b"n" + repr(value).encode()
    return None  # arrays and objects: not an identity


class Policy:
    """One route's rate limit, compiled once (see the module docstring)."""

    __slots__ = (
        "requests", "per", "burst", "key", "scope", "interval", "tolerance",
        "name", "policy_field", "_prefix", "_ip_prefix",
    )

    def __init__(self, requests: int, per: float, burst: int = 0, key: str = CLIENT_IP,
                 scope: str = "") -> None:
        if requests < 1:
            raise ValueError("requests must be >= 1")
        if not per > 0 or not math.isfinite(per):
            raise ValueError("per must be > 0 seconds")
        if burst < 0:
            raise ValueError("burst must be >= 0")
        if not key:
            raise ValueError("key must not be empty")
        self.requests = requests
        self.per = float(per)
        self.burst = burst
        self.key = key
        self.scope = scope
        self.interval = self.per / requests
        self.tolerance = burst * self.interval
        self.name = _sf_string(key)
        field = self.name + b";q=%d" % requests
        if self.per.is_integer():
            field += b";w=%d" % int(self.per)
        if burst:
            field += b";jwtproxy-burst=%d" % burst
        self.policy_field = field
        scope_bytes = scope.encode("utf-8", "surrogatepass")
        self._prefix = b"rl\x00" + scope_bytes + b"\x00" + key.encode("utf-8", "surrogatepass") + b"\x00"
        self._ip_prefix = b"rl\x00" + scope_bytes + b"\x00\x00ip\x00"

    # -- the transition ----------------------------------------------------------------------

    def step(self, state: State | None, now: float) -> tuple[State | None, float, float]:
        """GCRA: ``(new state or None, its expiry, wait)``; ``wait == 0`` means admitted."""
        tat = state[0] if state is not None and state[0] > now else now
        wait = tat - self.tolerance - now
        if wait > SLACK:
            return None, 0.0, wait
        tat += self.interval
        return (tat,), tat, 0.0

    # -- keys ----------------------------------------------------------------------------------

    def key_for(self, client: str, claims: Mapping[str, Any] | None = None,
                token_digest: bytes | None = None) -> bytes:
        """The limit's key for a request from ``client`` (its address) with these verified
        ``claims`` and ``token_digest`` (SHA-256 of the token); falls back to the address."""
        key = self.key
        if key == CLIENT_IP:
            return self._prefix + client.encode("ascii", "replace")
        if key == TOKEN:
            if token_digest is not None:
                return self._prefix + token_digest
        elif claims is not None:
            value = _claim_bytes(claims.get(key))
            if value is not None:
                return self._prefix + value
        return self._ip_prefix + client.encode("ascii", "replace")

    @property
    def needs_identity(self) -> bool:
        """True when the key is a claim: it can only be known after verification."""
        return self.key not in (CLIENT_IP, TOKEN)

    # -- answers -------------------------------------------------------------------------------

    def headers(self, wait: float) -> tuple[tuple[bytes, bytes], ...]:
        """The fields of a 429 for a request refused with ``wait`` seconds to go."""
        seconds = b"%d" % retry_after_seconds(wait)
        return (
            (b"retry-after", seconds),
            (b"ratelimit-policy", self.policy_field),
            (b"ratelimit", self.name + b";r=0;t=" + seconds),
        )


class LocalLimiter:
    """GCRA cells in the host's shared table (one value per slot): exact across the workers of
    one host."""

    __slots__ = ("table",)

    def __init__(self, table: SharedTable) -> None:
        if table.values != 1:
            raise ValueError("a rate limit table holds one value per slot")
        self.table = table

    def check(self, policy: Policy, key: bytes, now: float) -> float:
        """Seconds the request must wait: 0.0 = admitted (and counted)."""
        return self.table.update(key, now, policy.step)


# The same transition as Policy.step, on Redis. KEYS[1] = the cell; ARGV = interval, tolerance.
# Returns the wait as a string ("0" = admitted): Lua numbers would come back truncated to integers.
GCRA_LUA: Final = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 1e-9 then return string.format('%.6f', wait) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1)
return '0'
"""

REDIS_PREFIX: Final = "jwtproxy:rl:"


class RedisLimiter:
    """GCRA cells on Redis, shared by every node; the local limiter while Redis is away.

    ``client`` is a ``redis.asyncio.Redis``; ``local`` decides when it fails. ``on_state(up,
    error)`` is called once when an outage starts (``up`` False) and once when it ends; without
    it, those two moments are logged here."""

    def __init__(self, client: Any, local: LocalLimiter, *, retry_interval: float = 1.0,
                 on_state: Callable[[bool, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.local = local
        self.retry_interval = retry_interval
        self.on_state = on_state
        self.clock = clock
        self.up = True
        self.fallbacks = 0
        self._down_until = 0.0
        self._script = client.register_script(GCRA_LUA)

    @staticmethod
    def redis_key(key: bytes) -> str:
        """The Redis key of a cell: a digest, so no identity is stored in Redis."""
        return REDIS_PREFIX + hashlib.blake2b(key, digest_size=16).hexdigest()

    async def check(self, policy: Policy, key: bytes, now: float) -> float:
        """Seconds the request must wait: 0.0 = admitted. Never raises for Redis trouble."""
        if not self.up and self.clock() < self._down_until:
            self.fallbacks += 1
            return self.local.check(policy, key, now)
        try:
            reply = await self._script(keys=[self.redis_key(key)],
                                       args=[repr(policy.interval), repr(policy.tolerance)])
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._went_down(exc)
            self.fallbacks += 1
            return self.local.check(policy, key, now)
        if not self.up:
            self.up = True
            if self.on_state is not None:
                self.on_state(True, "")
            else:
                log.info("rate limit backend redis is back; limits are shared across nodes again")
        return float(reply)

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = self.clock() + self.retry_interval
        if self.up:
            self.up = False
            reason = f"{type(exc).__name__}: {exc}"
            if self.on_state is not None:
                self.on_state(False, reason)
            else:
                log.warning("rate limit backend redis unreachable (%s); limits apply per host until "
                            "it is back", reason)


class FailureBudget:
    """Failed verifications per client address per one-second window (``failures_per_ip``), in a
    shared table of two values per slot (window start, count)."""

    __slots__ = ("table", "per_second")

    def __init__(self, table: SharedTable, per_second: int) -> None:
        if per_second < 1:
            raise ValueError("per_second must be >= 1")
        if table.values != 2:
            raise ValueError("a failure budget table holds two values per slot")
        self.table = table
        self.per_second = per_second

    @staticmethod
    def _key(client: str) -> bytes:
        return b"fail\x00" + client.encode("ascii", "replace")

    def wait(self, client: str, now: float) -> float:
        """Seconds until ``client`` may have signature work again; 0.0 if it may now."""
        state = self.table.get(self._key(client), now)
        if state is None:
            return 0.0
        window, count = state
        if count > self.per_second and window <= now < window + 1.0:
            return window + 1.0 - now
        return 0.0

    def record_failure(self, client: str, now: float) -> None:
        """Count one failed verification from ``client``."""
        self.table.update(self._key(client), now, _count_in_window)

    def headers(self, wait: float) -> tuple[tuple[bytes, bytes], ...]:
        """The fields of a 429 from the failure budget."""
        seconds = b"%d" % retry_after_seconds(wait)
        return (
            (b"retry-after", seconds),
            (b"ratelimit-policy", b'"failures";q=%d;w=1' % self.per_second),
            (b"ratelimit", b'"failures";r=0;t=' + seconds),
        )


def _count_in_window(state: State | None, now: float) -> tuple[State, float, None]:
    window = float(math.floor(now))
    if state is not None and state[0] == window:
        return (window, state[1] + 1.0), window + 1.0, None
    return (window, 1.0), window + 1.0, None
