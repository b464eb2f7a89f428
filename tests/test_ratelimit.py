"""Rate limits (GCRA), their keys and 429 fields, the local and Redis backends, the failure budget.

Time is always injected: nothing here sleeps to make a limit pass, except the Redis tests whose
clock is Redis's own ``TIME``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer, redis_server  # noqa: E402,F401  (fixture)

from jwtproxy.ratelimit import (  # noqa: E402
    FailureBudget,
    LocalLimiter,
    Policy,
    RedisLimiter,
    retry_after_seconds,
)
from jwtproxy.sharedtable import SharedTable  # noqa: E402

NOW = 1_700_000_000.0


def run_steps(policy: Policy, times: list[float]) -> list[float]:
    """Admitted arrival times of ``times`` through ``policy.step`` (one key)."""
    state: tuple[float, ...] | None = None
    admitted = []
    for t in times:
        new, expires, wait = policy.step(state, t)
        if wait == 0.0:
            assert new is not None and expires == new[0]
            state = new
            admitted.append(t)
        else:
            assert new is None and wait > 0
    return admitted


def max_in_window(times: list[float], width: float) -> int:
    """The most of ``times`` inside any half-open window ``[t, t + width)``."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


# -- GCRA ----------------------------------------------------------------------------------


def test_fresh_key_admits_burst_plus_one_then_one_per_interval() -> None:
    policy = Policy(requests=4, per=1, burst=2)  # T = 0.25 s, exact in binary
    admitted = run_steps(policy, [NOW] * 10)
    assert len(admitted) == 3  # burst + 1 at once
    state: tuple[float, ...] | None = (NOW + 0.75,)
    _, _, wait = policy.step(state, NOW)
    assert wait == pytest.approx(0.25)  # the next one is due in one interval
    assert policy.step(state, NOW + 0.24)[2] > 0
    assert policy.step(state, NOW + 0.25)[2] == 0.0


def test_burst_zero_means_strictly_one_per_interval() -> None:
    policy = Policy(requests=10, per=1)
    times = [NOW + i * 0.1 for i in range(100)]  # exactly on time: float rounding must not refuse
    assert len(run_steps(policy, times)) == 100
    assert len(run_steps(policy, [NOW, NOW + 0.05, NOW + 0.0999])) == 1


@settings(max_examples=200, deadline=None)
@given(
    requests=st.integers(1, 50),
    per=st.sampled_from([0.5, 1.0, 2.0, 10.0, 60.0]),
    burst=st.integers(0, 20),
    gaps=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=400),
)
def test_no_window_of_per_seconds_admits_more_than_requests_plus_burst(
        requests: int, per: float, burst: int, gaps: list[float]) -> None:
    policy = Policy(requests=requests, per=per, burst=burst)
    times, t = [], NOW
    for gap in gaps:
        t += gap * per
        times.append(t)
    admitted = run_steps(policy, times)
    assert max_in_window(admitted, per) <= requests + burst


def test_a_steady_sender_above_the_rate_gets_requests_per_per() -> None:
    policy = Policy(requests=100, per=60, burst=20)
    rng = random.Random(7)
    times, t = [], NOW
    while t < NOW + 600:  # ~5 requests a second against 100 a minute, for ten minutes
        t += rng.expovariate(5.0)
        times.append(t)
    admitted = run_steps(policy, times)
    # Ten windows of 100, plus the burst it started with.
    assert 1000 <= len(admitted) <= 1000 + 20 + 1
    # After the initial burst is spent, every minute admits 100 (+-1 at the edges).
    for start in range(1, 9):
        in_minute = [a for a in admitted if NOW + start * 60 <= a < NOW + (start + 1) * 60]
        assert abs(len(in_minute) - 100) <= 1


def test_refused_requests_change_nothing() -> None:
    policy = Policy(requests=1, per=10)
    new, _, wait = policy.step(None, NOW)
    assert wait == 0.0
    assert policy.step(new, NOW + 1) == (None, 0.0, pytest.approx(9.0))
    assert policy.step(new, NOW + 10)[2] == 0.0


def test_bad_policies() -> None:
    for kwargs in ({"requests": 0, "per": 1}, {"requests": 1, "per": 0},
                   {"requests": 1, "per": float("inf")}, {"requests": 1, "per": 1, "burst": -1},
                   {"requests": 1, "per": 1, "key": ""}, {"requests": 1, "per": 1, "key": "sübject"}):
        with pytest.raises(ValueError):
            Policy(**kwargs)


# -- keys ----------------------------------------------------------------------------------


