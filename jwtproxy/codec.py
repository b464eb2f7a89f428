"""HTTP/1.1 request codecs: bytes in, request events out.

Theory of operation
-------------------
A codec is a narrow adapter between the client socket and :class:`~jwtproxy.connection.ClientConnection`.
It turns received bytes into three events on a :class:`CodecHandler`: ``on_request_head``,
``on_request_body`` and ``on_request_end``; it never writes, never reads the clock, never decides
anything about routing or auth. Responses are not produced by the codec: the connection writes bytes.

Two implementations exist, selected by ``server.http_parser``:

* :class:`HttptoolsCodec` wraps llhttp (C), the default. It is strict already: obs-fold, bare LF,
  duplicate ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding`` and chunk-size overflow
  are parse errors.
* :class:`H11Codec` wraps h11 (pure Python). h11 is lenient where llhttp is strict (it unfolds
  obs-fold, accepts bare LF, merges identical ``Content-Length`` headers, tolerates control
  characters in values), so the adapter buffers each request head and checks it against llhttp's
  rules before h11 sees it. Both codecs must reject the same requests with the same status; the
  differential tests in ``tests/adversarial/test_adv_http.py`` hold them to it.

Framing rules that do not depend on the parser (exactly one ``Host``, ``Transfer-Encoding`` only
``chunked``, ``Content-Length`` digits only) are checked once, after the head, in
:func:`jwtproxy.headerpolicy.scan_request_head`.

Upgrades: llhttp stops at the end of a head that asks for an upgrade (and at ``CONNECT``). When
the handler sets :attr:`Codec.tunnel_after_message` during ``on_request_head`` the remaining bytes
go to ``on_tunnel_data`` untouched; otherwise parsing simply continues (an ignored ``h2c`` upgrade
is an ordinary request).
"""

from __future__ import annotations

import re
from typing import Protocol

import h11
import httptools

__all__ = [
    "Codec",
    "CodecHandler",
    "H11Codec",
    "HttptoolsCodec",
    "ProtocolError",
    "RequestHead",
    "header_tokens",
    "make_codec",
    "unwrap_callback_error",
]


class ProtocolError(Exception):
    """The client broke HTTP/1.1; ``status`` is the answer (400, 431, 501) before closing."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.description = description
        self.status = status


class RequestHead:
    """One parsed request head. Header names are lower-case bytes, in arrival order."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "upgrade")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade


class CodecHandler(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...


class Codec(Protocol):
    tunnel_after_message: bool

    def feed(self, data: bytes) -> None:
        """Parse ``data``; events go to the handler. Raises :class:`ProtocolError`."""
        ...


def unwrap_callback_error(exc: BaseException, raised: BaseException | None) -> BaseException:
    """httptools re-raises a callback's exception as HttpParserCallbackError; find the original.

    ``raised``: what the callback recorded before raising, which is the reliable answer. httptools
    also chains the original as ``__context__``, but CPython replaces a context when an exception
    is raised while another is being handled, and compiled code (jwtproxy.compiled) can leave one
    marked as handled; so the chain is only the fallback.
    """
    if raised is not None:
        return raised
    inner = exc.__cause__ or exc.__context__
    return inner if inner is not None else exc


def header_tokens(value: bytes) -> set[bytes]:
    """The tokens of a comma-separated header value such as ``Connection``, lower-cased and trimmed."""
    return {token.strip() for token in value.lower().split(b",")}


# Connection header values seen in responses, and their tokens: an upstream sends one or two
# values ("keep-alive", "close") on every response. Bounded: a value past the bound is parsed
# each time, so a hostile upstream cannot grow it.
_TOKENS_MEMO: dict[bytes, frozenset[bytes]] = {}
_TOKENS_MEMO_LIMIT = 64


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """:func:`header_tokens` of a ``Connection`` value, remembered for the values seen most."""
    found = _TOKENS_MEMO.get(value)
    if found is None:
        found = frozenset(header_tokens(value))
        if len(_TOKENS_MEMO) < _TOKENS_MEMO_LIMIT:
            _TOKENS_MEMO[value] = found
    return found


class HttptoolsCodec:
    """llhttp through httptools. One instance per client connection."""

    __slots__ = (
        "handler",
        "max_header_bytes",
        "tunnel_after_message",
        "_parser",
        "_url",
        "_headers",
        "_head_bytes",
        "_in_head",
        "_tunnel",
        "_finished",
        "_raised",
    )

    def __init__(self, handler: CodecHandler, max_header_bytes: int) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.tunnel_after_message = False
        self._raised: BaseException | None = None  # what a callback raised (unwrap_callback_error)
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._tunnel = False
        self._finished = False

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._tunnel:
            self.handler.on_tunnel_data(data)
            return
        if self._finished:
            return  # the last request ended the connection; what follows is never parsed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0]:]
            if self.tunnel_after_message:
                self._tunnel = True
                if rest:
                    self.handler.on_tunnel_data(rest)
            else:
                # An upgrade we do not honour (h2c, or one that was refused): carry on with HTTP.
                self._parser = httptools.HttpRequestParser(self)
                if rest:
                    self.feed(rest)
            return
        except httptools.HttpParserCallbackError as exc:
            inner = unwrap_callback_error(exc, self._raised)
            self._raised = None
            if isinstance(inner, ProtocolError):
                raise inner from None
            raise
        except httptools.HttpParserError as error:  # another name: see jwtproxy.compiled
            if self._finished:
                return  # llhttp's "Data after Connection: close": the bytes are ignored, as h11 does
            raise ProtocolError(f"malformed request: {error}") from None
        if self._in_head:
            # llhttp keeps a partial header in its own buffer; bound what a client can make it hold.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                raise ProtocolError("request head too large", 431)

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        self.tunnel_after_message = False

    def _raise(self, error: BaseException) -> BaseException:
        """Record what a callback is about to raise (see unwrap_callback_error)."""
        self._raised = error
        return error

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            raise self._raise(ProtocolError("request head too large", 431))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_header_bytes:
            raise self._raise(ProtocolError("request head too large", 431))
        # Trailing whitespace is not part of a field value (RFC 9110 §5.5); llhttp keeps it, h11
        # strips it, and both codecs must hand the same values on.
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        try:
            self.handler.on_request_head(
                RequestHead(
                    parser.get_method(),
                    self._url,
                    parser.get_http_version().encode(),
                    self._headers,
                    parser.should_keep_alive(),
                    parser.should_upgrade(),
                )
            )
        except BaseException as exc:
            raise self._raise(exc)

    def on_body(self, body: bytes) -> None:
        try:
            self.handler.on_request_body(body)
        except BaseException as exc:
            raise self._raise(exc)

    def on_message_complete(self) -> None:
        if not self._parser.should_keep_alive():
            self._finished = True
        try:
            self.handler.on_request_end()
        except BaseException as exc:
            raise self._raise(exc)


# What llhttp refuses in a head and h11 lets through: control characters other than HTAB,
# CR and LF, and a line starting with whitespace (obs-fold, RFC 9112 §5.2).
_H11_BAD_HEAD_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r\n[ \t]")
_H11_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:")


class H11Codec:
    """h11, held to llhttp's strictness. One instance per client connection.

    h11 is a whole-connection state machine that expects us to send responses through it; we only
    use its request parsing, so after each complete request a fresh ``h11.Connection`` takes over
    the remaining bytes.
    """

    __slots__ = (
        "handler",
        "max_header_bytes",
        "tunnel_after_message",
        "_conn",
        "_head_buffer",
        "_in_head",
        "_tunnel",
        "_chunked",
        "_keep_alive",
        "_finished",
    )

    def __init__(self, handler: CodecHandler, max_header_bytes: int) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.tunnel_after_message = False
        self._conn = self._new_connection()
        self._head_buffer = b""
        self._in_head = True
        self._tunnel = False
        self._chunked = False
        self._keep_alive = True
        self._finished = False

    def _new_connection(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes + 4)

    def feed(self, data: bytes) -> None:
        while data and not self._finished:
            if self._tunnel:
                self.handler.on_tunnel_data(data)
                return
            if self._in_head:
                complete = self._buffer_head(data)
                if complete is None:
                    return
                data = complete
            data = self._pump(data)

    def _buffer_head(self, data: bytes) -> bytes | None:
        """Collect a complete head, check it, and return the bytes to give h11 (None: need more)."""
        buffer = self._head_buffer + data
        if not self._head_buffer:
            # Empty lines before a request line are tolerated (RFC 9112 §2.2), as llhttp does.
            buffer = buffer.lstrip(b"\r\n") if buffer[:1] in (b"\r", b"\n") else buffer
        end = buffer.find(b"\r\n\r\n")
        head = buffer if end < 0 else buffer[: end + 2]
        crlf = head.count(b"\r\n")
        if head.count(b"\n") != crlf:
            raise ProtocolError("malformed request: bare LF in request head")
        # A CR not followed by LF is an error as soon as it is seen (llhttp does not wait for the
        # blank line either); a CR that is the last byte received may still get its LF.
        if head.count(b"\r") - (1 if end < 0 and head.endswith(b"\r") else 0) != crlf:
            raise ProtocolError("malformed request: bare CR in request head")
        if _H11_BAD_HEAD_BYTES.search(head):
            raise ProtocolError("malformed request: invalid character or obs-fold in request head")
        lines = head.split(b"\r\n")
        # Every complete header line must start with "name:" -- llhttp says so on the line's CRLF,
        # h11 only once the blank line arrives.
        for line in lines[1:-1]:
            if line and not _H11_HEADER_LINE.match(line):
                raise ProtocolError("malformed request: invalid header line")
        if len(head) > self.max_header_bytes:
            raise ProtocolError("request head too large", 431)
        if end < 0:
            self._head_buffer = buffer
            return None
        self._check_content_length(head)
        self._head_buffer = b""
        self._in_head = False
        request_line = lines[0]
        if b"  " in request_line:
            # llhttp reads the request line on whitespace-delimited words, as RFC 9112 §3 allows a
            # recipient to; h11 wants single spaces. Hand h11 the same three words.
            words = [w for w in request_line.split(b" ") if w]
            if len(words) == 3:
                buffer = b" ".join(words) + buffer[len(request_line):]
        return buffer

    @staticmethod
    def _check_content_length(head: bytes) -> None:
        """What h11 folds away before we see it: repeated or list-valued Content-Length."""
        lowered = head.lower()
        count = lowered.count(b"\r\ncontent-length:")
        if count > 1:
            raise ProtocolError("malformed request: duplicate Content-Length")
        if count == 1:
            start = lowered.index(b"\r\ncontent-length:") + 17
            value = head[start: head.index(b"\r\n", start)].strip(b" \t")
            if not value.isdigit():
                raise ProtocolError("malformed request: invalid Content-Length")

    def _pump(self, data: bytes) -> bytes:
        """Feed h11 and dispatch its events; return bytes that belong to the next request."""
        conn = self._conn
        conn.receive_data(data)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if self._chunked:
                        self._check_chunk_size(conn, 0)
                    return b""
                if isinstance(event, h11.Data):
                    if self._chunked:
                        self._check_chunk_size(conn, len(event.data))
                    self.handler.on_request_body(bytes(event.data))
                elif isinstance(event, h11.Request):
                    self.tunnel_after_message = False
                    headers = list(event.headers.raw_items())
                    headers = [(name.lower(), value) for name, value in headers]
                    self._chunked = any(n == b"transfer-encoding" for n, _ in headers)
                    self._keep_alive = _h11_keep_alive(event)
                    self.handler.on_request_head(
                        RequestHead(
                            event.method,
                            event.target,
                            event.http_version,
                            headers,
                            self._keep_alive,
                            _h11_upgrade(headers) or event.method == b"CONNECT",
                        )
                    )
                elif isinstance(event, h11.EndOfMessage):
                    keep_alive = self._keep_alive
                    self.handler.on_request_end()
                    if not keep_alive and not self.tunnel_after_message:
                        self._finished = True  # the connection ends here: ignore what follows
                        return b""
                    # Whatever follows belongs to the next request (or to the tunnel). Take it now:
                    # h11 would refuse more data after an HTTP/1.0 request, which we keep alive.
                    rest = bytes(conn.trailing_data[0])
                    self._conn = self._new_connection()
                    self._in_head = True
                    if self.tunnel_after_message:
                        self._tunnel = True
                    return rest
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return b""
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status not in (400, 431):
                status = 400  # llhttp says 400 for what h11 calls 501 (e.g. Transfer-Encoding: gzip)
            raise ProtocolError(f"malformed request: {exc}", status) from None

    @staticmethod
    def _check_chunk_size(conn: h11.Connection, just_read: int) -> None:
        # llhttp refuses a chunk size that overflows 64 bits; h11 accepts up to 20 hex digits.
        # h11 keeps the unread part of the current chunk in its reader; that plus what it just
        # returned bounds the declared size from below.
        remaining = getattr(getattr(conn, "_reader", None), "_bytes_in_chunk", 0)
        if isinstance(remaining, int) and remaining + just_read >= 1 << 64:
            raise ProtocolError("malformed request: chunk size overflow")


def _h11_keep_alive(request: h11.Request) -> bool:
    tokens = header_tokens(b",".join(v for n, v in request.headers if n == b"connection"))
    if request.http_version == b"1.0":
        return b"keep-alive" in tokens
    return b"close" not in tokens


def _h11_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """llhttp's rule: an Upgrade header plus 'upgrade' among the Connection tokens."""
    has_upgrade = False
    connection_upgrade = False
    for name, value in headers:
        if name == b"upgrade":
            has_upgrade = True
        elif name == b"connection":
            connection_upgrade |= b"upgrade" in header_tokens(value)
    return has_upgrade and connection_upgrade


def make_codec(kind: str, handler: CodecHandler, max_header_bytes: int) -> Codec:
    """The codec named by ``server.http_parser``."""
    if kind == "h11":
        return H11Codec(handler, max_header_bytes)
    return HttptoolsCodec(handler, max_header_bytes)
