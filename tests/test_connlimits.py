"""Connection caps: the open-file limit, upstream slots across processes, the pending queue."""

from __future__ import annotations

import multiprocessing
import resource
from typing import Any

import h11
import pytest

from jwtproxy.connlimits import (
    BUSY_RESPONSE,
    PendingQueue,
    QueueFull,
    UpstreamSlots,
    raise_open_file_limit,
)
from jwtproxy.sharedtable import SharedTable

FORK = multiprocessing.get_context("fork")


def _raise_in_child(out: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    before, after = raise_open_file_limit()
    out[0], out[1] = before, after
    out[2] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    out[3] = hard if hard != resource.RLIM_INFINITY else -1


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    out = FORK.Array("q", 4)
    child = FORK.Process(target=_raise_in_child, args=(out,))  # not to change this process
    child.start()
    child.join(30)
    assert child.exitcode == 0
    before, after, soft_now, hard = list(out)
    assert before == 64
    assert after == soft_now > 64
    if hard != -1:
        assert soft_now == hard


def test_busy_response_is_one_complete_503() -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(BUSY_RESPONSE)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 503
    headers = dict(response.headers)
    assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    body = client.next_event()
    assert isinstance(body, h11.Data) and b"too many client connections" in body.data
    assert isinstance(client.next_event(), h11.EndOfMessage)


# -- upstream slots ------------------------------------------------------------------------------


def test_slots_without_a_table_count_this_process() -> None:
    slots = UpstreamSlots(None, 0, 2, [b"http://a", b"http://b"])
    assert slots.try_acquire(0) and slots.try_acquire(0)
    assert not slots.try_acquire(0)  # the cap is per target
    assert slots.try_acquire(1)
    slots.release(0)
    assert slots.held(0) == 1 and slots.in_use(0) == 1
    assert slots.try_acquire(0)
    with pytest.raises(RuntimeError):
        UpstreamSlots(None, 0, 1, [b"x"]).release(0)  # a release without a slot is a bug, loudly


def _open_and_hold(index: int, table: SharedTable, attempts: int, got: Any) -> None:
    slots = UpstreamSlots(table, index, 100, [b"http://a"])
    got[index] = sum(slots.try_acquire(0) for _ in range(attempts))


def test_slots_cap_the_sum_over_workers_and_a_dead_workers_column_is_cleared() -> None:
    table = SharedTable(64, values=4)
    got = FORK.Array("i", 3)
    procs = [FORK.Process(target=_open_and_hold, args=(i, table, 60, got)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(got) == 100  # three workers wanted 180: the host-wide cap let exactly 100 open
    here = UpstreamSlots(table, 3, 100, [b"http://a"])
    assert here.in_use(0) == 100 and not here.try_acquire(0)
    table.clear_column(0)  # the supervisor, when worker 0 exits
    assert here.in_use(0) == 100 - got[0]
    assert here.try_acquire(0)
    with pytest.raises(ValueError):
        UpstreamSlots(table, 4, 10, [b"x"])  # no such column


# -- pending queue ---------------------------------------------------------------------------------


async def test_pending_queue_is_bounded_fifo_and_times_out_to_none() -> None:
    queue: PendingQueue[str] = PendingQueue(2)
    first, second = queue.wait(5), queue.wait(5)
    with pytest.raises(QueueFull):
        queue.wait(5)
    assert len(queue) == 2
    assert queue.hand("conn-1")
    assert first.result() == "conn-1" and not second.done()
    third = queue.wait(0.01)  # a place freed up
    assert queue.hand("slot")
    assert second.result() == "slot"
    assert await third is None  # nobody handed it anything within its timeout
    assert not queue.hand("unused")  # nobody waits
    assert len(queue) == 0


async def test_pending_queue_skips_waiters_whose_client_left() -> None:
    queue: PendingQueue[int] = PendingQueue(3)
    gone, waiting = queue.wait(5), queue.wait(5)
    gone.cancel()
    assert len(queue) == 1
    assert queue.hand(7)
    assert waiting.result() == 7
    # A full queue of departed waiters makes room for a new one.
    for _ in range(3):
        queue.wait(5).cancel()
    fresh = queue.wait(5)
    queue.fail_all()
    assert fresh.result() is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        UpstreamSlots(None, 0, 0, [b"x"])
    with pytest.raises(ValueError):
        PendingQueue(-1)
