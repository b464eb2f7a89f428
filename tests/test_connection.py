"""Every exchange ends in a response or a close, whatever fails and wherever it fails.

The client connection answers requests from several places besides ``data_received``: a queued
pipelined request begins from a scheduled callback, connecting upstream and waiting for a key
refetch run as tasks, and the upstream's protocol callbacks deliver the response. An exception in
any of them must end the exchange (a 500 or 502 when nothing of the response is out yet, else a
cut connection), be logged once, and never surface as "Task exception was never retrieved".

These run on uvloop, the loop the daemon runs on: a write to a transport whose peer has reset it
raises there, which is how the connect/start race showed up under a burst of clients.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop
from helpers import parse_responses, raw_exchange

from jwtproxy.auth import Pending
from jwtproxy.connection import ClientConnection, Exchange
from jwtproxy.upstream import UpstreamPool

# uvloop through the event_loop_policy fixture; pytest-asyncio 1.x prefers a conftest-wide hook,
# which would move every other test file off the default loop too.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")

OPEN_ROUTES = [{"path_prefix": "/", "upstream": "backend", "auth": "off"}]
AUTH_ROUTES = [{"path_prefix": "/", "upstream": "backend"}]


@pytest.fixture
def event_loop_policy() -> Iterator[asyncio.AbstractEventLoopPolicy]:
    yield uvloop.EventLoopPolicy()


@pytest.fixture
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler (unretrieved task exceptions, callback errors)."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_event_loop_policy().get_event_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "jwtproxy" and "internal error" in r.getMessage()]


async def settle_loop(errors: list[dict[str, Any]]) -> None:
    """Let pending callbacks run and collect dead tasks, so an unretrieved exception is reported."""
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    assert not errors, [c.get("message") for c in errors]


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault")


async def test_upstream_closed_between_connect_and_start_is_answered_502(make_gateway, backend, monkeypatch,
                                                                        loop_errors, caplog):
    """The burst race: the new upstream connection is reset before the request is written to it."""
    gw = await make_gateway(routes=OPEN_ROUTES)
    connect = UpstreamPool.connect

    async def connect_then_reset(self: UpstreamPool) -> Any:
        conn = await connect(self)
        conn.transport.abort()  # as a reset does: uvloop closes the handle on the next tick
        await asyncio.sleep(0)
        return conn

    monkeypatch.setattr(UpstreamPool, "connect", connect_then_reset)
    raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 502 "), raw
    assert not internal_errors(caplog)  # an upstream failure, not a bug
    await settle_loop(loop_errors)
    assert backend.seen == []


async def test_idle_upstream_closed_before_start_is_retried(make_gateway, backend, monkeypatch, loop_errors):
    """The same race on a pooled connection is the stale keep-alive case: retried once, then 200."""
    gw = await make_gateway(routes=OPEN_ROUTES)
    raw = await raw_exchange(gw.port, b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    take_idle = UpstreamPool.take_idle

    def take_idle_reset(self: UpstreamPool) -> Any:
        conn = take_idle(self)
        if conn is not None:
            conn.transport.abort()  # the handle is closed a tick later; is_closing() is true now
        return conn

    monkeypatch.setattr(UpstreamPool, "take_idle", take_idle_reset)
    raw = await raw_exchange(gw.port, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    assert [r["path"] for r in backend.seen] == ["/warm", "/again"]
    await settle_loop(loop_errors)


async def test_fault_in_queued_begin_is_500_after_the_earlier_answer(make_gateway, backend, monkeypatch,
                                                                    loop_errors, caplog):
    gw = await make_gateway(routes=OPEN_ROUTES)
    begin = ClientConnection._begin

    def begin_or_fail(self: ClientConnection, ex: Exchange) -> None:
        if ex.head.target == b"/boom":
            raise RuntimeError("injected fault")
        begin(self, ex)

    monkeypatch.setattr(ClientConnection, "_begin", begin_or_fail)
    wire = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await raw_exchange(gw.port, wire, until_close=True, read_timeout=3)
    statuses = [status for status, _, _ in parse_responses(raw)]
    assert statuses == [200, 500], raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)


async def test_fault_in_connect_task_is_500(make_gateway, backend, monkeypatch, loop_errors, caplog):
    gw = await make_gateway(routes=OPEN_ROUTES)
    monkeypatch.setattr(ClientConnection, "_attach", boom)
    raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True, read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert b"connection: close" in raw.lower()
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)


async def test_fault_after_key_refetch_is_500(make_gateway, backend, monkeypatch, loop_errors, caplog):
    gw = await make_gateway(routes=AUTH_ROUTES)
    loop = asyncio.get_running_loop()

    def authorize(rules: Any, token: Any, now: float, refetched: bool = False) -> Any:
        if refetched:
            raise RuntimeError("injected fault")
        done = loop.create_future()
        done.set_result(True)
        return Pending(done)

    monkeypatch.setattr(gw.gateway.auth, "authorize", authorize)
    raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True, read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)
    assert backend.seen == []


@pytest.mark.parametrize("callback", ["on_response_head", "on_response_body", "on_response_end"])
async def test_fault_in_upstream_callback_cuts_the_connection(make_gateway, backend, monkeypatch, loop_errors,
                                                              caplog, callback):
    """Once the response has begun, a fault can only be signalled by closing the connection."""
    gw = await make_gateway(routes=OPEN_ROUTES)
    monkeypatch.setattr(Exchange, callback, boom)
    raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True, read_timeout=3)
    assert b"HTTP/1.1 200 " not in raw or callback != "on_response_head"
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)
    assert not gw.gateway.connections  # closed, not left hanging


async def test_fault_while_handling_an_upstream_failure_is_500(make_gateway, monkeypatch, loop_errors, caplog):
    """The upstream times out and handling that raises: the client still gets an answer."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    gw = await make_gateway(routes=OPEN_ROUTES, backend_port=port, upstream={"response_timeout": 0.05})
    monkeypatch.setattr(ClientConnection, "upstream_failed", boom)
    try:
        raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True,
                                 read_timeout=3)
    finally:
        silent.close()
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)
