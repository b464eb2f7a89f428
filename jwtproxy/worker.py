"""One worker: its parts built from the config and its inheritance, in one place, then served.

Theory of operation
-------------------
:func:`build_worker` is the only place a worker is wired. The supervisor's workers
(:func:`serve_worker`), ``jwtproxy verify`` and the in-process gateways of the tests all call it,
so what they run is the same object graph::

    TokenVerifier --- installed keys ---------------------------- KeyManager (jwks)
         |                                                          | on_change(issuer):
    Gateway: Router, RouteRuntime per route, UpstreamPools,         |   evict the issuer's cached
             AuthStage(verifier, TokenCache,                        |   verdicts, report status
                       is_revoked = store.is_revoked,               |
                       refetch_unknown_kid = keys.refetch_unknown_kid,
                       introspectors = {issuer: Introspector})  (issuers with an
                                                                  introspection_endpoint)
    RevocationStore (seeded with the inherited mirror) ------ WorkerMetrics (counts, flushed 1/s)

Every callback is known when its receiver is built: the verifier comes first, so the key
manager and the gateway can both be given it, and the gateway gets the key manager's refetch
at construction. Nothing is patched in afterwards.

What a worker takes over from its supervisor arrives on one
:class:`~jwtproxy.workerlink.WorkerInheritance` (the control link, the last-good-keys directory,
the revocation mirror); a new inherited thing is a new field there, read here.

Lifecycle (:class:`Worker`): ``start(sockets)`` opens the revocation store, starts accepting,
then loads keys (listening first means the accept queue fills while keys load, instead of
refusing connections); ``stop(timeout)`` drains the gateway, then closes the key manager, the
introspection clients and the store. :func:`serve_worker` adds the process concerns: signals, the ready message, periodic
status reports and metric flushes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jwtproxy.accesslog import log_event
from jwtproxy.assertion import AssertionKey, generate_key
from jwtproxy.auth import AUTH_FAILURE_REASONS, CachedToken, cached_token
from jwtproxy.config import Config, TracingConfig
from jwtproxy.dpop import NonceIssuer, ProofChecker
from jwtproxy.dpopreplay import HostReplayGuard, RedisReplayGuard
from jwtproxy.connlimits import raise_open_file_limit
from jwtproxy.gateway import Gateway
from jwtproxy.introspection import IntrospectionEndpoint, Introspector
from jwtproxy.jwks import FetchPolicy, KeyManager
from jwtproxy.limits import WorkerLimits
from jwtproxy.metrics import WorkerMetrics
from jwtproxy.revocation import RevocationStore, open_store
from jwtproxy.upstream import UPSTREAM_ERROR_KINDS
from jwtproxy.verifier import TokenVerifier
from jwtproxy.workerlink import WorkerInheritance

if TYPE_CHECKING:
    from jwtproxy.tracing import Tracing


def start_tracing(config: TracingConfig) -> Tracing:
    """The worker's OpenTelemetry tracing (imported only when [tracing] is on)."""
    from jwtproxy.tracing import Tracing

    return Tracing(config)

__all__ = ["Worker", "build_worker", "serve_worker", "split_listeners"]

#: Seconds between status reports to the supervisor (readiness detail, issuer gauges).
REPORT_INTERVAL = 2.0
#: Seconds between metric flushes into the shared multiprocess files.
FLUSH_INTERVAL = 1.0


