"""A host-wide table shared by every forked worker of one supervisor.

Theory of operation
-------------------
* *What it is for.* State that must be exact across the workers of a host, not guessed per worker:
  rate-limit cells (contract §5.5, a read-modify-write per request), the DPoP proofs' ``jti`` seen
  within their window (contract §5.2, "insert if absent"), and counters summed over the workers
  (upstream connections per target). One table holds one kind of state; each user creates its own.
* *Memory.* One ``MAP_SHARED`` mapping of an anonymous memory file (``memfd_create``; an unlinked
  temporary file where that is missing), created by the supervisor **before** it forks. Every
  worker, and every worker of every later reload generation, inherits the same pages, so a write
  by one worker is seen by all of them at once, and no worker ever opens or names a file. The
  mapping is fixed at creation: the table never grows, and no operation allocates shared memory.
* *Layout.* ``capacity`` slots in buckets of ``WAYS`` (16) slots. A bucket is the 16-byte keys of
  its slots side by side, then per slot ``expires`` and ``values`` float64s (``values`` fixed per
  table)::

      bucket = key[0] .. key[15] | expires[0] v[0][0] .. v[0][n-1] | .. | expires[15] v[15][0] ..

  The key of a slot is a 16-byte keyed BLAKE2b digest of the caller's key, salted with 16 random
  bytes drawn when the table is created (inherited by the workers, new with every supervisor), so a
  client choosing its address, claim values or tokens cannot aim many keys at one bucket, and two
  distinct keys sharing a slot is a 2**-128 event. The all-zero digest marks an empty slot.
* *Open addressing, bounded.* A key lives in the bucket its digest names (and nowhere else): a
  lookup searches that bucket's 256 key bytes and finds the digest at a slot boundary; an insert takes
  a slot of the bucket that is empty or expired, else evicts the slot that expires first (the one
  with the least life left). Probing is therefore bounded by one bucket, deletion needs no
  tombstones, a full table evicts instead of growing or failing, and every operation costs the
  same however full the table is. Evictions of live slots are counted in :attr:`evictions` (per
  process). Sixteen ways keep them rare until the table fills: with live entries at a quarter of
  ``capacity`` a given bucket overflows with probability ~1e-6, at half ~4e-3 (Poisson tails).
  Size a table at four times the entries it must hold: an evicted ``jti`` could be replayed.
* *Expiry.* A slot whose ``expires <= now`` is absent to every operation, and reusable. ``now`` is
  a parameter (the caller's clock; workers of one host share ``time.time()``); no clock is read
  here. Counters (:meth:`add`) use ``expires = inf`` and free their slot when their sum returns to
  zero.
* *Locks.* Buckets are spread over ``stripes`` lock stripes (bucket ``b`` -> stripe
  ``b % stripes``). A stripe is a POSIX record lock (``fcntl`` ``F_SETLK``) on one byte of the
  memory file, taken around each operation, plus a per-process ``threading.Lock`` (record locks
  exclude processes, not threads). Why record locks rather than semaphores in the mapping
  (``multiprocessing.Lock``, ~0.2 µs against ~1.2 µs a pair here): the kernel releases a record
  lock when its holder dies, and the supervisor ends stuck workers with ``SIGKILL``; a semaphore
  held by a killed worker would stay taken and wedge its stripe for every later worker. Record
  locks are not inherited over ``fork``, so a child never starts out holding its parent's lock.
* *Never forever.* A stripe is first tried without blocking; while another process holds it (a
  critical section is a few microseconds) the caller retries with a short sleep, and after
  ``lock_timeout`` (default 1 s: only a stopped or traced holder gets there) it raises
  :class:`SharedTableBusy`, which the caller turns into its own fail-closed answer.
* *What runs under the lock.* :meth:`update` runs the caller's function under the stripe lock, so a
  read-modify-write (a GCRA cell) is atomic across workers; the function must be short and pure (no
  I/O, no awaiting; it is called at most once).
"""

from __future__ import annotations

import errno
import fcntl
import math
import mmap
import os
import struct
import tempfile
import threading
import time
import weakref
from hashlib import blake2b as _blake2b
from collections.abc import Callable
from typing import Final, TypeVar

__all__ = ["SharedTable", "SharedTableBusy", "WAYS"]

T = TypeVar("T")

