"""What crosses the gateway in each direction: request head scan, upstream head, client response head.

Theory of operation
-------------------
Towards the upstream (contract §4 "Identity headers"):

1. Every header whose name, lower-cased with everything but letters and digits removed, equals the
   same reduction of a ``[claims_to_headers]`` name or of the ``[assertion] header`` (contract §5.4)
   is dropped, on every route. ``X-User-Id``, ``x_user_id``, ``X.USER.ID`` and ``xuserid`` are one
   name to us, because some servers (nginx with ``underscores_in_headers``, CGI-style frameworks,
   WSGI) fold them into one.
2. Hop-by-hop headers (RFC 9110 §7.6.1) and every name listed in ``Connection`` are dropped. The
   gateway adds its own headers *after* this filtering, so ``Connection: x-user-id`` cannot remove
   an injected identity.
3. Headers the gateway owns are replaced: ``Host`` (the client's, or the target's when
   ``preserve_host = false``), framing (``Content-Length`` / ``Transfer-Encoding: chunked``),
   ``X-Forwarded-For`` (client address appended), ``X-Forwarded-Proto``, ``X-Forwarded-Host``,
   ``X-Request-Id`` (kept if well-formed, else generated) and ``Expect`` (the gateway answers
   ``100-continue`` itself, after authentication).
4. The verified identity headers are appended last, then the gateway's signed assertion, if any.

Towards the client: hop-by-hop headers of the upstream response are dropped, framing is rebuilt by
the connection, and ``X-Request-Id`` is echoed.

Header names are classified once per distinct name (a bounded memo), so the per-request cost is a
dict lookup per header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from jwtproxy.codec import ProtocolError, RequestHead, connection_tokens, header_tokens

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Set by the gateway itself towards the upstream.
OWNED_REQUEST = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
# Consumed by the gateway and never forwarded: a DPoP proof is for this hop only (contract §5.2).
CONSUMED_REQUEST = frozenset({b"dpop"})
OWNED_RESPONSE = frozenset({b"content-length", b"x-request-id"})
_RESPONSE_DROP = HOP_BY_HOP | OWNED_RESPONSE
_NO_NAMES: frozenset[bytes] = frozenset()

KEEP = 0
DROP = 1
AUTHORIZATION = 2

_ALNUM_LOWER = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz"
)
_NOT_ALNUM = bytes(c for c in range(256) if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122))
_MEMO_LIMIT = 4096
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def header_key(name: bytes) -> bytes:
    """The spelling-independent form of a header name: lower-case letters and digits only."""
    return name.translate(_ALNUM_LOWER, _NOT_ALNUM)


class ScannedHead:
    """What the gateway needs from a request head, gathered in one pass over the headers."""

    __slots__ = (
        "host",
        "authorization",
        "content_length",
        "chunked",
        "connection_tokens",
        "expect_continue",
        "upgrade",
        "request_id",
        "forwarded_for",
        "dpop",
    )

    def __init__(self) -> None:
        self.host: bytes | None = None
        self.authorization: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.connection_tokens: frozenset[bytes] = frozenset()
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.request_id: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.dpop: tuple[str, ...] = ()  # every DPoP proof header, in order (RFC 9449 §4.1)


_SCANNED = frozenset(
    {
        b"host",
        b"authorization",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"expect",
        b"upgrade",
        b"x-request-id",
        b"x-forwarded-for",
        b"dpop",
    }
)


def scan_request_head(head: RequestHead) -> ScannedHead:
    """Collect framing and routing facts and enforce the parser-independent framing rules.

    Raises :class:`ProtocolError` (400) for: no or several ``Host`` on HTTP/1.1, several
    ``Authorization``, a ``Content-Length`` that is not a single run of digits, several
    ``Content-Length``, any ``Transfer-Encoding`` other than a single ``chunked``, or both.
    """
    if head.version != b"1.1" and head.version != b"1.0":
        raise ProtocolError("malformed request: unsupported HTTP version")
    scanned = ScannedHead()
    hosts = 0
    authorizations = 0
    content_lengths = 0
    transfer_encodings = 0
    for name, value in head.headers:
        if name not in _SCANNED:
            continue
        if name == b"host":
            hosts += 1
            scanned.host = value
        elif name == b"authorization":
            authorizations += 1
            scanned.authorization = value
        elif name == b"content-length":
            content_lengths += 1
            value = value.strip(b" \t")  # optional whitespace around a field value (RFC 9110 §5.5)
            if not value.isdigit() or len(value) > 18:
                raise ProtocolError("malformed request: invalid Content-Length")
            scanned.content_length = int(value)
        elif name == b"transfer-encoding":
            transfer_encodings += 1
            if value.strip().lower() != b"chunked":
                raise ProtocolError("malformed request: unsupported Transfer-Encoding")
            scanned.chunked = True
        elif name == b"connection":
            scanned.connection_tokens = scanned.connection_tokens | header_tokens(value)
        elif name == b"expect":
            if value.strip().lower() == b"100-continue":
                scanned.expect_continue = True
        elif name == b"upgrade":
            scanned.upgrade = value.strip().lower()
        elif name == b"x-request-id":
            scanned.request_id = value if _REQUEST_ID_RE.fullmatch(value) else None
        elif name == b"dpop":
            scanned.dpop += (value.strip(b" \t").decode("latin-1"),)
        elif name == b"x-forwarded-for":
            if scanned.forwarded_for is None:
                scanned.forwarded_for = value
            else:
                scanned.forwarded_for += b", " + value
    if hosts > 1:
        raise ProtocolError("malformed request: more than one Host header")
    if hosts == 0 and head.version == b"1.1":
        raise ProtocolError("malformed request: missing Host header")
    if authorizations > 1:
        raise ProtocolError("more than one Authorization header")
    if content_lengths > 1:
        raise ProtocolError("malformed request: duplicate Content-Length")
    if transfer_encodings > 1 or (transfer_encodings and content_lengths):
        raise ProtocolError("malformed request: conflicting message framing")
    if transfer_encodings and head.version == b"1.0":
        # HTTP/1.0 has no chunked coding: a sender using it is confused or smuggling (RFC 9112 §6.1).
        raise ProtocolError("malformed request: Transfer-Encoding in an HTTP/1.0 request")
    return scanned


class HeaderPolicy:
    """Compiled once per config: which client header names never reach an upstream."""

    __slots__ = ("identity_keys", "assertion_prefix", "_memo")

    def __init__(self, identity_header_names: Iterable[str], assertion_header: str = "x-jwtproxy-assertion") -> None:
        """``identity_header_names``: the ``[claims_to_headers]`` names; ``assertion_header``: the
        ``[assertion] header``, dropped from clients like them whether or not assertions are on (a
        backend once told to trust it must never receive a client's copy)."""
        names = [*identity_header_names, assertion_header]
        self.identity_keys = frozenset(header_key(n.encode("ascii")) for n in names)
        self.assertion_prefix = assertion_header.encode("ascii") + b": "
        self._memo: dict[bytes, int] = {}

    def classify(self, name: bytes) -> int:
        """KEEP, DROP or AUTHORIZATION for a lower-case request header name."""
        verdict = self._memo.get(name)
        if verdict is None:
            if name == b"authorization":
                verdict = AUTHORIZATION
            elif (
                name in HOP_BY_HOP
                or name in OWNED_REQUEST
                or name in CONSUMED_REQUEST
                or header_key(name) in self.identity_keys
            ):
                verdict = DROP
            else:
                verdict = KEEP
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[name] = verdict
        return verdict

    def upstream_head(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        scanned: ScannedHead,
        *,
        host: bytes,
        forwarded_host: bytes,
        client_ip: bytes,
        proto: bytes,
        request_id: bytes,
        identity: list[tuple[bytes, bytes]],
        forward_authorization: bool,
        drop_names: frozenset[bytes],
        framing: bytes,
        upgrade: bytes | None,
        assertion: bytes | None = None,
    ) -> bytes:
        """The request head sent upstream. ``framing`` is ``content-length: N\\r\\n``-style bytes;
        ``assertion`` the signed assertion's value (a compact JWS: base64url and dots only)."""
        # parts.append and self.classify, not aliases of them: compiled, each is a direct call,
        # and a bound-method alias a generic one.
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        dropped_by_connection = scanned.connection_tokens
        for name, value in headers:
            verdict = self.classify(name)
            if verdict == DROP:
                continue
            if verdict == AUTHORIZATION and not forward_authorization:
                continue
            if dropped_by_connection and name in dropped_by_connection:
                continue
            if drop_names and name in drop_names:
                continue
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        xff = client_ip if scanned.forwarded_for is None else scanned.forwarded_for + b", " + client_ip
        parts += (
            b"x-forwarded-for: ", xff,
            b"\r\nx-forwarded-proto: ", proto,
            b"\r\nx-forwarded-host: ", forwarded_host,
            b"\r\nx-request-id: ", request_id, b"\r\n",
        )
        for name, value in identity:
            parts += (name, b": ", value, b"\r\n")
        if assertion is not None:
            parts += (self.assertion_prefix, assertion, b"\r\n")
        if upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
        parts.append(framing)
        parts.append(b"\r\n")
        return b"".join(parts)


def response_head(
    version: bytes,
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    request_id: bytes,
    framing: bytes,
    keep_alive: bool,
    http10_client: bool,
    upgrade: bool = False,
) -> bytes:
    """The response head for the client, from the upstream's status and headers."""
    parts = [b"HTTP/1.1 ", b"%d " % status, reason, b"\r\n"]
    named = _NO_NAMES
    for name, value in headers:
        if name == b"connection":
            tokens = connection_tokens(value)
            named = tokens if not named else named | tokens
    drop = _RESPONSE_DROP  # a module global is a dictionary lookup each time it is read
    for name, value in headers:
        if name in drop or name in named:
            continue
        parts.append(name)  # not an alias: compiled, a direct list append (see upstream_head)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    parts += (b"x-request-id: ", request_id, b"\r\n")
    if upgrade:
        upgrade_value = next((v for n, v in headers if n == b"upgrade"), b"websocket")
        parts += (b"connection: upgrade\r\nupgrade: ", upgrade_value, b"\r\n")
    elif not keep_alive:
        parts.append(b"connection: close\r\n")
    elif http10_client:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(framing)
    parts.append(b"\r\n")
    return b"".join(parts)
