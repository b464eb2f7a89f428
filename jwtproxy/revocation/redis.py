"""Redis revocation backend: revocations shared by every worker of every node.

Theory of operation
-------------------
Data (all names under the prefix ``jwtproxy:rev:``):

* ``jwtproxy:rev:jti:<jti>`` = ``exp`` (string), with ``PXAT (exp + grace)``: Redis forgets the
  revocation by itself once the token can no longer be accepted.
* ``jwtproxy:rev:sub`` hash, ``<sub>`` -> ``before``: no expiry (see :mod:`jwtproxy.revocation`).
* ``jwtproxy:rev:epoch``: a random id created by the first node to find it missing. Its value
  changing (or vanishing) means Redis lost its data set: restarted without persistence, flushed,
  failed over to an empty replica.
* channel ``jwtproxy:rev:events``: one JSON message per change, ``{"op": "jti", "jti", "exp"}``,
  ``{"op": "unjti", "jti"}``, ``{"op": "sub", "sub", "before"}``, ``{"op": "unsub", "sub"}``, and
  ``{"op": "resync"}`` (reload everything).

Writes are Lua scripts that store (keeping the larger exp / before) *and* publish in one atomic
step, so no node can see the data without the message being on its way, and vice versa. A write
returns after Redis executed it and the caller's own mirror holds it; it raises
``RevocationBackendError`` (admin API: 503) when Redis is unreachable. Revocations are **not**
queued during an outage: a queue in one process's memory would be lost with that process after
success had been reported; the operator retries instead.

Each store runs one background session at a time, on a dedicated pub/sub connection:

1. SUBSCRIBE, and wait for the confirmation (from then on no change can be missed: messages
   published during the next steps wait in the socket and are applied after them).
2. Read the epoch (create it if missing). If this store synced before under another epoch, Redis
   lost data: write the whole mirror back (max rule, no per-entry publish), then publish
   ``resync`` so nodes that already loaded the empty set reload. A revocation is thus lost only
   if Redis *and* every node holding it lose it. (An unrevoke made while such a node was away can
   be undone by its write-back -- fail closed; repeat the unrevoke.)
3. Full load (SCAN + MGET of jti keys, HGETALL of subjects) replaces the mirror. ``up`` = True.
4. Apply messages as they arrive; every ``resync_interval`` (30 s) repeat steps 2-3 as a safety
   net (and prune expired jti entries from the mirror).

Any Redis error ends the session: the mirror stays as it is and keeps being enforced, ``up`` =
False (``status()``; the supervisor turns it into ``jwtproxy_revocation_backend_up``), and a new
session is tried after an exponential backoff (``backoff_min`` .. ``backoff_max``, jittered). The
redis-py connection retry is disabled on the pub/sub client so that no reconnect can happen behind
our back (it would skip step 2-3 and miss what was published meanwhile).

A worker that starts while Redis is unreachable (a replaced worker, a reload) begins from the
supervisor's mirror, handed over at fork (``RevocationMirror.seed``); the first successful sync
replaces it with Redis's. Reconnect attempts are at most ``backoff_max`` (0.5 s) apart, so a
revocation made right after an outage still reaches every worker within a second.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.asyncio.retry import Retry

from .core import (
    EXPIRY_GRACE,
    Log,
    RevocationBackendError,
    RevocationMirror,
    RevocationSnapshot,
    check_id,
    check_time,
)

__all__ = ["RedisRevocationStore", "DEFAULT_PREFIX"]

DEFAULT_PREFIX: Final = "jwtproxy:rev:"

# KEYS[1] = jti key; ARGV = exp, pxat_ms, channel ("" = do not publish), message
_REVOKE_JTI: Final = """
local cur = tonumber(redis.call('GET', KEYS[1]))
if cur == nil or cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""
# KEYS[1] = subject hash; ARGV = sub, before, channel ("" = do not publish), message
_REVOKE_SUB: Final = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if cur == nil or cur < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""
# KEYS[1] = jti key; ARGV = channel, message. Publishes even when absent: clears stray mirrors.
_UNREVOKE_JTI: Final = """
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""
# KEYS[1] = subject hash; ARGV = sub, channel, message
_UNREVOKE_SUB: Final = """
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return n
"""

_SESSION_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)


def redact_url(url: str) -> str:
    """``redis://host:port/db`` without credentials, for status and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisRevocationStore(RevocationMirror):
    """Revocations in Redis, mirrored per worker (``[revocation] backend = "redis"``)."""

    def __init__(
        self,
        url: str,
        log: Log,
        *,
        prefix: str = DEFAULT_PREFIX,
        resync_interval: float = 30.0,
        backoff_min: float = 0.1,
        backoff_max: float = 0.5,
        command_timeout: float = 2.0,
        start_timeout: float = 3.0,
        grace: float = EXPIRY_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(log, grace)
        self.url = url
        self.resync_interval = resync_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.command_timeout = command_timeout
        self.start_timeout = start_timeout
        self._clock = clock
        self._jti_prefix = prefix + "jti:"
        self._sub_key = prefix + "sub"
        self._epoch_key = prefix + "epoch"
        self._channel = prefix + "events"
        self._cmd: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._synced_event = asyncio.Event()
        self._resync_requested = False
        # health, for status()
        self._up = False
        self._epoch: str | None = None
        self._last_error: str | None = None
        self._down_since: float | None = None
        self._last_sync: float | None = None
        self._connects = 0
        self._failures = 0
        self._writebacks = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background session; wait up to ``start_timeout`` for the first full load.

        Never raises because Redis is down: the store then starts empty, reports ``up: false``
        and keeps retrying.
        """
        if self._task is not None:
            return
        common: dict[str, Any] = dict(
            decode_responses=True,
            socket_connect_timeout=self.command_timeout,
            socket_timeout=self.command_timeout,
            socket_keepalive=True,
        )
        # One retry on the command client: a pooled connection to a restarted server fails once.
        self._cmd = aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 1), **common)
        self._sub_client = aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **common)
        for name, source in (("jti", _REVOKE_JTI), ("sub", _REVOKE_SUB),
                             ("unjti", _UNREVOKE_JTI), ("unsub", _UNREVOKE_SUB)):
            self._scripts[name] = self._cmd.register_script(source)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="jwtproxy-revocation-redis")
        try:
            await asyncio.wait_for(self._synced_event.wait(), self.start_timeout)
        except asyncio.TimeoutError:
            self._log("revocation: redis at %s not reachable at start (%s); retrying in the background",
                      redact_url(self.url), self._last_error)

    async def close(self) -> None:
        """Stop the session and close the connections."""
        task, self._task = self._task, None
        if task is not None:
            # A cancellation that lands while redis-py's own read timeout fires can be swallowed
            # (the session then waits on its socket forever), so it is repeated until the task
            # is done: one cancel() hung close() about one time in forty in the tests.
            for _ in range(50):
                task.cancel()
                done, _pending = await asyncio.wait({task}, timeout=0.1)
                if done:
                    break
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a session error at shutdown is not news
        for client in (self._cmd, self._sub_client):
            if client is not None:
                try:
                    await client.aclose()
                except _SESSION_ERRORS:
                    pass
        self._cmd = self._sub_client = None
        self._up = False

    def status(self) -> dict[str, Any]:
        """``{"backend": "redis", "up", "connected", "synced", "url" (no credentials), "jti",
        "sub", "down_since", "last_sync", "connects", "failures", "writebacks", "last_error"}``."""
        return {
            "backend": "redis",
            "up": self._up,
            "connected": self._up,
            "synced": self._last_sync is not None,
            "url": redact_url(self.url),
            "jti": len(self._jti),
            "sub": len(self._sub),
            "down_since": self._down_since,
            "last_sync": self._last_sync,
            "connects": self._connects,
            "failures": self._failures,
            "writebacks": self._writebacks,
            "last_error": self._last_error,
        }

    # -- writes ---------------------------------------------------------------------------------

    def snapshot(self) -> RevocationSnapshot:
        # The epoch travels with the mirror: a seeded worker whose first sync finds Redis emptied
        # (a new epoch) then writes the seed back instead of replacing it with nothing.
        return {**self.list(), "epoch": self._epoch}

    def seed(self, listing: RevocationSnapshot) -> None:
        super().seed(listing)
        epoch = listing.get("epoch")
        if self._epoch is None and isinstance(epoch, str):
            self._epoch = epoch

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Store ``jti`` until ``exp + grace`` and publish it; raises RevocationBackendError."""
        check_id("jti", jti)
        exp = check_time("exp", exp)
        pxat = int((exp + self._grace) * 1000)
        if pxat <= int(self._clock() * 1000):
            return  # already past the point where any verifier could accept the token
        msg = json.dumps({"op": "jti", "jti": jti, "exp": exp})
        await self._call("revoke_jti", self._scripts["jti"],
                         [self._jti_prefix + jti], [repr(exp), pxat, self._channel, msg])
        self._mirror_jti(jti, exp)

    async def revoke_sub(self, sub: str, before: float) -> None:
        """Store the subject revocation and publish it; raises RevocationBackendError."""
        check_id("sub", sub)
        before = check_time("before", before)
        msg = json.dumps({"op": "sub", "sub": sub, "before": before})
        await self._call("revoke_sub", self._scripts["sub"],
                         [self._sub_key], [sub, repr(before), self._channel, msg])
        self._mirror_sub(sub, before)

    async def unrevoke_jti(self, jti: str) -> bool:
        """Delete a jti revocation everywhere; False if neither Redis nor the mirror had it."""
        msg = json.dumps({"op": "unjti", "jti": jti})
        n = await self._call("unrevoke_jti", self._scripts["unjti"],
                             [self._jti_prefix + jti], [self._channel, msg])
        return bool(n) | (self._jti.pop(jti, None) is not None)

    async def unrevoke_sub(self, sub: str) -> bool:
        """Delete a subject revocation everywhere; False if neither Redis nor the mirror had it."""
        msg = json.dumps({"op": "unsub", "sub": sub})
        n = await self._call("unrevoke_sub", self._scripts["unsub"],
                             [self._sub_key], [sub, self._channel, msg])
        return bool(n) | (self._sub.pop(sub, None) is not None)

    async def _call(self, what: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._cmd is None:
            raise RevocationBackendError("revocation store is not open")
        try:
            return await script(keys=keys, args=args)
        except _SESSION_ERRORS as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise RevocationBackendError(
                f"redis unreachable, {what} not recorded: {type(exc).__name__}: {exc}") from exc

    # -- background session ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            synced_before = self._connects
            try:
                await self._session()
            except _SESSION_ERRORS as exc:
                self._mark_down(exc)
            except Exception as exc:  # a bug or a surprise from Redis must not end the task
                self._log("revocation: redis session failed unexpectedly: %s: %s",
                          type(exc).__name__, exc)
                self._mark_down(exc)
            if self._connects != synced_before:
                backoff = self.backoff_min  # the session got going: start over from short waits
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self.backoff_max)

    def _mark_down(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        if self._up or self._down_since is None:
            self._down_since = self._clock()
            self._log("revocation: redis at %s unreachable (%s); enforcing the last %d jti / %d sub"
                      " revocations, retrying", redact_url(self.url), error,
                      len(self._jti), len(self._sub))
        self._up = False
        self._last_error = error

    async def _session(self) -> None:
        if self._sub_client is None:
            return
        loop = asyncio.get_running_loop()
        pubsub = self._sub_client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            deadline = loop.time() + self.command_timeout
            while True:  # wait for the SUBSCRIBE confirmation: from here on nothing is missed
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError("no SUBSCRIBE confirmation")
                msg = await pubsub.get_message(timeout=remaining)
                if msg is not None and msg.get("type") == "subscribe":
                    break
            await self._sync()
            if self._down_since is not None:
                self._log("revocation: redis at %s reachable again after %.1f s; resynced",
                          redact_url(self.url), self._clock() - self._down_since)
            self._down_since = None
            self._up = True
            self._connects += 1
            self._synced_event.set()
            next_sync = loop.time() + self.resync_interval
            while True:
                timeout = max(0.0, next_sync - loop.time())
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                if msg is not None and msg.get("type") == "message":
                    self._apply(msg.get("data"))
                if self._resync_requested or loop.time() >= next_sync:
                    self._resync_requested = False
                    await self._sync()
                    next_sync = loop.time() + self.resync_interval
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except _SESSION_ERRORS:
                pass

    def _apply(self, data: object) -> None:
        """Apply one pub/sub message to the mirror (unknown or malformed: logged, ignored)."""
        try:
            event = json.loads(data) if isinstance(data, str) else None
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
            op = event.get("op")
            if op == "jti":
                self._mirror_jti(check_id("jti", event.get("jti")), check_time("exp", event.get("exp")))
            elif op == "sub":
                self._mirror_sub(check_id("sub", event.get("sub")),
                                 check_time("before", event.get("before")))
            elif op == "unjti":
                self._jti.pop(check_id("jti", event.get("jti")), None)
            elif op == "unsub":
                self._sub.pop(check_id("sub", event.get("sub")), None)
            elif op == "resync":
                self._resync_requested = True
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, TypeError) as exc:
            self._log("revocation: ignored a malformed message on %s: %s", self._channel, exc)

    async def _sync(self) -> None:
        """Steps 2-3 of the session: epoch check, write-back if Redis lost data, full load."""
        cmd = self._cmd
        if cmd is None:
            return
        epoch = _text(await cmd.get(self._epoch_key))
        if epoch is None:
            await cmd.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            epoch = _text(await cmd.get(self._epoch_key))
        if self._epoch is not None and epoch != self._epoch and (self._jti or self._sub):
            count = await self._write_back(cmd)
            self._writebacks += 1
            self._log("revocation: redis lost its revocations (epoch changed); wrote back %d"
                      " from this node's mirror", count)
            await cmd.publish(self._channel, json.dumps({"op": "resync"}))
        jti, sub = await self._load(cmd)
        self._epoch = epoch
        now = self._clock()
        # Swap whole dicts: is_revoked sees either the old or the new set.
        self._jti = jti
        self._sub = sub
        self._prune_mirror(now)
        self._last_sync = now

    async def _write_back(self, cmd: aioredis.Redis) -> int:
        now_ms = int(self._clock() * 1000)
        count = 0
        async with cmd.pipeline(transaction=False) as pipe:
            for jti, exp in list(self._jti.items()):
                pxat = int((exp + self._grace) * 1000)
                if pxat > now_ms:
                    await self._scripts["jti"](keys=[self._jti_prefix + jti],
                                         args=[repr(exp), pxat, "", ""], client=pipe)
                    count += 1
            for sub, before in list(self._sub.items()):
                await self._scripts["sub"](keys=[self._sub_key],
                                           args=[sub, repr(before), "", ""], client=pipe)
                count += 1
            await pipe.execute()
        return count

    async def _load(self, cmd: aioredis.Redis) -> tuple[dict[str, float], dict[str, float]]:
        keys = [key async for key in cmd.scan_iter(match=self._jti_prefix + "*", count=1000)]
        jti: dict[str, float] = {}
        cut = len(self._jti_prefix)
        bad = 0
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            for key, value in zip(chunk, await cmd.mget(chunk)):
                if value is None:  # expired between SCAN and MGET
                    continue
                exp = _number(value)
                if exp is None:
                    bad += 1
                else:
                    jti[(_text(key) or "")[cut:]] = exp
        sub: dict[str, float] = {}
        for name, value in (await cmd.hgetall(self._sub_key)).items():
            before = _number(value)
            if before is None:
                bad += 1
            else:
                sub[_text(name) or ""] = before
        if bad:
            # Someone else wrote under our prefix; skipping beats refusing to sync at all.
            self._log("revocation: skipped %d redis entries under %s with a non-numeric value",
                      bad, self._jti_prefix[:-4])
        return jti, sub


def _text(value: bytes | str | None) -> str | None:
    # The clients decode responses; this only narrows the type (and survives a raw client).
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _number(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None
