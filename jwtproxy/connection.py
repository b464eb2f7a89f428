"""The client side of the gateway: one :class:`ClientConnection` per accepted socket.

Theory of operation
-------------------
The connection owns the transport, the codec, one timer and the pipeline; an :class:`Exchange`
owns one request from its head to the end of its response. The codec reports request events
(``on_request_head`` / ``on_request_body`` / ``on_request_end``); the connection turns each head
into an exchange and each exchange into exactly one response, in arrival order:

* A request without a body is decided when its end arrives; one with a body is decided at its head,
  so the body can stream to the upstream (or, when the answer is an error, never be read at all:
  the connection then closes after the error, because the unread body would be taken for the next
  request).
* "Decided" means: scan the head (framing rules), normalise the target, route, authorise (one call
  into :class:`jwtproxy.auth.AuthStage`), then either answer an error here or hand the exchange to
  an upstream connection, idle from the pool (synchronously) or newly connected (a task).
* Pipelined requests wait in ``queue``; reading pauses while one waits, so at most one read's worth
  of requests is ever buffered.
* One timer per connection, re-armed lazily against ``deadline``: ``header_timeout`` while a request
  head is incomplete (slowloris), ``keepalive_timeout`` while idle, none while an exchange runs
  (the upstream's ``response_timeout`` covers that).

Reading from the client pauses for three independent reasons (``pipeline``, ``buffer`` while a
body waits for an upstream connection, ``upstream`` while the upstream cannot take more bytes);
:meth:`_pause` and :meth:`_resume` keep the transport paused while any reason holds. A slow client
pauses the upstream's reading in turn (``pause_writing``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from jwtproxy.auth import ANONYMOUS, Allow, AmbiguousToken, Deny, MalformedAuthorization, Pending, extract_token, invalid_token
from jwtproxy.codec import ProtocolError, RequestHead, make_codec
from jwtproxy.headerpolicy import ScannedHead, response_head, scan_request_head
from jwtproxy.responses import error_response
from jwtproxy.routing import BadRequest, normalise_target, split_host, strip_prefix
from jwtproxy.upstream import UpstreamConnection, UpstreamError

if TYPE_CHECKING:
    from jwtproxy.gateway import Gateway, RouteRuntime

log = logging.getLogger("jwtproxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
BUFFER_LIMIT = 256 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Response body modes towards the client.
BODY_NONE = 0
BODY_RAW = 1
BODY_CHUNKED = 2


class Exchange:
    """One request and its response."""

    __slots__ = (
        "conn",
        "head",
        "scanned",
        "started",
        "expects_body",
        "begun",
        "request_done",
        "response_started",
        "response_done",
        "completed",
        "route",
        "request_id",
        "upstream",
        "body_chunks",
        "body_buffered",
        "body_bytes",
        "body_sent",
        "status",
        "bytes_out",
        "out",
        "body_mode",
        "keep_alive",
        "auth",
        "deny_reason",
        "retried",
        "tunnel",
        "tunnel_open",
        "tunnel_buffer",
        "path",
        "query",
        "authority",
        "task",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead, started: float) -> None:
        self.conn = conn
        self.head = head
        self.scanned: ScannedHead | None = None
        self.started = started
        self.expects_body = False
        self.begun = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.completed = False
        self.route: RouteRuntime | None = None
        self.request_id = b""
        self.upstream: UpstreamConnection | None = None
        self.body_chunks: list[bytes] = []
        self.body_buffered = 0
        self.body_bytes = 0
        self.body_sent = False
        self.status = 0
        self.bytes_out = 0
        self.out: list[bytes] = []
        self.body_mode = BODY_NONE
        self.keep_alive = head.keep_alive
        self.auth: Allow | None = None
        self.deny_reason: str | None = None
        self.retried = False
        self.tunnel = False
        self.tunnel_open = False
        self.tunnel_buffer: list[bytes] = []
        self.path = ""
        self.query = ""
        self.authority: str | None = None
        self.task: asyncio.Task[None] | None = None

    # -- ResponseSink (called by the UpstreamConnection) ----------------------------------------
    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: bytes | None,
    ) -> None:
        self.response_started = True
        self.status = status
        conn = self.conn
        head = self.head
        http10 = head.version == b"1.0"
        if status == 101 and self.tunnel:
            self.tunnel_open = True
            self.keep_alive = False
            self.out.append(
                response_head(b"1.1", status, reason, headers, self.request_id, b"", False, False, upgrade=True)
            )
            # Bytes the client sent after its upgrade request belong to the new protocol, so they
            # go upstream only now that the upstream has switched. Had it declined, they would be
            # parsed there as further HTTP requests that never passed the gateway (smuggling).
            if self.tunnel_buffer and self.upstream is not None:
                for data in self.tunnel_buffer:
                    self.upstream.tunnel_write(data)
            self.tunnel_buffer.clear()
            conn._resume("tunnel")
            return
        self.tunnel_buffer.clear()  # upgrade declined: what followed the request is dropped
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
            self.body_mode = BODY_RAW  # close-delimited for an HTTP/1.0 client
            framing = b""
            self.keep_alive = False
        if self.tunnel or not self.request_done or (conn.closing and not conn.queue and conn.deferred_error is None):
            self.keep_alive = False
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
        if self.tunnel_open:
            self.on_response_flushed()
            self.conn.close()
            return
        if self.body_mode == BODY_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.on_response_flushed()
        self.response_done = True
        self.upstream = None
        if not self.request_done:
            self.keep_alive = False
        self.conn.exchange_done(self)

    def on_upstream_failed(self, error: UpstreamError, retryable: bool) -> None:
        self.upstream = None
        try:
            self.conn.upstream_failed(self, error, retryable)
        except Exception:
            self.conn.internal_error(self)

    def on_tunnel_data(self, data: bytes) -> None:
        if self.tunnel_open:
            if self.out:
                self.on_response_flushed()
            self.conn.write(data)

    def pause_client_reading(self) -> None:
        self.conn._pause("upstream")

    def resume_client_reading(self) -> None:
        self.conn._resume("upstream")


class ClientConnection(asyncio.Protocol):
    """One client socket: codec, pipeline, timer and flow control."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.loop = asyncio.get_running_loop()
        config = gateway.config.server
        self.codec = make_codec(config.http_parser, self, config.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"unknown"
        self.proto = b"http"
        self.current: Exchange | None = None
        self.receiving: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused: set[str] = set()
        self.write_paused = False
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
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()
        if transport.get_extra_info("sslcontext") is not None:
            self.proto = b"https"
        self.gw.connections.add(self)
        self._set_deadline(self.gw.config.server.header_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self.gw.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for ex in (self.current, *self.queue):
            if ex is not None and not ex.completed and ex.begun:
                ex.status = ex.status or 499  # nginx's "client closed request"
                self._record(ex)
        self._abandon_all()
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
        ex = Exchange(self, head, self.loop.time())
        scanned = scan_request_head(head)
        ex.scanned = scanned
        limit = self.gw.config.server.max_body_bytes
        if scanned.content_length is not None and limit and scanned.content_length > limit:
            raise ProtocolError("request body too large", 413)
        ex.expects_body = scanned.chunked or bool(scanned.content_length)
        if head.upgrade and scanned.upgrade == b"websocket" and head.method == b"GET":
            ex.tunnel = True
            self.codec.tunnel_after_message = True
        self.receiving = ex
        self.deadline = None
        if self.current is None:
            self.current = ex
            if ex.expects_body:
                self._begin(ex)
        else:
            self.queue.append(ex)
            self._pause("pipeline")

    def on_request_body(self, data: bytes) -> None:
        ex = self.receiving
        if ex is None or self.closing:
            return
        ex.body_bytes += len(data)
        limit = self.gw.config.server.max_body_bytes
        if limit and ex.body_bytes > limit:
            raise ProtocolError("request body too large", 413)
        if ex.response_done:
            return  # answered already; the rest of the body is read only to reach the next request
        upstream = ex.upstream
        if upstream is not None:
            upstream.send(b"%x\r\n%b\r\n" % (len(data), data) if ex.scanned.chunked else data)  # type: ignore[union-attr]
            ex.body_sent = True
        else:
            ex.body_chunks.append(data)
            ex.body_buffered += len(data)
            if ex.body_buffered > BUFFER_LIMIT:
                self._pause("buffer")

    def on_request_end(self) -> None:
        ex = self.receiving
        if ex is None:
            return
        self.receiving = None
        ex.request_done = True
        if self.closing and ex is not self.current:
            return
        if ex is self.current and not ex.begun:
            self._begin(ex)
        elif ex.upstream is not None:
            if ex.scanned is not None and ex.scanned.chunked:
                ex.upstream.send(b"0\r\n\r\n")
            ex.upstream.request_sent()
        if ex.response_done and not ex.completed:
            self.exchange_done(ex)

    def on_tunnel_data(self, data: bytes) -> None:
        ex = self.current
        if ex is None or not ex.tunnel:
            return
        if ex.tunnel_open and ex.upstream is not None:
            ex.upstream.tunnel_write(data)
        elif not ex.response_started:
            # Held until the upstream switches protocols (see Exchange.on_response_head).
            ex.tunnel_buffer.append(data)
            ex.body_buffered += len(data)
            if ex.body_buffered > BUFFER_LIMIT:
                self._pause("tunnel")

    # -- deciding ------------------------------------------------------------------------------------
    def _begin(self, ex: Exchange) -> None:
        ex.begun = True
        gw = self.gw
        scanned = ex.scanned
        if scanned is None:  # queued heads are scanned on arrival; this cannot happen
            self._answer(ex, 400, "malformed request")
            return
        ex.request_id = scanned.request_id or gw.next_request_id()
        try:
            path, query, authority = normalise_target(ex.head.target)
            host_value = authority if authority is not None else (scanned.host or b"").decode("latin-1")
            host = split_host(host_value) if host_value else ""
        except BadRequest as exc:
            self._answer(ex, 400, exc.description)
            return
        ex.path = path
        ex.query = query
        ex.authority = authority
        route = gw.router.match(host, path)
        if route is None:
            self._answer(ex, 404, "no route")
            return
        runtime = gw.routes[id(route)]
        ex.route = runtime
        if runtime.auth_off or (runtime.cors_forward and self._is_preflight(ex.head)):
            self._forward(ex, ANONYMOUS)
            return
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
        decision = gw.auth.authorize(runtime.rules, token, time.time())
        if type(decision) is Allow:
            self._forward(ex, decision)
        elif type(decision) is Deny:
            self._deny(ex, decision)
        else:
            self._pause("buffer")
            ex.task = self.loop.create_task(self._after_refetch(ex, decision, token))  # type: ignore[arg-type]

    async def _after_refetch(self, ex: Exchange, pending: Pending, token: str | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(pending.wait), 10.0)
        except asyncio.CancelledError:
            raise
        except Exception:  # the refetch failed; the retry below then says "unknown key"
            pass
        ex.task = None
        try:
            self._decide_after_refetch(ex, token)
        except Exception:
            self.internal_error(ex)

    def _decide_after_refetch(self, ex: Exchange, token: str | None) -> None:
        if self.closed or ex.route is None:
            return
        self._resume("buffer")
        decision = self.gw.auth.authorize(ex.route.rules, token, time.time(), refetched=True)
        if type(decision) is Allow:
            self._forward(ex, decision)
        elif type(decision) is Deny:
            self._deny(ex, decision)
        else:
            self._deny(ex, invalid_token("unknown_kid", "unknown key"))

    @staticmethod
    def _is_preflight(head: RequestHead) -> bool:
        if head.method != b"OPTIONS":
            return False
        names = {name for name, _ in head.headers}
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
        )

    # -- forwarding -----------------------------------------------------------------------------------
    def _forward(self, ex: Exchange, allow: Allow) -> None:
        ex.auth = allow
        runtime = ex.route
        assert runtime is not None
        if ex.tunnel and not self.codec.tunnel_after_message:
            ex.tunnel = False
        conn = runtime.pool.take_idle()
        if conn is not None:
            self._attach(ex, conn)
        else:
            ex.task = self.loop.create_task(self._connect(ex))

    async def _connect(self, ex: Exchange) -> None:
        runtime = ex.route
        assert runtime is not None
        try:
            conn = await runtime.pool.connect()
        except UpstreamError as error:
            ex.task = None
            if not self.closed:
                self.gw.metrics.upstream_error(runtime.pool.name, error.kind)
                self._answer(ex, error.status, error.description)
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
            self._attach(ex, conn)
        except Exception:
            self.internal_error(ex)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        runtime = ex.route
        assert runtime is not None and ex.scanned is not None and ex.auth is not None
        gw = self.gw
        scanned = ex.scanned
        head = ex.head
        path = strip_prefix(runtime.route, ex.path) if runtime.strip_prefix else ex.path
        target = (path + ex.query).encode("latin-1")
        client_host = (ex.authority.encode("latin-1") if ex.authority is not None else scanned.host) or b""
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
        upstream_head = gw.policy.upstream_head(
            head.method,
            target,
            head.headers,
            scanned,
            host=host,
            forwarded_host=client_host,
            client_ip=self.client_ip,
            proto=self.proto,
            request_id=ex.request_id,
            identity=ex.auth.identity,
            forward_authorization=runtime.forward_token or runtime.auth_off,
            drop_names=runtime.drop_names,
            framing=framing,
            upgrade=b"websocket" if ex.tunnel else None,
        )
        try:
            conn.start(ex, upstream_head, head.method == b"HEAD", runtime.response_timeout)
        except UpstreamError as error:
            # The upstream closed the connection after it was handed out: an idle one may be
            # retried like any reused connection; a new one is answered 502.
            self.upstream_failed(ex, error, conn.reused)
            return
        ex.upstream = conn
        if self.write_paused:
            conn.pause_reading()
        if scanned.expect_continue and not ex.request_done and head.version == b"1.1":
            self.write(CONTINUE)
        if ex.body_chunks:
            chunks = ex.body_chunks
            ex.body_chunks = []
            ex.body_buffered = 0
            for chunk in chunks:
                conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if scanned.chunked else chunk)
            ex.body_sent = True
            self._resume("buffer")
        if ex.request_done:
            if scanned.chunked:
                conn.send(b"0\r\n\r\n")
            conn.request_sent()

    def upstream_failed(self, ex: Exchange, error: UpstreamError, retryable: bool) -> None:
        if self.closed or ex.completed:
            return
        runtime = ex.route
        assert runtime is not None
        if (
            retryable
            and not ex.retried
            and not ex.body_sent
            and not ex.expects_body
            and ex.head.method in IDEMPOTENT
        ):
            # A kept-alive connection the upstream had closed just before our request: try once more
            # on a fresh connection (RFC 9110 §9.2.2).
            ex.retried = True
            ex.task = self.loop.create_task(self._connect(ex))
            return
        self.gw.metrics.upstream_error(runtime.pool.name, error.kind)
        if ex.response_started:
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
        error: str | None = None,
        www_auth: bytes | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer ``ex`` with an error from the gateway itself."""
        if ex.upstream is not None:
            ex.upstream.abandon()
            ex.upstream = None
        ex.status = status
        ex.response_started = True
        if not ex.request_done or not ex.head.keep_alive or status in (400, 413, 431):
            ex.keep_alive = False
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
            )
        )
        ex.response_done = True
        self.exchange_done(ex)

    def exchange_done(self, ex: Exchange) -> None:
        """The response is complete; record it and move on to the next request, or close."""
        if ex.completed:
            return
        if not ex.request_done and ex.keep_alive:
            return  # the rest of the request body is still arriving; on_request_end calls back
        ex.completed = True
        self._record(ex)
        if self.current is ex:
            self.current = None
        if not ex.keep_alive:
            if not ex.request_done and self.receiving is ex:
                self.receiving = None
            self.close()
            return
        if self.queue:
            # Requests received whole before a shutdown or a protocol error are still answered.
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue:
                self._resume("pipeline")
            if nxt.request_done or nxt.expects_body:
                # Scheduled, not called: a long pipeline of immediate answers must not recurse.
                self.loop.call_soon(self._begin_queued, nxt)
        elif self.closing:
            if self.deferred_error is not None:
                status, description = self.deferred_error
                self.write(error_response(status, description, close=True))
            self.close()
        else:
            self.head_started = False
            self._set_deadline(self.gw.config.server.keepalive_timeout, "idle")

    def _begin_queued(self, ex: Exchange) -> None:
        if not self.closed and self.current is ex and not ex.begun:
            try:
                self._begin(ex)
            except Exception:
                self.internal_error(ex)

    def internal_error(self, ex: Exchange) -> None:
        """An unexpected exception escaped while serving ``ex``: log it once and end the exchange.

        Called from inside the ``except`` block. Nothing of the response out yet: a 500 and a close;
        otherwise the connection is cut, the only honest signal left.
        """
        log.exception("internal error while handling a request")
        try:
            if ex.completed or ex.response_started or self.closed:
                self.abort()
            else:
                if ex.task is not None and ex.task is not asyncio.current_task():
                    ex.task.cancel()
                ex.task = None
                ex.keep_alive = False
                self._answer(ex, 500, "internal error")
        except Exception:  # answering failed too; the traceback above is the one that matters
            self.abort()

    def _record(self, ex: Exchange) -> None:
        gw = self.gw
        duration = self.loop.time() - ex.started
        label = ex.route.label if ex.route is not None else "-"
        gw.metrics.request(label, ex.status, duration)
        if gw.access_log.enabled:
            auth = ex.auth
            gw.access_log.write(
                {
                    "request_id": ex.request_id.decode("latin-1"),
                    "method": ex.head.method.decode("latin-1"),
                    "path": ex.path or "-",
                    "status": ex.status,
                    "route": label,
                    "upstream": ex.route.pool.name if ex.route is not None else None,
                    "duration": round(duration, 6),
                    "sub": auth.sub if auth is not None else None,
                    "jti": auth.jti if auth is not None else None,
                    "auth": ex.deny_reason or ("ok" if auth is not None and auth.sub else "anonymous"),
                    "bytes_in": ex.body_bytes,
                    "bytes_out": ex.bytes_out,
                    "client": self.client_ip.decode("latin-1"),
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
        self._pause("error")
        self.gw.metrics.request("-", status, 0.0)
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
            if current.upstream is not None:
                current.upstream.abandon()
                current.upstream = None
            if current.response_started:
                self.abort()
                return
            current.keep_alive = False
            current.request_done = True
            self._answer(current, status, description)
            return
        if current is None:
            self.write(error_response(status, description, close=True))
            self.close()
            return
        self.deferred_error = (status, description)

    def _abandon_all(self) -> None:
        """Drop every exchange of this connection (the client cannot complete its request)."""
        for ex in (self.current, *self.queue):
            if ex is None:
                continue
            if ex.task is not None:
                ex.task.cancel()
            if ex.upstream is not None:
                ex.upstream.abandon()
                ex.upstream = None
        self.closing = True

    # -- transport helpers ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        # is_closing(): the client may have reset the connection with connection_lost not yet
        # delivered, and a write then raises.
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the exchange in flight."""
        if self.current is None and not self.queue and self.receiving is None:
            self.close()
        else:
            self.closing = True

    def _pause(self, reason: str) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

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
