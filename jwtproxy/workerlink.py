"""What crosses the fork from the supervisor to a worker, as two typed objects.

Theory of operation
-------------------
A worker process gets exactly three things from its supervisor: the config, the listening
sockets, and a :class:`WorkerInheritance`. The inheritance holds everything else the worker
takes over from its parent, one field per kind:

* ``control`` -- the :class:`WorkerControl` link (ready, status reports, heartbeats);
* ``last_good_keys_dir`` -- the supervisor's private directory where workers leave each
  issuer's last good JWKS, so a worker started while an IdP is down begins with its peers' keys;
* ``revocations`` -- the supervisor's revocation mirror at fork, so a worker started while the
  backend is down still enforces every revocation known so far;
* ``dpop_nonce_secret`` -- the key of the stateless DPoP server nonces (``jwtproxy.dpop``), made
  once per daemon, so a nonce issued by one worker is good on every worker and after reloads;
* ``dpop_replay`` -- the host-wide table of DPoP proof ``jti`` values already used
  (``jwtproxy.dpopreplay``), shared memory created before the first fork, so a proof is good
  once on the whole host, across workers and reload generations;
* ``assertion_key`` -- the assertion signing key the supervisor generated before forking when
  ``[assertion] key_files`` is empty, so every worker signs with the key the admin JWKS
  publishes (contract §5.4);
* ``limit_tables`` and ``limit_column`` -- the host's shared-memory tables of rate-limit cells,
  failure counts and upstream connection counters (:class:`jwtproxy.connlimits.HostTables`),
  made once before the first fork so every generation shares them, and the column of the
  connection counters this worker writes.

A later feature that hands something new to workers (a shared-memory table, a key generated
once per daemon, a secret all workers must share) adds a field here with a default that means
"not inherited", and reads it in ``jwtproxy.worker.build_worker``; nothing else changes. The
object is frozen: what a worker inherited does not change while it runs.

This module imports nothing of the gateway, so the supervisor can build these objects without
importing the hot path, and the worker can read them without importing the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from jwtproxy.assertion import AssertionKey
from jwtproxy.connlimits import HostTables
from jwtproxy.revocation import RevocationSnapshot
from jwtproxy.sharedtable import SharedTable

__all__ = ["WorkerControl", "WorkerInheritance"]


class WorkerControl:
    """The worker's link to the supervisor (created by the supervisor in the child).

    A SOCK_SEQPACKET socket carrying one JSON message per ``send``. ``WorkerControl(worker_id)``
    without a socket is a no-op stand-in for running a worker without a supervisor (tests,
    single-process tools).
    """

    def __init__(self, worker_id: int, sock: socket.socket | None = None, *,
                 generation: int = 0, heartbeat_interval: float = 1.0) -> None:
        self.worker_id = worker_id
        self.generation = generation
        self._sock = sock
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat: asyncio.TimerHandle | None = None
        self.is_ready = False

    def ready(self) -> None:
        """Tell the supervisor this worker accepts connections. Call from inside the worker's
        running event loop: it also starts the heartbeat that proves the loop is not stuck."""
        self.is_ready = True
        self._send({"t": "ready"})
        if self._sock is not None and self._heartbeat is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._heartbeat = loop.call_later(self._heartbeat_interval, self._beat, loop)

    def report(self, status: dict[str, Any]) -> None:
        """Send the worker's status for /readyz:
        ``{"issuers": {name: {"loaded": bool, ...}}, "revocation": {...}}``."""
        self._send({"t": "report", "status": status})

    def close(self) -> None:
        """Stop the heartbeat (the worker is shutting down)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._send({"t": "hb"})
        if self._sock is not None:
            self._heartbeat = loop.call_later(self._heartbeat_interval, self._beat, loop)

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            return
        data = json.dumps(message, separators=(",", ":"), default=str).encode()
        try:
            self._sock.send(data)
        except BlockingIOError:
            # The supervisor is not reading (busy or stuck): dropping a status message is
            # better than blocking the worker's event loop. Heartbeats resume later.
            pass
        except OSError:
            # Link closed: the supervisor is gone. Drain and exit rather than serve unsupervised.
            self._sock.close()
            self._sock = None
            self.close()
            os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class WorkerInheritance:
    """Everything a worker inherits from its supervisor besides config and sockets.

    The defaults describe a worker without a supervisor (tests, ``jwtproxy verify``): a link
    that sends nothing, no shared key directory, no revocations handed over, no generated
    assertion key (such a worker generates its own when it needs one).
    """

    control: WorkerControl = field(default_factory=lambda: WorkerControl(0))
    last_good_keys_dir: str | None = None
    revocations: RevocationSnapshot | None = None
    dpop_nonce_secret: bytes | None = field(default=None, repr=False)  # None: the worker makes one
    dpop_replay: SharedTable | None = None  # None: the worker's own table (it is the whole host)
    assertion_key: AssertionKey | None = None
    limit_tables: HostTables | None = None
    limit_column: int = 0
