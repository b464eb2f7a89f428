"""Cached tokens first: the per-turn verification budget (jwtproxy.turns) and the gateway's use of it.

The unit tests drive :class:`VerificationTurns` with a ``call_soon`` of their own (a list of
callbacks the test runs as "the next turn"); the gateway tests put many unknown tokens into one
turn of a real worker and check that only a turn's share is verified at once, that every request
is still answered, in order of arrival, and that a client leaving while its request waits costs
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from helpers import ISSUER, AUDIENCE, SigningKey, parse_responses

from jwtproxy.lifecycle import DECIDING
from jwtproxy.turns import VERIFICATIONS_PER_TURN, VerificationTurns


class Turns:
    """A hand-driven loop: ``call_soon`` queues, :meth:`next` runs what was queued (one turn)."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.pending.append(callback)

    def next(self) -> None:
        pending, self.pending = self.pending, []
        for callback in pending:
            callback()


def test_a_turn_gives_per_turn_slots_then_refuses():
    loop = Turns()
    turns = VerificationTurns(3, loop.call_soon)
    assert [turns.take() for _ in range(5)] == [True, True, True, False, False]
    assert len(loop.pending) == 1  # one turn callback, however many slots were taken
    loop.next()
    assert [turns.take() for _ in range(4)] == [True, True, True, False]


def test_waiting_requests_resume_oldest_first_at_most_per_turn_each_turn():
    loop = Turns()
    turns = VerificationTurns(2, loop.call_soon)
    resumed: list[int] = []

    def waiter(n: int) -> Callable[[], None]:
        def resume() -> None:
            assert turns.take()  # a resumed request verifies: it takes its slot
            resumed.append(n)
        return resume

    assert turns.take() and turns.take() and not turns.take()
    for n in range(5):
        turns.wait(waiter(n))
    loop.next()
    assert resumed == [0, 1]
    loop.next()
    assert resumed == [0, 1, 2, 3]
    loop.next()
    assert resumed == [0, 1, 2, 3, 4]
    loop.next()  # the budget is refreshed once more, then nothing is scheduled
    assert loop.pending == []
    assert turns.left == 2


def test_a_new_token_does_not_overtake_the_waiting():
    loop = Turns()
    turns = VerificationTurns(2, loop.call_soon)
    assert turns.take() and turns.take()
    turns.wait(lambda: None)
    loop.next()  # the waiting one needed no slot (answered from the cache meanwhile)
    assert turns.left == 2
    turns.wait(lambda: None)
    assert not turns.take()  # slots are free, but someone waits: first come, first verified


def test_a_resumed_request_that_needs_no_slot_leaves_it_to_the_next():
    loop = Turns()
    turns = VerificationTurns(1, loop.call_soon)
    assert turns.take()
    order: list[str] = []
    turns.wait(lambda: order.append("cached meanwhile"))  # takes no slot
    turns.wait(lambda: order.append("verified") if turns.take() else order.append("refused"))
    turns.wait(lambda: order.append("next turn") if turns.take() else order.append("refused"))
    loop.next()
    assert order == ["cached meanwhile", "verified"]
    loop.next()
    assert order == ["cached meanwhile", "verified", "next turn"]


def test_a_resume_that_raises_is_logged_and_the_rest_still_resume(caplog):
    loop = Turns()
    turns = VerificationTurns(2, loop.call_soon)
    assert turns.take() and turns.take()
    resumed: list[str] = []

    def broken() -> None:
        raise RuntimeError("injected")

    turns.wait(broken)
    turns.wait(lambda: resumed.append("second"))
    with caplog.at_level(logging.ERROR, logger="jwtproxy"):
        loop.next()
    assert resumed == ["second"]
    assert any("resumed for its verification raised" in r.getMessage() for r in caplog.records)


def test_without_an_event_loop_every_verification_happens_at_once():
    turns = VerificationTurns(2)  # no call_soon given, and no loop running here
    assert all(turns.take() for _ in range(10))
    with pytest.raises(RuntimeError):
        turns.wait(lambda: None)


def test_per_turn_must_be_positive():
    with pytest.raises(ValueError):
        VerificationTurns(0)


def test_a_turn_pending_on_a_closed_loop_does_not_strand_the_next_loop():
    turns = VerificationTurns(2)

    async def spend() -> None:
        assert turns.take() and turns.take() and not turns.take()

    first = asyncio.new_event_loop()
    first.run_until_complete(spend())  # its turn callback is queued, then the loop closes
    first.close()

    async def wait_for_slot() -> str:
        resumed = asyncio.get_running_loop().create_future()
        turns.wait(lambda: resumed.set_result("resumed"))
        return await asyncio.wait_for(resumed, 2.0)

    second = asyncio.new_event_loop()
    try:
        assert second.run_until_complete(wait_for_slot()) == "resumed"
    finally:
        second.close()


