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


@pytest.mark.pure_python
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


@pytest.mark.pure_python
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


@pytest.mark.pure_python
async def test_fault_in_queued_begin_is_500_after_the_earlier_answer(make_gateway, backend, monkeypatch,
                                                                    loop_errors, caplog):
    gw = await make_gateway(routes=OPEN_ROUTES)
    decide = ClientConnection._decide

    def decide_or_fail(self: ClientConnection, ex: Exchange) -> None:
        if ex.head.target == b"/boom":
            raise RuntimeError("injected fault")
        decide(self, ex)

    monkeypatch.setattr(ClientConnection, "_decide", decide_or_fail)
    wire = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = await raw_exchange(gw.port, wire, until_close=True, read_timeout=3)
    statuses = [status for status, _, _ in parse_responses(raw)]
    assert statuses == [200, 500], raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)


@pytest.mark.pure_python
@pytest.mark.parametrize("wire", [
    b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n",  # decided at its end
    b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",  # decided at its head
], ids=["no-body", "body"])
async def test_fault_while_deciding_the_first_request_is_500(make_gateway, backend, monkeypatch, loop_errors,
                                                              caplog, wire):
    """A fault inside the decision itself (here: authorisation) answers that exchange, never hangs it."""
    gw = await make_gateway(routes=AUTH_ROUTES)

    def authorize(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(gw.gateway.auth, "authorize", authorize)
    raw = await raw_exchange(gw.port, wire, until_close=True, read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)
    assert backend.seen == []


@pytest.mark.pure_python
async def test_fault_in_connect_task_is_500(make_gateway, backend, monkeypatch, loop_errors, caplog):
    gw = await make_gateway(routes=OPEN_ROUTES)
    monkeypatch.setattr(ClientConnection, "_attach", boom)
    raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True, read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert b"connection: close" in raw.lower()
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)


@pytest.mark.pure_python
async def test_fault_after_key_refetch_is_500(make_gateway, backend, monkeypatch, loop_errors, caplog):
    gw = await make_gateway(routes=AUTH_ROUTES)
    loop = asyncio.get_running_loop()

    def authorize(rules: Any, token: Any, now: float, refetched: bool = False, presented: Any = None,
                  client: str = "") -> Any:
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


@pytest.mark.pure_python
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


@pytest.mark.pure_python
async def test_fault_while_handling_an_upstream_failure_is_500(make_gateway, monkeypatch, loop_errors, caplog):
    """The upstream times out and handling that raises: the client still gets an answer."""
    held: list[asyncio.StreamWriter] = []  # kept: a collected StreamWriter closes its socket (3.13)
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    gw = await make_gateway(routes=OPEN_ROUTES, backend_port=port, upstream={"response_timeout": 0.05})
    monkeypatch.setattr(ClientConnection, "upstream_failed", boom)
    try:
        raw = await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True,
                                 read_timeout=3)
    finally:
        for writer in held:
            writer.close()
        silent.close()
    assert raw.startswith(b"HTTP/1.1 500 "), raw
    assert len(internal_errors(caplog)) == 1
    await settle_loop(loop_errors)


# -- a connection on a fake transport and a clock the test moves ------------------------------------
# Timeouts and pipelining are exact here: no sockets, no sleeping. The real-socket tests in
# test_proxy.py and tests/adversarial prove the same machinery works on a live loop.


class MockTransport(asyncio.Transport):
    """Records what the connection does to its socket: writes, close, abort, pause and resume."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.pauses = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000)}.get(name, default)

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


class FakeTimer:
    def __init__(self, when: float, callback: Any) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ClockLoop:
    """The loop as the connection sees it: the real loop, except that time moves only when told."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def call_soon(self, callback: Any, *args: Any) -> Any:
        return self.loop.call_soon(callback, *args)

    def create_task(self, coro: Any) -> Any:
        return self.loop.create_task(coro)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= self.now]
            if not due:
                return
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback()


AUTH_A_ONLY = [{"path_prefix": "/a", "upstream": "backend"}]  # /a: 401 without a token; else 404
OPEN_O = [{"path_prefix": "/o", "upstream": "backend", "auth": "off"}]  # forwarded


@pytest.fixture
def client(parser, jwks_path):
    """``client(**config)`` -> (connection, transport, clock): a connection answered by the gateway
    itself (401 and 404 need no upstream)."""
    from helpers import RunningGateway, base_config

    def make(**kwargs: Any) -> tuple[ClientConnection, MockTransport, ClockLoop]:
        kwargs.setdefault("routes", AUTH_A_ONLY)
        data = base_config(9, parser=parser, jwks_file=jwks_path, **kwargs)
        conn = ClientConnection(RunningGateway(data).gateway)  # built as the daemon builds it, not started
        clock = ClockLoop(conn.loop)
        conn.loop = clock
        transport = MockTransport()
        conn.connection_made(transport)
        return conn, transport, clock

    return make


