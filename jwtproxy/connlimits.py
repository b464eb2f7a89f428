"""Connection caps: open files, client connections per worker, upstream connections per host.

Theory of operation
-------------------
A burst of clients must never leave a request unanswered (contract §5.5). Three bounds, each
ending in an answer rather than a hang:

* *Open files.* :func:`raise_open_file_limit` lifts the worker's soft ``RLIMIT_NOFILE`` to the hard
  limit at start (what nginx's ``worker_rlimit_nofile`` does): the default soft limit of 1024
  would otherwise be the real connection cap. Should the process still run out of descriptors,
  uvloop's listener survives it: libuv answers ``EMFILE`` on ``accept`` by closing a descriptor
  it keeps in reserve, accepting and closing the waiting connections, and reopening the
  reserve, so clients see their connection closed at once and the loop does not spin; the
  worker serves again as soon as descriptors are free.
* *Client connections per worker* (``[limits] max_connections``). The gateway counts open
  connections; one accepted beyond the cap gets :data:`BUSY_RESPONSE` (a 503 with
  ``Retry-After``, ``Connection: close``) and is closed at once, before its request is read.
* *Upstream connections per target per host* (``[limits] upstream_max_connections``).
  :class:`UpstreamSlots` counts open connections per target in the host's shared table
  (:mod:`jwtproxy.sharedtable`), one column per worker, so the cap holds for the sum over all
  workers, and a worker's counts vanish with it (the supervisor clears its column when it
  exits: a killed worker cannot leak slots). A connection takes its slot before it connects and
  gives it back when it closes (or fails to connect); idle pooled connections hold theirs.
  A request that finds no slot free and no idle connection waits in a :class:`PendingQueue`
  (bounded, oldest first, each waiting at most the upstream's ``connect_timeout``), as behind
  Envoy's ``max_pending_requests``. It is served by the first of: a connection released to the
  pool by this worker (handed over directly), a slot freed by this worker, or a slot freed by
  another worker (seen by a 10 ms check that runs only while someone waits: another process
  cannot wake this one's loop). Past the queue's bound, or past the wait, the answer is a 503
  with ``Retry-After``.
* *Connect timers under a stall.* A burst can hold a worker's loop up for longer than
  ``connect_timeout``. Completing a connect takes the loop several turns, and the expired timer
  runs before them, so an upstream connect that completed in the kernel at once would be timed
  out (a 504 for the gateway's own slowness; measured: every time under uvloop with a 0.5 s
  stall and a 0.2 s timeout). So a connect timeout that fires more than ``LATE_TIMER`` late
  waits ``STALL_GRACE`` more, up to ``STALL_GRACES`` times in a row; one that fires on time (a
  loop keeping up) counts at once. (Reading a request or a response is one turn: a late header
  or response timer finds the bytes already read, so those timers need no such grace.)
"""

from __future__ import annotations

import asyncio
import collections
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from .sharedtable import SharedTable

__all__ = [
    "BUSY_RESPONSE",
    "HostTables",
    "WorkerColumns",
    "PendingQueue",
    "QueueFull",
    "UpstreamSlots",
    "raise_open_file_limit",
]

T = TypeVar("T")

_BUSY_BODY: Final = (
    b'{"error":"temporarily_unavailable","error_description":"too many client connections"}'
)
#: The whole answer to a client connection beyond ``max_connections`` (written before any read).
BUSY_RESPONSE: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"cache-control: no-store\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)

#: Seconds between checks for slots freed by other workers, while requests wait.
CROSS_WORKER_POLL: Final = 0.01

#: A connect timer that fires this much after it was due was held up by a busy loop (a burst), not
#: by the upstream: a connect that completed meanwhile is seen before the timeout counts.
LATE_TIMER: Final = 0.1
#: How much longer such a late timeout waits, so the loop polls its sockets first; and how many
#: times in a row (a grace that fires late again is a loop still overloaded).
STALL_GRACE: Final = 0.05
STALL_GRACES: Final = 10


#: Sizes of the host's tables. Rate cells live until their TAT and failure counts one second, so
#: these bound the clients tracked at once (an evicted cell restarts that client's count: the
#: table errs on the side of admitting); counters need one slot per upstream target.
RATE_CELLS: Final = 131072
FAILURE_CELLS: Final = 65536
CONNECTION_COUNTERS: Final = 1024
#: Worker columns of the connection counters: workers alive at once (a reload overlaps two
#: generations, and restarts) beyond this share columns (see :class:`WorkerColumns`).
WORKER_COLUMNS: Final = 64