def test_keys_by_claim_token_and_address_with_fallback_to_the_address() -> None:
    by_sub = Policy(10, 1, key="sub", scope="/a")
    assert by_sub.needs_identity
    alice = by_sub.key_for("10.0.0.1", {"sub": "alice"})
    assert alice == by_sub.key_for("10.0.0.2", {"sub": "alice"})  # same subject, any address
    assert alice != by_sub.key_for("10.0.0.1", {"sub": "bob"})
    # Without the claim (or with a value that is no identity) the address counts.
    no_sub = by_sub.key_for("10.0.0.1", {"scope": "x"})
    assert no_sub == by_sub.key_for("10.0.0.1", None) == by_sub.key_for("10.0.0.1", {"sub": True})
    assert no_sub != by_sub.key_for("10.0.0.2", {})
    assert no_sub != alice
    # A subject spelled like an address does not share the address's cell.
    assert by_sub.key_for("10.0.0.1", {"sub": "10.0.0.1"}) != no_sub
    # Numbers and strings with the same spelling are different identities.
    assert by_sub.key_for("x", {"sub": 5}) != by_sub.key_for("x", {"sub": "5"})

    by_token = Policy(10, 1, key="token", scope="/a")
    assert not by_token.needs_identity
    assert by_token.key_for("10.0.0.1", None, b"d" * 32) == by_token.key_for("10.0.0.9", None, b"d" * 32)
    assert by_token.key_for("10.0.0.1", None, None) != by_token.key_for("10.0.0.2", None, None)

    by_ip = Policy(10, 1, key="client_ip", scope="/a")
    assert by_ip.key_for("10.0.0.1", {"sub": "alice"}) != by_ip.key_for("10.0.0.2", {"sub": "alice"})
    # Two routes never share a cell.
    assert Policy(10, 1, key="client_ip", scope="/b").key_for("10.0.0.1") != by_ip.key_for("10.0.0.1")


# -- 429 fields ------------------------------------------------------------------------------


def test_retry_after_rounds_up_to_whole_seconds_at_least_one() -> None:
    assert retry_after_seconds(0.001) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.2) == 2
    assert retry_after_seconds(59.5) == 60


def test_rate_limit_fields_follow_the_ietf_draft() -> None:
    policy = Policy(requests=100, per=60, burst=20, key="sub")
    assert policy.headers(2.3) == (
        (b"retry-after", b"3"),
        (b"ratelimit-policy", b'"sub";q=100;w=60;jwtproxy-burst=20'),
        (b"ratelimit", b'"sub";r=0;t=3'),
    )
    # No burst: no vendor parameter. A window that is not whole seconds: no w (the draft has no
    # fractions).
    assert Policy(5, 1, key="client_ip").policy_field == b'"client_ip";q=5;w=1'
    assert Policy(5, 0.5, key="client_ip").policy_field == b'"client_ip";q=5'
    # A claim name with a quote or a backslash is escaped as an sf-string.
    assert Policy(5, 1, key='we"ird\\').name == b'"we\\"ird\\\\"'


def test_failure_budget_fields() -> None:
    budget = FailureBudget(SharedTable(64, values=2), 20)
    assert budget.headers(0.4) == (
        (b"retry-after", b"1"),
        (b"ratelimit-policy", b'"failures";q=20;w=1'),
        (b"ratelimit", b'"failures";r=0;t=1'),
    )


# -- local backend -----------------------------------------------------------------------------


def test_local_limiter_keeps_cells_per_key_in_the_shared_table() -> None:
    table = SharedTable(1024, values=1)
    limiter = LocalLimiter(table)
    policy = Policy(requests=2, per=1, burst=1, key="sub")
    alice, bob = policy.key_for("a", {"sub": "alice"}), policy.key_for("a", {"sub": "bob"})
    assert [limiter.check(policy, alice, NOW) for _ in range(2)] == [0.0, 0.0]  # burst + 1
    assert limiter.check(policy, alice, NOW) == pytest.approx(0.5)
    assert limiter.check(policy, bob, NOW) == 0.0  # bob has his own cell
    assert limiter.check(policy, alice, NOW + 0.5) == 0.0
    # The cell expires at its TAT: an idle key holds no slot.
    assert table.live(NOW + 10) == 0
    with pytest.raises(ValueError):
        LocalLimiter(SharedTable(8, values=2))


# -- failure budget -----------------------------------------------------------------------------


