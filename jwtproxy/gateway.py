"""One worker's gateway: everything a request touches, built once per config.

:class:`Gateway` compiles the config into what the hot path reads (route table, per-route
runtime, header policy, upstream pools, the verification stage, the assertion signer) and owns
the listening servers (traffic and ``[authz]`` listeners: one connection class, told which kind
it serves) and open connections. It is built by ``jwtproxy.worker.build_worker``, which hands it
the verifier, the revocation check, the key refetch and the assertion signing key it cannot make
itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from jwtproxy.accesslog import AccessLog
from jwtproxy.assertion import AssertionKey, AssertionSigner
from jwtproxy.auth import AuthStage, CachedToken, RouteRules
from jwtproxy.config import Config, IssuerConfig, RouteConfig
from jwtproxy.connection import ClientConnection, RequestIds
from jwtproxy.dpop import ProofChecker
from jwtproxy.dpopreplay import HostReplayGuard, RedisReplayGuard
from jwtproxy.forwarded import ProxyTrust
from jwtproxy.forwardauth import prefix_key
from jwtproxy.headerpolicy import HeaderPolicy
from jwtproxy.introspection import Introspector
from jwtproxy.metrics import WorkerMetrics
from jwtproxy.outbox import Outbox
from jwtproxy.limits import WorkerLimits
from jwtproxy.metrics import (
    GAUGE_CLIENT_CONNECTIONS,
    GAUGE_QUEUE_DEPTH,
    GAUGE_RATE_LIMIT_BACKEND_UP,
    GAUGE_UPSTREAM_CONNECTIONS,
    WorkerMetrics,
)
from jwtproxy.ratelimit import Policy
from jwtproxy.revocation import IsRevoked
from jwtproxy.routing import Router
from jwtproxy.tokencache import TokenCache
from jwtproxy.turns import VerificationTurns
from jwtproxy.upstream import UpstreamPool
from jwtproxy.verifier import TokenVerifier

if TYPE_CHECKING:  # the tracing module is only imported when tracing is on
    from jwtproxy.tracing import Tracing

log = logging.getLogger("jwtproxy")

__all__ = ["Gateway", "RouteRuntime", "server_ssl_context"]


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
        "drop_untrusted",
        "rate_limit",
    )

    def __init__(
        self,
        route: RouteConfig,
        pool: UpstreamPool,
        drop_names: frozenset[bytes],
        issuers: tuple[IssuerConfig, ...] = (),
        untrusted_drop: frozenset[bytes] = frozenset(),
        rate_limit: Policy | None = None,
    ) -> None:
        self.route = route
        self.label = route_label(route)
        self.rules = RouteRules(route, issuers)
        self.pool = pool
        self.pool_hosts = [_host_header(t.host, t.port, t.scheme) for t in pool.targets]
        self.auth_off = route.auth == "off"
        self.cors_forward = route.cors_preflight == "forward"
        self.forward_token = route.forward_token
        self.strip_prefix = route.strip_prefix
        self.preserve_host = pool.config.preserve_host
        self.response_timeout = pool.config.response_timeout
        self.drop_names = drop_names
        # From a peer that is not a trusted proxy, its client_cert_header is removed as well.
        self.drop_untrusted = drop_names | untrusted_drop
        self.rate_limit = rate_limit


def route_label(route: RouteConfig) -> str:
    """A route's name in metrics, logs and rate-limit keys: its host and path prefix."""
    return (route.host + route.path_prefix) if route.host else route.path_prefix


def _host_header(host: str, port: int, scheme: str) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return (shown if port == default else f"{shown}:{port}").encode("ascii")


