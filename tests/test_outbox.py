"""Writes held to the end of the loop turn (jwtproxy.outbox), alone and in a client connection."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from test_connection import MockTransport

from jwtproxy.outbox import Outbox


class Writer:
    """A connection as the outbox sees it: bytes held until ``flush_out``."""

    def __init__(self, outbox: Outbox, sent: list[tuple[str, bytes]], name: str, fail: bool = False) -> None:
        self.outbox = outbox
        self.sent = sent
        self.name = name
        self.fail = fail
        self.held: list[bytes] | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif self.outbox.hold(self):
            self.held = [data]
        else:
            self.sent.append((self.name, data))

    def flush_out(self) -> None:
        held, self.held = self.held, None
        if self.fail:
            raise OSError("the socket is gone")
        if held:
            self.sent.append((self.name, b"".join(held)))


async def end_of_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_turns_writes_go_out_together_at_its_end_in_order() -> None:
    outbox = Outbox()
    sent: list[tuple[str, bytes]] = []
    first, second = Writer(outbox, sent, "first"), Writer(outbox, sent, "second")
    first.write(b"a1")
    second.write(b"b1")
    first.write(b"a2")
    assert sent == []  # held: nothing is written while the turn runs
    await end_of_turn()
    # One write per connection, its bytes in the order written, connections in order of their first write.
    assert sent == [("first", b"a1a2"), ("second", b"b1")]
    assert outbox.held == []
    first.write(b"a3")  # a later turn holds again, and is flushed again
    await end_of_turn()
    assert sent[-1] == ("first", b"a3")


def test_outside_a_running_loop_nothing_is_held() -> None:
    outbox = Outbox()
    sent: list[tuple[str, bytes]] = []
    writer = Writer(outbox, sent, "w")
    writer.write(b"now")
    assert sent == [("w", b"now")] and outbox.held == []


async def test_one_failing_connection_does_not_keep_the_others_from_being_written(
        caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox()
    sent: list[tuple[str, bytes]] = []
    broken, fine = Writer(outbox, sent, "broken", fail=True), Writer(outbox, sent, "fine")
    broken.write(b"x")
    fine.write(b"y")
    with caplog.at_level(logging.ERROR, logger="jwtproxy"):
        await end_of_turn()
    assert sent == [("fine", b"y")]
    assert "held bytes failed" in caplog.text
    assert broken.closed and not fine.closed  # its client is not left waiting for the answer


def test_a_flush_scheduled_on_a_loop_that_closed_is_scheduled_again_on_the_next() -> None:
    """A gateway that outlives its loop (tests do this) must not wait for a flush that a closed
    loop will never run."""
    outbox = Outbox()
    sent: list[tuple[str, bytes]] = []
    writer = Writer(outbox, sent, "w")

    async def write_and_stop(data: bytes) -> None:
        writer.write(data)
        asyncio.get_running_loop().stop()  # the loop ends with this turn, before the flush
        await asyncio.Future()

    first = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError):  # stopped before the coroutine completed
            first.run_until_complete(write_and_stop(b"lost"))
    finally:
        first.close()
    assert sent == []

    async def write_and_wait(data: bytes) -> None:
        writer.held = None  # the first loop's connection went with it
        writer.write(data)
        await end_of_turn()

    second = asyncio.new_event_loop()
    try:
        second.run_until_complete(write_and_wait(b"second"))
    finally:
        second.close()
    assert ("w", b"second") in sent


# -- in a client connection ---------------------------------------------------------------------


class CountingTransport(MockTransport):
    """The connection tests' transport, counting its writes (system calls, on a socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


@pytest.fixture
def connection(parser: str, jwks_path: Any) -> Any:
    """``connection()`` -> (connection, transport): answered by the gateway itself (401)."""
    from helpers import RunningGateway, base_config

    from jwtproxy.connection import ClientConnection

    def make() -> tuple[ClientConnection, CountingTransport]:
        data = base_config(9, parser=parser, jwks_file=jwks_path,
                           routes=[{"path_prefix": "/a", "upstream": "backend"}])
        conn = ClientConnection(RunningGateway(data).gateway)
        transport = CountingTransport()
        conn.connection_made(transport)
        return conn, transport

    return make


REQUEST = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_pipelined_answers_of_one_turn_are_one_write(connection: Any) -> None:
    conn, transport = connection()
    conn.data_received(REQUEST * 3)
    assert transport.take() == b""  # decided, held
    await end_of_turn()
    raw = transport.take()
    assert raw.count(b"HTTP/1.1 401 ") == 3
    assert transport.writes == 1


async def test_closing_writes_what_the_connection_holds_first(connection: Any) -> None:
    conn, transport = connection()
    conn.data_received(REQUEST)
    conn.close()
    assert transport.closed
    assert transport.take().startswith(b"HTTP/1.1 401 ")


async def test_aborting_drops_what_the_connection_holds(connection: Any) -> None:
    conn, transport = connection()
    conn.data_received(REQUEST)
    conn.abort()
    await end_of_turn()
    assert transport.take() == b""


async def test_a_connection_lost_before_the_end_of_the_turn_writes_nothing(connection: Any) -> None:
    conn, transport = connection()
    conn.data_received(REQUEST)
    conn.connection_lost(ConnectionResetError())
    await end_of_turn()
    assert transport.take() == b""
