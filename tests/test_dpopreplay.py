"""Tests for jwtproxy.dpopreplay: single use per host (shared memory) and across nodes (Redis)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer, redis_server  # noqa: E402,F401  (fixture)

from jwtproxy.dpop import replay_key  # noqa: E402
from jwtproxy.dpopreplay import HostReplayGuard, RedisReplayGuard, ReplayCheckUnavailable  # noqa: E402
from jwtproxy.sharedtable import SharedTableBusy  # noqa: E402

NOW = 1_800_000_000.0


class _BusyTable:
    evictions = 0

    def insert_if_absent(self, key: bytes, expires: float, now: float) -> bool:
        raise SharedTableBusy("stripe 3 locked for more than 1.0 s")


def test_host_guard_busy_table_fails_closed() -> None:
    with pytest.raises(ReplayCheckUnavailable):
        HostReplayGuard(_BusyTable()).first_use(replay_key("j"), NOW + 90, NOW)


@pytest.mark.redis
async def test_redis_guard_single_use_across_clients(redis_server: RedisServer) -> None:
    node_a, node_b = RedisReplayGuard(redis_server.url), RedisReplayGuard(redis_server.url)
    try:
        key = replay_key("jti-1")
        assert await node_a.first_use(key, NOW + 90, NOW) is True
        assert await node_b.first_use(key, NOW + 90, NOW) is False
        assert await node_a.first_use(key, NOW + 90, NOW) is False
        assert await node_b.first_use(replay_key("jti-2"), NOW + 90, NOW) is True
    finally:
        await node_a.close()
        await node_b.close()


@pytest.mark.redis
async def test_redis_guard_forgets_after_the_window(redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    guard = RedisReplayGuard(redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        key = replay_key("jti-ttl")
        assert await guard.first_use(key, NOW + 90, NOW)
        ttl = await client.pttl("jwtproxy:dpop:jti:" + key.hex())
        assert 89_000 < ttl <= 90_000
    finally:
        await guard.close()
        await client.aclose()


@pytest.mark.redis
async def test_redis_guard_unreachable_fails_closed(redis_server: RedisServer) -> None:
    guard = RedisReplayGuard(redis_server.url, timeout=0.5)
    try:
        assert await guard.first_use(replay_key("a"), NOW + 90, NOW)
        redis_server.stop()
        with pytest.raises(ReplayCheckUnavailable):
            await guard.first_use(replay_key("b"), NOW + 90, NOW)
    finally:
        await guard.close()
