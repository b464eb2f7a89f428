"""The supervisor: binds the listeners, forks the workers, reloads, drains, restarts.

Theory of operation
-------------------
Process model (``jwtproxy serve``)::

    supervisor (systemd main PID, stdlib asyncio loop)
      |- listening sockets (traffic, then [authz]), bound here once, inherited by every worker
      |  (one shared accept queue per address: the kernel hands each connection to exactly one
      |  worker)
      |- admin listener (aiohttp), revocation store, /metrics aggregation, sd_notify
      '- N workers: os.fork(), then uvloop.run(serve_worker(config, sockets, inheritance))

* Signals: the supervisor's handlers only queue the signal (``loop.add_signal_handler``
  writes to the loop's wakeup fd); one dispatcher task handles SIGHUP/SIGTERM/SIGINT in
  order. SIGCHLD just reaps (``waitpid(pid, WNOHANG)`` for known workers only).
* Fork safety: signals are blocked around ``fork()`` so none can reach the child while it
  still has the parent's handlers and wakeup fd (a SIGTERM there would be written into the
  *parent's* loop). The child resets its handlers, clears the wakeup fd and the inherited
  "running loop", closes the parent's fds (admin socket, other workers' links), drops the
  sd_notify variables, ignores SIGINT/SIGHUP (the supervisor owns those: Ctrl-C and
  reloads reach the workers as an orderly SIGTERM) and starts a fresh uvloop. It leaves
  with ``os._exit`` so nothing of the parent's state is finalised twice.
* Inheritance: everything a worker takes over besides config and sockets travels on one
  ``WorkerInheritance`` (``jwtproxy.workerlink``): the link below, the last-good-keys
  directory, the revocation mirror at fork, the assertion signing key generated here, and the
  host's limit tables (``jwtproxy.connlimits.HostTables``: shared memory made once, before the
  first fork, so every generation counts rate limits and upstream connections in the same
  place) with the column of the connection counters the worker writes; the column is cleared
  when the worker exits, however it ends, so a killed worker's connections stop counting.
* Assertion keys (contract §5.4): with ``[assertion] enabled`` and no ``key_files``, one key per
  algorithm is generated here, before the first fork that needs it, and kept for the life of the
  process: every worker of every generation signs with it and the admin JWKS publishes it until
  exit. The JWKS also lists the ``key_files`` keys of the current config and, while a reload is
  starting its new generation, of the new one, so a new signing key is published before the
  first assertion it signs reaches a backend.
* Worker link: a SOCK_SEQPACKET socketpair (message boundaries, no partial writes).
  ``WorkerControl.ready()`` / ``report(status)`` / a heartbeat every ``heartbeat_interval``
  started by ``ready()``. A worker whose heartbeat stops for ``hang_timeout`` is SIGKILLed
  and replaced; a worker that finds the link closed (supervisor gone) SIGTERMs itself.
* Generations: every (re)start of the worker set is a generation. Only workers of the
  current generation are replaced when they die (after 1 s of life the failure count
  resets; otherwise exponential backoff 0.5 s .. 30 s). SIGHUP: load + validate; on success
  start a complete new generation on the same (plus any new) sockets, wait until all of it
  reported ready, then SIGTERM the old generation, which stops accepting and drains; since
  the accept queues are shared, no connection is refused during the swap. Any failure
  (invalid config, bind error, a new worker dying or not ready in ``ready_timeout``) keeps
  the old generation serving.
* Stopping: STOPPING=1, SIGTERM to every worker, SIGKILL to any still running
  ``shutdown_timeout + stop_margin`` after its SIGTERM; exit code 0.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Iterable, Protocol

from aiohttp import web

from . import compiled, systemd
from .accesslog import log_event
from .admin import compute_readiness, make_admin_app
from .assertion import AssertionKey, generate_key, jwks_json
from .config import Config, ConfigError, ListenAddr, RevocationConfig
from .dpopreplay import TABLE_CAPACITY
from .connlimits import HostTables, WorkerColumns
from .metrics import (
    METRICS_CONTENT_TYPE,
    SupervisorMetrics,
    counter_totals,
    enable_multiprocess,
    mark_worker_dead,
    render_metrics,
)
from .revocation import Log, RevocationStore, open_store, parse_revocation_request
from .sharedtable import SharedTable
from .statuspage import RateWindow, WorkerView, build_status
from .workerlink import WorkerControl, WorkerInheritance

__all__ = ["Supervisor", "WorkerTarget", "bind_listener"]

_QUEUED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: A listening socket's identity: its kind ("traffic" or "authz") and address. Two kinds may both
#: list "127.0.0.1:0" (each gets a port of its own), so the address alone is not a key.
ListenKey = tuple[str, ListenAddr]


def listen_keys(config: Config) -> list[ListenKey]:
    """Every listener of ``config``, in the order a worker takes its sockets (traffic, then authz:
    ``jwtproxy.worker.split_listeners``)."""
    return [("traffic", a) for a in config.server.listen] + [("authz", a) for a in config.authz.listen]
_BLOCK_AROUND_FORK = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_MAX_MESSAGE = 1 << 20
#: The counters behind the status page's per-minute figures.
_TRAFFIC_COUNTERS = {
    "requests": ("jwtproxy_requests", ("route", "status")),
    "auth_failures": ("jwtproxy_auth_failures", ("reason",)),
}


# ---------------------------------------------------------------------------------------------
# Worker side


class WorkerTarget(Protocol):
    """What runs in a worker process: ``jwtproxy.worker.serve_worker`` or a test's stand-in."""

    def __call__(self, config: Config, sockets: list[socket.socket],
                 inheritance: WorkerInheritance) -> Coroutine[Any, Any, None]: ...


