"""The host-wide shared table: semantics in one process, exactness across forked processes."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from jwtproxy.sharedtable import WAYS, SharedTable, SharedTableBusy

FORK = multiprocessing.get_context("fork")
NOW = 1_000_000.0


def run_in_children(count: int, target: Callable[..., None], *args: Any) -> None:
    """Run ``target(index, *args)`` in ``count`` forked processes at once; all must exit 0."""
    procs = [FORK.Process(target=target, args=(i, *args)) for i in range(count)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"child exited with {p.exitcode}"


# -- one process ---------------------------------------------------------------------------


def test_put_get_expire_delete() -> None:
    table = SharedTable(64, values=2)
    assert table.get(b"a", NOW) is None
    table.put(b"a", (1.5, 2.5), NOW + 10, NOW)
    assert table.get(b"a", NOW) == (1.5, 2.5)
    assert table.expires(b"a", NOW) == NOW + 10
    assert table.get(b"a", NOW + 9.999) == (1.5, 2.5)
    assert table.get(b"a", NOW + 10) is None  # expires <= now is absent
    assert table.get(b"b", NOW) is None
    assert table.delete(b"a") is True
    assert table.delete(b"a") is False
    assert table.get(b"a", NOW) is None


def test_insert_if_absent_is_single_use_within_the_window() -> None:
    table = SharedTable(64, values=0)
    assert table.insert_if_absent(b"jti-1", NOW + 60, NOW) is True
    assert table.insert_if_absent(b"jti-1", NOW + 60, NOW + 1) is False
    assert table.insert_if_absent(b"jti-2", NOW + 60, NOW + 1) is True
    # Once the window passed the key is absent again.
    assert table.insert_if_absent(b"jti-1", NOW + 200, NOW + 60) is True
    assert table.expires(b"jti-1", NOW + 61) == NOW + 200


def test_update_is_a_read_modify_write_and_none_leaves_the_slot() -> None:
    table = SharedTable(64, values=1)
    seen: list[tuple[float, ...] | None] = []

    def bump(current: tuple[float, ...] | None, now: float) -> tuple[tuple[float, ...] | None, float, float]:
        seen.append(current)
        value = (current[0] if current else 0.0) + 1
        return (value,), now + 5, value

    assert table.update(b"k", NOW, bump) == 1
    assert table.update(b"k", NOW, bump) == 2
    assert seen == [None, (1.0,)]
    assert table.update(b"k", NOW, lambda cur, now: (None, 0.0, "kept")) == "kept"
    assert table.get(b"k", NOW) == (2.0,)
    assert table.update(b"absent", NOW, lambda cur, now: (None, 0.0, cur)) is None
    assert table.get(b"absent", NOW) is None


def test_update_releases_the_lock_when_fn_raises() -> None:
    table = SharedTable(8, values=1, stripes=1, lock_timeout=0.1)

    def boom(current: tuple[float, ...] | None, now: float) -> tuple[tuple[float, ...] | None, float, None]:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        table.update(b"k", NOW, boom)
    table.put(b"k", (1.0,), NOW + 1, NOW)  # would raise SharedTableBusy if the lock leaked
    assert table.get(b"k", NOW) == (1.0,)


def test_counters_sum_columns_refuse_past_limit_and_free_at_zero() -> None:
    table = SharedTable(64, values=3)
    assert table.add(b"t", 1, NOW, column=0, limit=3) == 1
    assert table.add(b"t", 1, NOW, column=1, limit=3) == 2
    assert table.add(b"t", 1, NOW, column=2, limit=3) == 3
    assert table.add(b"t", 1, NOW, column=0, limit=3) is None  # refused, nothing changed
    assert table.get(b"t", NOW) == (1.0, 1.0, 1.0)
    assert table.add(b"t", -1, NOW, column=0, limit=3) == 2  # decreases are never refused
    assert table.total(b"t", NOW) == 2
    assert table.get(b"t", NOW + 10**9) == (0.0, 1.0, 1.0)  # counters never expire
    table.clear_column(1)
    assert table.get(b"t", NOW) == (0.0, 0.0, 1.0)
    assert table.add(b"t", -1, NOW, column=2) == 0
    assert table.get(b"t", NOW) is None  # sum back at zero: the slot is free
    assert table.live(NOW) == 0
    with pytest.raises(IndexError):
        table.add(b"t", 1, NOW, column=3)


def test_full_table_evicts_the_slot_expiring_first_and_never_grows() -> None:
    table = SharedTable(WAYS, values=1)  # one bucket: every key competes for the same slots
    assert table.capacity == WAYS
    for i in range(WAYS):
        assert table.insert_if_absent(b"k%d" % i, NOW + 100 + i, NOW)
    assert table.evictions == 0
    assert table.insert_if_absent(b"new", NOW + 500, NOW)
    assert table.evictions == 1
    assert table.get(b"k0", NOW) is None  # the one with the least life left went
    assert all(table.get(b"k%d" % i, NOW) is not None for i in range(1, WAYS))
    assert table.live(NOW) == WAYS
    # An expired slot is reused without counting an eviction.
    assert table.insert_if_absent(b"later", NOW + 1000, NOW + 101.5)
    assert table.evictions == 1
    assert table.get(b"k1", NOW + 101.5) is None


def test_many_keys_stay_within_capacity() -> None:
    table = SharedTable(1000, values=0)
    for i in range(10_000):
        table.insert_if_absent(b"%d" % i, NOW + 60, NOW)
    assert table.live(NOW) <= table.capacity
    assert table.live(NOW) > table.capacity * 0.9  # buckets fill evenly


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SharedTable(0)
    with pytest.raises(ValueError):
        SharedTable(8, values=-1)
    with pytest.raises(ValueError):
        SharedTable(8, stripes=0)


def test_a_stopped_holder_makes_callers_fail_after_lock_timeout_not_hang() -> None:
    table = SharedTable(8, values=1, stripes=1, lock_timeout=0.2)
    table._lock(0)  # this process holds the only stripe...
    try:
        started = time.monotonic()
        child = FORK.Process(target=_try_put_expect_busy, args=(table,))
        child.start()
        child.join(10)
        assert child.exitcode == 0  # ...so another process gives up with SharedTableBusy
        assert time.monotonic() - started < 5
    finally:
        table._unlock(0)
    table.put(b"k", (1.0,), NOW + 1, NOW)


def _try_put_expect_busy(table: SharedTable) -> None:
    try:
        table.put(b"k", (1.0,), NOW + 1, NOW)
    except SharedTableBusy:
        os._exit(0)
    os._exit(3)


def test_a_child_forked_while_a_thread_is_inside_an_operation_gets_fresh_thread_locks() -> None:
    """A worker is forked while another thread of its parent holds the table's thread lock (it
    is inside ``update``): the child has no such thread, so it must start with a free lock, or
    its every operation would wait ``lock_timeout`` and fail."""
    table = SharedTable(16 * 64, values=1, lock_timeout=0.5)
    inside, leave = threading.Event(), threading.Event()

    def hold(current: tuple[float, ...] | None, now: float) -> tuple[None, float, None]:
        inside.set()
        leave.wait(10)
        return None, 0.0, None

    held = b"held"
    # A key on another stripe: the parent's record lock on the held stripe is real in the child.
    other = next(key for key in (b"other-%d" % i for i in range(1000))
                 if table._locate(key)[2] != table._locate(held)[2])
    thread = threading.Thread(target=table.update, args=(held, NOW, hold))
    thread.start()
    try:
        assert inside.wait(10)
        child = FORK.Process(target=_put_expect_done, args=(table, other))
        child.start()
        child.join(10)
        assert child.exitcode == 0, "the child inherited its parent's held thread lock"
    finally:
        leave.set()
        thread.join(10)
    assert table.get(other, NOW) == (1.0,)  # the child's write, seen here


def _put_expect_done(table: SharedTable, key: bytes) -> None:
    try:
        table.put(key, (1.0,), NOW + 1, NOW)
    except SharedTableBusy:
        os._exit(3)
    os._exit(0)


# -- across forked processes ----------------------------------------------------------------


def _increment(index: int, table: SharedTable, keys: int, rounds: int) -> None:
    def plus_one(current: tuple[float, ...] | None, now: float) -> tuple[tuple[float, ...], float, None]:
        return ((current[0] if current else 0.0) + 1,), math.inf, None

    for r in range(rounds):
        table.update(b"counter-%d" % (r % keys), NOW, plus_one)


def test_update_is_exact_across_processes() -> None:
    table = SharedTable(256, values=1)
    run_in_children(4, _increment, table, 3, 3000)
    total = sum(table.get(b"counter-%d" % k, NOW)[0] for k in range(3))  # type: ignore[index]
    assert total == 4 * 3000
    assert table.get(b"counter-0", NOW) == (4 * 1000.0,)


def _claim_jtis(index: int, table: SharedTable, count: int, wins: Any, evictions: Any) -> None:
    won = sum(table.insert_if_absent(b"jti-%d" % j, NOW + 60, NOW) for j in range(count))
    wins[index] = won
    evictions[index] = table.evictions


def test_insert_if_absent_has_exactly_one_winner_across_processes() -> None:
    # 2000 keys in 32768 slots: a bucket overflowing (an eviction, after which the evicted jti
    # could win again) has a probability ~1e-15 here.
    table = SharedTable(32768, values=0)
    wins, evictions = FORK.Array("i", 4), FORK.Array("i", 4)
    run_in_children(4, _claim_jtis, table, 2000, wins, evictions)
    assert list(evictions) == [0, 0, 0, 0]
    assert sum(wins) == 2000  # every jti accepted once, whichever worker saw it first


def _take_connections(index: int, table: SharedTable, attempts: int, taken: Any) -> None:
    got = 0
    for _ in range(attempts):
        if table.add(b"upstream-a", 1, NOW, column=index, limit=150) is not None:
            got += 1
    taken[index] = got


def test_counter_limit_is_exact_across_processes_and_columns_clear() -> None:
    table = SharedTable(64, values=4)
    taken = FORK.Array("i", 4)
    run_in_children(4, _take_connections, table, 100, taken)
    assert sum(taken) == 150
    assert table.total(b"upstream-a", NOW) == 150
    per_column = table.get(b"upstream-a", NOW)
    assert per_column is not None and list(per_column) == [float(n) for n in taken]
    # A worker's exit: the supervisor clears its column, its connections stop counting.
    table.clear_column(0)
    assert table.total(b"upstream-a", NOW) == 150 - taken[0]


def _write_then_exit(index: int, table: SharedTable) -> None:
    table.put(b"from-generation-1", (42.0,), NOW + 60, NOW)


def _read_back(index: int, table: SharedTable, out: Any) -> None:
    value = table.get(b"from-generation-1", NOW)
    out[index] = value[0] if value else -1.0


def test_later_children_inherit_what_earlier_ones_wrote() -> None:
    table = SharedTable(64, values=1)
    run_in_children(1, _write_then_exit, table)  # a worker of the first generation
    out = FORK.Array("d", 2)
    run_in_children(2, _read_back, table, out)  # workers forked after a reload
    assert list(out) == [42.0, 42.0]
    assert table.get(b"from-generation-1", NOW) == (42.0,)


def _hold_stripe_forever(index: int, table: SharedTable, ready: Any) -> None:
    table._lock(0)
    ready.set()
    time.sleep(60)


def test_a_killed_holder_releases_its_stripe() -> None:
    table = SharedTable(8, values=1, stripes=1, lock_timeout=5)
    ready = FORK.Event()
    holder = FORK.Process(target=_hold_stripe_forever, args=(0, table, ready))
    holder.start()
    try:
        assert ready.wait(10)
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        started = time.monotonic()
        table.put(b"k", (7.0,), NOW + 1, NOW)  # the kernel dropped the dead holder's lock
        assert time.monotonic() - started < 1
        assert table.get(b"k", NOW) == (7.0,)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