def test_failure_budget_refuses_past_the_budget_for_the_rest_of_the_window() -> None:
    budget = FailureBudget(SharedTable(1024, values=2), per_second=3)
    start = NOW + 0.2
    for i in range(3):
        budget.record_failure("127.0.0.2", start + i * 0.01)
        assert budget.wait("127.0.0.2", start + i * 0.01) == 0.0  # at the budget, not past it
    budget.record_failure("127.0.0.2", start + 0.05)  # the fourth in this second
    assert budget.wait("127.0.0.2", start + 0.06) == pytest.approx(0.74)
    assert budget.wait("127.0.0.2", NOW + 0.99) == pytest.approx(0.01)
    assert budget.wait("127.0.0.3", start + 0.06) == 0.0  # another address is unaffected
    assert budget.wait("127.0.0.2", NOW + 1.0) == 0.0  # a new window
    budget.record_failure("127.0.0.2", NOW + 1.1)  # counts from one again
    assert budget.wait("127.0.0.2", NOW + 1.1) == 0.0
    with pytest.raises(ValueError):
        FailureBudget(SharedTable(8, values=2), 0)
    with pytest.raises(ValueError):
        FailureBudget(SharedTable(8, values=1), 1)


# -- Redis backend -------------------------------------------------------------------------------


class _BrokenScript:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    async def __call__(self, keys: list[str], args: list[str]) -> Any:
        self.calls += 1
        raise self.exc


class _FakeRedis:
    def __init__(self, script: Any) -> None:
        self.script = script

    def register_script(self, source: str) -> Any:
        assert "redis.call('TIME')" in source
        return self.script


async def test_redis_outage_falls_back_to_local_logs_once_and_probes_again(
        caplog: pytest.LogCaptureFixture) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    script = _BrokenScript(RedisConnectionError("refused"))
    clock = [0.0]
    states: list[tuple[bool, str]] = []
    local = LocalLimiter(SharedTable(256, values=1))
    limiter = RedisLimiter(_FakeRedis(script), local, retry_interval=1.0,
                           on_state=lambda up, why: states.append((up, why)),
                           clock=lambda: clock[0])
    policy = Policy(requests=1, per=10, key="client_ip")
    key = policy.key_for("10.1.1.1")
    assert await limiter.check(policy, key, NOW) == 0.0  # decided locally, admitted
    assert await limiter.check(policy, key, NOW) == pytest.approx(10.0)  # the local limit holds
    assert script.calls == 1  # within retry_interval Redis is not asked again
    clock[0] = 1.5
    assert await limiter.check(policy, key, NOW + 10) == 0.0
    assert script.calls == 2  # one probe after retry_interval
    assert limiter.fallbacks == 3
    assert states == [(False, "ConnectionError: refused")]  # one state change per outage

    # Without a state callback the limiter logs the outage itself, once.
    quiet = RedisLimiter(_FakeRedis(_BrokenScript(RedisConnectionError("refused"))), local, clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="jwtproxy.ratelimit"):
        for _ in range(3):
            await quiet.check(policy, key, NOW)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]

    script.exc = RuntimeError("a bug, not an outage")  # programming errors are not swallowed
    clock[0] = 10.0
    with pytest.raises(RuntimeError):
        await limiter.check(policy, key, NOW + 20)


@pytest.mark.redis
async def test_redis_limit_is_shared_by_two_nodes_and_survives_an_outage(
        redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    clients = [aioredis.Redis.from_url(redis_server.url, socket_timeout=0.5,
                                       socket_connect_timeout=0.5) for _ in range(2)]
    states: list[bool] = []
    nodes = [RedisLimiter(c, LocalLimiter(SharedTable(256, values=1)), retry_interval=0.2,
                          on_state=lambda up, why: states.append(up)) for c in clients]
    policy = Policy(requests=10, per=60, burst=5, key="sub", scope="/api")
    key = policy.key_for("10.0.0.1", {"sub": "alice"})
    try:
        waits = await asyncio.gather(*(nodes[i % 2].check(policy, key, 0.0) for i in range(40)))
        assert sum(1 for w in waits if w == 0.0) == 6  # burst + 1 between both nodes, exactly
        assert all(0 < w <= 6.0 + 0.1 for w in waits if w)  # next one due within one interval
        # The cell lives in Redis under a digest, never under the subject's name.
        keys = await clients[0].keys("jwtproxy:rl:*")
        assert len(keys) == 1 and b"alice" not in keys[0]

        redis_server.stop()
        other = policy.key_for("10.0.0.1", {"sub": "bob"})
        assert await nodes[0].check(policy, other, NOW) == 0.0  # no 5xx: the local limit decides
        assert states == [False]
        assert nodes[0].fallbacks == 1

        redis_server.start()
        await asyncio.sleep(0.3)  # past retry_interval: the next request probes Redis
        assert await nodes[0].check(policy, other, NOW) == 0.0
        assert states == [False, True]
        assert await clients[0].keys("jwtproxy:rl:*") != []  # decided on Redis again
    finally:
        for c in clients:
            await c.aclose()