async def run_callbacks() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_header_timeout_is_exact(client):
    conn, transport, clock = client(server={"header_timeout": 2.0})
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    clock.advance(1.999)
    assert not transport.closed
    conn.data_received(b"aaa")  # more bytes of the same head do not extend the deadline
    clock.advance(0.002)
    assert transport.closed
    assert transport.take().startswith(b"HTTP/1.1 408 ")


async def test_idle_connection_closes_at_keepalive_timeout_without_a_408(client):
    conn, transport, clock = client(server={"keepalive_timeout": 5.0, "header_timeout": 1.0})
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await run_callbacks()  # the answer goes out at the end of the loop turn (jwtproxy.outbox)
    assert transport.take().startswith(b"HTTP/1.1 401 ")
    clock.advance(4.999)
    assert not transport.closed
    clock.advance(0.002)
    assert transport.closed
    assert transport.take() == b""  # an idle connection is closed silently


async def test_head_timeout_rearms_when_an_idle_connection_starts_a_head(client):
    conn, transport, clock = client(server={"keepalive_timeout": 5.0, "header_timeout": 1.0})
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await run_callbacks()
    assert transport.take().startswith(b"HTTP/1.1 401 ")
    clock.advance(0.5)
    conn.data_received(b"GET /a HTTP/1.1\r\n")  # header_timeout now counts from here
    clock.advance(0.999)
    assert not transport.closed
    clock.advance(0.002)
    assert transport.closed
    assert transport.take().startswith(b"HTTP/1.1 408 ")


async def test_no_timer_fires_while_a_request_is_answered_in_time(client):
    conn, transport, clock = client(server={"keepalive_timeout": 5.0, "header_timeout": 1.0})
    for _ in range(4):
        clock.advance(0.9)
        conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await run_callbacks()
        assert transport.take().startswith(b"HTTP/1.1 401 ")
    assert not transport.closed


@pytest.mark.pure_python
async def test_pipelined_requests_are_answered_in_order_with_reading_paused_meanwhile(client, monkeypatch):
    """The first request waits for an upstream connection; the ones behind it wait their turn."""
    from jwtproxy.upstream import UpstreamError

    refused = asyncio.get_running_loop().create_future()

    async def connect_when_told(self: UpstreamPool) -> Any:
        await refused
        raise UpstreamError("connect", 502, "upstream connection refused")

    monkeypatch.setattr(UpstreamPool, "connect", connect_when_told)
    conn, transport, clock = client(routes=AUTH_A_ONLY + OPEN_O)
    wire = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"o", b"a", b"b", b"a"))
    conn.data_received(wire)
    await run_callbacks()
    assert transport.take() == b""  # nothing may overtake the first answer
    assert not transport.reading and len(conn.queue) == 3
    refused.set_result(None)
    await run_callbacks()
    statuses = [status for status, _, _ in parse_responses(transport.take())]
    assert statuses == [502, 401, 404, 401]
    assert transport.reading and transport.pauses == 1
    assert not transport.closed and conn.current is None and not conn.queue


async def test_protocol_error_after_pipelined_requests_is_the_last_answer(client):
    conn, transport, clock = client()
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /\x01 HTTP/1.1\r\n\r\n")
    await run_callbacks()
    statuses = [status for status, _, _ in parse_responses(transport.take())]
    assert statuses == [401, 404, 400]
    assert transport.closed


async def test_refused_upgrade_closes_the_connection(client):
    """What follows an upgrade request is not HTTP, so a 401 to one is the connection's last answer."""
    conn, transport, clock = client()
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    raw = transport.take()
    assert raw.startswith(b"HTTP/1.1 401 ")
    assert b"connection: close" in raw.lower()
    assert transport.closed


@pytest.mark.pure_python
async def test_draining_connection_says_close_on_its_last_answer(client, monkeypatch):
    from jwtproxy.upstream import UpstreamError

    refused = asyncio.get_running_loop().create_future()

    async def connect_when_told(self: UpstreamPool) -> Any:
        await refused
        raise UpstreamError("connect", 502, "upstream connection refused")

    monkeypatch.setattr(UpstreamPool, "connect", connect_when_told)
    conn, transport, clock = client(routes=AUTH_A_ONLY + OPEN_O)
    conn.data_received(b"GET /o HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.shutdown()  # both requests are in: both are answered, then the connection closes
    assert not transport.closed
    refused.set_result(None)
    await run_callbacks()
    responses = parse_responses(transport.take())
    assert [status for status, _, _ in responses] == [502, 404]
    assert "connection" not in responses[0][1]  # the first is kept alive for the second
    assert responses[1][1].get("connection") == "close"
    assert transport.closed
