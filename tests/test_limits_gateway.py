"""Limits inside the running gateway (contract §5.5), on both codecs: rate limits per route and key,
the failure budget, the client connection cap and the upstream connection cap.

Real requests through loopback sockets into one in-process worker; time is pinned where a window
boundary could make a test flaky.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
from helpers import parse_responses, raw_exchange

import jwtproxy.connection

RL = {"path_prefix": "/rl", "upstream": "backend", "auth": "off",
      "rate_limit": {"requests": 2, "per": 60, "burst": 1, "key": "client_ip"}}
BY_SUB = {"path_prefix": "/sub", "upstream": "backend",
          "rate_limit": {"requests": 1, "per": 60, "burst": 1, "key": "sub"}}
BY_IP_AUTH = {"path_prefix": "/ip", "upstream": "backend",
              "rate_limit": {"requests": 1, "per": 60, "key": "client_ip"}}
BY_TOKEN = {"path_prefix": "/tok", "upstream": "backend",
            "rate_limit": {"requests": 1, "per": 60, "key": "token"}}
PLAIN = {"path_prefix": "/", "upstream": "backend"}
ROUTES = [RL, BY_SUB, BY_IP_AUTH, BY_TOKEN, PLAIN]


def get(path: str, token: str | None = None) -> bytes:
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token is not None else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: api.test\r\n" + auth + b"\r\n"


async def call(port: int, wire: bytes) -> tuple[int, dict[str, str], bytes]:
    return parse_responses(await raw_exchange(port, wire))[0]


def forged(rsa_key: Any, n: int) -> str:
    """A well-formed token with a wrong signature (distinct per ``n``: never cached)."""
    token = rsa_key.token(sub=f"forged-{n}")
    head, body, sig = token.split(".")
    return ".".join((head, body, sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")))


@pytest.fixture
async def gw(make_gateway: Any) -> Any:
    return await make_gateway(routes=ROUTES)


async def test_over_the_limit_is_429_with_retry_after_and_the_ratelimit_fields(gw: Any, backend: Any) -> None:
    statuses = [(await call(gw.port, get("/rl/x")))[0] for _ in range(2)]
    assert statuses == [200, 200]  # a fresh client gets burst + 1 at once...
    status, headers, body = await call(gw.port, get("/rl/x"))  # ...and then one per 30 s
    assert status == 429
    retry = int(headers["retry-after"])
    assert 29 <= retry <= 30
    assert headers["ratelimit-policy"] == '"client_ip";q=2;w=60;jwtproxy-burst=1'
    assert headers["ratelimit"] == f'"client_ip";r=0;t={retry}'
    assert json.loads(body)["error"] == "rate_limited"
    assert len(backend.seen) == 2  # the refused request never reached the upstream
    assert gw.gateway.metrics._rate_limited["/rl"] == 1


async def test_claim_keys_count_per_subject_and_only_verified_requests(gw: Any, backend: Any, rsa_key: Any) -> None:
    alice, bob = rsa_key.token(sub="alice"), rsa_key.token(sub="bob")
    # Rejected tokens do not spend alice's quota: a claim key is only known after verification.
    for n in range(3):
        assert (await call(gw.port, get("/sub", forged(rsa_key, n))))[0] == 401
    assert [(await call(gw.port, get("/sub", alice)))[0] for _ in range(3)] == [200, 200, 429]
    # Another subject, same address: its own cell. Alice with a fresh token: still alice.
    assert (await call(gw.port, get("/sub", bob)))[0] == 200
    assert (await call(gw.port, get("/sub", rsa_key.token(sub="alice", jti="other"))))[0] == 429


async def test_address_keys_refuse_before_any_signature_work(gw: Any, backend: Any, rsa_key: Any) -> None:
    metrics = gw.gateway.metrics
    assert (await call(gw.port, get("/ip", forged(rsa_key, 1))))[0] == 401
    misses = metrics._token_cache["miss"]
    status, headers, _ = await call(gw.port, get("/ip", forged(rsa_key, 2)))
    assert status == 429 and headers["ratelimit-policy"] == '"client_ip";q=1;w=60'
    assert metrics._token_cache["miss"] == misses  # the token was never looked at


async def test_token_keys_count_per_token(gw: Any, backend: Any, rsa_key: Any) -> None:
    first, second = rsa_key.token(jti="1"), rsa_key.token(jti="2")
    assert [(await call(gw.port, get("/tok", first)))[0] for _ in range(2)] == [200, 429]
    assert (await call(gw.port, get("/tok", second)))[0] == 200
    # Without a token the address is the key.
    assert [(await call(gw.port, get("/tok")))[0] for _ in range(2)] == [401, 429]


async def test_routes_without_a_limit_are_unaffected(gw: Any, backend: Any, rsa_key: Any) -> None:
    token = rsa_key.token()
    assert {(await call(gw.port, get("/plain", token)))[0] for _ in range(20)} == {200}


@pytest.mark.pure_python  # freezes jwtproxy.connection's clock
async def test_failure_budget_refuses_uncached_tokens_and_lets_cached_ones_pass(
        make_gateway: Any, backend: Any, rsa_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # One fixed instant: every failure lands in the same one-second window.
    frozen = float(int(time.time())) + 0.25

    class Clock:
        @staticmethod
        def time() -> float:
            return frozen

    monkeypatch.setattr(jwtproxy.connection, "time", Clock)
    gw = await make_gateway(routes=[PLAIN], extra={"limits": {"failures_per_ip": 3}})
    cached = rsa_key.token(sub="cached")
    assert (await call(gw.port, get("/x", cached)))[0] == 200  # verified once, now in the cache
    statuses = [(await call(gw.port, get("/x", forged(rsa_key, n))))[0] for n in range(6)]
    # Three failures are within the budget, the fourth goes past it; from then on 429.
    assert statuses == [401, 401, 401, 401, 429, 429]
    status, headers, body = await call(gw.port, get("/x", forged(rsa_key, 99)))
    assert status == 429
    assert headers["retry-after"] == "1" and headers["ratelimit"] == '"failures";r=0;t=1'
    assert json.loads(body)["error"] == "rate_limited"
    # A cached valid token still passes; a valid token that would need verification does not.
    assert (await call(gw.port, get("/x", cached)))[0] == 200
    assert (await call(gw.port, get("/x", rsa_key.token(sub="fresh"))))[0] == 429
    assert gw.gateway.metrics._auth_failures["failure_budget"] == 4
    # The next second is a new window.
    frozen += 1.0
    assert (await call(gw.port, get("/x", rsa_key.token(sub="fresh"))))[0] == 200


async def test_connections_past_max_connections_get_503_at_once(make_gateway: Any, backend: Any) -> None:
    gw = await make_gateway(routes=[RL | {"rate_limit": {}}], extra={"limits": {"max_connections": 2}})
    held = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)  # both accepted
        raw = await raw_exchange(gw.port, get("/rl"), until_close=True, read_timeout=3)
        status, headers, body = parse_responses(raw)[0]
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert b"too many client connections" in body
        assert gw.gateway.metrics._client_rejected == 1
    finally:
        for s in held:
            s.close()
    await asyncio.sleep(0.1)
    assert (await call(gw.port, get("/rl")))[0] == 200  # room again


async def test_upstream_cap_queues_then_answers_503_with_retry_after(make_gateway: Any, backend: Any) -> None:
    gw = await make_gateway(routes=[RL | {"rate_limit": {}, "strip_prefix": True}],
                            extra={"limits": {"upstream_max_connections": 1}},
                            upstream={"connect_timeout": 0.3})
    slow = asyncio.ensure_future(call(gw.port, get("/rl/slow/1")))  # holds the one connection 1 s
    await asyncio.sleep(0.1)
    # The queue holds one waiter (the cap); it waits connect_timeout, then 503.
    waiting = asyncio.ensure_future(call(gw.port, get("/rl/a")))
    await asyncio.sleep(0.05)
    status, headers, body = await call(gw.port, get("/rl/b"))  # queue full: at once
    assert status == 503 and headers["retry-after"] == "1"
    assert b"too many requests waiting" in body
    status, headers, body = await waiting
    assert status == 503 and b"no connection free in time" in body
    assert (await slow)[0] == 200
    assert (await call(gw.port, get("/rl/c")))[0] == 200  # the connection is free again
    assert gw.gateway.metrics._queue_rejected["backend"] == 2


@pytest.mark.parametrize("trusted", [True, False])
async def test_the_address_that_counts_is_the_one_a_trusted_proxy_names(
        make_gateway: Any, backend: Any, rsa_key: Any, trusted: bool) -> None:
    limited = RL | {"rate_limit": {"requests": 1, "per": 60, "key": "client_ip"}}
    gw = await make_gateway(routes=[limited, PLAIN],
                            server={"trusted_proxies": ["127.0.0.1/32"] if trusted else []},
                            extra={"limits": {"failures_per_ip": 1}})

    def via(client: str, path: str, token: str | None = None) -> bytes:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        return f"GET {path} HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-For: {client}\r\n{auth}\r\n".encode()

    first = (await call(gw.port, via("10.0.0.1", "/rl")))[0]
    second = (await call(gw.port, via("10.0.0.2", "/rl")))[0]
    # Behind a trusted proxy each client has its own count; otherwise the header is the client's
    # own word, ignored: both requests count against the proxy's address.
    assert (first, second) == ((200, 200) if trusted else (200, 429))
    # The failure budget counts the same address. Its windows are whole seconds of the real clock
    # (a compiled connection module does not read a patched ``time``), so the three requests
    # start at the top of a fresh second and share its window.
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
    for n in range(2):
        assert (await call(gw.port, via("10.0.0.9", "/x", forged(rsa_key, n))))[0] == 401
    status = (await call(gw.port, via("10.0.0.8", "/x", rsa_key.token(sub="other"))))[0]
    assert status == (200 if trusted else 429)