# ---------------------------------------------------------------------------------------------
# Sockets


def bind_listener(addr: ListenAddr, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening TCP socket for ``addr`` (SO_REUSEADDR; IPv6 sockets are
    IPV6_V6ONLY so "[::]:p" and "0.0.0.0:p" can be listed side by side)."""
    infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _type, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------------------
# Supervisor side


@dataclass(eq=False)
class _Worker:
    worker_id: int
    generation: int
    pid: int
    link: socket.socket
    config: Config
    started: float
    last_seen: float
    ready: bool = False
    report: dict[str, Any] | None = None
    stopping: bool = False
    kill_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    limit_column: int = 0


def _default_target() -> WorkerTarget:
    from .worker import serve_worker  # imported in the child: the supervisor never needs the hot path
    return serve_worker


def _store_log(message: str, *args: Any, **fields: Any) -> None:
    """printf-style logger handed to the revocation store."""
    try:
        text = str(message) % args if args else str(message)
    except (TypeError, ValueError):
        text = f"{message} {args!r}"
    log_event("revocation", message=text, **fields)


class Supervisor:
    """Runs the daemon: ``Supervisor(loader).run()`` returns the exit code.

    config_loader: returns a validated Config or raises ConfigError (called at start unless
        ``config`` is given, and on every SIGHUP).
    worker_target: ``async (config, sockets, inheritance) -> None`` run in each worker under
        uvloop; default ``jwtproxy.worker.serve_worker``.
    open_store: builds the revocation store the admin API writes to and whose mirror every
        worker inherits; default ``jwtproxy.revocation.open_store``.
    on_ready: called once, when every worker of the first generation is ready.
    """

    def __init__(
        self,
        config_loader: Callable[[], Config],
        worker_target: WorkerTarget | None = None,
        *,
        config: Config | None = None,
        ready_timeout: float = 30.0,
        hang_timeout: float = 30.0,
        heartbeat_interval: float = 1.0,
        stop_margin: float = systemd.STOP_MARGIN,
        max_backoff: float = 30.0,
        metrics_dir: str | None = None,
        open_store: Callable[[RevocationConfig, Log], RevocationStore] = open_store,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._loader = config_loader
        self._target = worker_target
        self._initial_config = config
        self.ready_timeout = ready_timeout
        self.hang_timeout = hang_timeout
        self.heartbeat_interval = heartbeat_interval
        self.stop_margin = stop_margin
        self.max_backoff = max_backoff
        self._metrics_dir = metrics_dir
        self._open_store = open_store
        self._on_ready = on_ready

        self._config: Config | None = None
        self._sockets: dict[ListenKey, socket.socket] = {}
        self._workers: dict[int, _Worker] = {}          # by pid
        self._generation = 0
        self._failures: dict[int, int] = {}             # consecutive quick deaths per slot
        self._restart_timers: dict[int, asyncio.TimerHandle] = {}
        self._stopping = False
        self._all_ready_once = False
        self._admin_sock: socket.socket | None = None
        self._admin_runner: web.AppRunner | None = None
        self._store: RevocationStore | None = None
        self._metrics: SupervisorMetrics | None = None
        self._own_metrics_dir: str | None = None
        self._keys_dir: str | None = None
        # Made once per daemon and inherited by every worker of every generation (contract §5.2):
        # DPoP nonces from any worker are good on all, and a proof is single-use host-wide.
        self._dpop_nonce_secret = os.urandom(32)
        self._dpop_replay: SharedTable | None = None  # made in _main, before the first fork
        self._limit_tables: HostTables | None = None
        self._limit_columns: WorkerColumns | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[int] | None = None
        self._changed: asyncio.Future[None] | None = None
        self._stop_event: asyncio.Event | None = None
        self._started_at = time.time()
        self._traffic = RateWindow()
        self._assertion_keys: dict[str, AssertionKey] = {}  # generated, by algorithm
        self._reloading: Config | None = None  # the config a reload is starting workers for

    # -- entry point --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. Raises ConfigError if the initial config is invalid."""
        config = self._initial_config if self._initial_config is not None else self._loader()
        return asyncio.run(self._main(config))

    @property
    def config(self) -> Config:
        if self._config is None:
            raise RuntimeError("supervisor not started")
        return self._config

    async def _main(self, config: Config) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._config = config
        self._queue = asyncio.Queue()
        self._changed = loop.create_future()
        self._stop_event = asyncio.Event()
        self._setup_metrics()
        # Private (0700) directory where workers leave each issuer's last good JWKS, so a worker
        # started while an IdP is down (reload, restart) begins with the keys its peers had.
        self._keys_dir = tempfile.mkdtemp(prefix="jwtproxy-keys-")
        # Shared memory for the limits of every worker of every generation: made before the
        # first fork, kept for the supervisor's life (contract §5.5).
        self._limit_tables = HostTables.create()
        self._limit_columns = WorkerColumns(self._limit_tables.connections)
        addr: ListenAddr | None = None
        try:
            for key in listen_keys(config):
                addr = key[1]
                self._sockets[key] = bind_listener(addr)
        except OSError as exc:
            # The address, not only errno's text: "Address already in use" alone names no port.
            log_event("bind_failed", level="error", address=str(addr), error=str(exc))
            self._close_sockets(self._sockets.values())
            return 1
        for sig in _QUEUED_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        try:
            self._dpop_replay = SharedTable(TABLE_CAPACITY, values=0)
            # Bind the admin port before forking (a bad address fails the start cleanly),
            # but open the store and serve afterwards: workers start sooner and inherit
            # fewer of the supervisor's connections.
            if not self._bind_admin():
                return 1
            log_event("starting", pid=os.getpid(), workers=config.server.workers,
                      listen=[str(a) for a in config.server.listen],
                      authz=[str(a) for a in config.authz.listen],
                      request_path=compiled.describe())
            self._generation = 1
            for worker_id in range(config.server.workers):
                self._spawn(worker_id, self._generation, config)
            await self._open_revocation_store()
            await self._serve_admin()
            tasks = [
                asyncio.create_task(self._announce_ready()),
                asyncio.create_task(self._monitor()),
                asyncio.create_task(systemd.watchdog_loop(self._healthy)),
            ]
            try:
                await self._dispatch()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()
            return 0
        finally:
            for sig in (*_QUEUED_SIGNALS, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            await self._cleanup()

    def _setup_metrics(self) -> None:
        path = self._metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            path = self._own_metrics_dir = tempfile.mkdtemp(prefix="jwtproxy-metrics-")
        enable_multiprocess(path, clean=True)
        self._metrics = SupervisorMetrics()

    # -- signals ------------------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        # Runs on the loop (add_signal_handler), not in the C signal handler: queue only,
        # except a second Ctrl-C during shutdown, which must not wait for the queue.
        if sig in (signal.SIGTERM, signal.SIGINT):
            if self._stopping and sig == signal.SIGINT:
                log_event("shutdown_forced", level="warning")
                for w in list(self._workers.values()):
                    self._kill(w)
            assert self._stop_event is not None
            self._stop_event.set()
        assert self._queue is not None
        self._queue.put_nowait(sig)

    async def _dispatch(self) -> None:
        assert self._queue is not None
        while True:
            sig = await self._queue.get()
            if sig == signal.SIGHUP:
                if self._stop_event is not None and self._stop_event.is_set():
                    continue
                await self._reload()
            else:
                log_event("signal", signal=signal.Signals(sig).name)
                return

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self, worker_id: int, generation: int, config: Config) -> _Worker:
        loop = self._loop
        assert loop is not None
        sockets = [self._sockets[key] for key in listen_keys(config)]
        assertion_key = self._generated_assertion_key(config)  # before the fork: one key for all
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        column = self._limit_columns.take() if self._limit_columns is not None else 0
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCK_AROUND_FORK)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            parent_end.close()
            child_end.close()
            if self._limit_columns is not None:
                self._limit_columns.give_back(column)
            raise
        if pid == 0:  # child: never returns
            parent_end.close()
            self._child_main(worker_id, generation, config, sockets, child_end, old_mask, assertion_key,
                             column)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_end.close()
        parent_end.setblocking(False)
        now = loop.time()
        w = _Worker(worker_id, generation, pid, parent_end, config, started=now, last_seen=now,
                    limit_column=column)
        self._workers[pid] = w
        loop.add_reader(parent_end.fileno(), self._on_message, w)
        log_event("worker_started", worker=worker_id, pid=pid, generation=generation)
        self._update_gauges()
        return w

    def _child_main(self, worker_id: int, generation: int, config: Config,
                    sockets: list[socket.socket], link: socket.socket,
                    old_mask: Iterable[int], assertion_key: AssertionKey | None,
                    limit_column: int = 0) -> None:
        code = 1
        try:
            # Everything inherited from the supervisor is never freed in the worker: keeps
            # the cyclic GC from finalising parent objects (and touching their fds) and keeps
            # those pages shared copy-on-write.
            gc.freeze()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            # The fork happened inside the supervisor's running loop (Python 3.11 does not
            # reset this after fork); the worker starts its own.
            asyncio.events._set_running_loop(None)
            keep = {s.fileno() for s in sockets} | {link.fileno()}
            inherited = [w.link for w in self._workers.values()]
            inherited += [s for s in self._sockets.values() if s.fileno() not in keep]
            if self._admin_sock is not None:
                inherited.append(self._admin_sock)
            for s in inherited:
                try:
                    os.close(s.fileno())   # the fd only: the parent's objects stay untouched
                except OSError:
                    pass
            systemd.unset_environment()
            inheritance = WorkerInheritance(
                control=WorkerControl(worker_id, link, generation=generation,
                                      heartbeat_interval=self.heartbeat_interval),
                last_good_keys_dir=self._keys_dir,
                # The supervisor's revocation mirror, so a worker started while the backend is
                # unreachable (a respawn, a reload) still enforces every known revocation.
                revocations=self._store.snapshot() if self._store is not None else None,
                dpop_nonce_secret=self._dpop_nonce_secret,
                dpop_replay=self._dpop_replay,
                assertion_key=assertion_key,
                limit_tables=self._limit_tables,
                limit_column=limit_column,
            )
            target = self._target or _default_target()
            import uvloop
            uvloop.run(target(config, list(sockets), inheritance))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _generated_assertion_key(self, config: Config) -> AssertionKey | None:
        """The generated key ``config``'s workers sign with (None: assertions off or key_files)."""
        settings = config.assertion
        if not settings.enabled or settings.keys:
            return None
        key = self._assertion_keys.get(settings.algorithm)
        if key is None:
            key = self._assertion_keys[settings.algorithm] = generate_key(settings.algorithm)
            log_event("assertion_key_generated", algorithm=key.algorithm, kid=key.kid)
        return key

    def assertion_jwks(self) -> bytes | None:
        """The JWKS the admin listener serves, or None when there is no key to publish."""
        keys: list[AssertionKey] = []
        for config in (self._config, self._reloading):
            if config is not None and config.assertion.enabled:
                keys.extend(config.assertion.keys)
        keys.extend(self._assertion_keys.values())
        return jwks_json(keys) if keys else None

    def _on_message(self, w: _Worker) -> None:
        assert self._loop is not None
        while True:
            try:
                data = w.link.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # Worker closed its end (exiting); reaping happens on SIGCHLD.
                self._loop.remove_reader(w.link.fileno())
                return
            try:
                message = json.loads(data)
            except ValueError:
                continue
            w.last_seen = self._loop.time()
            kind = message.get("t") if isinstance(message, dict) else None
            if kind == "ready":
                if not w.ready:
                    w.ready = True
                    log_event("worker_ready", worker=w.worker_id, pid=w.pid,
                              generation=w.generation)
                    self._update_gauges()
                    self._pulse()
            elif kind == "report":
                status = message.get("status")
                if isinstance(status, dict):
                    w.report = status
                    self._update_issuer_gauges()
                    self._pulse()

    def _reap(self) -> None:
        for pid, w in list(self._workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            self._on_exit(w, os.waitstatus_to_exitcode(status))

    def _on_exit(self, w: _Worker, code: int) -> None:
        loop = self._loop
        assert loop is not None
        del self._workers[w.pid]
        if w.kill_timer is not None:
            w.kill_timer.cancel()
        try:
            loop.remove_reader(w.link.fileno())
        except (ValueError, OSError):
            pass
        w.link.close()
        mark_worker_dead(w.pid)
        if self._limit_columns is not None:
            # Its upstream connections died with it, however it ended: they stop counting.
            self._limit_columns.give_back(w.limit_column)
        uptime = round(loop.time() - w.started, 3)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        if w.stopping:
            log_event("worker_stopped", worker=w.worker_id, pid=w.pid, generation=w.generation,
                      status=how, uptime=uptime)
        else:
            log_event("worker_died", level="error", worker=w.worker_id, pid=w.pid,
                      generation=w.generation, status=how, uptime=uptime)
            if w.generation == self._generation and not self._stopping:
                self._schedule_restart(w, uptime)
        self._update_gauges()
        self._pulse()

    def _schedule_restart(self, w: _Worker, uptime: float) -> None:
        assert self._loop is not None and self._metrics is not None
        # A worker that lived a while was healthy: restart at once. Quick deaths back off
        # exponentially so a crash loop cannot fork-bomb the host or flood the journal.
        failures = 1 if uptime >= 1.0 and w.ready else self._failures.get(w.worker_id, 0) + 1
        self._failures[w.worker_id] = failures
        delay = 0.0 if failures <= 1 else min(self.max_backoff, 0.5 * 2 ** (failures - 2))
        self._metrics.worker_restarts.inc()
        log_event("worker_restart", level="warning", worker=w.worker_id, delay=delay,
                  consecutive_failures=failures)
        self._restart_timers[w.worker_id] = self._loop.call_later(
            delay, self._respawn, w.worker_id, w.generation)

    def _respawn(self, worker_id: int, generation: int) -> None:
        self._restart_timers.pop(worker_id, None)
        if self._stopping or generation != self._generation:
            return
        self._spawn(worker_id, generation, self.config)

    def _stop_worker(self, w: _Worker, timeout: float) -> None:
        """SIGTERM now, SIGKILL after ``timeout + stop_margin`` if still running."""
        assert self._loop is not None
        if w.stopping:
            return
        w.stopping = True
        try:
            os.kill(w.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        w.kill_timer = self._loop.call_later(timeout + self.stop_margin, self._kill, w)
        self._update_gauges()

    def _kill(self, w: _Worker) -> None:
        if w.pid in self._workers:
            log_event("worker_killed", level="warning", worker=w.worker_id, pid=w.pid)
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- waiting ------------------------------------------------------------------------------

    def _pulse(self) -> None:
        """Wake everything waiting in ``_wait_until`` (worker state changed)."""
        assert self._loop is not None
        fut, self._changed = self._changed, self._loop.create_future()
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait (without polling) until ``predicate()`` holds; False on timeout."""
        assert self._loop is not None
        deadline = None if timeout is None else self._loop.time() + timeout
        while not predicate():
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                return False
            assert self._changed is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)
            except TimeoutError:
                return predicate()
        return True

    def _current(self, generation: int | None = None) -> list[_Worker]:
        gen = self._generation if generation is None else generation
        return [w for w in self._workers.values() if w.generation == gen and not w.stopping]

    def _generation_ready(self, generation: int, count: int) -> bool:
        workers = self._current(generation)
        return len(workers) >= count and all(w.ready for w in workers)

    async def _announce_ready(self) -> None:
        """READY=1 once every worker of the first generation is ready."""
        config = self.config
        await self._wait_until(
            lambda: self._generation != 1 or self._generation_ready(1, config.server.workers),
            None)
        self._all_ready_once = True
        systemd.ready()
        systemd.status(f"serving with {len(self._current())} workers")
        log_event("ready", workers=[w.pid for w in self._current()])
        if self._on_ready is not None:
            self._on_ready()

    async def _monitor(self) -> None:
        """Once per heartbeat interval: hung workers, gauges, backend health."""
        assert self._loop is not None and self._metrics is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = self._loop.time()
            if self._traffic.due(now):
                self._traffic.add(now, counter_totals(_TRAFFIC_COUNTERS))
            for w in self._current():
                if w.ready and now - w.last_seen > self.hang_timeout:
                    log_event("worker_hung", level="error", worker=w.worker_id, pid=w.pid,
                              silent_for=round(now - w.last_seen, 1))
                    self._kill(w)
                elif not w.ready and self._all_ready_once and now - w.started > self.ready_timeout:
                    # A replacement that never becomes ready (reload candidates are handled
                    # by the reload itself).
                    log_event("worker_not_ready", level="error", worker=w.worker_id, pid=w.pid)
                    self._kill(w)
            if self._store is not None:
                self._metrics.revocation_backend_up.set(1 if self._store.up else 0)

    def _healthy(self) -> bool:
        """Watchdog health: the loop runs (we are here) and workers are starting or serving."""
        if not self._all_ready_once:
            return True
        return any(w.ready for w in self._current())

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        current = self._current()
        ready = sum(1 for w in current if w.ready)
        draining = sum(1 for w in self._workers.values() if w.stopping)
        self._metrics.set_workers(ready, len(current) - ready, draining)

    def _update_issuer_gauges(self) -> None:
        if self._metrics is None or self._config is None:
            return
        current = [w for w in self._current() if w.ready]
        for issuer in self._config.issuers:
            loaded = bool(current) and all(
                isinstance(w.report, dict)
                and isinstance(w.report.get("issuers", {}).get(issuer.name), dict)
                and w.report["issuers"][issuer.name].get("loaded") is True
                for w in current)
            self._metrics.issuer_keys_loaded.labels(issuer.name).set(1 if loaded else 0)

    def readiness(self) -> list[str]:
        """Reasons for /readyz to answer 503 (empty: ready)."""
        config = self.config
        return compute_readiness(
            listeners_bound=bool(self._sockets),
            shutting_down=self._stopping,
            expected_workers=config.server.workers,
            workers=[(w.worker_id, w.ready, w.report) for w in self._current()],
            issuers=[i.name for i in config.issuers],
        )

    def status_document(self) -> dict[str, Any]:
        """The admin ``GET /status`` document (``statuspage.build_status``)."""
        assert self._loop is not None
        now = self._loop.time()
        workers = [
            WorkerView(
                worker_id=w.worker_id, pid=w.pid, generation=w.generation,
                state="draining" if w.stopping else "ready" if w.ready else "starting",
                uptime=now - w.started, report=w.report,
                report_age=now - w.last_seen if w.report is not None else None,
            )
            for w in self._workers.values()
        ]
        revocation: dict[str, Any] | None = None
        if self._store is not None:
            try:
                revocation = self._store.status()
            except Exception as exc:  # a status probe must never fail the page
                revocation = {"up": False, "last_error": type(exc).__name__}
        return build_status(
            config=self.config, now=time.time(), started=self._started_at,
            generation=self._generation, workers=workers, not_ready=self.readiness(),
            revocation=revocation,
            traffic=self._traffic.deltas(now, counter_totals(_TRAFFIC_COUNTERS)),
        )

    # -- reload -------------------------------------------------------------------------------

    async def _reload(self) -> None:
        assert self._metrics is not None and self._stop_event is not None
        systemd.reloading()
        log_event("reload_started")
        old_config = self.config
        try:
            new_config = self._loader()
        except ConfigError as exc:
            for problem in exc.problems:
                log_event("config_problem", level="error", problem=problem)
            self._reload_failed("invalid configuration", problems=len(exc.problems))
            return
        except OSError as exc:
            self._reload_failed(f"cannot read configuration: {exc}")
            return

        added: dict[ListenKey, socket.socket] = {}
        try:
            for key in listen_keys(new_config):
                if key not in self._sockets and key not in added:
                    added[key] = bind_listener(key[1])
        except OSError as exc:
            self._close_sockets(added.values())
            self._reload_failed(f"cannot bind: {exc}")
            return
        self._sockets.update(added)

        generation = self._generation + 1
        count = new_config.server.workers
        # The new config's assertion keys are published from now on (its workers may sign before
        # the swap); if the reload fails, only the kept config's keys again.
        self._reloading = new_config
        for worker_id in range(count):
            self._spawn(worker_id, generation, new_config)

        def settled() -> bool:
            if self._stop_event is not None and self._stop_event.is_set():
                return True
            if len(self._current(generation)) < count:   # one died
                return True
            return self._generation_ready(generation, count)

        await self._wait_until(settled, self.ready_timeout)
        if not self._generation_ready(generation, count) or self._stop_event.is_set():
            for w in self._current(generation):
                self._stop_worker(w, 0.0)
            for key, sock in added.items():
                del self._sockets[key]
                sock.close()
            self._reloading = None
            self._reload_failed("new workers did not become ready"
                                if not self._stop_event.is_set() else "shutdown requested")
            return

        old = self._current()
        self._generation = generation
        self._config = new_config
        self._reloading = None
        self._failures.clear()
        for w in old:
            self._stop_worker(w, old_config.server.shutdown_timeout)
        # The parent's copies of addresses no longer listed can go now: the old workers hold
        # their own fds until they finish draining.
        listed = set(listen_keys(new_config))
        for key in [k for k in self._sockets if k not in listed]:
            self._sockets.pop(key).close()
        if new_config.admin.listen != old_config.admin.listen:
            log_event("restart_required", level="warning", setting="admin.listen")
        if new_config.revocation != old_config.revocation:
            log_event("restart_required", level="warning", setting="revocation")
        self._metrics.config_reloads.labels("ok").inc()
        self._update_gauges()
        self._update_issuer_gauges()
        systemd.ready()
        log_event("reload_done", generation=generation,
                  workers=[w.pid for w in self._current()], draining=[w.pid for w in old])

    def _reload_failed(self, reason: str, **fields: Any) -> None:
        assert self._metrics is not None
        self._metrics.config_reloads.labels("error").inc()
        log_event("reload_failed", level="error", reason=reason, kept_generation=self._generation,
                  **fields)
        systemd.ready()

    # -- shutdown -----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._stopping = True
        systemd.stopping()
        log_event("stopping", workers=[w.pid for w in self._workers.values()])
        for timer in self._restart_timers.values():
            timer.cancel()
        self._restart_timers.clear()
        timeout = self.config.server.shutdown_timeout
        for w in list(self._workers.values()):
            self._stop_worker(w, min(timeout, w.config.server.shutdown_timeout))
        # Workers keep their own copies; closing ours releases the ports once they exit.
        self._close_sockets(self._sockets.values())
        self._sockets.clear()
        await self._wait_until(lambda: not self._workers, timeout + self.stop_margin + 1.0)
        for w in list(self._workers.values()):
            self._kill(w)
        await self._wait_until(lambda: not self._workers, 2.0)
        log_event("stopped")

    async def _cleanup(self) -> None:
        for w in self._workers.values():
            # Only after an unexpected error: never leave workers serving unsupervised.
            try:
                os.kill(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._close_sockets(self._sockets.values())
        self._sockets.clear()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._admin_sock is not None:
            self._admin_sock.close()
        if self._store is not None:
            try:
                await self._store.close()
            except Exception as exc:  # closing a broken backend must not change the exit code
                log_event("revocation_close_error", level="error", error=type(exc).__name__)
        if self._own_metrics_dir is not None:
            shutil.rmtree(self._own_metrics_dir, ignore_errors=True)
        if self._keys_dir is not None:
            shutil.rmtree(self._keys_dir, ignore_errors=True)
        if self._dpop_replay is not None:
            self._dpop_replay.close()  # the workers that shared it are gone
            self._dpop_replay = None
        if self._limit_tables is not None:
            self._limit_tables.close()  # likewise
            self._limit_tables = None
            self._limit_columns = None

    @staticmethod
    def _close_sockets(sockets: Iterable[socket.socket]) -> None:
        for sock in list(sockets):
            sock.close()

    # -- admin + revocation -------------------------------------------------------------------

    async def _open_revocation_store(self) -> None:
        try:
            store = self._open_store(self.config.revocation, _store_log)
            await store.start()
        except Exception as exc:  # the gateway keeps serving; the admin API answers 503
            log_event("revocation_open_failed", level="error", error=f"{type(exc).__name__}: {exc}")
            return
        self._store = store

    def _bind_admin(self) -> bool:
        addr = self.config.admin.listen
        if addr is None:
            return True
        try:
            self._admin_sock = bind_listener(addr, backlog=128)
        except OSError as exc:
            log_event("admin_bind_failed", level="error", address=str(addr), error=str(exc))
            return False
        return True

    async def _serve_admin(self) -> None:
        if self._admin_sock is None:
            return
        app = make_admin_app(
            readiness=self.readiness,
            render_metrics=render_metrics,
            metrics_content_type=METRICS_CONTENT_TYPE,
            store=lambda: self._store,
            parse_revocation=parse_revocation_request,
            token=lambda: self.config.admin.token,
            status=self.status_document,
            jwks=self.assertion_jwks,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, self._admin_sock).start()
        self._admin_runner = runner