class Worker:
    """One worker's parts, wired; built by :func:`build_worker`."""

    def __init__(
        self,
        config: Config,
        inheritance: WorkerInheritance,
        store: RevocationStore,
        *,
        key_log: Callable[[str], None] | None,
        fetch_policy: FetchPolicy,
    ) -> None:
        self.config = config
        self.inheritance = inheritance
        self.metrics = WorkerMetrics()
        # Built here, in the worker process: the exporter's thread must start after the fork.
        self.tracing = start_tracing(config.tracing) if config.tracing.otlp_endpoint else None
        self.store = store
        if inheritance.revocations:
            store.seed(inheritance.revocations)
        verifier = TokenVerifier(config.issuers, config.token.max_bytes)
        self.keys = KeyManager(
            config.issuers,
            verifier,
            on_change=self._keys_changed,
            log=key_log,
            on_refresh=self.metrics.jwks_refresh,
            policy=fetch_policy,
            last_good_dir=inheritance.last_good_keys_dir,
            tracer=self.tracing,
        )
        # Sender-constrained tokens (contract §5.2): the nonce key and the proof jti table come
        # from the supervisor, so every worker of the host agrees; across nodes, proofs are
        # recorded on the revocation Redis.
        secret = inheritance.dpop_nonce_secret or os.urandom(32)
        self.replay_remote = (
            RedisReplayGuard(config.revocation.redis_url) if config.revocation.backend == "redis" else None
        )
        mapping = config.claims_to_headers
        # One RFC 7662 client per issuer with an introspection_endpoint; it renders an accepted
        # answer into the same cached verdict a JWT gets (identity headers rendered once).
        self.introspectors: dict[str, Introspector[CachedToken]] = {
            issuer.name: Introspector(
                issuer,
                IntrospectionEndpoint.of(issuer),
                lambda verified, key: cached_token(verified, key, mapping),
                on_result=self.metrics.introspection,
                tracer=self.tracing,
            )
            for issuer in config.issuers
            if issuer.introspection_endpoint
        }
        self.gateway = Gateway(
            config,
            verifier=verifier,
            metrics=self.metrics,
            is_revoked=store.is_revoked,
            refetch_unknown_kid=self.keys.refetch_unknown_kid,
            proofs=ProofChecker(NonceIssuer(secret)),
            replay_host=HostReplayGuard(inheritance.dpop_replay) if inheritance.dpop_replay is not None else None,
            replay_remote=self.replay_remote,
            assertion_key=assertion_signing_key(config, inheritance),
            tracer=self.tracing,
            introspectors=self.introspectors,
            limits=WorkerLimits(config, inheritance.limit_tables, inheritance.limit_column,
                                on_backend_state=_limits_backend_state),
        )

        # Every labelled counter exists from the start, at 0 (contract §5.6).
        self.metrics.declare(
            routes=[runtime.label for runtime in self.gateway.routes.values()],
            listeners=("traffic", "authz") if config.authz.listen else ("traffic",),
            reasons=AUTH_FAILURE_REASONS,
            upstreams=list(config.upstreams),
            upstream_kinds=UPSTREAM_ERROR_KINDS,
            issuers=[issuer.name for issuer in config.issuers],
            introspecting=list(self.introspectors),
            rate_limited_routes=[r.label for r in self.gateway.routes.values() if r.rate_limit is not None],
        )

    def _keys_changed(self, issuer: str) -> None:
        # Verdicts cached under the old keys must not outlive them (contract §4), and the
        # supervisor's readiness should see the new key state without waiting for a report.
        self.gateway.auth.evict_issuer(issuer)
        self.report()

    def status(self) -> dict[str, Any]:
        """The status a worker reports: connections, issuers loaded, key and revocation detail."""
        status = self.gateway.status()
        status["keys"] = self.keys.status()
        status["revocation"] = self.store.status()
        return status

    def report(self) -> None:
        """Send :meth:`status` over the inherited control link."""
        self.inheritance.control.report(self.status())

    async def start(self, sockets: list[socket.socket], authz_sockets: list[socket.socket] | None = None) -> None:
        """Open the revocation store, accept on ``sockets`` (traffic) and ``authz_sockets``
        (``[authz]`` listeners), load every issuer's keys once."""
        await self.store.start()
        await self.gateway.start(sockets, authz_sockets)
        await self.keys.start()

    async def stop(self, timeout: float) -> None:
        """Drain (up to ``timeout`` seconds), then close the key manager, the introspection
        clients and the store."""
        await self.gateway.drain(timeout)
        await self.keys.close()
        for introspector in self.introspectors.values():
            await introspector.close()
        await self.store.close()
        if self.replay_remote is not None:
            await self.replay_remote.close()
        if self.tracing is not None:
            # Export what is queued; off the loop, the exporter may block up to its timeout.
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)