def server_ssl_context(cert: str, key: str, client_ca: str = "", client_cert: str = "optional") -> ssl.SSLContext:
    """TLS 1.2+ with the library's modern defaults and ALPN http/1.1.

    With ``client_ca`` the listener asks for a client certificate that must chain to that bundle
    (a certificate that does not fails the handshake); ``client_cert = "required"`` also fails a
    handshake without one. Built by every worker at start, so a reload (SIGHUP: new workers)
    re-reads the certificate, the key and the CA bundle.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION
    return context


class Gateway:
    """The compiled config and live state of one worker."""

    def __init__(
        self,
        config: Config,
        *,
        verifier: TokenVerifier,
        metrics: WorkerMetrics,
        is_revoked: IsRevoked,
        refetch_unknown_kid: Callable[[str], asyncio.Future[bool]],
        proofs: ProofChecker | None = None,
        replay_host: HostReplayGuard | None = None,
        replay_remote: RedisReplayGuard | None = None,
        assertion_key: AssertionKey | None = None,
        tracer: Tracing | None = None,
        introspectors: Mapping[str, Introspector[CachedToken]] | None = None,
        limits: WorkerLimits | None = None,
    ) -> None:
        """``proofs``/``replay_host``: the DPoP checker and the host-wide jti guard (defaults
        for a single process); ``replay_remote``: the cross-node jti guard (Redis), if any;
        ``assertion_key`` signs the assertions when ``[assertion] enabled`` (required then);
        ``tracer``: the worker's OpenTelemetry tracing, None when it is off;
        ``introspectors``: the RFC 7662 clients of the introspecting issuers, by issuer name."""
        self.config = config
        #: None unless [tracing] is on: the hot path's only tracing work is this None check.
        self.tracer = tracer
        self.metrics = metrics
        self.access_log = AccessLog(config.server.access_log)
        self.router = Router(config.routes)
        #: Who may speak for the client (X-Forwarded-*, client_cert_header), contract §5.2.
        self.proxies = ProxyTrust(config.server.trusted_proxies, config.server.client_cert_header)
        self.policy = HeaderPolicy((name for name, _ in config.claims_to_headers), config.assertion.header)
        self.signer: AssertionSigner | None = None
        if config.assertion.enabled:
            if assertion_key is None:
                raise ValueError("[assertion] is enabled but no signing key was given")
            self.signer = AssertionSigner(
                assertion_key,
                issuer=config.assertion.issuer,
                lifetime=config.assertion.lifetime,
                claims=config.assertion.claims,
                # As many reusable assertions as verified tokens: the token cache's bound, so a
                # cache-hit request finds its assertion too.
                cache_size=config.token.cache_size,
            )
        self.limits = limits if limits is not None else WorkerLimits(config)
        # Requests waiting for an upstream connection, per worker and upstream: as many as the
        # host may have connections to one target (Envoy's max_pending_requests is the same
        # default, 1024), each for at most the upstream's connect_timeout.
        queue_limit = config.limits.upstream_max_connections
        #: The connections holding writes until the end of this loop turn (jwtproxy.outbox).
        self.outbox = Outbox()
        self.pools = {
            name: UpstreamPool(upstream, slots=self.limits.slots(upstream), queue_limit=queue_limit,
                               outbox=self.outbox)
            for name, upstream in config.upstreams.items()
        }
        self.routes: dict[int, RouteRuntime] = {}
        for route in config.routes:
            drop: set[bytes] = set()
            if not route.forward_token:
                drop.update(s.name.encode() for s in config.token.sources if s.kind == "header")
            self.routes[id(route)] = RouteRuntime(
                route, self.pools[route.upstream], frozenset(drop), config.issuers, self.proxies.untrusted_drop,
                self.limits.policy(route, route_label(route)),
            )
        metrics.sample = self._sample_gauges
        self._fallbacks_seen = 0
        self.token_sources = config.token.sources
        #: ``[authz] path_prefix`` as the authz listeners strip it from their own paths.
        self.authz_prefix = prefix_key(config.authz.path_prefix)
        self.verifier = verifier
        self.cache: TokenCache[CachedToken] = TokenCache(config.token.cache_size)
        self.auth = AuthStage(
            config,
            verifier,
            self.cache,
            is_revoked,
            refetch_unknown_kid,
            on_cache=metrics.token_cache,
            proofs=proofs,
            host_replay=replay_host,
            remote_replay=replay_remote is not None,
            introspectors=introspectors,
            failures=self.limits if self.limits.budget is not None else None,
            turns=VerificationTurns(),
        )
        self.replay_remote = replay_remote
        self.connections: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.request_ids = RequestIds()
        self._drained: asyncio.Event | None = None

    def _sample_gauges(self) -> Iterator[tuple[str, tuple[str, ...], float]]:
        """The limit gauges' values now (asked at each metrics flush)."""
        yield GAUGE_CLIENT_CONNECTIONS, (), len(self.connections)
        for name, pool in self.pools.items():
            yield GAUGE_QUEUE_DEPTH, (name,), len(pool.pending)
            yield GAUGE_UPSTREAM_CONNECTIONS, (name,), pool.open_connections()
        limits = self.limits
        if limits.uses_redis:
            yield GAUGE_RATE_LIMIT_BACKEND_UP, (), 0.0 if limits.backend_up is False else 1.0
            fallbacks = limits.fallbacks
            if fallbacks > self._fallbacks_seen:
                self.metrics.rate_limit_fallbacks(fallbacks - self._fallbacks_seen)
                self._fallbacks_seen = fallbacks

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    def authz_protocol_factory(self) -> ClientConnection:
        return ClientConnection(self, authz=True)

    async def start(self, sockets: list[socket.socket], authz_sockets: list[socket.socket] | None = None) -> None:
        """Accept traffic on ``sockets`` and forward-auth questions on ``authz_sockets`` (none for
        ``jwtproxy verify``: no certificate to load). TLS, when configured, is on every listener."""
        authz_sockets = authz_sockets or []
        if not sockets and not authz_sockets:
            return
        await self.limits.start()
        loop = asyncio.get_running_loop()
        server = self.config.server
        context = (
            server_ssl_context(server.tls_cert, server.tls_key, server.tls_client_ca, server.tls_client_cert)
            if server.tls_cert
            else None
        )
        for factory, listening in ((self.protocol_factory, sockets), (self.authz_protocol_factory, authz_sockets)):
            for sock in listening:
                self.servers.append(await loop.create_server(factory, sock=sock, ssl=context, backlog=1024))

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
        await self.limits.close()

    def status(self) -> dict[str, Any]:
        return {
            "connections": len(self.connections),
            "issuers": {i.name: {"loaded": self.verifier.has_keys(i.name)} for i in self.config.issuers},
        }
