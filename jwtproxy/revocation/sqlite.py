"""SQLite revocation backend: one WAL database per host, shared by every worker.

Theory of operation
-------------------
* Storage: two ``WITHOUT ROWID`` tables, ``revoked_jti(jti PRIMARY KEY, exp)`` and
  ``revoked_sub(sub PRIMARY KEY, before)``. WAL journal (readers never block the writer and the
  other way round), ``synchronous=FULL`` (a commit is on disk before ``revoke_*`` returns, so a
  revocation that returned success survives a crash or power loss), ``busy_timeout`` 5 s (several
  workers writing or pruning at once wait instead of failing). Upserts keep the larger
  ``exp`` / ``before`` (see :mod:`jwtproxy.revocation`).
* One thread per store owns the sqlite connection (a single-thread executor), so every database
  call is serialised in submission order and the event loop never waits on a lock or an fsync.
  That thread is also the only writer of the mirror, so the mirror always reflects the database
  in the order the thread saw it: an own write lands in the mirror right after its commit, and a
  reload cannot overtake a later write.
* Change detection: ``PRAGMA data_version`` changes when *another* connection (another worker, the
  admin process, the CLI) committed. A timer checks it every ``poll_interval`` (200 ms; the check
  reads shared memory, no disk I/O) and reloads the whole mirror only when it moved. Propagation
  to every worker of the host is therefore <= poll_interval + reload time.
* Expiry: every ``prune_interval`` (60 s) each store drops jti entries past ``exp + grace`` from its
  mirror and deletes them from the table (several workers doing it is harmless).
* Failure: a failing poll keeps the last mirror and is retried at the next tick (``status()``
  shows ``up: false`` and the error); a failing write raises ``RevocationBackendError``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from .core import (
    EXPIRY_GRACE,
    Log,
    RevocationBackendError,
    RevocationMirror,
    check_id,
    check_time,
)

__all__ = ["SqliteRevocationStore"]

T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 5000
SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS revoked_jti (jti TEXT PRIMARY KEY NOT NULL, exp REAL NOT NULL)"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS revoked_sub (sub TEXT PRIMARY KEY NOT NULL, before REAL NOT NULL)"
    " WITHOUT ROWID",
)


class SqliteRevocationStore(RevocationMirror):
    """Revocations in a local SQLite file (``[revocation] backend = "sqlite"``)."""

    def __init__(
        self,
        path: str,
        log: Log,
        *,
        poll_interval: float = 0.2,
        prune_interval: float = 60.0,
        grace: float = EXPIRY_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(log, grace)
        self.path = path
        self.poll_interval = poll_interval
        self.prune_interval = prune_interval
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._data_version = -1
        self._poller: asyncio.Task[None] | None = None
        self._next_prune = 0.0
        self._up = False
        self._last_error: str | None = None
        self._reloads = 0
        self._last_reload: float | None = None
        self._poll_errors = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating if needed) the database, load the mirror, start the change poller.

        Raises RevocationBackendError if the database cannot be opened: without it no
        revocation could be enforced, so the caller must not serve as if it could.
        """
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="jwtproxy-revocation")
        try:
            await self._run(self._open)
        except sqlite3.Error as exc:
            await self.close()
            raise RevocationBackendError(f"cannot open revocation database {self.path!r}: {exc}") from exc
        self._up = True
        self._next_prune = self._clock() + self.prune_interval
        self._poller = asyncio.get_running_loop().create_task(
            self._poll_loop(), name="jwtproxy-revocation-sqlite")

    async def close(self) -> None:
        """Stop polling and close the database."""
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
            executor.shutdown(wait=True)
        self._up = False

    # -- writes ---------------------------------------------------------------------------------

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Store (durably) and mirror a jti revocation; keeps the larger exp if already there."""
        check_id("jti", jti)
        exp = check_time("exp", exp)
        await self._write(self._do_revoke_jti, jti, exp)

    async def revoke_sub(self, sub: str, before: float) -> None:
        """Store (durably) and mirror a subject revocation; keeps the larger ``before``."""
        check_id("sub", sub)
        before = check_time("before", before)
        await self._write(self._do_revoke_sub, sub, before)

    async def unrevoke_jti(self, jti: str) -> bool:
        """Delete a jti revocation; False if none was stored."""
        return await self._write(self._do_delete, "revoked_jti", "jti", jti)

    async def unrevoke_sub(self, sub: str) -> bool:
        """Delete a subject revocation; False if none was stored."""
        return await self._write(self._do_delete, "revoked_sub", "sub", sub)

    def status(self) -> dict[str, Any]:
        """``{"backend": "sqlite", "up": bool, "path", "jti", "sub", "reloads", "last_reload",
        "poll_errors", "last_error"}``."""
        return {
            "backend": "sqlite",
            "up": self._up,
            "path": self.path,
            "jti": len(self._jti),
            "sub": len(self._sub),
            "reloads": self._reloads,
            "last_reload": self._last_reload,
            "poll_errors": self._poll_errors,
            "last_error": self._last_error,
        }

    # -- loop side ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RevocationBackendError("revocation store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._run(fn, *args)
        except sqlite3.Error as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"
            raise RevocationBackendError(f"sqlite write failed: {exc}") from exc

    async def _poll_loop(self) -> None:
        # A timer, not an event: SQLite has no change notification across processes, and
        # data_version is the cheap way to ask (shared-memory read, no I/O).
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._run(self._poll)
            except sqlite3.Error as exc:
                self._poll_errors += 1
                error = f"{type(exc).__name__}: {exc}"
                if self._up or error != self._last_error:
                    self._log("revocation: sqlite poll failed, keeping the last %d/%d entries: %s",
                              len(self._jti), len(self._sub), error)
                self._up = False
                self._last_error = error
            else:
                if not self._up:
                    self._log("revocation: sqlite database readable again")
                self._up = True

    # -- executor thread (the only user of self._conn and the only writer of the mirror) ---------

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # e.g. a filesystem without shared memory: still correct, just less concurrent.
                self._log("revocation: sqlite journal_mode is %s, not wal", mode)
            conn.execute("PRAGMA synchronous=FULL")
            for statement in SCHEMA:
                conn.execute(statement)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn
        self._data_version = self._read_data_version()
        self._load()

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("revocation database is closed")
        return self._conn

    def _read_data_version(self) -> int:
        return int(self._connection().execute("PRAGMA data_version").fetchone()[0])

    def _poll(self) -> None:
        version = self._read_data_version()
        if version != self._data_version:
            # Read the version *before* loading: a commit landing during the load moves it
            # again and the next tick reloads.
            self._data_version = version
            self._load()
        now = self._clock()
        if now >= self._next_prune:
            self._next_prune = now + self.prune_interval
            self._prune(now)

    def _load(self) -> None:
        conn = self._connection()
        limit = self._clock() - self._grace
        conn.execute("BEGIN")  # one read snapshot for both tables
        try:
            jti = {k: float(v) for k, v in conn.execute(
                "SELECT jti, exp FROM revoked_jti WHERE exp >= ?", (limit,))}
            sub = {k: float(v) for k, v in conn.execute("SELECT sub, before FROM revoked_sub")}
        finally:
            conn.execute("COMMIT")
        # Attribute swaps: the loop thread's is_revoked sees either the old or the new dict.
        self._jti = jti
        self._sub = sub
        self._reloads += 1
        self._last_reload = self._clock()

    def _prune(self, now: float) -> None:
        if not self._prune_mirror(now):
            return
        conn = self._connection()
        with _transaction(conn):
            conn.execute("DELETE FROM revoked_jti WHERE exp < ?", (now - self._grace,))

    def _do_revoke_jti(self, jti: str, exp: float) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.execute(
                "INSERT INTO revoked_jti (jti, exp) VALUES (?, ?)"
                " ON CONFLICT (jti) DO UPDATE SET exp = max(exp, excluded.exp)", (jti, exp))
        self._mirror_jti(jti, exp)

    def _do_revoke_sub(self, sub: str, before: float) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.execute(
                "INSERT INTO revoked_sub (sub, before) VALUES (?, ?)"
                " ON CONFLICT (sub) DO UPDATE SET before = max(before, excluded.before)",
                (sub, before))
        self._mirror_sub(sub, before)

    def _do_delete(self, table: str, column: str, key: str) -> bool:
        conn = self._connection()
        with _transaction(conn):
            # table/column come from the two literal call sites above, never from input.
            deleted = conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,)).rowcount
        mirror = self._jti if table == "revoked_jti" else self._sub
        in_mirror = mirror.pop(key, None) is not None
        return deleted > 0 or in_mirror


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on an autocommit connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so busy_timeout applies here rather than
        # as a deadlock-prone upgrade in the middle of the transaction.
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