@dataclass(frozen=True, slots=True)
class HostTables:
    """The shared tables of one supervisor, made before it forks (contract §5.5: limits hold
    across all workers of a host). ~6 MB of shared memory in all."""

    rates: SharedTable  # GCRA cells: one value (TAT)
    failures: SharedTable  # failure budget: window start, count
    connections: SharedTable  # open upstream connections per target: one value per worker column

    @classmethod
    def create(cls, *, workers: int = WORKER_COLUMNS) -> HostTables:
        """The tables of a supervisor; ``workers=1``: small ones for a lone worker (no
        supervisor: ``jwtproxy verify``, in-process gateways), a sixteenth of the size."""
        scale = 1 if workers > 1 else 16
        return cls(
            rates=SharedTable(RATE_CELLS // scale, values=1),
            failures=SharedTable(FAILURE_CELLS // scale, values=2),
            connections=SharedTable(CONNECTION_COUNTERS // scale, values=min(workers, WORKER_COLUMNS)),
        )

    def close(self) -> None:
        for table in (self.rates, self.failures, self.connections):
            table.close()


class WorkerColumns:
    """Which column of the connection counters each live worker writes (the supervisor's book).

    A worker takes a free column when it is forked; when it exits, the column is cleared (the
    connections it held are gone with it, whether it drained or was killed) and freed. With more
    workers alive than columns, the least shared column is shared: its counts are then cleared
    only when its last user exits (until then a dead sharer's connections still count, which
    errs towards fewer upstream connections, never more)."""

    __slots__ = ("table", "_users")

    def __init__(self, table: SharedTable) -> None:
        self.table = table
        self._users = [0] * table.values

    def take(self) -> int:
        column = min(range(len(self._users)), key=self._users.__getitem__)
        self._users[column] += 1
        return column

    def give_back(self, column: int) -> None:
        self._users[column] -= 1
        if self._users[column] == 0:
            self.table.clear_column(column)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns ``(before, after)``.

    A hard limit of ``RLIM_INFINITY`` is capped at the kernel's ``nr_open`` (Linux refuses more),
    else at 1048576. Failure leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                target = int(f.read().strip())
        except (OSError, ValueError):
            target = 1048576
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


class UpstreamSlots:
    """Open connections per target of one upstream, summed over the workers of a host.

    ``table`` is the host's counter table (one value per worker column); ``column`` this
    worker's; ``keys`` one key per target (its URL, the same in every worker). Without a table
    (a gateway with no supervisor) the count is this process's own."""

    __slots__ = ("table", "column", "limit", "keys", "_own")

    def __init__(self, table: SharedTable | None, column: int, limit: int,
                 keys: Sequence[bytes]) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if table is not None and not 0 <= column < table.values:
            raise ValueError(f"column {column} outside the table's {table.values} columns")
        self.table = table
        self.column = column
        self.limit = limit
        self.keys = [b"up\x00" + key for key in keys]
        self._own = [0] * len(keys)

    def try_acquire(self, index: int) -> bool:
        """Take a slot for a new connection to target ``index``; False at the cap."""
        table = self.table
        if table is None:
            if self._own[index] >= self.limit:
                return False
        elif table.add(self.keys[index], 1, 0.0, column=self.column, limit=self.limit) is None:
            return False
        self._own[index] += 1
        return True

    def release(self, index: int) -> None:
        """Give back the slot of a connection to target ``index`` that closed."""
        if self._own[index] <= 0:
            raise RuntimeError(f"release without a slot held for target {index}")
        self._own[index] -= 1
        # A lone worker closes its own tables when it stops; connections closing after that
        # have nothing left to count in.
        if self.table is not None and not self.table.closed:
            self.table.add(self.keys[index], -1, 0.0, column=self.column)

    def held(self, index: int) -> int:
        """Slots this worker holds for target ``index``."""
        return self._own[index]

    def in_use(self, index: int) -> int:
        """Slots held for target ``index`` by every worker of the host."""
        if self.table is None:
            return self._own[index]
        return int(self.table.total(self.keys[index], 0.0))


class QueueFull(Exception):
    """The pending queue is at its bound: answer 503 at once."""


class PendingQueue(Generic[T]):
    """Requests waiting for an upstream connection: bounded, oldest first.

    :meth:`wait` returns a future resolved with what :meth:`hand` gives (a connection or a slot)
    or with None when ``timeout`` passed first. A waiter that is cancelled (its client left) is
    skipped; one that was handed something as it was cancelled must give it back (see
    :meth:`UpstreamPool.connect`)."""

    __slots__ = ("limit", "_waiters", "_loop")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self._waiters: collections.deque[asyncio.Future[T | None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Requests waiting (those whose client left are not counted)."""
        return sum(1 for future in self._waiters if not future.done())

    def has_waiters(self) -> bool:
        """Whether anyone may be waiting: :meth:`hand` is worth calling. Cheap (no count), so it
        may be true of waiters whose client left, which :meth:`hand` skips; asked once per
        forwarded request, where ``len`` would walk the queue."""
        return bool(self._waiters)

    def wait(self, timeout: float) -> asyncio.Future[T | None]:
        """A place in the queue; raises :class:`QueueFull` when there is none."""
        if len(self._waiters) >= self.limit:
            # Waiters whose client left stay in the deque until handed over; drop them first.
            self._waiters = collections.deque(f for f in self._waiters if not f.done())
            if len(self._waiters) >= self.limit:
                raise QueueFull()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[T | None] = loop.create_future()
        timer = loop.call_later(timeout, _expire, future)
        future.add_done_callback(lambda _: timer.cancel())
        self._waiters.append(future)
        return future

    def hand(self, value: T) -> bool:
        """Give ``value`` to the oldest live waiter; False if nobody waits."""
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(value)
                return True
        return False

    def fail_all(self) -> None:
        """Resolve every waiter with None (the pool is closing)."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)


def _expire(future: asyncio.Future[T | None]) -> None:
    if not future.done():
        future.set_result(None)