# --- the gateway -----------------------------------------------------------------------------------

# Both loops: the daemon runs on uvloop, whose transports deliver a reset's connection_lost later
# than asyncio's do (a resumed request must notice the closing transport itself).
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoopPolicy]:
    yield uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


async def test_a_worker_verifies_by_turns(make_gateway):
    gw = await make_gateway()
    turns = gw.gateway.auth.turns
    assert isinstance(turns, VerificationTurns) and turns.per_turn == VERIFICATIONS_PER_TURN


class RecordingTurns(VerificationTurns):
    """The worker's budget, counting what it refused and resumed."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.waited = 0
        self.granted = 0

    def take(self) -> bool:
        taken = super().take()
        if taken:
            self.granted += 1
        else:
            self.refused += 1
        return taken

    def wait(self, resume: Callable[[], None]) -> None:
        self.waited += 1
        super().wait(resume)


def request(token: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def fresh_token(key: SigningKey, n: int) -> str:
    now = int(time.time())
    return key.token({"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{n}", "exp": now + 300, "iat": now})


async def send_all_in_one_turn(port: int, payloads: list[bytes]) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open one connection per payload, then write every payload before yielding to the loop, so
    that the gateway finds all of them readable in one poll."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in payloads]
    await asyncio.sleep(0.05)  # the gateway has accepted them all
    for (_, writer), payload in zip(conns, payloads):
        writer.transport.write(payload)
    return conns


async def read_status(reader: asyncio.StreamReader) -> int:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
    return int(head.split(b" ", 2)[1])


async def test_unknown_tokens_beyond_a_turns_share_wait_and_are_all_answered(make_gateway, rsa_key, backend):
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    count = 5 * VERIFICATIONS_PER_TURN
    conns = await send_all_in_one_turn(gw.port, [request(fresh_token(rsa_key, n)) for n in range(count)])
    try:
        statuses = await asyncio.gather(*(read_status(reader) for reader, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()
    assert statuses == [200] * count
    # All arrived in one turn: the first turn's share was verified at once, the rest waited.
    assert turns.waited >= count - 2 * VERIFICATIONS_PER_TURN
    assert not turns.waiting
    subs = [h for record in backend.seen for k, h in record["headers"] if k == "x-user-id"]
    assert sorted(subs) == sorted(f"user-{n}" for n in range(count))


async def test_a_waiting_token_verified_meanwhile_is_found_by_its_own_key(make_gateway, rsa_key, backend):
    # A refused request resumes with the cache key its first ask computed. Two requests carry one
    # token past the turn's share: the first to resume verifies it, the second must find that
    # verdict under its own key (a wrong key would miss and verify again, or find another's).
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    others = [fresh_token(rsa_key, n) for n in range(VERIFICATIONS_PER_TURN)]
    twice = fresh_token(rsa_key, 777)
    payloads = [request(t) for t in others] + [request(twice, "/a"), request(twice, "/b")]
    conns = await send_all_in_one_turn(gw.port, payloads)
    try:
        statuses = await asyncio.gather(*(read_status(r) for r, _ in conns))
    finally:
        for _, w in conns:
            w.close()
    assert statuses == [200] * len(payloads)
    assert turns.waited >= 2  # both copies waited behind the first turn's share
    assert turns.granted == VERIFICATIONS_PER_TURN + 1  # the repeated token was verified once
    by_path = {record["path"]: dict(record["headers"]).get("x-user-id") for record in backend.seen}
    assert by_path["/a"] == by_path["/b"] == "user-777"


async def test_a_cached_token_is_not_held_behind_waiting_verifications(make_gateway, rsa_key, backend):
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    known = fresh_token(rsa_key, 999)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request(known))
    assert await read_status(reader) == 200  # now in the token cache
    count = 6 * VERIFICATIONS_PER_TURN
    payloads = [request(fresh_token(rsa_key, n)) for n in range(count)] + [request(known, "/known")]
    conns = await send_all_in_one_turn(gw.port, payloads)
    try:
        statuses = await asyncio.gather(*(read_status(r) for r, _ in conns))
    finally:
        writer.close()
        for _, w in conns:
            w.close()
    assert statuses == [200] * (count + 1)
    assert turns.waited > 0
    # The backend saw the cached-token request before most of the unknown tokens it arrived after.
    paths = [record["path"] for record in backend.seen[1:]]
    assert paths.index("/known") < 2 * VERIFICATIONS_PER_TURN


async def wait_until_waiting(turns: RecordingTurns, count: int) -> None:
    deadline = time.monotonic() + 5.0
    while turns.waited < count and time.monotonic() < deadline:
        await asyncio.sleep(0)
    assert turns.waited == count


async def test_a_client_that_resets_while_its_request_waits_leaves_the_rest_answered(make_gateway, rsa_key,
                                                                                    caplog):
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    count = 4 * VERIFICATIONS_PER_TURN
    conns = await send_all_in_one_turn(gw.port, [request(fresh_token(rsa_key, n)) for n in range(count)])
    await wait_until_waiting(turns, count - VERIFICATIONS_PER_TURN)  # one turn's share verified
    leaving, staying = conns[count // 2:], conns[:count // 2]
    for _, writer in leaving:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a FIN
        writer.transport.abort()
    try:
        statuses = await asyncio.gather(*(read_status(r) for r, _ in staying))
    finally:
        for _, writer in staying:
            writer.close()
    assert statuses == [200] * len(staying)
    deadline = time.monotonic() + 5.0
    while (turns.waiting or gw.gateway.connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not turns.waiting and not gw.gateway.connections  # every exchange ended
    assert len(staying) <= turns.granted <= count
    if isinstance(asyncio.get_running_loop(), uvloop.Loop):
        # On the daemon's loop the resets of those still waiting are seen before their turn
        # comes: they are not verified. (On asyncio's loop, in this test, the reset was seen only
        # after the turn that resumed them; there only the liveness above is checked.)
        assert turns.granted < count
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_connection_closed_while_its_request_waits_is_skipped(make_gateway, rsa_key, backend, caplog):
    """The worker aborts connections (a shutdown's deadline, a limit) whose requests wait for a slot:
    those are neither verified nor forwarded when their turn comes."""
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    count = 4 * VERIFICATIONS_PER_TURN
    conns = await send_all_in_one_turn(gw.port, [request(fresh_token(rsa_key, n)) for n in range(count)])
    await wait_until_waiting(turns, count - VERIFICATIONS_PER_TURN)
    waiting = [c for c in gw.gateway.connections if c.current is not None and c.current.state == DECIDING]
    assert len(waiting) == count - VERIFICATIONS_PER_TURN
    for conn in waiting:
        conn.abort()
    try:
        deadline = time.monotonic() + 5.0
        while turns.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not turns.waiting
        await asyncio.sleep(0.1)
        assert turns.granted == VERIFICATIONS_PER_TURN  # only the first turn's share was verified
        assert len(backend.seen) == VERIFICATIONS_PER_TURN
    finally:
        for _, writer in conns:
            writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_forged_tokens_wait_their_turn_too_and_are_all_refused(make_gateway, rsa_key):
    gw = await make_gateway()
    turns = gw.gateway.auth.turns = RecordingTurns()
    forger = SigningKey.rsa(rsa_key.kid, "RS256")  # the right kid, another key
    count = 4 * VERIFICATIONS_PER_TURN
    conns = await send_all_in_one_turn(gw.port, [request(fresh_token(forger, n)) for n in range(count)])
    try:
        responses: list[Any] = []
        for reader, _ in conns:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            responses.extend(parse_responses(head + await reader.readexactly(length)))
    finally:
        for _, writer in conns:
            writer.close()
    assert [status for status, _, _ in responses] == [401] * count
    assert all(b"signature verification failed" in body for _, _, body in responses)
    assert turns.waited > 0


async def test_requests_past_the_failure_budget_take_no_verification_slot(make_gateway, rsa_key):
    gw = await make_gateway(extra={"limits": {"failures_per_ip": 2}})
    turns = gw.gateway.auth.turns = RecordingTurns()
    forger = SigningKey.rsa(rsa_key.kid, "RS256")
    # The budget counts failures per one-second window: start early in a second, to stay in it.
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
    for n in range(3):  # three failures: past the budget of two
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request(fresh_token(forger, n)))
        assert await read_status(reader) == 401
        writer.close()
    granted = turns.granted
    count = 4 * VERIFICATIONS_PER_TURN
    conns = await send_all_in_one_turn(gw.port, [request(fresh_token(forger, 100 + n)) for n in range(count)])
    try:
        statuses = await asyncio.gather(*(read_status(r) for r, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()
    assert statuses == [429] * count
    assert turns.granted == granted and turns.waited == 0  # refused before the turn's budget