WAYS: Final = 16
DIGEST_BYTES: Final = 16
EMPTY: Final = bytes(DIGEST_BYTES)
KEYS_BYTES: Final = WAYS * DIGEST_BYTES
INFINITY: Final = math.inf

# Retry pauses while another process holds a stripe: the first retries only yield the CPU (the
# holder needs microseconds), later ones back off so a stopped holder does not cost a busy core.
_RETRY_PAUSES: Final = (0.0, 0.0, 0.0, 0.00001, 0.0001, 0.001)
_BUSY_ERRNOS: Final = (errno.EAGAIN, errno.EACCES)
_lockf: Final = fcntl.lockf
_EXCLUSIVE_NOWAIT: Final = fcntl.LOCK_EX | fcntl.LOCK_NB
_UNLOCK: Final = fcntl.LOCK_UN


class SharedTableBusy(Exception):
    """A stripe stayed locked past ``lock_timeout`` (its holder is stopped, not dead).

    An ``Exception``, not a ``RuntimeError``: this module is compiled (``jwtproxy.compiled``), and
    mypyc derives a compiled class from ``Exception`` but from no other built-in exception."""


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _memory_file(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes with no name anywhere."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("jwtproxy-sharedtable", os.MFD_CLOEXEC)
    else:  # pragma: no cover - memfd is there on every Linux this runs on
        fd, path = tempfile.mkstemp(prefix="jwtproxy-sharedtable-")
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
        # Allocate the pages now, in the supervisor, rather than one page fault at a time on the
        # request path of whichever worker touches a page first.
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


# The thread locks of the tables alive in this process. A fork may happen while a thread of the
# parent holds one; the child would inherit it locked with no thread to release it, so every child
# starts with fresh ones (record locks need no such care: they are never inherited). A table's lock
# sits in a one-item list that the table and this registry share, and the registry is keyed by the
# table's mapping: a compiled class has no weak references, an ``mmap`` has, and the entry goes
# with the table (nothing else holds its mapping).
_THREAD_LOCKS: weakref.WeakKeyDictionary[mmap.mmap, list[threading.Lock]] = weakref.WeakKeyDictionary()


def _fresh_thread_locks() -> None:
    for holder in list(_THREAD_LOCKS.values()):
        holder[0] = threading.Lock()


os.register_at_fork(after_in_child=_fresh_thread_locks)


class SharedTable:
    """A fixed-capacity hash table in shared memory (see the module docstring).

    Keys are ``bytes`` of any length (hashed here); each slot holds ``values`` float64s and an
    expiry. Every operation takes ``now`` and treats slots with ``expires <= now`` as absent.
    """

    __slots__ = (
        "capacity", "values", "stripes", "lock_timeout", "evictions",
        "_buckets", "_bucket_bytes", "_record", "_records", "_fd", "_map", "_salt",
        "_thread_lock", "_zero_values", "_closer",
    )

    def __init__(self, capacity: int, *, values: int = 1, stripes: int = 64,
                 lock_timeout: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if values < 0:
            raise ValueError("values must be >= 0")
        if stripes < 1:
            raise ValueError("stripes must be >= 1")
        self._buckets = -(-capacity // WAYS)
        self.capacity = self._buckets * WAYS
        self.values = values
        self.stripes = min(stripes, self._buckets)
        self.lock_timeout = lock_timeout
        self.evictions = 0
        self._record = struct.Struct(f"<{1 + values}d")
        self._records = struct.Struct(f"<{WAYS * (1 + values)}d")
        self._bucket_bytes = KEYS_BYTES + self._records.size
        self._fd = _memory_file(self._buckets * self._bucket_bytes)
        self._map = mmap.mmap(self._fd, self._buckets * self._bucket_bytes, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        # A table dropped without close() must not keep its descriptor: it is closed when the
        # mapping, which only the table holds, is collected; close() runs the same finaliser once.
        self._closer = weakref.finalize(self._map, _close_fd, self._fd)
        self._salt = os.urandom(16)
        self._thread_lock: list[threading.Lock] = [threading.Lock()]  # see _THREAD_LOCKS
        _THREAD_LOCKS[self._map] = self._thread_lock
        self._zero_values = (0.0,) * values

    # -- keys and locks ----------------------------------------------------------------------

    def _locate(self, key: bytes) -> tuple[bytes, int, int]:
        """``(digest, bucket offset, stripe)`` of ``key``."""
        digest = _blake2b(self._salt + key, digest_size=DIGEST_BYTES).digest()
        if digest == EMPTY:
            digest = b"\x01" + EMPTY[1:]
        bucket = int.from_bytes(digest[:8], "little") % self._buckets
        return digest, bucket * self._bucket_bytes, bucket % self.stripes

    def _lock(self, stripe: int) -> None:
        if not self._thread_lock[0].acquire(False):
            self._lock_slowly(stripe)
        else:
            try:
                _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
            except OSError as exc:
                self._stripe_busy(stripe, exc)

    def _lock_slowly(self, stripe: int) -> None:
        """Take the stripe when another thread of this process holds the thread lock."""
        if not self._thread_lock[0].acquire(timeout=self.lock_timeout):
            raise SharedTableBusy(f"table locked by another thread for more than "
                                  f"{self.lock_timeout} s")
        try:
            _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
        except OSError as exc:
            self._stripe_busy(stripe, exc)

    def _stripe_busy(self, stripe: int, exc: OSError) -> None:
        """The thread lock is held and the record lock was not free: wait for it (bounded), or
        release the thread lock and raise."""
        try:
            if exc.errno not in _BUSY_ERRNOS:
                raise exc
            self._wait_for(stripe)
        except BaseException:
            self._thread_lock[0].release()
            raise

    def _wait_for(self, stripe: int) -> None:
        deadline = time.monotonic() + self.lock_timeout
        attempt = 0
        while True:
            time.sleep(_RETRY_PAUSES[min(attempt, len(_RETRY_PAUSES) - 1)])
            attempt += 1
            try:
                _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
                return
            except OSError as exc:
                if exc.errno not in _BUSY_ERRNOS:
                    raise
            if time.monotonic() >= deadline:
                raise SharedTableBusy(f"stripe {stripe} locked for more than "
                                      f"{self.lock_timeout} s")

    def _unlock(self, stripe: int) -> None:
        try:
            _lockf(self._fd, _UNLOCK, 1, stripe)
        finally:
            self._thread_lock[0].release()

    # -- slots (callers hold the bucket's stripe) --------------------------------------------

    def _find(self, base: int, digest: bytes) -> int:
        """The way of ``digest`` in the bucket at ``base``, or -1."""
        end = base + KEYS_BYTES
        pos = self._map.find(digest, base, end)
        while pos >= 0 and (pos - base) % DIGEST_BYTES:
            pos = self._map.find(digest, pos + 1, end)
        return -1 if pos < 0 else (pos - base) // DIGEST_BYTES

    def _record_at(self, base: int, way: int) -> int:
        return base + KEYS_BYTES + way * self._record.size

    def _live(self, base: int, way: int, now: float) -> tuple[float, ...] | None:
        """The slot's record ``(expires, *values)`` if it has not expired."""
        record = self._record.unpack_from(self._map, self._record_at(base, way))
        return record if record[0] > now else None

    def _claim(self, base: int, digest: bytes, now: float) -> int:
        """A way for a new key: an empty or expired slot, else the one expiring first."""
        mapping, end = self._map, base + KEYS_BYTES
        pos = mapping.find(EMPTY, base, end)  # a never used or freed slot: found in C
        while pos >= 0 and (pos - base) % DIGEST_BYTES:
            pos = mapping.find(EMPTY, pos + 1, end)
        if pos >= 0:
            mapping[pos:pos + DIGEST_BYTES] = digest
            return (pos - base) // DIGEST_BYTES
        records = self._records.unpack_from(mapping, end)
        stride = 1 + self.values
        victim, soonest = 0, INFINITY
        for way in range(WAYS):
            expires = records[way * stride]
            if expires <= now:
                victim = way
                break
            if expires < soonest:
                victim, soonest = way, expires
        else:
            self.evictions += 1
        self._map[base + victim * DIGEST_BYTES:base + (victim + 1) * DIGEST_BYTES] = digest
        return victim

    def _write(self, base: int, way: int, expires: float, values: tuple[float, ...]) -> None:
        self._record.pack_into(self._map, self._record_at(base, way), expires, *values)

    def _free(self, base: int, way: int) -> None:
        self._map[base + way * DIGEST_BYTES:base + (way + 1) * DIGEST_BYTES] = EMPTY
        self._record.pack_into(self._map, self._record_at(base, way), 0.0, *self._zero_values)

    # -- operations --------------------------------------------------------------------------

    # get, insert_if_absent and update run on the request path: they take the stripe's locks and
    # search the bucket inline (the fast path of _lock/_find/_live), each call saved being ~0.1 µs
    # of a ~2-3 µs operation. The slow path (a busy stripe) goes through _lock_slowly.

    def get(self, key: bytes, now: float) -> tuple[float, ...] | None:
        """The values of ``key`` if it is present and not expired."""
        digest = _blake2b(self._salt + key, digest_size=DIGEST_BYTES).digest()
        bucket = int.from_bytes(digest[:8], "little") % self._buckets
        base = bucket * self._bucket_bytes
        stripe = bucket % self.stripes
        if not self._thread_lock[0].acquire(False):
            self._lock_slowly(stripe)
        else:
            try:
                _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
            except OSError as exc:
                self._stripe_busy(stripe, exc)
        try:
            mapping, end = self._map, base + KEYS_BYTES
            pos = mapping.find(digest, base, end)
            while pos >= 0 and (pos - base) % DIGEST_BYTES:
                pos = mapping.find(digest, pos + 1, end)
            if pos < 0:
                return None
            record = self._record.unpack_from(
                mapping, end + (pos - base) // DIGEST_BYTES * self._record.size)
        finally:
            self._unlock(stripe)
        return record[1:] if record[0] > now else None

    def expires(self, key: bytes, now: float) -> float | None:
        """When ``key`` expires, if it is present and not expired."""
        digest, base, stripe = self._locate(key)
        self._lock(stripe)
        try:
            way = self._find(base, digest)
            record = self._live(base, way, now) if way >= 0 else None
        finally:
            self._unlock(stripe)
        return None if record is None else record[0]

    def insert_if_absent(self, key: bytes, expires: float, now: float,
                         values: tuple[float, ...] | None = None) -> bool:
        """Remember ``key`` until ``expires`` unless it is already present: True if it was absent
        (and is now stored), False if a live entry exists (which is left as it is).

        A DPoP proof's ``jti`` is single-use this way: the first worker to insert it wins."""
        digest = _blake2b(self._salt + key, digest_size=DIGEST_BYTES).digest()
        bucket = int.from_bytes(digest[:8], "little") % self._buckets
        base = bucket * self._bucket_bytes
        stripe = bucket % self.stripes
        if not self._thread_lock[0].acquire(False):
            self._lock_slowly(stripe)
        else:
            try:
                _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
            except OSError as exc:
                self._stripe_busy(stripe, exc)
        try:
            mapping, end = self._map, base + KEYS_BYTES
            pos = mapping.find(digest, base, end)
            while pos >= 0 and (pos - base) % DIGEST_BYTES:
                pos = mapping.find(digest, pos + 1, end)
            if pos >= 0:
                way = (pos - base) // DIGEST_BYTES
                if self._record.unpack_from(mapping, end + way * self._record.size)[0] > now:
                    return False
            else:
                way = self._claim(base, digest, now)
            self._record.pack_into(mapping, end + way * self._record.size, expires,
                                   *(values if values is not None else self._zero_values))
            return True
        finally:
            self._unlock(stripe)

    def put(self, key: bytes, values: tuple[float, ...], expires: float, now: float) -> None:
        """Store ``values`` under ``key`` until ``expires`` (replacing any entry)."""
        digest, base, stripe = self._locate(key)
        self._lock(stripe)
        try:
            way = self._find(base, digest)
            if way < 0:
                way = self._claim(base, digest, now)
            self._write(base, way, expires, values)
        finally:
            self._unlock(stripe)

    def update(
        self, key: bytes, now: float,
        fn: Callable[[tuple[float, ...] | None, float], tuple[tuple[float, ...] | None, float, T]],
    ) -> T:
        """Atomic read-modify-write of ``key`` across all processes.

        ``fn(current, now)`` gets the live values (or None) and ``now``, and returns
        ``(new_values, expires, result)``: ``new_values`` None leaves the slot as it is; otherwise
        they are stored until ``expires``. ``result`` is returned. ``fn`` runs under the stripe
        lock: keep it short."""
        digest = _blake2b(self._salt + key, digest_size=DIGEST_BYTES).digest()
        bucket = int.from_bytes(digest[:8], "little") % self._buckets
        base = bucket * self._bucket_bytes
        stripe = bucket % self.stripes
        if not self._thread_lock[0].acquire(False):
            self._lock_slowly(stripe)
        else:
            try:
                _lockf(self._fd, _EXCLUSIVE_NOWAIT, 1, stripe)
            except OSError as exc:
                self._stripe_busy(stripe, exc)
        try:
            mapping, end, record_struct = self._map, base + KEYS_BYTES, self._record
            pos = mapping.find(digest, base, end)
            while pos >= 0 and (pos - base) % DIGEST_BYTES:
                pos = mapping.find(digest, pos + 1, end)
            if pos >= 0:
                way = (pos - base) // DIGEST_BYTES
                record = record_struct.unpack_from(mapping, end + way * record_struct.size)
                new_values, expires, result = fn(record[1:] if record[0] > now else None, now)
            else:
                way = -1
                new_values, expires, result = fn(None, now)
            if new_values is not None:
                if way < 0:
                    way = self._claim(base, digest, now)
                record_struct.pack_into(mapping, end + way * record_struct.size, expires,
                                        *new_values)
            return result
        finally:
            self._unlock(stripe)

    def add(self, key: bytes, delta: float, now: float, *, column: int = 0,
            limit: float | None = None) -> float | None:
        """Add ``delta`` to value ``column`` of a counter and return the sum of its values.

        With ``limit``, an increase that would take the sum above ``limit`` is refused (nothing
        changes, None is returned). A counter never expires; when its sum returns to zero its
        slot is freed. One column per process (see :meth:`clear_column`) gives a count summed over
        the workers that survives a worker's death."""
        if not 0 <= column < self.values:
            raise IndexError(f"column {column} out of range 0..{self.values - 1}")
        digest, base, stripe = self._locate(key)
        self._lock(stripe)
        try:
            way = self._find(base, digest)
            record = self._live(base, way, now) if way >= 0 else None
            values = list(record[1:]) if record is not None else [0.0] * self.values
            total = math.fsum(values)
            if limit is not None and delta > 0 and total + delta > limit:
                return None
            values[column] += delta
            total += delta
            if way < 0:
                if total == 0.0:
                    return 0.0
                way = self._claim(base, digest, now)
            if total == 0.0 and not any(values):
                self._free(base, way)
            else:
                self._write(base, way, INFINITY, tuple(values))
            return total
        finally:
            self._unlock(stripe)

    def total(self, key: bytes, now: float) -> float:
        """The sum of ``key``'s values (0 when absent)."""
        values = self.get(key, now)
        return 0.0 if values is None else math.fsum(values)

    def delete(self, key: bytes) -> bool:
        """Forget ``key``; True if it was present (expired or not)."""
        digest, base, stripe = self._locate(key)
        self._lock(stripe)
        try:
            way = self._find(base, digest)
            if way < 0:
                return False
            self._free(base, way)
            return True
        finally:
            self._unlock(stripe)

    def clear_column(self, column: int) -> None:
        """Zero value ``column`` in every slot: what the supervisor does for a worker that exited,
        so the counts it held (say, open upstream connections) stop counting against the others."""
        if not 0 <= column < self.values:
            raise IndexError(f"column {column} out of range 0..{self.values - 1}")
        stride = 1 + self.values
        for bucket in range(self._buckets):
            base = bucket * self._bucket_bytes
            stripe = bucket % self.stripes
            self._lock(stripe)
            try:
                records = self._records.unpack_from(self._map, base + KEYS_BYTES)
                for way in range(WAYS):
                    if records[way * stride + 1 + column] != 0.0:
                        values = list(records[way * stride + 1:(way + 1) * stride])
                        values[column] = 0.0
                        if records[way * stride] == INFINITY and not any(values):
                            self._free(base, way)
                        else:
                            self._write(base, way, records[way * stride], tuple(values))
            finally:
                self._unlock(stripe)

    def live(self, now: float) -> int:
        """How many slots hold a live entry (walks the table: for tests and status, not per
        request)."""
        stride = 1 + self.values
        count = 0
        for bucket in range(self._buckets):
            base = bucket * self._bucket_bytes
            records = self._records.unpack_from(self._map, base + KEYS_BYTES)
            count += sum(1 for way in range(WAYS) if records[way * stride] > now)
        return count

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (in this process)."""
        return self._map.closed

    def close(self) -> None:
        """Unmap and close this process's view (other processes keep theirs); idempotent."""
        self._map.close()
        self._closer()
