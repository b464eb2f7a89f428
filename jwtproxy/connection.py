"""The client side of the gateway: one :class:`ClientConnection` per accepted socket.

Theory of operation
-------------------
The connection owns the transport, the codec, one timer and the pipeline; an :class:`Exchange`
owns one request from its head to the end of its response, and moves through the states of
:mod:`jwtproxy.lifecycle` (where the invariants are written down). The codec reports request
events (``on_request_head`` / ``on_request_body`` / ``on_request_end``); the connection turns each
head into an exchange and each exchange into exactly one response, in arrival order:

* An exchange is begun (leaves ``WAITING``) when it is the current one and either its whole
  request is in or it has a body (:meth:`ClientConnection._ready`): a body then streams to the
  upstream, or, when the answer is an error, is never read at all (the connection closes after the
  error, because the unread body would be taken for the next request).
* Beginning means: normalise the target, route, authorise (one call into
  :class:`jwtproxy.auth.AuthStage`), then either answer here or hand the exchange to an upstream
  connection, idle from the pool (synchronously) or newly connected (a task).
* Pipelined requests wait in ``queue``; reading pauses while one waits, so at most one read's worth
  of requests is ever buffered.
* One timer per connection, re-armed lazily against ``deadline``: ``header_timeout`` while a request
  head is incomplete (slowloris), ``keepalive_timeout`` while idle, none while an exchange runs
  (the upstream's ``response_timeout`` covers that).
* Every path that runs outside ``data_received`` (the scheduled begin of a queued request, the
  connect and refetch tasks, the upstream's callbacks) contains its exceptions the same way:
  :meth:`ClientConnection.internal_error` logs once and answers 500 or cuts the connection.

Reading from the client pauses for independent reasons (``pipeline``, ``buffer`` while a body waits
for an upstream connection or keys, ``tunnel``, ``upstream`` while the upstream cannot take more
bytes, ``error``); :class:`ReadGate` keeps the transport paused while any reason holds. A slow
client pauses the upstream's reading in turn (``pause_writing``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from jwtproxy.auth import (
    ANONYMOUS,
    REPLAY_UNAVAILABLE,
    Allow,
    AmbiguousToken,
    CheckReplay,
    Deferred,
    Deny,
    MalformedAuthorization,
    Pending,
    extract_token,
    invalid_token,
    replay_denied,
    uses_dpop_scheme,
)
from jwtproxy.binding import BEARER, Presentation, request_presentation
from jwtproxy.config import RouteConfig, TokenSource
from jwtproxy.dpopreplay import ReplayCheckUnavailable
from jwtproxy.forwarded import Forwarded
from jwtproxy.mtls import header_thumbprint, peer_thumbprint
from jwtproxy.codec import ProtocolError, RequestHead, make_codec
from jwtproxy.connlimits import BUSY_RESPONSE
from jwtproxy.forwardauth import original_request
from jwtproxy.headerpolicy import ScannedHead, response_head, scan_request_head
from jwtproxy.lifecycle import (
    ANSWER,
    ATTACH,
    CLOSE_AFTER,
    CONNECT,
    DECIDING,
    DEFER,
    DONE,
    DROP,
    FINISH,
    FORWARDED,
    RESPONDING,
    RESPONSE_HEAD,
    SWITCH,
    TUNNEL,
    WAITING,
    advance,
    keeps_alive,
    may_retry,
)
from jwtproxy.ratelimit import TOKEN, Policy
from jwtproxy.responses import allowed_response, error_response
from jwtproxy.routing import BadRequest, normalise_target, split_host, strip_prefix
from jwtproxy.tokencache import cache_key
from jwtproxy.tracing import TRACE_HEADERS
from jwtproxy.upstream import UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from jwtproxy.gateway import Gateway, RouteRuntime
    from jwtproxy.tracing import RequestTrace, UnsampledTrace

log = logging.getLogger("jwtproxy")

BUFFER_LIMIT = 256 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Steps of a request's decision (ClientConnection._decide), in order.
LIMIT_BEFORE = 0  # the rate limit keyed by the client address or the token
AUTHORIZE = 1
AUTHORIZE_AGAIN = 2  # after the issuer's keys were refetched for an unknown kid
LIMIT_AFTER = 3  # the rate limit keyed by a claim
FORWARD = 4

# Response body modes towards the client.
BODY_NONE = 0
BODY_RAW = 1
BODY_CHUNKED = 2


class ReadGate:
    """Client reading is paused while any reason holds; each reason is paused and resumed on its own."""

    __slots__ = ("transport", "reasons")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        transport = self.transport
        if not self.reasons and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            transport = self.transport
            if not self.reasons and transport is not None and not transport.is_closing():
                transport.resume_reading()


class RequestIds:
    """``X-Request-Id`` values for requests that bring none: a random prefix per worker start and
    a counter (cheaper than a UUID; the prefix tells workers and restarts apart). Here, not in the
    gateway: the connection asks once per request, and a compiled method is a cheap call."""

    __slots__ = ("prefix", "count")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return self.prefix + b"%x" % self.count


class Exchange:
    """One request and its response: the per-request half of a client connection.

    It is the :class:`~jwtproxy.upstream.ResponseSink` of the upstream connection that carries it,
    and turns the upstream's response into bytes for the client.
    """

    __slots__ = (
        "conn",
        "head",
        "scanned",
        "started",
        "expects_body",
        "upgrade",
        "state",
        "received",
        "keep_alive",
        "retried",
        "route",
        "request_id",
        "method",
        "target",
        "path",
        "query",
        "authority",
        "forwarded",
        "auth",
        "deny_reason",
        "upstream",
        "task",
        "body_chunks",
        "body_buffered",
        "body_bytes",
        "status",
        "bytes_out",
        "out",
        "body_mode",
        "tunnel_buffer",
        "trace",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead, scanned: ScannedHead, started: float) -> None:
        self.conn = conn
        self.head = head
        self.scanned = scanned
        self.started = started
        self.expects_body = scanned.chunked or bool(scanned.content_length)
        self.upgrade = False  # a websocket upgrade was asked for and the codec will tunnel after it
        self.state = WAITING  # response side; the request side is ``received``
        self.received = False
        self.keep_alive = False  # decided as the response head is written (lifecycle.keeps_alive)
        self.retried = False
        self.route: RouteRuntime | None = None  # None: not routed (yet, or no route matched)
        self.request_id = b""
        # The request the decision is about: this one's own method and target on a traffic
        # listener, the original request it describes on an authz listener (forwardauth).
        self.method = head.method
        self.target = head.target
        self.path = ""
        self.query = ""
        self.authority: str | None = None
        self.forwarded: Forwarded | None = None  # what a trusted proxy said; None: not trusted
        self.auth: Allow = ANONYMOUS
        self.deny_reason: str | None = None
        self.upstream: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.body_chunks: list[bytes] = []
        self.body_buffered = 0
        self.body_bytes = 0
        self.status = 0
        self.bytes_out = 0
        self.out: list[bytes] = []
        self.body_mode = BODY_NONE
        self.tunnel_buffer: list[bytes] = []
        self.trace: RequestTrace | UnsampledTrace | None = None  # only with [tracing] on

    # -- ResponseSink (called by the UpstreamConnection) ----------------------------------------
    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: bytes | None,
    ) -> None:
        self.status = status
        conn = self.conn
        head = self.head
        http10 = head.version == b"1.0"
        if status == 101 and self.upgrade:
            self.state = advance(self.state, SWITCH)
            self.keep_alive = False
            self.out.append(
                response_head(b"1.1", status, reason, headers, self.request_id, b"", False, False, upgrade=True)
            )
            # Bytes the client sent after its upgrade request belong to the new protocol, so they
            # go upstream only now that the upstream has switched. Had it declined, they would be
            # parsed there as further HTTP requests that never passed the gateway (smuggling).
            if self.tunnel_buffer and self.upstream is not None:
                for data in self.tunnel_buffer:
                    self.upstream.send(data)
            self.tunnel_buffer.clear()
            conn.reading.resume("tunnel")
            return
        self.state = advance(self.state, RESPONSE_HEAD)
        self.tunnel_buffer.clear()  # upgrade declined: what followed the request is dropped
        close_delimited = False
        if status in (204, 304) or status < 200 or head.method == b"HEAD":
            self.body_mode = BODY_NONE
            framing = b""
            if content_length is not None and status != 204:
                framing = b"content-length: " + content_length + b"\r\n"
        elif content_length is not None:
            self.body_mode = BODY_RAW
            framing = b"content-length: " + content_length + b"\r\n"
        elif not http10:
            self.body_mode = BODY_CHUNKED
            framing = b"transfer-encoding: chunked\r\n"
        else:
            self.body_mode = BODY_RAW
            framing = b""
            close_delimited = True  # an HTTP/1.0 client learns the body's end from the close
        self.keep_alive = keeps_alive(head.keep_alive, self.received, self.upgrade, close_delimited, conn.last())
        self.out.append(
            response_head(b"1.1", status, reason, headers, self.request_id, framing, self.keep_alive, http10)
        )

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.body_mode == BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif self.body_mode == BODY_RAW:
            self.out.append(data)

    def on_response_flushed(self) -> None:
        if self.out:
            self.conn.write(b"".join(self.out))
            self.out.clear()

    def on_response_end(self) -> None:
        if self.state == TUNNEL:
            # One side of the tunnel closed; closing the client ends the other. connection_lost
            # records the exchange.
            self.on_response_flushed()
            self.conn.close()
            return
        if self.body_mode == BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.on_response_flushed()
        self.upstream = None
        if self.trace is not None:
            self.trace.upstream_end(self.status)
        self.state = advance(self.state, FINISH)
        self.conn.complete(self)

    def on_upstream_failed(self, error: UpstreamError, retryable: bool) -> None:
        self.upstream = None
        try:
            self.conn.upstream_failed(self, error, retryable)
        except Exception:
            self.conn.internal_error(self)

    def on_tunnel_data(self, data: bytes) -> None:
        if self.state == TUNNEL:
            if self.out:
                self.on_response_flushed()
            self.conn.write(data)

    def pause_client_reading(self) -> None:
        self.conn.reading.pause("upstream")

    def resume_client_reading(self) -> None:
        self.conn.reading.resume("upstream")

class ClientConnection(asyncio.Protocol):
    """One client socket: codec, pipeline, timer and flow control.

    ``authz``: the socket is an ``[authz]`` listener's. Its requests describe other requests
    (:mod:`jwtproxy.forwardauth`); they are decided exactly as traffic requests are, and answered
    ``200`` with the identity headers instead of being forwarded.
    """

    def __init__(self, gateway: Gateway, authz: bool = False) -> None:
        self.gw = gateway
        self.authz = authz
        self.listener = "authz" if authz else "traffic"  # the metrics and access log label
        self.loop = asyncio.get_running_loop()
        config = gateway.config.server
        self.codec = make_codec(config.http_parser, self, config.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.reading = ReadGate()
        self.client_ip = b"unknown"
        self.proto = b"http"
        self.peer = ""  # the peer's address as text
        # In [server] trusted_proxies, or any peer of an authz listener: its X-Forwarded-* count.
        self.trusted_peer = authz
        self.peer_cert: str | None = None  # x5t#S256 of the TLS client certificate, if any
        self.current: Exchange | None = None  # the exchange whose response goes out next
        self.receiving: Exchange | None = None  # the exchange whose request bytes are arriving
        self.queue: deque[Exchange] = deque()
        self.write_paused = False
        # Bytes written this loop turn, sent at its end (jwtproxy.outbox); None: nothing held.
        self.held_out: list[bytes] | None = None
        self.closing = False
        self.closed = False
        self.deadline: float | None = None
        self.deadline_kind = "head"
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.head_started = False  # bytes of a request head arrived since the last exchange
        self.deferred_error: tuple[int, str] | None = None  # answered once the pipeline drains

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server hands every protocol a full transport; BaseTransport is the declared type.
        self.transport = self.reading.transport = cast(asyncio.Transport, transport)
        if len(self.gw.connections) >= self.gw.limits.max_connections:
            # Past [limits] max_connections: answered at once and closed, never left waiting.
            self.closing = True
            self.gw.metrics.client_rejected()
            self.transport.write(BUSY_RESPONSE)
            self.transport.close()
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
            self.client_ip = self.peer.encode()
            # An authz listener's peer is the front proxy by construction (contract §5.1).
            self.trusted_peer = self.authz or self.gw.proxies.trusts(self.peer)
        if transport.get_extra_info("sslcontext") is not None:
            self.proto = b"https"
            # Once per connection: the handshake is over when the protocol sees the connection.
            self.peer_cert = peer_thumbprint(transport.get_extra_info("ssl_object"))
        self.gw.connections.add(self)
        self._set_deadline(self.gw.config.server.header_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self.held_out = None
        self.gw.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._abandon_all()
        for ex in (self.current, *self.queue):
            if ex is None:
                continue
            if ex.state != WAITING and ex.state != DONE:
                ex.status = ex.status or 499  # nginx's "client closed request"
                self._record(ex)
            ex.state = advance(ex.state, DROP)
        self.current = None
        self.queue.clear()
        self.gw.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.current is None and self.receiving is None:
            self.head_started = True
            if self.deadline_kind == "idle":
                self._set_deadline(self.gw.config.server.header_timeout, "head")
        try:
            self.codec.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc.status, exc.description)
        except Exception:  # a bug must cost one connection, never the worker
            log.exception("internal error while handling a request")
            self._protocol_error(500, "internal error")

    def eof_received(self) -> bool | None:
        # Half-close from the client. Requests received whole are still answered (our side stays
        # open until then); a request cut off mid-head or mid-body can never complete, so the
        # exchange it belongs to is abandoned now rather than at response_timeout.
        if self.receiving is not None:
            self._abandon_all()
            return None
        if self.current is None and not self.queue:
            return None
        self.closing = True
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # -- codec events --------------------------------------------------------------------------------
    def on_request_head(self, head: RequestHead) -> None:
        scanned = scan_request_head(head)
        limit = self.gw.config.server.max_body_bytes
        if scanned.content_length is not None and limit and scanned.content_length > limit:
            raise ProtocolError("request body too large", 413)
        ex = Exchange(self, head, scanned, self.loop.time())
        if head.upgrade and scanned.upgrade == b"websocket" and head.method == b"GET" and not self.authz:
            ex.upgrade = True
            self.codec.tunnel_after_message = True
        self.receiving = ex
        self.deadline = None
        if self.current is None:
            self.current = ex
            if self._ready(ex):
                self._begin(ex)
        else:
            self.queue.append(ex)
            self.reading.pause("pipeline")

    def on_request_body(self, data: bytes) -> None:
        ex = self.receiving
        if ex is None or self.closing:
            return
        ex.body_bytes += len(data)
        limit = self.gw.config.server.max_body_bytes
        if limit and ex.body_bytes > limit:
            raise ProtocolError("request body too large", 413)
        upstream = ex.upstream
        if upstream is not None:
            upstream.send(b"%x\r\n%b\r\n" % (len(data), data) if ex.scanned.chunked else data)
        else:
            ex.body_chunks.append(data)
            ex.body_buffered += len(data)
            if ex.body_buffered > BUFFER_LIMIT:
                self.reading.pause("buffer")

    def on_request_end(self) -> None:
        ex = self.receiving
        if ex is None:
            return
        self.receiving = None
        ex.received = True
        if ex.state == WAITING:
            if ex is self.current:
                self._begin(ex)
        elif ex.upstream is not None:
            if ex.scanned.chunked:
                ex.upstream.send(b"0\r\n\r\n")
            ex.upstream.request_sent()

    def on_tunnel_data(self, data: bytes) -> None:
        ex = self.current
        if ex is None or not ex.upgrade:
            return
        if ex.state == TUNNEL:
            if ex.upstream is not None:
                ex.upstream.send(data)
        elif ex.state < RESPONDING:
            # Held until the upstream switches protocols (see Exchange.on_response_head).
            ex.tunnel_buffer.append(data)
            ex.body_buffered += len(data)
            if ex.body_buffered > BUFFER_LIMIT:
                self.reading.pause("tunnel")

    # -- deciding ------------------------------------------------------------------------------------
    @staticmethod
    def _ready(ex: Exchange) -> bool:
        """Whether the current exchange can be begun: its request is whole, or its body can stream."""
        return ex.received or ex.expects_body

    def _begin(self, ex: Exchange) -> None:
        """Decide ``ex``; a fault while deciding ends it with a 500 rather than leaving it unanswered.

        Called from codec callbacks (inside ``data_received``) and from the pipeline's scheduled
        start: containing the fault here, at the one entry of the decision, answers the exchange
        whose decision failed, wherever the call came from.
        """
        try:
            self._decide(ex)
        except Exception:
            self.internal_error(ex)

    def _decide(self, ex: Exchange) -> None:
        """Describe, route and decide ``ex`` (the phases shared by both listener kinds)."""
        gw = self.gw
        scanned = ex.scanned
        ex.request_id = scanned.request_id or gw.request_ids.next()
        try:
            forwarded_host = None
            if self.authz:
                ex.method, ex.target, forwarded_host = original_request(ex.head, gw.authz_prefix)
            path, query, authority = normalise_target(ex.target)
            if authority is None and forwarded_host is not None:
                authority = forwarded_host.decode("latin-1")  # the original request's own Host
            host_value = authority if authority is not None else (scanned.host or b"").decode("latin-1")
            host = split_host(host_value) if host_value else ""
        except BadRequest as exc:
            self._answer(ex, exc.status, exc.description)
            return
        ex.path = path
        ex.query = query
        ex.authority = authority
        route = gw.router.match(host, path)
        if gw.tracer is not None:
            self._start_trace(ex, host_value, route)
        if route is None:
            self._answer(ex, 404, "no route")
            return
        runtime = gw.routes[id(route)]
        ex.route = runtime
        anonymous = runtime.auth_off or (runtime.cors_forward and self._is_preflight(ex))
        token: str | None = None
        presented = BEARER
        if not anonymous:
            try:
                token, source = extract_token(gw.token_sources, ex.head.headers, scanned.authorization, query)
            except MalformedAuthorization:
                self._deny(ex, invalid_token("malformed_header", "malformed bearer authorization header"))
                return
            except AmbiguousToken:
                ex.deny_reason = "ambiguous_token"
                self.gw.metrics.auth_failure("ambiguous_token")
                self._answer(ex, 400, "more than one token in the request")
                return
            if token is not None:
                presented = self._presentation(ex, source)
        elif runtime.rate_limit is not None and runtime.rate_limit.key == TOKEN:
            # Only the rate limit's key: a token it cannot read makes the address the key.
            try:
                token, _ = extract_token(gw.token_sources, ex.head.headers, scanned.authorization, query)
            except (MalformedAuthorization, AmbiguousToken):
                token = None
        self._proceed(ex, runtime, token, presented, LIMIT_BEFORE, ANONYMOUS if anonymous else None)

    def _proceed(self, ex: Exchange, runtime: RouteRuntime, token: str | None, presented: Presentation,
                step: int, allow: Allow | None, token_key: bytes | None = None) -> None:
        """Take ``ex`` from decision step ``step`` to an answer or an upstream.

        The steps, in order: the rate limit when its key is known without verification
        (``client_ip``, ``token``: refused before any signature work, which is the better
        protection), authorisation (skipped when ``allow`` is already given: anonymous routes
        and preflights), the rate limit keyed by a claim (it needs the verified claims), then
        forwarding. A step that has to wait (keys to refetch, a proof's jti to record on Redis, a
        rate-limit decision on Redis) parks the exchange in ``DECIDING`` and a task calls back
        here with the next step; so does a token that needs a signature verification once this
        loop turn's verifications are spent, without a task (:mod:`jwtproxy.turns`), and with
        the token's cache key (``token_key``), which the first ask computed.
        """
        gw = self.gw
        policy = runtime.rate_limit
        if step == LIMIT_BEFORE:
            if policy is not None and not policy.needs_identity:
                digest = None
                if token is not None and policy.key == TOKEN:
                    # The token's cache key keys the limit too: authorisation reuses it.
                    digest = token_key = cache_key(token) if token_key is None else token_key
                key = policy.key_for(self.client_address(ex), None, digest)
                if not self._within_limit(ex, runtime, policy, key, token, presented, AUTHORIZE, allow, token_key):
                    return
            step = AUTHORIZE
        if step in (AUTHORIZE, AUTHORIZE_AGAIN) and allow is None:
            authorize = gw.auth.authorize
            # The address only when a failure budget will count it (reading it can parse headers).
            client = self.client_address(ex) if gw.limits.budget is not None else ""
            arguments = (runtime.rules, token, time.time(), step == AUTHORIZE_AGAIN, presented, client, token_key)
            decision = authorize(*arguments) if ex.trace is None else ex.trace.verify(authorize, *arguments)
            if isinstance(decision, Deny):
                self._deny(ex, decision)
                return
            if isinstance(decision, Deferred):
                turns = gw.auth.turns
                assert turns is not None  # only a stage with turns defers
                ex.state = advance(ex.state, DEFER)
                # Reading goes on (unlike _park): the wait is a few loop turns, a body is bounded
                # by on_request_body's own pause, and a client that resets is noticed and skipped.
                turns.wait(partial(self._after_turn, ex, runtime, token, presented, step, decision.key))
                return
            if isinstance(decision, Pending):
                if step == AUTHORIZE_AGAIN:
                    self._deny(ex, invalid_token("unknown_kid", "unknown key"))
                    return
                self._park(ex, self._after_refetch(ex, runtime, decision, token, presented))
                return
            if isinstance(decision, CheckReplay):
                self._park(ex, self._after_replay_check(ex, runtime, decision, token, presented))
                return
            allow = decision
        if allow is None:  # fail closed: nothing may reach an upstream unauthorised
            raise RuntimeError("decision reached forwarding without authorisation")
        if step <= LIMIT_AFTER and policy is not None and policy.needs_identity:
            key = policy.key_for(self.client_address(ex), allow.claims)
            if not self._within_limit(ex, runtime, policy, key, token, presented, FORWARD, allow):
                return
        self._allowed(ex, runtime, allow)

    def client_address(self, ex: Exchange) -> str:
        """The client the limits count: the peer, or whom a trusted proxy names (contract §5.5)."""
        forwarded = self.forwarded(ex)
        return forwarded.client if forwarded is not None else self.peer

    def _within_limit(self, ex: Exchange, runtime: RouteRuntime, policy: Policy, key: bytes, token: str | None,
                      presented: Presentation, next_step: int, allow: Allow | None,
                      token_key: bytes | None = None) -> bool:
        """Whether ``ex`` may go on now; otherwise it has been answered 429 or parked on Redis."""
        limits = self.gw.limits
        if limits.uses_redis:
            self._park(ex, self._after_limit(ex, runtime, policy, key, token, presented, next_step, allow, token_key))
            return False
        wait = limits.check(policy, key, time.time())
        if wait > 0.0:
            self._rate_limited(ex, runtime, policy, wait)
            return False
        return True

    def _park(self, ex: Exchange, work: Coroutine[Any, Any, None]) -> None:
        """Wait for ``work`` in ``DECIDING``; a body that arrives meanwhile is buffered (bounded)."""
        ex.state = advance(ex.state, DEFER)
        self.reading.pause("buffer")
        ex.task = self.loop.create_task(work)

    async def _after_limit(self, ex: Exchange, runtime: RouteRuntime, policy: Policy, key: bytes,
                           token: str | None, presented: Presentation, next_step: int, allow: Allow | None,
                           token_key: bytes | None = None) -> None:
        try:
            wait = await self.gw.limits.check_redis(policy, key, time.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            ex.task = None
            self.internal_error(ex)
            return
        ex.task = None
        if self.closed:
            return
        try:
            self.reading.resume("buffer")
            if wait > 0.0:
                self._rate_limited(ex, runtime, policy, wait)
            else:
                self._proceed(ex, runtime, token, presented, next_step, allow, token_key)
        except Exception:
            self.internal_error(ex)

    def _after_turn(self, ex: Exchange, runtime: RouteRuntime, token: str | None, presented: Presentation,
                    step: int, token_key: bytes) -> None:
        """A verification slot for ``ex``, which waited for it (jwtproxy.turns): decide it now,
        unless it was answered meanwhile (a protocol error) or its client has gone, which the
        transport knows first (closing at once; ``connection_lost``, which drops ``ex``, follows
        as a callback)."""
        transport = self.transport
        if (self.closed or transport is None or transport.is_closing() or self.current is not ex
                or ex.state != DECIDING or ex.task is not None):
            return
        self._authorize_after_wait(ex, runtime, token, presented, step, token_key)

    def _authorize_after_wait(self, ex: Exchange, runtime: RouteRuntime, token: str | None,
                              presented: Presentation, step: int, token_key: bytes | None = None) -> None:
        """Go on with ``ex`` from authorisation step ``step`` once its wait is over."""
        try:
            self.reading.resume("buffer")
            self._proceed(ex, runtime, token, presented, step, None, token_key)
        except Exception:
            self.internal_error(ex)

    def _rate_limited(self, ex: Exchange, runtime: RouteRuntime, policy: Policy, wait: float) -> None:
        ex.deny_reason = "rate_limited"
        self.gw.metrics.rate_limited(runtime.label)
        self._answer(ex, 429, "rate limit exceeded", error="rate_limited", headers=policy.headers(wait))

    def _start_trace(self, ex: Exchange, host: str, route: RouteConfig | None) -> None:
        """[tracing] is on: the request's SERVER span (see jwtproxy.tracing)."""
        tracer = self.gw.tracer
        assert tracer is not None
        fwd = ex.forwarded
        ex.trace = tracer.request(
            ex.head.method, ex.head.version, ex.head.headers, path=ex.path, scheme=self.proto, host=host,
            client=fwd.client if fwd is not None else self.peer, request_id=ex.request_id,
            age=self.loop.time() - ex.started, route=route.path_prefix if route is not None else None,
            upstream=route.upstream if route is not None else None,
        )

    def _presentation(self, ex: Exchange, source: TokenSource | None) -> Presentation:
        """What this request offers as proof of possession (contract §5.2)."""
        scanned = ex.scanned
        dpop_scheme = (
            source is not None and source.name == "authorization" and source.kind == "header"
            and uses_dpop_scheme(scanned.authorization)
        )
        if not dpop_scheme and not scanned.dpop and self.peer_cert is None and self.gw.proxies.cert_header is None:
            return BEARER  # no proof, and no certificate anywhere: nothing else to look at
        fwd = self.forwarded(ex)
        cert = self.peer_cert
        if fwd is not None and fwd.client_cert is not None:
            cert = header_thumbprint(fwd.client_cert)  # the client's, vouched for by the proxy
        authority = ex.authority.encode("latin-1") if ex.authority is not None else scanned.host
        scheme = self.proto
        if fwd is not None:
            scheme = fwd.proto or scheme
            authority = fwd.host or authority
        return request_presentation(
            method=ex.method,
            target=ex.target,
            scheme=scheme,
            authority=authority,
            dpop_scheme=dpop_scheme,
            proofs=scanned.dpop,
            cert=cert,
        )

    def forwarded(self, ex: Exchange) -> Forwarded | None:
        """What the front proxy said about ``ex`` (None: the peer is not one), read on first use:
        parsing its addresses costs microseconds that a request needing none of it (a cached
        bearer token on an authz listener) does not pay."""
        if ex.forwarded is None and self.trusted_peer:
            ex.forwarded = self.gw.proxies.forwarded(self.peer, ex.head.headers, peer_trusted=True)
        return ex.forwarded

    def _begin_queued(self, ex: Exchange) -> None:
        if not self.closed and self.current is ex and ex.state == WAITING:
            self._begin(ex)

    async def _after_replay_check(self, ex: Exchange, runtime: RouteRuntime, check: CheckReplay,
                                  token: str | None, presented: Presentation) -> None:
        """Record the proof's jti across nodes (Redis) before forwarding; fail closed."""
        remote = self.gw.replay_remote
        issuer = check.allow.issuer or ""
        decision: Allow | Deny
        try:
            first = remote is not None and await remote.first_use(
                check.proof.replay_key, check.proof.replay_until, time.time()
            )
            decision = check.allow if first else replay_denied(self.gw.auth.dpop_algs.get(issuer, ""))
        except ReplayCheckUnavailable:
            decision = REPLAY_UNAVAILABLE
        except Exception:  # CancelledError (a BaseException) passes: the exchange was dropped
            ex.task = None
            self.internal_error(ex)
            return
        ex.task = None
        if self.closed:
            return
        try:
            self.reading.resume("buffer")
            if isinstance(decision, Allow):
                self._proceed(ex, runtime, token, presented, LIMIT_AFTER, decision)
            else:
                self._deny(ex, decision)
        except Exception:
            self.internal_error(ex)

    async def _after_refetch(
        self, ex: Exchange, runtime: RouteRuntime, pending: Pending, token: str | None, presented: Presentation
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(pending.wait), 10.0)
        except asyncio.CancelledError:
            raise
        except Exception:  # the refetch failed; the retry below then says "unknown key"
            pass
        ex.task = None
        if self.closed:
            return
        self._authorize_after_wait(ex, runtime, token, presented, AUTHORIZE_AGAIN)

    @staticmethod
    def _is_preflight(ex: Exchange) -> bool:
        if ex.method != b"OPTIONS":
            return False
        names = {name for name, _ in ex.head.headers}
        return b"origin" in names and b"access-control-request-method" in names

    def _deny(self, ex: Exchange, deny: Deny) -> None:
        ex.deny_reason = deny.reason
        self.gw.metrics.auth_failure(deny.reason)
        self._answer(
            ex,
            deny.status,
            deny.description,
            error=deny.error,
            www_auth=deny.www_authenticate,
            retry_after=deny.retry_after,
            dpop_nonce=deny.dpop_nonce,
            headers=deny.headers,
        )

    def _allowed(self, ex: Exchange, runtime: RouteRuntime, allow: Allow) -> None:
        """The request may pass: a traffic listener forwards it, an authz listener says so."""
        if self.authz:
            self._answer_allowed(ex, allow)
        else:
            self._forward(ex, runtime, allow)

    def _answer_allowed(self, ex: Exchange, allow: Allow) -> None:
        """An authz listener's yes: ``200``, no body, the identity headers for the front proxy."""
        ex.auth = allow
        ex.status = 200
        ex.state = advance(ex.state, ANSWER)
        ex.keep_alive = keeps_alive(ex.head.keep_alive, ex.received, False, False, self.last())
        self.write(allowed_response(ex.request_id, allow.identity_block, not ex.keep_alive))
        self.complete(ex)

    # -- forwarding -----------------------------------------------------------------------------------
    def _forward(self, ex: Exchange, runtime: RouteRuntime, allow: Allow) -> None:
        ex.auth = allow
        if ex.trace is not None:
            ex.trace.upstream_start(ex.head.method)
        if ex.upgrade and not self.codec.tunnel_after_message:
            ex.upgrade = False
        conn = runtime.pool.take_idle()
        if conn is not None:
            self._attach(ex, runtime, conn)
        else:
            ex.state = advance(ex.state, CONNECT)
            ex.task = self.loop.create_task(self._connect(ex, runtime))

    async def _connect(self, ex: Exchange, runtime: RouteRuntime) -> None:
        try:
            conn = await runtime.pool.connect()
        except UpstreamError as error:
            ex.task = None
            if ex.trace is not None:
                ex.trace.upstream_end(None, error.kind)
            if not self.closed:
                self.gw.metrics.upstream_error(runtime.pool.name, error.kind)
                if error.kind == "overflow":
                    self.gw.metrics.queue_rejected(runtime.pool.name)
                self._answer(ex, error.status, error.description, retry_after=error.retry_after)
            return
        except Exception:  # CancelledError (a BaseException) passes: the exchange was dropped
            ex.task = None
            self.internal_error(ex)
            return
        ex.task = None
        if self.closed:
            runtime.pool.release(conn)
            return
        try:
            self._attach(ex, runtime, conn)
        except Exception:
            self.internal_error(ex)

    def _attach(self, ex: Exchange, runtime: RouteRuntime, conn: UpstreamConnection) -> None:
        gw = self.gw
        scanned = ex.scanned
        head = ex.head
        path = strip_prefix(runtime.route, ex.path) if runtime.strip_prefix else ex.path
        target = (path + ex.query).encode("latin-1")
        client_host = (ex.authority.encode("latin-1") if ex.authority is not None else scanned.host) or b""
        fwd = self.forwarded(ex)
        proto = self.proto
        forwarded_host = client_host
        if fwd is not None:  # a trusted proxy's view of the client is what the upstream hears
            proto = fwd.proto or proto
            forwarded_host = fwd.host or forwarded_host
        if runtime.preserve_host and client_host:
            host = client_host
        else:
            host = runtime.pool_hosts[conn.target_index]
        if scanned.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif scanned.content_length is not None:
            framing = b"content-length: %d\r\n" % scanned.content_length
        else:
            framing = b""
        allow = ex.auth
        signer = gw.signer
        assertion = None
        if signer is not None and allow.token_key is not None:
            # Contract §5.4: every request forwarded with a verified token; reused per
            # (token, upstream), so a cache-hit request costs a dict lookup here, not a signature.
            assertion = signer.assertion(allow.token_key, runtime.pool.name, allow.claims, allow.exp, time.time())
        identity = allow.identity
        drop = runtime.drop_names if self.trusted_peer else runtime.drop_untrusted
        if ex.trace is not None:
            # The client's trace headers give way to ours, naming the upstream exchange's span.
            upstream = runtime.pool.targets[conn.target_index]
            identity = identity + ex.trace.upstream_headers(upstream.scheme, upstream.host, upstream.port, path)
            drop = drop | TRACE_HEADERS
        upstream_head = gw.policy.upstream_head(
            head.method,
            target,
            head.headers,
            scanned,
            host=host,
            forwarded_host=forwarded_host,
            client_ip=self.client_ip,
            proto=proto,
            request_id=ex.request_id,
            identity=identity,
            forward_authorization=runtime.forward_token or runtime.auth_off,
            drop_names=drop,
            framing=framing,
            upgrade=b"websocket" if ex.upgrade else None,
            assertion=assertion,
        )
        ex.state = advance(ex.state, ATTACH)
        try:
            conn.start(ex, upstream_head, head.method == b"HEAD", runtime.response_timeout)
        except UpstreamError as error:
            # The upstream closed the connection after it was handed out: a pooled one is retried
            # like any stale keep-alive connection; a new one is answered 502.
            self.upstream_failed(ex, error, conn.reused)
            return
        ex.upstream = conn
        if self.write_paused:
            conn.pause_reading()
        if scanned.expect_continue and not ex.received and head.version == b"1.1":
            self.write(CONTINUE)
        if ex.body_chunks:
            chunks = ex.body_chunks
            ex.body_chunks = []
            ex.body_buffered = 0
            for chunk in chunks:
                conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if scanned.chunked else chunk)
            self.reading.resume("buffer")
        if ex.received:
            if scanned.chunked:
                conn.send(b"0\r\n\r\n")
            conn.request_sent()

    def upstream_failed(self, ex: Exchange, error: UpstreamError, retryable: bool) -> None:
        runtime = ex.route
        if self.closed or ex.state == DONE or runtime is None:
            return  # dropped with its connection, or answered already (only routed ones are forwarded)
        if ex.trace is not None:
            ex.trace.upstream_end(None, error.kind)
        if may_retry(retryable, ex.retried, ex.expects_body, ex.head.method):
            if ex.trace is not None:
                ex.trace.upstream_start(ex.head.method)
            ex.retried = True
            ex.state = advance(ex.state, CONNECT)
            ex.task = self.loop.create_task(self._connect(ex, runtime))
            return
        self.gw.metrics.upstream_error(runtime.pool.name, error.kind)
        if ex.state >= RESPONDING:
            # Part of the response is out: the only honest signal left is to cut the connection.
            ex.status = ex.status or error.status
            self.abort()
            return
        self._answer(ex, error.status, error.description)

    # -- answering and completing ----------------------------------------------------------------------
    def _answer(
        self,
        ex: Exchange,
        status: int,
        description: str,
        *,
        must_close: bool = False,
        error: str | None = None,
        www_auth: bytes | None = None,
        retry_after: int | None = None,
        dpop_nonce: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer ``ex`` with an error from the gateway itself."""
        if ex.upstream is not None:
            ex.upstream.abandon()
            ex.upstream = None
        ex.status = status
        ex.state = advance(ex.state, ANSWER)
        requested = ex.head.keep_alive and not must_close and status not in CLOSE_AFTER
        ex.keep_alive = keeps_alive(requested, ex.received, ex.upgrade, False, self.last())
        self.write(
            error_response(
                status,
                description,
                error=error,
                request_id=ex.request_id,
                close=not ex.keep_alive,
                www_auth=www_auth,
                retry_after=retry_after,
                head_only=ex.head.method == b"HEAD",
                dpop_nonce=dpop_nonce,
                headers=headers,
            )
        )
        self.complete(ex)

    def last(self) -> bool:
        """Whether the current exchange is the last this draining connection answers."""
        return self.closing and not self.queue and self.deferred_error is None

    def complete(self, ex: Exchange) -> None:
        """``ex``'s response is out (state DONE): record it, then start the next request, or close."""
        self._record(ex)
        if self.current is ex:
            self.current = None
        if not ex.keep_alive:
            if self.receiving is ex:
                self.receiving = None
            self.close()
            return
        if self.queue:
            # Requests received whole before a shutdown or a protocol error are still answered.
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue:
                self.reading.resume("pipeline")
            if self._ready(nxt):
                # Scheduled, not called: a long pipeline of immediate answers must not recurse.
                self.loop.call_soon(self._begin_queued, nxt)
        elif self.closing:
            self._drained()
        else:
            self.head_started = False
            self._set_deadline(self.gw.config.server.keepalive_timeout, "idle")

    def _drained(self) -> None:
        """A closing connection has answered every request: the deferred error goes last, then close."""
        if self.deferred_error is not None:
            status, description = self.deferred_error
            self.write(error_response(status, description, close=True))
        self.close()

    def internal_error(self, ex: Exchange) -> None:
        """An unexpected exception escaped while serving ``ex``: log it once and end the exchange.

        Called from inside the ``except`` block. Nothing of the response out yet: a 500 and a close;
        otherwise the connection is cut, the only honest signal left.
        """
        log.exception("internal error while handling a request")
        try:
            if ex.state >= RESPONDING or self.closed:
                self.abort()
                return
            if ex.task is not None and ex.task is not asyncio.current_task():
                ex.task.cancel()
            ex.task = None
            self._answer(ex, 500, "internal error", must_close=True)
        except Exception:  # answering failed too; the traceback above is the one that matters
            self.abort()

    def _record(self, ex: Exchange) -> None:
        gw = self.gw
        duration = self.loop.time() - ex.started
        runtime = ex.route
        label = runtime.label if runtime is not None else "-"
        gw.metrics.request(label, ex.status, duration, self.listener)
        if ex.trace is not None:
            ex.trace.finish(ex.status, ex.deny_reason or ("ok" if ex.auth.sub else "anonymous"))
        if gw.access_log.enabled:
            auth = ex.auth
            fwd = self.forwarded(ex)
            gw.access_log.write(
                {
                    "request_id": ex.request_id.decode("latin-1"),
                    "listener": self.listener,
                    "method": ex.method.decode("latin-1"),
                    "path": ex.path or "-",
                    "status": ex.status,
                    "route": label,
                    "upstream": runtime.pool.name if runtime is not None and not self.authz else None,
                    "duration": round(duration, 6),
                    "sub": auth.sub,
                    "jti": auth.jti,
                    "auth": ex.deny_reason or ("ok" if auth.sub else "anonymous"),
                    "bytes_in": ex.body_bytes,
                    "bytes_out": ex.bytes_out,
                    "client": fwd.client if fwd is not None else self.peer or "unknown",
                }
            )

    def _protocol_error(self, status: int, description: str) -> None:
        """The client broke the protocol: stop reading, answer, close.

        Requests that arrived whole before the broken bytes are answered first, in order, and the
        error response comes last (a pipelined valid request is never lost to a later malformed
        one). The exchange whose own bytes were broken is never forwarded, or is abandoned if its
        body was already streaming.
        """
        self.closing = True
        self.reading.pause("error")
        self.gw.metrics.request("-", status, 0.0, self.listener)
        broken = self.receiving
        self.receiving = None
        if broken is not None and broken is not self.current:
            self.queue.remove(broken)
            broken = None
        current = self.current
        if broken is not None and current is not None:
            # The request in flight is itself malformed (its body broke off).
            if current.task is not None:
                current.task.cancel()
                current.task = None
            if current.upstream is not None:
                current.upstream.abandon()
                current.upstream = None
            if current.state >= RESPONDING:
                self.abort()
                return
            self._answer(current, status, description, must_close=True)
            return
        self.deferred_error = (status, description)
        if current is None:
            self._drained()

    def _abandon_all(self) -> None:
        """Drop every exchange of this connection (the client cannot complete its request)."""
        for ex in (self.current, *self.queue):
            if ex is None:
                continue
            if ex.task is not None:
                ex.task.cancel()
                ex.task = None
            if ex.upstream is not None:
                ex.upstream.abandon()
                ex.upstream = None
        self.closing = True

    # -- transport helpers ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send ``data`` at the end of this loop turn, after what was written before it
        (:mod:`jwtproxy.outbox`)."""
        # is_closing(): the client may have reset the connection with connection_lost not yet
        # delivered, and a write then raises.
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        held = self.held_out
        if held is not None:
            held.append(data)
        elif self.gw.outbox.hold(self):
            self.held_out = [data]
        else:
            transport.write(data)

    def flush_out(self) -> None:
        """Write what this turn held (the outbox's end-of-turn callback, and before a close)."""
        held = self.held_out
        if held is None:
            return
        self.held_out = None
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.closing = True
        self.flush_out()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self.held_out = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the exchange in flight."""
        if self.current is None and not self.queue and self.receiving is None:
            self.close()
        else:
            self.closing = True

    def _set_deadline(self, delay: float, kind: str) -> None:
        when = self.loop.time() + delay
        self.deadline = when
        self.deadline_kind = kind
        if self.timer is None or self.timer_at > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = when
            self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.closed:
            return
        now = self.loop.time()
        if now < deadline:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)
            return
        if self.deadline_kind == "head" and self.head_started and self.current is None:
            self.write(error_response(408, "request head not received in time", close=True))
        self.close()