def assertion_signing_key(config: Config, inheritance: WorkerInheritance) -> AssertionKey | None:
    """The key this worker signs assertions with: the first of ``key_files``, else the key the
    supervisor generated for every worker, else (no supervisor: tests, ``jwtproxy verify``) a
    key of its own. None when assertions are off."""
    settings = config.assertion
    if not settings.enabled:
        return None
    if settings.keys:
        return settings.keys[0]
    inherited = inheritance.assertion_key
    if inherited is None:
        return generate_key(settings.algorithm)
    if inherited.algorithm != settings.algorithm:
        # The supervisor hands over the key for the config it forks with: a mismatch is a bug,
        # and signing with a key nobody publishes would fail every backend.
        raise ValueError(f"inherited an {inherited.algorithm} assertion key for algorithm {settings.algorithm}")
    return inherited


def _limits_backend_state(up: bool, reason: str) -> None:
    """The Redis rate-limit backend came or went: one event line each way (never per request)."""
    log_event("rate_limit_backend", level="info" if up else "warning", up=up, error=reason or None,
              pid=os.getpid())


def _store_log(message: str, *args: Any) -> None:
    """printf-style logger handed to the revocation store (never receives tokens)."""
    log_event("revocation", message=message % args if args else message, pid=os.getpid())


def build_worker(
    config: Config,
    inheritance: WorkerInheritance | None = None,
    *,
    store: RevocationStore | None = None,
    key_log: Callable[[str], None] | None = None,
    fetch_policy: FetchPolicy | None = None,
) -> Worker:
    """Wire one worker for ``config``; nothing is started (see :meth:`Worker.start`).

    inheritance: what the supervisor handed over (default: nothing, a no-op control link).
    store: the revocation store; default ``open_store(config.revocation)``. In-process gateways
        pass their own (``jwtproxy.revocation.memory.MemoryRevocationStore``).
    key_log / fetch_policy: the key manager's text log (default: structured log lines) and
        fetch bounds (default ``FetchPolicy()``).
    """
    return Worker(
        config,
        inheritance if inheritance is not None else WorkerInheritance(),
        store if store is not None else open_store(config.revocation, _store_log),
        key_log=key_log,
        fetch_policy=fetch_policy if fetch_policy is not None else FetchPolicy(),
    )


def split_listeners(config: Config, sockets: list[socket.socket]) -> tuple[list[socket.socket], list[socket.socket]]:
    """The inherited ``sockets`` as (traffic, authz): the supervisor hands them over in the order
    of ``server.listen`` then ``authz.listen``."""
    traffic = len(config.server.listen)
    return sockets[:traffic], sockets[traffic:]


async def serve_worker(config: Config, sockets: list[socket.socket], inheritance: WorkerInheritance) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain for ``shutdown_timeout`` and return.

    ``sockets``: the traffic listeners' then the authz listeners' (:func:`split_listeners`)."""
    loop = asyncio.get_running_loop()
    # The soft open-file limit (often 1024) would otherwise be the real connection cap.
    before, after = raise_open_file_limit()
    if after != before:
        log_event("open_file_limit", pid=os.getpid(), before=before, after=after)
    worker = build_worker(config, inheritance)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP is the supervisor's; a worker ignores it (the supervisor replaces workers instead).
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    await worker.start(*split_listeners(config, sockets))
    flusher = loop.create_task(worker.metrics.flush_periodically(FLUSH_INTERVAL))
    worker.report()
    inheritance.control.ready()
    log_event("worker_serving", pid=os.getpid(), issuers=[i.name for i in config.issuers])
    reporter = loop.create_task(_report_periodically(worker.report))
    try:
        await stop.wait()
    finally:
        log_event("worker_stopping", pid=os.getpid(), connections=len(worker.gateway.connections))
        await worker.stop(config.server.shutdown_timeout)
        reporter.cancel()
        flusher.cancel()  # flush_periodically flushes once more on its way out
        await asyncio.gather(reporter, flusher, return_exceptions=True)


async def _report_periodically(report: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        report()
