"""The upstream pool under ``upstream_max_connections``: slots, the pending queue, the 503s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from jwtproxy.config import Target, UpstreamConfig
from jwtproxy.connlimits import UpstreamSlots
from jwtproxy.sharedtable import SharedTable
from jwtproxy.upstream import UpstreamConnection, UpstreamError, UpstreamPool


class CountingServer:
    """A TCP server that only counts the connections it has open."""

    def __init__(self) -> None:
        self.open = 0
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> CountingServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.open += 1
            try:
                await reader.read()
            finally:
                self.open -= 1
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@pytest.fixture
async def upstream() -> AsyncIterator[CountingServer]:
    server = await CountingServer().start()
    yield server
    assert server.server is not None
    server.server.close()


def pool_for(port: int, slots: UpstreamSlots | None, queue: int, connect_timeout: float = 2.0) -> UpstreamPool:
    config = UpstreamConfig(name="up", targets=(Target("http", "127.0.0.1", port),),
                            connect_timeout=connect_timeout)
    return UpstreamPool(config, slots=slots, queue_limit=queue)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_beyond_the_cap_requests_wait_then_a_full_queue_is_503(upstream: CountingServer) -> None:
    pool = pool_for(upstream.port, UpstreamSlots(None, 0, 2, [b"t"]), queue=2)
    first, second = await pool.connect(), await pool.connect()
    waiting = [asyncio.ensure_future(pool.connect()) for _ in range(2)]
    await settle()
    assert len(pool.pending) == 2 and not any(w.done() for w in waiting)
    with pytest.raises(UpstreamError) as info:
        await pool.connect()  # the queue is full: answered at once
    assert (info.value.status, info.value.kind, info.value.retry_after) == (503, "overflow", 1)
    assert pool.rejected == 1

    # A connection released by a finished exchange goes straight to the oldest waiter.
    pool.release(first)
    handed = await waiting[0]
    assert handed is first and handed.reused
    # A connection that closes frees its slot: the next waiter connects anew.
    second.close()
    fresh = await waiting[1]
    assert fresh is not second and not fresh.reused
    assert pool.slots is not None and pool.slots.held(0) == 2
    await settle()
    assert upstream.open == 2  # never more than the cap
    pool.close()


async def test_a_wait_longer_than_connect_timeout_is_503(upstream: CountingServer) -> None:
    pool = pool_for(upstream.port, UpstreamSlots(None, 0, 1, [b"t"]), queue=4, connect_timeout=0.05)
    held = await pool.connect()
    with pytest.raises(UpstreamError) as info:
        await pool.connect()
    assert info.value.status == 503 and info.value.retry_after == 1
    assert pool.rejected == 1 and len(pool.pending) == 0
    held.close()
    pool.close()


async def test_a_waiter_that_leaves_loses_nothing(upstream: CountingServer) -> None:
    pool = pool_for(upstream.port, UpstreamSlots(None, 0, 1, [b"t"]), queue=4)
    held = await pool.connect()
    leaving = asyncio.ensure_future(pool.connect())
    staying = asyncio.ensure_future(pool.connect())
    await settle()
    leaving.cancel()
    await settle()
    pool.release(held)
    assert await staying is held  # the departed waiter was skipped
    # The same race the other way: handed over just as it was cancelled, the connection comes back.
    late = asyncio.ensure_future(pool.connect())
    await settle()
    pool.release(held)  # resolves late's future...
    late.cancel()  # ...but its task is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await late
    assert pool.take_idle() is held  # given back to the pool, not lost
    pool.close()


async def test_failed_connects_free_their_slot() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on port now
    pool = pool_for(port, UpstreamSlots(None, 0, 1, [b"t"]), queue=1)
    for _ in range(3):
        with pytest.raises(UpstreamError) as info:
            await pool.connect()
        assert info.value.status == 502
    assert pool.slots is not None and pool.slots.held(0) == 0
    pool.close()


async def test_the_cap_is_shared_between_workers(upstream: CountingServer) -> None:
    # Two pools on one shared table with their own columns stand for two workers of one host.
    table = SharedTable(64, values=4)
    worker_a = pool_for(upstream.port, UpstreamSlots(table, 0, 2, [b"http://127.0.0.1"]), queue=4)
    worker_b = pool_for(upstream.port, UpstreamSlots(table, 1, 2, [b"http://127.0.0.1"]), queue=4)
    held = [await worker_a.connect(), await worker_a.connect()]
    waiting = asyncio.ensure_future(worker_b.connect())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # worker a holds the host's two slots
    held[0].close()  # worker a's connection closes: b notices within its poll
    conn = await asyncio.wait_for(waiting, 1.0)
    assert isinstance(conn, UpstreamConnection)
    assert worker_b.slots is not None and worker_b.slots.in_use(0) == 2
    held[1].close()
    conn.close()
    await settle()
    assert worker_b.slots.in_use(0) == 0
    worker_a.close()
    worker_b.close()


async def test_closing_the_pool_answers_every_waiter(upstream: CountingServer) -> None:
    pool = pool_for(upstream.port, UpstreamSlots(None, 0, 1, [b"t"]), queue=4)
    held = await pool.connect()
    waiting = asyncio.ensure_future(pool.connect())
    await settle()
    pool.close()
    with pytest.raises(UpstreamError):
        await waiting
    held.close()


def run_on(loop_kind: str, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` on a fresh loop of that kind: the daemon's (uvloop) or the stdlib's.
    Which callbacks a loop runs first after a stall (timers or sockets) differs between them."""
    if loop_kind == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_connect_done_while_the_loop_was_stalled_is_not_a_timeout(loop_kind: str) -> None:
    # A burst can keep the loop busy for longer than connect_timeout; the connect itself finished
    # in microseconds. Its timer then fires late, before the socket is looked at: that must not
    # be a 504 for an upstream that answered at once.
    async def scenario() -> None:
        # The server keeps its writers: a StreamWriter that is garbage-collected closes its
        # socket (Python 3.13), and the client would then see its fresh connection closed.
        accepted: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
        pool = pool_for(server.sockets[0].getsockname()[1], None, queue=0, connect_timeout=0.2)
        for _ in range(3):
            asyncio.get_running_loop().call_soon(time.sleep, 0.5)  # the loop stalls as the connect starts
            conn = await pool.connect()
            assert isinstance(conn, UpstreamConnection) and not conn.closed
            conn.close()
        pool.close()
        for writer in accepted:
            writer.close()
        server.close()

    run_on(loop_kind, scenario)


