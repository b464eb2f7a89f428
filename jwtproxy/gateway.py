"""One worker's gateway: everything a request touches, built once per config.

:class:`Gateway` compiles the config into what the hot path reads (route table, per-route
runtime, header policy, upstream pools, the verification stage) and owns the listening servers.
:func:`serve_worker` is what the supervisor runs in each worker process: start, report ready,
serve until SIGTERM, drain, exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

from jwtproxy.accesslog import AccessLog, log_event
from jwtproxy.auth import AuthStage, RouteRules
from jwtproxy.config import Config, RouteConfig
from jwtproxy.connection import ClientConnection
from jwtproxy.headerpolicy import HeaderPolicy
from jwtproxy.metrics import WorkerMetrics
from jwtproxy.routing import Router
from jwtproxy.tokencache import TokenCache
from jwtproxy.upstream import UpstreamPool
from jwtproxy.verifier import TokenVerifier

log = logging.getLogger("jwtproxy")

__all__ = ["Gateway", "RouteRuntime", "serve_worker", "server_ssl_context"]


class RouteRuntime:
    """A route as the hot path needs it."""

    __slots__ = (
        "route",
        "label",
        "rules",
        "pool",
        "pool_hosts",
        "auth_off",
        "cors_forward",
        "forward_token",
        "strip_prefix",
        "preserve_host",
        "response_timeout",
        "drop_names",
    )

    def __init__(self, route: RouteConfig, pool: UpstreamPool, drop_names: frozenset[bytes]) -> None:
        self.route = route
        self.label = (route.host + route.path_prefix) if route.host else route.path_prefix
        self.rules = RouteRules(route)
        self.pool = pool
        self.pool_hosts = [_host_header(t.host, t.port, t.scheme) for t in pool.targets]
        self.auth_off = route.auth == "off"
        self.cors_forward = route.cors_preflight == "forward"
        self.forward_token = route.forward_token
        self.strip_prefix = route.strip_prefix
        self.preserve_host = pool.config.preserve_host
        self.response_timeout = pool.config.response_timeout
        self.drop_names = drop_names


def _host_header(host: str, port: int, scheme: str) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return (shown if port == default else f"{shown}:{port}").encode("ascii")


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ with the library's modern defaults and ALPN http/1.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION
    return context


class Gateway:
    """The compiled config and live state of one worker."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: WorkerMetrics | None = None,
        access_log: AccessLog | None = None,
        is_revoked: Callable[[str | None, str | None, float | None, float], bool] | None = None,
        refetch_unknown_kid: Callable[[str], asyncio.Future[bool]] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or WorkerMetrics()
        self.access_log = access_log or AccessLog(config.server.access_log)
        self.router = Router(config.routes)
        self.policy = HeaderPolicy(name for name, _ in config.claims_to_headers)
        self.pools = {
            name: UpstreamPool(upstream) for name, upstream in config.upstreams.items()
        }
        self.routes: dict[int, RouteRuntime] = {}
        for route in config.routes:
            drop: set[bytes] = set()
            if not route.forward_token:
                drop.update(s.name.encode() for s in config.token.sources if s.kind == "header")
            self.routes[id(route)] = RouteRuntime(route, self.pools[route.upstream], frozenset(drop))
        self.token_sources = config.token.sources
        self.verifier = TokenVerifier(config.issuers, config.token.max_bytes)
        self.cache = TokenCache(config.token.cache_size)
        self.auth = AuthStage(
            config,
            self.verifier,
            self.cache,
            is_revoked or _never_revoked,
            refetch_unknown_kid or _no_refetch,
            on_cache=self.metrics.token_cache,
        )
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._request_prefix = os.urandom(6).hex().encode() + b"-"
        self._request_counter = 0
        self._drained: asyncio.Event | None = None

    def next_request_id(self) -> bytes:
        """Unique per worker start: a random prefix and a counter (cheaper than a UUID)."""
        self._request_counter += 1
        return self._request_prefix + b"%x" % self._request_counter

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        server = self.config.server
        context = server_ssl_context(server.tls_cert, server.tls_key) if server.tls_cert else None
        for sock in sockets:
            self.servers.append(
                await loop.create_server(self.protocol_factory, sock=sock, ssl=context, backlog=1024)
            )

    def connection_closed(self) -> None:
        if self._drained is not None and not self.connections:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight exchanges finish (up to ``timeout``), close the rest."""
        for server in self.servers:
            server.close()
        self._drained = asyncio.Event()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except asyncio.TimeoutError:
                for conn in list(self.connections):
                    conn.abort()
        for pool in self.pools.values():
            pool.close()

    def status(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "issuers": {i.name: {"loaded": self.verifier.has_keys(i.name)} for i in self.config.issuers},
        }


def _never_revoked(jti: str | None, sub: str | None, iat: float | None, now: float) -> bool:
    return False


def _no_refetch(issuer: str) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(False)
    return future


async def serve_worker(config: Config, sockets: list[socket.socket], control: Any) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain for ``shutdown_timeout`` and return."""
    from jwtproxy.jwks import KeyManager
    from jwtproxy.revocation import open_store
    from jwtproxy.supervisor import LAST_GOOD_KEYS_ENV

    loop = asyncio.get_running_loop()
    metrics = WorkerMetrics()
    def store_log(message: str, *args: Any) -> None:
        log_event("revocation", message=message % args if args else message, pid=os.getpid())

    store = open_store(config.revocation, store_log)
    gateway_ref: list[Gateway] = []

    def on_keys_changed(issuer: str) -> None:
        if gateway_ref:
            gateway_ref[0].auth.evict_issuer(issuer)
        report()

    gateway = Gateway(config, metrics=metrics, is_revoked=store.is_revoked)
    gateway_ref.append(gateway)
    keys = KeyManager(
        config.issuers,
        gateway.verifier,
        on_change=on_keys_changed,
        on_refresh=metrics.jwks_refresh,
        last_good_dir=os.environ.get(LAST_GOOD_KEYS_ENV),
    )
    gateway.auth.refetch_unknown_kid = keys.refetch_unknown_kid

    def report() -> None:
        status = gateway.status()
        status["keys"] = keys.status()
        status["revocation"] = store.status()
        control.report(status)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP is the supervisor's; a worker ignores it (the supervisor replaces workers instead).
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    inherited = getattr(control, "inherited_revocations", None)
    if inherited:
        store.seed(inherited)
    await store.start()
    await gateway.start(sockets)
    await keys.start()
    flusher = loop.create_task(_flush_metrics(metrics))
    report()
    control.ready()
    log_event("worker_serving", pid=os.getpid(), issuers=[i.name for i in config.issuers])
    reporter = loop.create_task(_report_periodically(report))
    try:
        await stop.wait()
    finally:
        log_event("worker_stopping", pid=os.getpid(), connections=len(gateway.connections))
        await gateway.drain(config.server.shutdown_timeout)
        reporter.cancel()
        flusher.cancel()
        metrics.flush()
        await keys.close()
        await store.close()


async def _flush_metrics(metrics: WorkerMetrics) -> None:
    while True:
        await asyncio.sleep(1.0)
        metrics.flush()


async def _report_periodically(report: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(2.0)
        report()
