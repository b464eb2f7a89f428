"""Pooled keep-alive connections to upstream targets, on raw (uv)loop transports.

Theory of operation
-------------------
An :class:`UpstreamPool` exists per ``[upstream.NAME]``. It hands out :class:`UpstreamConnection`
objects: an idle one when it has one (synchronously: the hot path never awaits), otherwise a new
connection (the caller awaits :meth:`UpstreamPool.connect`). Targets are chosen round robin; a
failed connect moves on to the next target, so one dead target does not fail requests while another
is up.

An :class:`UpstreamConnection` carries one exchange at a time. It writes the request head and body
it is given and parses the response with llhttp (``httptools.HttpResponseParser``), handing the
response head, body pieces and end to its :class:`ResponseSink` (the client connection). After a
complete response on a connection the upstream keeps open, with the request fully sent, the
connection goes back to the pool; anything else closes it, so a half-used connection is never
reused.

Flow control couples the two sides: when the client cannot take more response bytes the sink
pauses this connection's reading; when this connection cannot take more request bytes it asks the
sink to pause the client's reading.

llhttp cannot be told that a response answers a ``HEAD`` request, so for ``HEAD`` the parse is cut
off after the head (a ``_HeadDone`` raised from the callback) and a fresh parser is made for the
next response. Interim ``1xx`` responses other than ``101`` are dropped: the gateway answers
``Expect: 100-continue`` itself.

TLS towards ``https://`` targets uses the pool's context from :mod:`jwtproxy.upstream_tls`
(``ca_file``, ``client_cert``/``client_key``, hostnames verified). A TLS failure is ``kind =
"tls"``, answered 502 without detail, and its reason goes to one ``upstream_tls_error`` log line
per target and reason every :data:`TLS_LOG_INTERVAL` seconds (a misconfigured backend fails every
request; the journal gets the reason, not a flood). It is recognised during the handshake (the
connect raises ``ssl.SSLError``) and after it: with TLS 1.3 a server checks the client certificate
after the client has finished, and its alert ends the first exchange as an ``ssl.SSLError`` -- or,
when the request was already being written, as a reset; a fresh TLS connection reset before the
first response byte therefore counts as ``tls`` too.

Every way an exchange can go wrong here reaches the sink as one :meth:`ResponseSink.on_upstream_failed`:
a reset, a timeout, an invalid response, a connection that closed between connecting and
:meth:`UpstreamConnection.start` (start raises :class:`UpstreamError`), and an unexpected exception
in a callback (logged once, then reported as an ``internal`` failure), so the client always gets an
answer or a close.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol, cast

import httptools

from jwtproxy.accesslog import log_event
from jwtproxy.codec import unwrap_callback_error
from jwtproxy.config import Target, UpstreamConfig
from jwtproxy.connlimits import (
    CROSS_WORKER_POLL,
    LATE_TIMER,
    STALL_GRACE,
    STALL_GRACES,
    PendingQueue,
    QueueFull,
    UpstreamSlots,
)
from jwtproxy.outbox import Outbox
from jwtproxy.upstream_tls import client_context, failure_reason

__all__ = ["ResponseSink", "UpstreamConnection", "UpstreamError", "UpstreamPool"]

log = logging.getLogger("jwtproxy")

#: Seconds between two log lines for the same TLS failure reason of one target.
TLS_LOG_INTERVAL = 10.0


#: Every ``kind`` of ``jwtproxy_upstream_errors_total``, counted from 0 for every upstream.
UPSTREAM_ERROR_KINDS: tuple[str, ...] = ("connect", "tls", "reset", "timeout", "protocol", "internal", "overflow")


class UpstreamError(Exception):
    """A request could not be delivered. ``kind`` is the metric label, ``status`` the client's
    answer, ``retry_after`` its ``Retry-After`` seconds (None: no such header)."""

    def __init__(self, kind: str, status: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.kind = kind
        self.status = status
        self.description = description
        self.retry_after = retry_after


def overflow(description: str) -> UpstreamError:
    """The pool's answer when no connection can be had (contract §5.5): a 503 with Retry-After,
    metric label "overflow". A fresh exception each time: a raised one keeps its traceback."""
    return UpstreamError("overflow", 503, description, retry_after=1)


class ResponseSink(Protocol):
    """What an upstream connection reports to (implemented by the client side's exchange)."""

    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: bytes | None,
    ) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_response_flushed(self) -> None: ...
    def on_upstream_failed(self, error: UpstreamError, retryable: bool) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class _HeadDone(Exception):
    """Raised from the parser callback to stop parsing after the head of a response to HEAD."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_loop",
        "pool",
        "target_index",
        "transport",
        "closed",
        "idle_since",
        "reused",
        "sink",
        "_parser",
        "_raised",
        "_reason",
        "_headers",
        "_content_length",
        "_chunked",
        "_interim",
        "_is_head",
        "_got_bytes",
        "_head_seen",
        "_close_delimited",
        "_request_done",
        "_response_done",
        "_keep_alive",
        "_timer",
        "_timer_at",
        "_head_due",
        "_tunnel",
        "_paused_reading",
        "_tls",
        "_lost",
        "holds_slot",
        "_held",
    )

    def __init__(self, pool: UpstreamPool, target_index: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.pool = pool
        self.target_index = target_index
        self._tls = pool.targets[target_index].scheme == "https"
        self._lost: Exception | None = None  # what closed the connection, if it was an error
        self._held: list[bytes] | None = None  # written this loop turn, sent at its end (pool.outbox)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.sink: ResponseSink | None = None
        self._raised: BaseException | None = None  # what a parser callback raised (unwrap_callback_error)
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: bytes | None = None
        self._chunked = False
        self._interim = False
        self._is_head = False
        self._got_bytes = False
        self._head_seen = False
        self._close_delimited = False
        self._request_done = False
        self._response_done = False
        self._keep_alive = False
        # The response timeout (see _arm_head_timer): when the head is due (0.0: none is
        # awaited), and the one timer that watches it and when that timer fires.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head_due = 0.0
        self._tunnel = False
        self._paused_reading = False
        self.holds_slot = False  # counts against upstream_max_connections until it closes

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection always gets a full transport; BaseTransport is the declared type.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._held = None
        self._lost = exc
        self._cancel_timer()
        self.pool.free_slot(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        try:
            self._report_lost(sink, exc)
        except Exception:
            self._internal_error(sink)

    def _report_lost(self, sink: ResponseSink, exc: Exception | None) -> None:
        if self._tunnel:
            sink.on_response_end()
            return
        if self._head_seen and self._close_delimited and not self._response_done:
            # A response without Content-Length or chunking ends when the upstream closes.
            self._response_done = True
            sink.on_response_end()
            sink.on_response_flushed()
            return
        if not self._response_done:
            if self._tls_rejected(exc):
                assert exc is not None
                sink.on_upstream_failed(self.pool.tls_failure(self.target_index, exc), False)
                return
            retryable = self.reused and not self._got_bytes
            sink.on_upstream_failed(
                UpstreamError("reset", 502, "upstream closed the connection"), retryable
            )

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.close()
            return
        try:
            if self._tunnel:
                sink.on_tunnel_data(data)
                return
            self._got_bytes = True
            self._parse(data, sink)
        except Exception:
            self._internal_error(sink)

    def _parse(self, data: bytes, sink: ResponseSink) -> None:
        try:
            self._parser.feed_data(data)
        except _HeadDone:
            self._raised = None
            self._parser = httptools.HttpResponseParser(self)
            self._finish_response()
        except httptools.HttpParserCallbackError as exc:
            inner = unwrap_callback_error(exc, self._raised)
            self._raised = None
            if not isinstance(inner, _HeadDone):
                raise inner from None
            self._parser = httptools.HttpResponseParser(self)
            self._finish_response()
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0]:]
            self._tunnel = True
            if rest:
                sink.on_tunnel_data(rest)
        except httptools.HttpParserError:
            self._fail(UpstreamError("protocol", 502, "upstream sent an invalid response"))
            return
        if self.sink is not None:
            self.sink.on_response_flushed()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_client_reading()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.resume_client_reading()

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._content_length = value
        elif name == b"transfer-encoding":
            self._chunked = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True
            self._reason = b""
            self._headers = []
            self._content_length = None
            self._chunked = False
            return
        self._head_due = 0.0  # the head is in: the timer, if it fires, finds nothing due
        self._head_seen = True
        headers = self._headers
        self._headers = []
        reason = self._reason or b"-"
        self._reason = b""
        keep_alive = self._parser.should_keep_alive()
        self._keep_alive = keep_alive
        content_length = self._content_length
        self._content_length = None
        framed = content_length is not None or self._chunked or status in (204, 304, 101) or self._is_head
        self._chunked = False
        self._close_delimited = not framed
        if self.sink is not None:
            try:
                self.sink.on_response_head(status, reason, headers, keep_alive, content_length)
            except BaseException as exc:
                raise self._raise(exc)
        if self._is_head:
            raise self._raise(_HeadDone())

    def _raise(self, error: BaseException) -> BaseException:
        """Record what a parser callback is about to raise (see codec.unwrap_callback_error)."""
        self._raised = error
        return error

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            try:
                self.sink.on_response_body(body)
            except BaseException as exc:
                raise self._raise(exc)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._parser.get_status_code() == 101:
            return  # llhttp raises HttpParserUpgrade next; the tunnel takes over from there
        self._keep_alive = self._keep_alive and self._parser.should_keep_alive()
        try:
            self._finish_response()
        except BaseException as exc:
            raise self._raise(exc)

    # -- driving an exchange ---------------------------------------------------------------------
    def start(self, sink: ResponseSink, head: bytes, is_head: bool, response_timeout: float) -> None:
        """Begin an exchange: write ``head`` (and whatever body bytes the caller sends next).

        Raises :class:`UpstreamError` when the connection closed after it was handed out (the
        upstream reset it between connect and now); ``sink`` is then not taken on. A transport
        still closing on its own (its ``connection_lost`` is on the way) takes the sink without
        writing: ``connection_lost`` then reports why it closed (a TLS 1.3 server's alert for a
        refused client certificate arrives that way, between connect and the first request).
        """
        transport = self.transport
        if self.closed or transport is None:
            self.close()
            lost = self._lost
            if lost is not None and self._tls_rejected(lost):
                raise self.pool.tls_failure(self.target_index, lost)
            raise UpstreamError("reset", 502, "upstream closed the connection")
        self.sink = sink
        self._is_head = is_head
        self._got_bytes = False
        self._head_seen = False
        self._request_done = False
        self._response_done = False
        self._keep_alive = False
        self._close_delimited = False
        self._interim = False
        if not transport.is_closing():
            self._write(transport, head)
        self._arm_head_timer(response_timeout)

    def send(self, data: bytes) -> None:
        # is_closing(): the upstream may have reset the connection with connection_lost not yet
        # delivered, and a write then raises.
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            self._write(transport, data)

    def _write(self, transport: asyncio.Transport, data: bytes) -> None:
        """``data`` at the end of this loop turn, after what was written before it."""
        held = self._held
        if held is not None:
            held.append(data)
            return
        outbox = self.pool.outbox
        if outbox is not None and outbox.hold(self):
            self._held = [data]
        else:
            transport.write(data)

    def flush_out(self) -> None:
        """Write what this turn held (the outbox's end-of-turn callback, and before a close)."""
        held = self._held
        if held is None:
            return
        self._held = None
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(held[0] if len(held) == 1 else b"".join(held))

    def request_sent(self) -> None:
        """The whole request body has been written."""
        self._request_done = True

    def pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The client went away mid-exchange: this connection's state is unknown, close it."""
        self.sink = None
        self.close()

    def close(self) -> None:
        self._cancel_timer()
        self.flush_out()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -- internals ---------------------------------------------------------------------------------
    def _finish_response(self) -> None:
        self._response_done = True
        sink = self.sink
        if sink is not None:
            sink.on_response_end()
        if self._request_done:
            self._release()
        else:
            # The upstream answered before the request body was all sent: what it expects next on
            # this connection is unknowable, so it is not reused.
            self.sink = None
            self.close()

    def _release(self) -> None:
        self.sink = None
        self.resume_reading()
        if self._keep_alive and not self.closed and not self._tunnel:
            self.pool.release(self)
        else:
            self.close()

    def _arm_head_timer(self, response_timeout: float) -> None:
        """The response head is due within ``response_timeout`` from now.

        One timer per connection, not one per exchange: arming and cancelling a timer for every
        request cost ~7 % of a forwarded request's own instructions (callgrind). The timer is
        left running when the head arrives; when it fires, :meth:`_on_timer` compares the clock
        with what is due then: nothing (the connection is idle or between heads: the timer
        ends), a later head (a later exchange on the same connection: it fires again then) or
        an overdue head (the exchange fails with a 504). A deadline earlier than the running
        timer (a smaller ``response_timeout``: never within one pool) re-arms it.
        The loop is looked up once per connection: asyncio.get_running_loop() costs a getpid()
        system call on Python 3.11."""
        loop = self._loop
        due = loop.time() + response_timeout
        self._head_due = due
        timer = self._timer
        if timer is None or self._timer_at > due:
            if timer is not None:
                timer.cancel()
            self._timer_at = due
            self._timer = loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        due = self._head_due
        if due == 0.0 or self.closed:
            return
        if self._loop.time() < due:
            self._timer_at = due
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._fail(UpstreamError("timeout", 504, "upstream timed out"))  # its close() clears _head_due

    def _fail(self, error: UpstreamError, sink: ResponseSink | None = None) -> None:
        sink = sink or self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.on_upstream_failed(error, False)

    def _internal_error(self, sink: ResponseSink) -> None:
        """An unexpected exception while serving ``sink``: log it once, close, and tell the sink."""
        log.exception("internal error while handling an upstream response")
        self._fail(UpstreamError("internal", 500, "internal error"), sink)

    def _tls_rejected(self, exc: Exception | None) -> bool:
        """Whether ``exc`` ending this connection is a TLS failure (module docstring): an
        ``ssl.SSLError``, or a reset of a fresh TLS connection before its first response byte."""
        if not self._tls or exc is None:
            return False
        if isinstance(exc, ssl.SSLError):
            return True
        return not self.reused and not self._got_bytes and isinstance(exc, (ConnectionResetError, BrokenPipeError))

    def _cancel_timer(self) -> None:
        self._head_due = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _within(
    loop: asyncio.AbstractEventLoop,
    connecting: Coroutine[Any, Any, tuple[asyncio.BaseTransport, UpstreamConnection]],
    timeout: float,
) -> UpstreamConnection:
    """The connection ``connecting`` makes, or ``asyncio.TimeoutError`` after ``timeout``.

    Unlike ``asyncio.wait_for``, a timeout that fires late (a burst kept the loop busy for longer
    than the timeout) does not count yet: completing a connect takes the loop several turns, and
    a stalled loop runs the expired timer before them, so a connect that completed in the kernel
    at once would be declared timed out (a 504 for an upstream that answered). The wait goes on in
    short graces for as long as the timer keeps firing late (:mod:`jwtproxy.connlimits`); a timer
    that fires on time (a loop keeping up) ends it."""
    attempt = loop.create_task(connecting)
    deadline = loop.time() + timeout
    graces = 0
    try:
        while True:
            done, _ = await asyncio.wait((attempt,), timeout=max(0.0, deadline - loop.time()))
            if done:
                return attempt.result()[1]
            now = loop.time()
            if now - deadline < LATE_TIMER or graces >= STALL_GRACES:
                raise asyncio.TimeoutError()
            graces += 1
            deadline = now + STALL_GRACE
    except BaseException as exc:  # the timeout above, or the caller's cancellation (a client left)
        error = exc
    # Not in a finally block: there, compiled (mypyc), a connect cancelled by a client's reset
    # came back as None instead of CancelledError (a TypeError in _open, logged as an internal
    # error). Outside the block the exception is re-raised explicitly.
    if not attempt.done():
        attempt.cancel()
        # As wait_for does: see the attempt end, so a connection that won the race against the
        # cancellation is closed rather than left open with nobody holding it.
        await asyncio.wait((attempt,))
        if not attempt.cancelled() and attempt.exception() is None:
            attempt.result()[0].close()
    raise error


class UpstreamPool:
    """Keep-alive connections to the targets of one upstream, round robin.

    With ``slots`` (``[limits] upstream_max_connections``, see :mod:`jwtproxy.connlimits`) a new
    connection first takes a slot of its target; with none free, :meth:`connect` waits in a
    bounded queue (``queue_limit``) for up to ``connect_timeout`` and then fails with a 503.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        ssl_context: ssl.SSLContext | None = None,
        *,
        slots: UpstreamSlots | None = None,
        queue_limit: int = 0,
        outbox: Outbox | None = None,
    ) -> None:
        """``outbox``: where this pool's connections hold their writes until the end of the loop
        turn (:mod:`jwtproxy.outbox`); None: they write at once."""
        self.config = config
        self.outbox = outbox
        self.name = config.name
        self.targets: tuple[Target, ...] = config.targets
        self._idle: list[deque[UpstreamConnection]] = [deque() for _ in self.targets]
        self._next = 0
        # One context per pool: building one loads the CA store (milliseconds). A new worker
        # generation (SIGHUP) builds new pools, so renewed certificate files are read again.
        if ssl_context is None and any(t.scheme == "https" for t in config.targets):
            ssl_context = client_context(config.ca_file, config.client_cert, config.client_key)
        self._ssl_context = ssl_context
        self._tls_logged: dict[tuple[int, str], tuple[float, int]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.slots = slots
        self.pending: PendingQueue[UpstreamConnection | int] = PendingQueue(queue_limit)
        self.rejected = 0  # requests answered 503 for want of a connection (queue full or timed out)
        self._poller: asyncio.TimerHandle | None = None

    def _choose(self) -> int:
        index = self._next
        self._next = (index + 1) % len(self.targets)
        return index

    def take_idle(self) -> UpstreamConnection | None:
        """An idle kept-alive connection to the next target in turn, or None."""
        index = self._choose() if len(self.targets) > 1 else 0
        idle = self._idle[index]
        while idle:
            conn = idle.pop()  # most recently used first: least likely to have been closed
            if not conn.closed:
                conn.reused = True
                return conn
        if len(self.targets) > 1:
            # Leave the round robin where it was so connect() starts at the same target.
            self._next = index
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a connection, trying each target once in round-robin order; with slots, only
        targets with a free slot, waiting in the queue when none has one."""
        start = self._choose() if len(self.targets) > 1 else 0
        order = [(start + step) % len(self.targets) for step in range(len(self.targets))]
        if self.slots is None:
            return await self._open(order)
        order = [index for index in order if self.slots.try_acquire(index)]
        if not order:
            got = await self._wait_for_capacity()
            if isinstance(got, UpstreamConnection):
                return got  # handed over by release(): already marked reused
            order = [got]
        return await self._open(order)

    async def _open(self, order: list[int]) -> UpstreamConnection:
        """Connect to the first target of ``order`` that answers. With slots, each index in
        ``order`` holds a slot; every slot not kept by the connection returned is freed."""
        loop = asyncio.get_running_loop()
        last_error = UpstreamError("connect", 502, "no upstream target")
        for step, index in enumerate(order):
            target = self.targets[index]
            ssl_context = self._ssl_context if target.scheme == "https" else None
            made: list[UpstreamConnection] = []

            def protocol(index: int = index) -> UpstreamConnection:
                conn = UpstreamConnection(self, index)
                conn.holds_slot = self.slots is not None
                made.append(conn)
                return conn

            try:
                conn = await _within(
                    loop,
                    loop.create_connection(
                        protocol,
                        target.host,
                        target.port,
                        ssl=ssl_context,
                        server_hostname=target.host if ssl_context else None,
                    ),
                    self.config.connect_timeout,
                )
            except BaseException as exc:
                self._abandon_attempt(index, made)
                if isinstance(exc, asyncio.TimeoutError):
                    last_error = UpstreamError("timeout", 504, "upstream connect timed out")
                elif isinstance(exc, ssl.SSLError):  # an OSError too: asked first
                    last_error = self.tls_failure(index, exc)
                elif isinstance(exc, OSError):
                    last_error = UpstreamError("connect", 502, "upstream connection refused")
                else:  # cancelled (the client left) or a bug: the other slots go back too
                    for rest in order[step + 1:]:
                        self._free_index(rest)
                    raise
            else:
                conn.reused = False
                for rest in order[step + 1:]:
                    self._free_index(rest)
                return conn
        raise last_error

    def tls_failure(self, index: int, exc: BaseException) -> UpstreamError:
        """The error for a TLS failure with target ``index``; logs its reason (throttled)."""
        reason = failure_reason(exc)
        now = time.monotonic()
        key = (index, reason)
        last, suppressed = self._tls_logged.get(key, (-TLS_LOG_INTERVAL, 0))
        if now - last >= TLS_LOG_INTERVAL:
            target = self.targets[index]
            log_event("upstream_tls_error", level="error", upstream=self.name,
                      target=f"{target.host}:{target.port}", reason=reason, repeated=suppressed)
            if len(self._tls_logged) >= 64:  # bounded: reasons come from a short OpenSSL list
                self._tls_logged.clear()
            self._tls_logged[key] = (now, 0)
        else:
            self._tls_logged[key] = (last, suppressed + 1)
        return UpstreamError("tls", 502, "upstream TLS handshake failed")

    def _abandon_attempt(self, index: int, made: list[UpstreamConnection]) -> None:
        """A connect that failed or was cancelled gives its slot back, exactly once: through the
        connection object when one was made (its connection_lost may still come), else here."""
        if made:
            made[0].close()
            self.free_slot(made[0])
        else:
            self._free_index(index)

    # -- slots and the pending queue -----------------------------------------------------------------

    async def _wait_for_capacity(self) -> UpstreamConnection | int:
        """Wait in the queue for a connection or a slot, or fail with the 503 of the contract."""
        try:
            future = self.pending.wait(self.config.connect_timeout)
        except QueueFull:
            self.rejected += 1
            raise overflow("upstream busy: too many requests waiting") from None
        self._schedule_poll()
        try:
            got = await future
        except asyncio.CancelledError:
            # The client left. Anything handed over in the meantime goes to the next in line.
            if future.done() and not future.cancelled() and future.result() is not None:
                self._give_back(future.result())
            raise
        if got is None:
            self.rejected += 1
            raise overflow("upstream busy: no connection free in time")
        return got

    def _give_back(self, got: UpstreamConnection | int | None) -> None:
        if isinstance(got, UpstreamConnection):
            self.release(got)
        elif got is not None:
            self._free_index(got)

    def free_slot(self, conn: UpstreamConnection) -> None:
        """The slot of ``conn`` is free (it closed, or never connected); idempotent."""
        if conn.holds_slot:
            conn.holds_slot = False
            self._free_index(conn.target_index)

    def _free_index(self, index: int) -> None:
        if self.slots is None:
            return
        self.slots.release(index)
        if len(self.pending) and not self._closed:
            self._serve_pending()

    def _serve_pending(self) -> None:
        """Hand free slots to waiting requests, oldest first, for as long as there are both."""
        slots = self.slots
        if slots is None:
            return
        while len(self.pending):
            start = self._choose() if len(self.targets) > 1 else 0
            for step in range(len(self.targets)):
                index = (start + step) % len(self.targets)
                if slots.try_acquire(index):
                    break
            else:
                return
            if not self.pending.hand(index):
                slots.release(index)
                return

    def _schedule_poll(self) -> None:
        # Another worker's freed slot wakes nobody here: look again shortly while anyone waits.
        if self._poller is None:
            self._poller = asyncio.get_running_loop().call_later(CROSS_WORKER_POLL, self._poll)

    def _poll(self) -> None:
        self._poller = None
        if self._closed:
            return
        self._serve_pending()
        if len(self.pending):
            self._schedule_poll()

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose exchange finished cleanly: to a waiting request, else idle."""
        if not self._closed and not conn.closed and self.pending.has_waiters():
            conn.reused = True
            if self.pending.hand(conn):
                return
        idle = self._idle[conn.target_index]
        if self._closed or len(idle) >= self.config.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        period = max(0.05, min(self.config.idle_timeout / 2, 5.0))
        self._sweeper = asyncio.get_running_loop().call_later(period, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.config.idle_timeout
        remaining = 0
        for idle in self._idle:
            # Oldest first: idle connections are appended as they are released.
            while idle and (idle[0].closed or idle[0].idle_since <= deadline):
                idle.popleft().close()
            remaining += len(idle)
        if remaining and not self._closed:
            self._schedule_sweep()

    def idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self.pending.fail_all()
        for idle in self._idle:
            while idle:
                idle.pop().close()

    def open_connections(self) -> int:
        """Connections of this worker to the targets that hold a slot (open or connecting)."""
        return 0 if self.slots is None else sum(self.slots.held(i) for i in range(len(self.targets)))