async def test_a_connect_that_never_completes_still_times_out() -> None:
    # A listener that never accepts, its queue filled: further SYNs are dropped, connects hang.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    await asyncio.sleep(0.1)
    pool = pool_for(port, None, queue=0, connect_timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamError) as info:
            await pool.connect()
        assert info.value.status == 504 and time.monotonic() - started < 2
    finally:
        pool.close()
        for s in fillers:
            s.close()
        server.close()


@pytest.mark.parametrize("turns_before_cancel", range(6))
async def test_a_cancelled_connect_ends_in_its_connection_or_cancelled_error(turns_before_cancel: int) -> None:
    """A client that leaves cancels its request's upstream connect, at any point of it: the connect
    ends in the connection (it won the race) or in CancelledError, never in anything else (the
    compiled build once gave None, see below)."""
    from jwtproxy.upstream import _within

    loop = asyncio.get_running_loop()

    class Transport:
        closed = False

        def close(self) -> None:
            self.closed = True

    transport = Transport()
    made = UpstreamConnection(pool_for(9, None, 0), 0)  # never connected: only what a connect returns

    async def connecting() -> tuple[Any, Any]:
        await asyncio.sleep(0)
        return transport, made

    attempt = connecting()
    waiting = asyncio.ensure_future(_within(loop, attempt, 5.0))
    for _ in range(turns_before_cancel):
        await asyncio.sleep(0)
    waiting.cancel()
    try:
        result = await waiting
    except asyncio.CancelledError:
        return
    finally:
        attempt.close()  # cancelled before _within began: the attempt was never started
    assert result is made


def test_compiled_modules_have_no_await_in_except_or_finally() -> None:
    """Keep ``await`` out of ``except`` and ``finally`` blocks in the compiled modules. The one
    there was (``upstream._within`` awaited the cancelled connect attempt in its ``finally``)
    made compiled ``_within`` return None to ``_open`` when clients reset their connections
    while their requests were being forwarded (tests/test_turns.py's reset test: an internal
    error, compiled only); with the wait moved after the ``except`` block it does not. The tests
    above, which cancel a connect in isolation, did not reproduce it, so the exact mypyc
    condition is not pinned down: the rule is the guard."""
    import ast
    from pathlib import Path

    import jwtproxy
    from jwtproxy.compiled import HOT_MODULES

    package = Path(jwtproxy.__file__).parent
    found = []
    for module in HOT_MODULES:
        source = package / (module.rsplit(".", 1)[-1] + ".py")
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Try):
                for kind, body in [("finally", node.finalbody)] + [("except", h.body) for h in node.handlers]:
                    for stmt in body:
                        for sub in ast.walk(stmt):
                            if isinstance(sub, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
                                found.append(f"{source.name}:{sub.lineno} ({kind})")
    assert HOT_MODULES and not found, found


async def test_a_pool_connect_cancelled_while_connecting_raises_cancelled_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the pool, as the client connection calls it: a connect still in progress
    when the client leaves ends in CancelledError, and the attempt is cancelled too."""
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    attempt_cancelled = asyncio.Event()

    async def hanging_connect(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            attempt_cancelled.set()
            raise
        raise AssertionError("not reached")

    monkeypatch.setattr(loop, "create_connection", hanging_connect)  # the stdlib loop of this test
    pool = pool_for(9, None, 0, connect_timeout=5.0)
    connecting = asyncio.ensure_future(pool.connect())
    await started.wait()
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    assert attempt_cancelled.is_set()
