"""Class 6 -- HTTP/1.1 attacks on the gateway's own parsing (RFC 9112 §6-7, §11.2 request
smuggling; PortSwigger's CL.TE / TE.CL / TE.TE catalogue; RFC 9110 §7.8 upgrades).

The centrepiece is a *differential* test: each malformed request goes to an httptools gateway
and an h11 gateway (same config, same backend) and both must answer the same statuses, forward
the same requests, never answer 5xx, and never let a smuggled request reach the backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from advhelpers import ROUTES, BigBackend, SigningKey, assert_rejected, get, header_values, status_of
from helpers import RunningGateway, base_config, parse_responses

SMUGGLE = b"GET /smuggled/x HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLE_LEN = len(SMUGGLE)


async def exchange(port: int, wire: bytes, *, first: float = 1.0, quiet: float = 0.1) -> tuple[bytes, bool]:
    """Send ``wire`` in one write; read until the peer closes, or ``quiet`` seconds pass with
    nothing new after a complete response (``first`` seconds before any). Returns (bytes, closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    closed = False
    try:
        writer.write(wire)
        await writer.drain()
        while True:
            complete = bool(parse_responses(received, strict=False))
            try:
                chunk = await asyncio.wait_for(reader.read(65536), quiet if complete else first)
            except asyncio.TimeoutError:
                break
            if not chunk:
                closed = True
                break
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    finally:
        writer.close()
    return received, closed


def statuses(raw: bytes) -> list[int]:
    return [s for s, _, _ in parse_responses(raw, strict=False)]


@pytest.fixture
async def pair(jwks_path) -> AsyncIterator[dict[str, tuple[RunningGateway, BigBackend]]]:
    """One gateway per codec, same config, each with its own backend (one that takes many and
    large headers) so both can be driven concurrently."""
    pairs = {}
    for parser in ("httptools", "h11"):
        backend = await BigBackend().start()
        gw = await RunningGateway(base_config(backend.port, parser=parser, jwks_file=jwks_path, routes=ROUTES)).start()
        pairs[parser] = (gw, backend)
    yield pairs
    for gw, backend in pairs.values():
        await gw.stop()
        await backend.stop()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def _h(method: bytes = b"POST", path: bytes = b"/open/d", headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return method + b" " + path + b" " + version + b"\r\nHost: x\r\n" + headers + b"\r\n"


# name -> (wire, expected first status or None when only "both codecs agree, < 500" is required)
CASES: dict[str, tuple[bytes, int | None]] = {
    # --- CL.TE / TE.CL (RFC 9112 §6.1: both present is an error for a proxy) ---
    "cl-te": (_h(headers=b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + SMUGGLE_LEN))
              + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-cl": (_h(headers=b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n") + b"%x\r\n%b\r\n0\r\n\r\n"
              % (SMUGGLE_LEN, SMUGGLE), 400),
    "cl-te-lowercase": (_h(headers=b"content-length: 5\r\ntransfer-encoding: chunked\r\n") + b"0\r\n\r\n", 400),
    # --- TE.TE obfuscations ---
    "te-te-identity": (_h(headers=b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n") + b"0\r\n\r\n"
                       + SMUGGLE, 400),
    "te-te-cow": (_h(headers=b"Transfer-Encoding: chunked\r\nTransfer-encoding: cow\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-space-before-colon": (_h(headers=b"Transfer-Encoding : chunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-chunked-identity": (_h(headers=b"Transfer-Encoding: chunked, identity\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-identity-chunked": (_h(headers=b"Transfer-Encoding: identity, chunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-quoted": (_h(headers=b'Transfer-Encoding: "chunked"\r\n') + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-xchunked": (_h(headers=b"Transfer-Encoding: xchunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-chunked-x": (_h(headers=b"Transfer-Encoding: chunkedx\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-vtab": (_h(headers=b"Transfer-Encoding: \x0bchunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-formfeed": (_h(headers=b"Transfer-Encoding:\x0cchunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-obs-fold": (_h(headers=b"Transfer-Encoding:\r\n chunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-bare-lf-line": (_h(headers=b"X: y\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-nul": (_h(headers=b"Transfer-Encoding: chunked\x00\r\n") + b"0\r\n\r\n" + SMUGGLE, 400),
    "te-tab-ows": (_h(headers=b"Transfer-Encoding:\tchunked\r\n") + chunked(b"abc"), 200),
    "te-uppercase-value": (_h(headers=b"Transfer-Encoding: CHUNKED\r\n") + chunked(b"abc"), 200),
    "te-http10": (_h(headers=b"Transfer-Encoding: chunked\r\n", version=b"HTTP/1.0") + b"0\r\n\r\n" + SMUGGLE, None),
    "te-underscore-with-cl": (_h(headers=b"Transfer_Encoding: chunked\r\nContent-Length: %d\r\n" % (5 + SMUGGLE_LEN))
                              + b"0\r\n\r\n" + SMUGGLE, 200),
    # --- Content-Length ---
    "cl-duplicate-same": (_h(headers=b"Content-Length: 3\r\nContent-Length: 3\r\n") + b"abc", 400),
    "cl-duplicate-diff": (_h(headers=b"Content-Length: 3\r\nContent-Length: 40\r\n") + b"abc" + SMUGGLE, 400),
    "cl-list": (_h(headers=b"Content-Length: 3, 3\r\n") + b"abc", 400),
    "cl-plus": (_h(headers=b"Content-Length: +3\r\n") + b"abc", 400),
    "cl-minus": (_h(headers=b"Content-Length: -3\r\n") + b"abc", 400),
    "cl-hex": (_h(headers=b"Content-Length: 0x3\r\n") + b"abc", 400),
    "cl-exponent": (_h(headers=b"Content-Length: 3e0\r\n") + b"abc", 400),
    "cl-empty": (_h(headers=b"Content-Length: \r\n") + b"abc", 400),
    "cl-overflow": (_h(headers=b"Content-Length: 99999999999999999999999\r\n") + b"abc", 400),
    "cl-2^64": (_h(headers=b"Content-Length: 18446744073709551616\r\n") + b"abc", 400),
    "cl-space-inside": (_h(headers=b"Content-Length: 1 0\r\n") + b"abc", 400),
    "cl-leading-zeros": (_h(headers=b"Content-Length: 0003\r\n") + b"abc", 200),
    "cl-trailing-space": (_h(headers=b"Content-Length: 3 \r\n") + b"abc", None),
    "cl-space-before-colon": (_h(headers=b"Content-Length : 3\r\n") + b"abc", 400),
    "cl-smuggle-in-body": (_h(headers=b"Content-Length: %d\r\n" % SMUGGLE_LEN) + SMUGGLE, 200),
    "cl-on-get-with-smuggle": (_h(b"GET", headers=b"Content-Length: %d\r\n" % SMUGGLE_LEN) + SMUGGLE, 200),
    # --- chunked bodies ---
    "chunk-size-overflow": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"10000000000000000\r\na\r\n", 400),
    "chunk-size-overflow-long": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"f" * 40 + b"\r\na\r\n", 400),
    "chunk-size-negative": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"-5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk-size-0x": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk-size-space-prefix": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b" 5\r\nhello\r\n0\r\n\r\n", 400),
    "chunk-bare-lf": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"5\nhello\n0\n\n" + SMUGGLE, 400),
    "chunk-data-too-long": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"3\r\nhello\r\n0\r\n\r\n", 400),
    "chunk-missing-crlf": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello0\r\n\r\n" + SMUGGLE, 400),
    "chunk-extension": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"5;a=b\r\nhello\r\n0\r\n\r\n", 200),
    "chunk-trailer-identity": (_h(headers=b"Transfer-Encoding: chunked\r\n")
                               + b"5\r\nhello\r\n0\r\nX-User-Id: admin\r\nTransfer-Encoding: x\r\n\r\n", None),
    "chunk-invalid-hex": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    # --- request line and header syntax ---
    "obs-fold": (_h(b"GET", headers=b"X-A: a\r\n b\r\n"), 400),
    "obs-fold-tab": (_h(b"GET", headers=b"X-A: a\r\n\tb\r\n"), 400),
    "bare-lf-everywhere": (b"GET /open/x HTTP/1.1\nHost: x\n\n", 400),
    "bare-cr": (b"GET /open/x HTTP/1.1\rHost: x\r\n\r\n", 400),
    "nul-in-header": (_h(b"GET", headers=b"X-A: a\x00b\r\n"), 400),
    "del-in-header-value": (_h(b"GET", headers=b"X-A: a\x7fb\r\n"), 400),
    "ctl-in-header-value": (_h(b"GET", headers=b"X-A: a\x01b\r\n"), 400),
    "space-in-header-name": (_h(b"GET", headers=b"X A: b\r\n"), 400),
    "no-colon": (_h(b"GET", headers=b"Foo\r\n"), 400),
    "empty-header-name": (_h(b"GET", headers=b": b\r\n"), 400),
    "non-ascii-header-name": (_h(b"GET", headers=b"X-\xc3\xa9: b\r\n"), 400),
    "high-bit-header-value": (_h(b"GET", headers=b"X-A: caf\xe9\r\n"), 200),
    # RFC 9112 §3 lets a recipient parse the request line on whitespace-delimited words; llhttp
    # does and the h11 adapter was made to agree, so only agreement is required here.
    "two-spaces-request-line": (b"GET  /open/x HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "tab-request-line": (b"GET\t/open/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "http-1.2": (b"GET /open/x HTTP/1.2\r\nHost: x\r\n\r\n", None),
    "http-2.0": (b"GET /open/x HTTP/2.0\r\nHost: x\r\n\r\n", None),
    "http-0.9": (b"GET /open/x\r\n\r\n", 400),
    "lowercase-version": (b"GET /open/x http/1.1\r\nHost: x\r\n\r\n", 400),
    "lowercase-method": (b"get /open/x HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "unknown-method": (b"FOO /open/x HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "no-host": (b"GET /open/x HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /open/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "host-with-path": (b"GET /open/x HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "host-with-userinfo": (b"GET /open/x HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    "leading-crlf": (b"\r\n\r\nGET /open/x HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "garbage": (b"\xff\xfe\xfd\r\n\r\n", 400),
    # --- targets (RFC 9112 §3.2) ---
    "absolute-form-open": (b"GET http://evil.example/open/x HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "absolute-form-required": (b"GET http://evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "absolute-form-uppercase-scheme": (b"GET HTTPS://evil.example/open/x HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "absolute-form-ftp": (b"GET ftp://evil.example/open/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "absolute-form-userinfo": (b"GET http://u:p@evil.example/open/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "authority-form-get": (b"GET evil.example:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "asterisk-options": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "connect": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", 400),
    "connect-with-body": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\nSSH-2.0-x\r\n" + SMUGGLE, 400),
    "fragment": (b"GET /open/x#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "non-ascii-target": (b"GET /open/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    # --- path tricks against per-route rules (no token: /public is open, /admin and / need one) ---
    "path-dotdot": (b"GET /public/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-encoded-dotdot": (b"GET /public/%2e%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-encoded-dotdot-upper": (b"GET /public/%2E%2E/admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-mixed-dotdot": (b"GET /public/.%2e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-encoded-slash": (b"GET /public%2F..%2Fadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-encoded-slash-lower": (b"GET /public/..%2fadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-double-slash": (b"GET //public/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-leading-double-slash": (b"GET //admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-semicolon-dotdot": (b"GET /public/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-semicolon-param": (b"GET /admin;jsessionid=1 HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-public-semicolon": (b"GET /public;/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-dot-segment": (b"GET /public/./../admin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-encoded-a": (b"GET /%61dmin HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-backslash": (b"GET /public\\..\\admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-encoded-backslash": (b"GET /public/..%5cadmin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-double-encoded": (b"GET /public/%252e%252e/admin HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "path-uppercase": (b"GET /PUBLIC/x HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-prefix-confusion": (b"GET /publicity HTTP/1.1\r\nHost: x\r\n\r\n", 401),
    "path-encoded-nul": (b"GET /public/%00/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-above-root": (b"GET /public/../../admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "path-query-dotdot": (b"GET /public/x?y=/../admin HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "path-overlong-utf8-dot": (b"GET /public/%c0%ae%c0%ae/admin HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    # --- authorization headers ---
    "two-authorization": (_h(b"GET", b"/x", b"Authorization: Bearer a.b.c\r\nAuthorization: Bearer {tok}\r\n"), 400),
    "two-authorization-case": (_h(b"GET", b"/x", b"authorization: Bearer {tok}\r\nAUTHORIZATION: Bearer a.b.c\r\n"), 400),
    "empty-then-real-authorization": (_h(b"GET", b"/x", b"Authorization:\r\nAuthorization: Bearer {tok}\r\n"), 400),
    "authorization-underscore": (_h(b"GET", b"/x", b"Authorization_: Bearer {tok}\r\n"), 401),
    "bearer-lowercase": (_h(b"GET", b"/x", b"Authorization: bearer {tok}\r\n"), 200),
    "bearer-mixedcase": (_h(b"GET", b"/x", b"Authorization: BeArEr {tok}\r\n"), 200),
    "bearer-tab": (_h(b"GET", b"/x", b"Authorization: Bearer\t{tok}\r\n"), 401),
    "bearer-no-space": (_h(b"GET", b"/x", b"Authorization: Bearer{tok}\r\n"), 401),
    "bearer-two-tokens": (_h(b"GET", b"/x", b"Authorization: Bearer {tok} {tok}\r\n"), 401),
    "bearer-comma-list": (_h(b"GET", b"/x", b"Authorization: Bearer a.b.c, Bearer {tok}\r\n"), 401),
    "basic-scheme": (_h(b"GET", b"/x", b"Authorization: Basic YTpi\r\n"), 401),
    # --- sizes ---
    "200-headers": (_h(b"GET", headers=b"".join(b"X-H-%d: v\r\n" % i for i in range(200))), 200),
    "2000-headers": (_h(b"GET", headers=b"".join(b"X-H-%d: v\r\n" % i for i in range(2000))), 431),
    "1mb-header-value": (_h(b"GET", headers=b"X-Big: " + b"a" * (1 << 20) + b"\r\n"), 431),
    "1mb-many-headers": (_h(b"GET", headers=b"X-A: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n" * 20000), 431),
    "1mb-target": (b"GET /open/" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    "1mb-header-name": (_h(b"GET", headers=b"X" * (1 << 20) + b": a\r\n"), 431),
    "1mb-no-terminator": (b"GET /open/x HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (1 << 20), 431),
    # --- upgrades ---
    "websocket-no-token": (_h(b"GET", b"/x", b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: "
                                             b"dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
                           + b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58" + SMUGGLE, 401),
    "websocket-bad-token": (_h(b"GET", b"/x", b"Authorization: Bearer a.b.c\r\nConnection: Upgrade\r\n"
                                              b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                              b"Sec-WebSocket-Version: 13\r\n") + SMUGGLE, 401),
    "h2c-no-token": (_h(b"GET", b"/x", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
                     401),
    "h2c-with-token": (_h(b"GET", b"/x", b"Authorization: Bearer {tok}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                         b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"), 200),
    "h2c-then-preface": (_h(b"GET", b"/open/x", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                               b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n") + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                         200),
    "upgrade-on-post-with-body": (_h(b"POST", b"/x", b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: %d\r\n"
                                                     % SMUGGLE_LEN) + SMUGGLE, 401),
    # --- pipelining with different tokens ---
    "pipeline-mixed-tokens": (_h(b"GET", b"/x", b"Authorization: Bearer {tok}\r\n") + _h(b"GET", b"/x", b"Authorization: Bearer a.b.c\r\n")
                              + _h(b"GET", b"/x") + _h(b"GET", b"/x", b"Authorization: Bearer {tok}\r\n"), 200),
    "pipeline-401-with-body-then-smuggle": (_h(b"POST", b"/x", b"Content-Length: %d\r\n" % SMUGGLE_LEN) + SMUGGLE
                                            + SMUGGLE, 401),
    "pipeline-after-400": (b"GET /open/x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" + SMUGGLE, 400),
    "expect-100-bad-token": (_h(b"POST", b"/x", b"Authorization: Bearer a.b.c\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                                                % SMUGGLE_LEN), 401),
    "pipeline-after-http10": (b"GET /open/x HTTP/1.0\r\n\r\nGET /open/y HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "pipeline-after-connection-close": (b"GET /open/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                        b"GET /open/y HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "connection-close-then-crlf": (b"GET /open/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\r\n", 200),
    "post-then-stray-crlf": (b"POST /open/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\r\n", 200),
    "bare-cr-unterminated-head": (b"GET /open/x HTTP/1.1\r\nHost: x\rX: y\r\n", 400),
    "double-space-after-target": (b"GET /open/x  HTTP/1.1\r\nHost: x\r\n\r\n", None),  # as above
    "no-space-before-version": (b"GET /open/xHTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "method-ET": (b"ET /open/x HTTP/1.1\r\nHost: x\r\n\r\n", None),
    "method-lowercase-post": (b"post /open/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", None),
    "invalid-header-line-unterminated": (b"GET /open/x HTTP/1.1\r\nHost: x\r\n-\r\n", 400),
    "trailer-garbage-unterminated": (_h(headers=b"Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n%\r\n", 400),
    "expect-unknown": (_h(b"POST", b"/open/x", b"Expect: 200-ok\r\nContent-Length: 3\r\n") + b"abc", None),
}

# Cases where the catalogue shows a product bug (see the xfail reasons). The lead removes an
# entry when the fix lands; strict xfail makes a silent fix fail the build until then.
_PIPELINE_BUG = ("BUG: a valid request followed in the same read by a malformed one is answered with the "
                 "malformed one's 400 and never forwarded (connection.py ClientConnection._protocol_error "
                 "cancels the in-flight exchange instead of answering it first)")
_CLOSE_BUG = ("BUG: with httptools, any byte after a request that ends the connection (HTTP/1.0 without "
              "keep-alive, or Connection: close) makes llhttp raise 'Data after Connection: close' and the "
              "valid request is answered 400 instead of 200 (h11 answers 200); codec.py HttptoolsCodec.feed "
              "should stop feeding llhttp after such a message, and connection.py _protocol_error answers the "
              "wrong request")
_OWS_BUG = ("BUG: the httptools codec keeps trailing whitespace of header values (RFC 9110 §5.5: it is not "
            "part of the value; h11 strips it): 'Content-Length: 3 ' and 'Host: admin.test ' are 400 with "
            "httptools and accepted with h11 (codec.py HttptoolsCodec.on_header should strip OWS)")
_LATE_BUG = ("BUG: the h11 codec only checks a head (or chunked trailer) once its terminating blank line "
             "arrives, so a bare CR / invalid line without the terminator gets no answer (the connection is "
             "held until header_timeout, or response_timeout for a trailer) where httptools answers 400 at "
             "once (codec.py H11Codec._buffer_head / _pump)")
_LINE_BUG = ("BUG: llhttp (httptools codec) accepts request lines h11 refuses -- no version (HTTP/0.9 style, "
             "also 'GET /xHTTP/1.1'), two spaces after the target -- and forwards them (200) where the h11 "
             "codec answers 400 (codec.py: neither adapter pins the request-line grammar of RFC 9112 §3)")
KNOWN_BUGS: dict[str, str] = {
    "trailer-garbage-unterminated": _LATE_BUG,
}
# Found by this suite and fixed since (commit 81c804a and later); kept as plain regression cases above.
FIXED: dict[str, str] = {
    "bare-cr-unterminated-head": _LATE_BUG,
    "no-space-before-version": _LINE_BUG,
    "http-0.9": _LINE_BUG,
    "pipeline-after-http10": _CLOSE_BUG,
    "pipeline-after-connection-close": _CLOSE_BUG,
    "chunk-size-overflow": "h11 codec accepted chunk size 2**64 when chunk data followed in the same read and "
                           "then waited for 2**64 bytes; httptools answered 400",
    "cl-list": "'Content-Length: 3, 3' was 400 with httptools but 200 with h11",
    "http-1.2": "'HTTP/1.2' was 400 with httptools and 200 with h11",
    "te-http10": "Transfer-Encoding in an HTTP/1.0 request: httptools 400, h11 forwarded it (RFC 9112 §6.1)",
    "h2c-then-preface": _PIPELINE_BUG,
    "cl-trailing-space": _OWS_BUG,
    "invalid-header-line-unterminated": _LATE_BUG,
}


def _wire(name: str, token: str) -> bytes:
    return CASES[name][0].replace(b"{tok}", token.encode())


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n])) if n in KNOWN_BUGS else n
    for n in sorted(CASES)])
async def test_differential_codecs_agree_rfc9112(pair, rsa_key, name):
    """httptools and h11 give the same statuses and forward the same requests; never 5xx; a
    smuggled request never reaches the backend; the expected status when the contract fixes it."""
    wire = _wire(name, rsa_key.token())
    expected = CASES[name][1]
    exchanges = await asyncio.gather(*(exchange(gw.port, wire) for gw, _ in pair.values()))
    results = {parser: statuses(raw) for parser, (raw, _) in zip(pair, exchanges)}
    forwarded = {
        parser: [(r["method"], r["path"], r["body_size"],
                  sorted((k, v) for k, v in r["headers"] if k.startswith("x-user") or k == "x-scope"))
                 for r in backend.seen]
        for parser, (_, backend) in pair.items()
    }
    assert results["httptools"] == results["h11"], results
    assert forwarded["httptools"] == forwarded["h11"], forwarded
    assert results["httptools"], f"no response at all: {name}"
    assert all(s < 500 for s in results["httptools"]), results
    for _, backend in pair.values():
        assert not [r for r in backend.seen if r["path"].startswith("/smuggled")], "smuggled request reached the backend"
        for record in backend.seen:
            # Anything that reached the backend without a verified identity used an open route.
            if not any(k == "x-user-id" for k, _ in record["headers"]):
                assert record["path"].startswith(("/open", "/public")), record["path"]
            assert ("x-user-id", "admin") not in [(k, v) for k, v in record["headers"]]
    if expected is not None:
        assert results["httptools"][0] == expected, results


def test_case_catalogue_size():
    assert len(CASES) >= 100


# --------------------------------------------------------------- per-codec behaviour beyond statuses


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


async def test_expect_100_continue_bad_token_answered_before_body(gw, backend):
    """RFC 9110 §10.1.1: the 401 comes before the client sends the body, and no 100 precedes it."""
    for auth in (b"", b"Authorization: Bearer a.b.c\r\n", b"Authorization: Basic YTpi\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"PUT /x HTTP/1.1\r\nHost: a\r\n" + auth + b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 401"), head
        writer.close()
    assert backend.seen == []


async def test_expect_100_continue_valid_token_but_forbidden(gw, backend, rsa_key):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"PUT /admin/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + rsa_key.token(role="member").encode()
                 + b"\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 403"), head
    writer.close()
    assert backend.seen == []


async def test_absolute_form_and_connect_never_open_a_connection(gw, backend, counting_listener):
    """Only routes choose upstreams: an absolute-form target naming another server, or CONNECT,
    never makes the gateway connect there (the gateway is not an open proxy)."""
    target = f"127.0.0.1:{counting_listener.port}".encode()
    wires = [
        b"GET http://" + target + b"/open/x HTTP/1.1\r\nHost: " + target + b"\r\n\r\n",
        b"GET http://" + target + b"/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n",
        b"GET /open/x HTTP/1.1\r\nHost: " + target + b"\r\n\r\n",
        b"OPTIONS http://" + target + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for wire in wires:
        raw, _ = await exchange(gw.port, wire)
        assert statuses(raw) and statuses(raw)[0] < 500
    await asyncio.sleep(0.1)
    assert counting_listener.connections == 0
    # The absolute-form request went to the configured backend, with its authority as Host.
    assert header_values(backend.seen[0], "host") == [target.decode()]


async def test_one_megabyte_head_in_one_write_is_fast_431(gw, backend):
    """The 431 comes fast and the connection closes. (The gateway closes with our unread bytes in
    its receive buffer, so the kernel may turn the close into a RST that overtakes the 431; a
    reset is accepted here, a hang or a 5xx is not.)"""
    started = time.monotonic()
    raw, closed = await exchange(gw.port, b"GET /open/x HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"b" * (1 << 20)
                                 + b"\r\n\r\n", first=5)
    assert statuses(raw) in ([431], [])
    assert closed
    assert time.monotonic() - started < 2
    assert backend.seen == []


@pytest.mark.parametrize("tail", [b"garbage\r\n\r\n", b"GET /open/z HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], ids=["garbage", "two-hosts", "h2-preface"])
async def test_valid_pipelined_requests_before_a_malformed_one_are_answered(gw, backend, tail):
    """RFC 9112 §9.3.2: responses in request order. Two valid requests then a malformed one in a
    single write: the valid ones get their 200s, then the 400 -- not one 400 for everything.
    (Found by this suite: both codecs answered a single 400 and dropped the valid requests.)"""
    wire = b"GET /open/x HTTP/1.1\r\nHost: a\r\n\r\nGET /open/y HTTP/1.1\r\nHost: a\r\n\r\n" + tail
    raw, _ = await exchange(gw.port, wire)
    assert statuses(raw) == [200, 200, 400]


async def test_websocket_upgrade_without_token_never_tunnels(gw, backend):
    """The 401 is final: frame bytes sent after the upgrade request are never relayed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert head.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in head.lower()  # what follows an upgrade request is not HTTP
    try:
        writer.write(b"\x81\x05hello" + SMUGGLE)
        await writer.drain()
    except ConnectionError:
        pass
    # The gateway closes after the 401 (no waiting on a clock): by EOF nothing can still be relayed.
    try:
        rest = await asyncio.wait_for(reader.read(), 3)  # the 401's body, then EOF
        assert b"HTTP/" not in rest
    except ConnectionError:
        pass  # our unread frame bytes may turn the close into a reset
    writer.close()
    assert backend.seen == []


async def test_h2c_upgrade_is_ignored_and_headers_not_forwarded(gw, backend, rsa_key):
    wire = get("/x", rsa_key.token(), b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n")
    raw, _ = await exchange(gw.port, wire)
    assert statuses(raw) == [200]
    names = {k for k, _ in backend.seen[-1]["headers"]}
    assert not names & {"upgrade", "http2-settings"}


async def test_chunk_trailer_cannot_inject_identity(gw, backend, rsa_key):
    """Trailer fields are never merged into the forwarded head (RFC 9110 §6.5.1)."""
    wire = (b"POST /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + rsa_key.token(sub="alice").encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-User-Id: admin\r\nX-User-Role: admin\r\n\r\n")
    raw, _ = await exchange(gw.port, wire)
    assert statuses(raw) == [200]
    assert header_values(backend.seen[-1], "x-user-id") == ["alice"]
    assert header_values(backend.seen[-1], "x-user-role") == ["member"]


async def test_pipelined_tokens_after_refused_body(gw, backend, rsa_key):
    """A 401 for a request with an unread body closes the connection: the body is never taken for
    the next request (which would be an unauthenticated smuggle)."""
    body = get("/smuggled/y", None)
    wire = (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)) + body + get("/x", rsa_key.token())
    raw, closed = await exchange(gw.port, wire)
    assert statuses(raw)[0] == 401
    assert not [r for r in backend.seen if r["path"].startswith("/smuggled")]


async def test_two_authorization_headers_any_order(gw, backend, rsa_key):
    token = rsa_key.token()
    for pair_ in ((token, "a.b.c"), ("a.b.c", token), (token, token)):
        wire = get("/x", pair_[0], b"Authorization: Bearer " + pair_[1].encode() + b"\r\n")
        raw, _ = await exchange(gw.port, wire)
        assert statuses(raw) == [400]
    assert backend.seen == []


async def test_header_count_and_bearer_case(gw, backend, rsa_key):
    token = rsa_key.token()
    for scheme in (b"bearer ", b"BEARER ", b"Bearer    ", b"bEaReR "):
        assert await status_of(gw, get("/x", token, scheme=scheme)) == 200
    await assert_rejected(gw, backend, token.upper())


# ------------------------------------------------------------------ wire-level mutation fuzzing

_FUZZ_ALPHABET = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b",", b";", b"0", b"-",
                  b"/", b"%", b".", b"a", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 4\r\n"]


def _mutations(token: bytes, seed: int, count: int) -> list[bytes]:
    """Deterministic byte-level mutations (insert / delete / replace) of valid requests."""
    import random

    rnd = random.Random(seed)
    seeds = [
        b"GET /open/x?a=1 HTTP/1.1\r\nHost: api.test\r\nX-User-Id: admin\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer " + token + b"\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /open/y HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /maybe/z HTTP/1.1\r\nHost: api.test\r\n\r\nGET /smuggled/z HTTP/1.1\r\nHost: a\r\nX-User-Id: admin\r\n\r\n",
        b"POST /open/b HTTP/1.1\r\nHost: a\r\nContent-Length: 38\r\n\r\n" + SMUGGLE,
    ]
    out = []
    for _ in range(count):
        wire = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(wire))
            op = rnd.random()
            if op < 0.4:
                wire[pos:pos] = rnd.choice(_FUZZ_ALPHABET)
            elif op < 0.7:
                del wire[pos]
            else:
                wire[pos:pos + 1] = rnd.choice(_FUZZ_ALPHABET)
        out.append(bytes(wire))
    return out


async def _run_mutations(pair, rsa_key, seed: int, count: int):
    wires = _mutations(rsa_key.token().encode(), seed, count)
    sem = asyncio.Semaphore(40)

    async def one(wire: bytes) -> list[list[int]]:
        async with sem:
            got = await asyncio.gather(*(exchange(gw.port, wire, first=1.0) for gw, _ in pair.values()))
            return [statuses(raw) for raw, _ in got]

    return wires, await asyncio.gather(*(one(w) for w in wires))


async def test_wire_mutation_fuzz_never_5xx_never_smuggles(pair, rsa_key):
    """200 seeded byte-level mutations of valid requests, sent to both codecs: no 5xx, no
    smuggled or unauthenticated request at the backend, no forged identity header."""
    wires, results = await _run_mutations(pair, rsa_key, seed=7, count=200)
    for wire, per_codec in zip(wires, results):
        for got in per_codec:
            assert all(s < 500 for s in got), (wire, got)
    for _, backend in pair.values():
        for record in backend.seen:
            assert not record["path"].startswith("/smuggled"), record
            assert ("x-user-id", "admin") not in [(k, v) for k, v in record["headers"]], record
            if not any(k == "x-user-id" for k, _ in record["headers"]):
                assert record["path"].startswith(("/open", "/public", "/maybe")), record["path"]


@pytest.mark.xfail(strict=True, reason="BUG: codecs disagree on seeded wire mutations; the remaining differences "
                                       "fall into the KNOWN_BUGS categories above (two-space request lines, late "
                                       "detection of a bad head/trailer line in h11)")
async def test_wire_mutation_fuzz_codecs_agree(pair, rsa_key):
    wires, results = await _run_mutations(pair, rsa_key, seed=11, count=150)
    differing = [(w, r) for w, r in zip(wires, results) if r[0] != r[1]]
    assert not differing, differing[:5]


HOST_ROUTES = [
    {"path_prefix": "/", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/", "upstream": "backend", "host": "admin.test"},
    {"path_prefix": "/", "upstream": "backend", "host": "*.corp.test"},
]


@pytest.mark.parametrize(("target", "host", "expected"), [
    (b"/x", b"admin.test", 401), (b"/x", b"ADMIN.TEST", 401), (b"/x", b"admin.test.", 401),
    (b"/x", b"admin.test:80", 401), (b"/x", b"Admin.Test.:8443", 401), (b"/x", b"admin.test ", 401),
    (b"/x", b"admin.test..", 400), (b"/x", b"admin%2etest", 400), (b"/x", b"admin.test@evil", 400),
    (b"/x", b"evil@admin.test", 400), (b"/x", b"admin.test:99999", 400), (b"/x", b"admin.test:", 401),
    (b"/x", b"a.corp.test", 401), (b"/x", b"A.B.CORP.TEST.", 401), (b"/x", b"corp.test", 200),
    (b"http://admin.test/x", b"other.test", 401), (b"HTTP://ADMIN.TEST:80/x", b"other.test", 401),
    (b"http://other.test/x", b"admin.test", 200),
], ids=lambda v: v.decode() if isinstance(v, bytes) else str(v))
async def test_host_routing_tricks(request, parser, make_gateway, backend, target, host, expected):
    """Per-host rules cannot be dodged by Host spelling (case, trailing dot, port, OWS) or by an
    absolute-form target disagreeing with Host; whatever reaches the upstream unauthenticated
    carries a Host that is not the protected one (RFC 9112 §3.2.2, RFC 9110 §7.2). (Found by this
    suite: 'Host: admin.test ' was 400 with httptools only -- trailing OWS kept.)"""
    gw = await make_gateway(routes=HOST_ROUTES)
    raw, _ = await exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert statuses(raw)[:1] == [expected], raw[:200]
    for record in backend.seen:
        forwarded = header_values(record, "host")[0].lower().rstrip(".").split(":")[0]
        assert forwarded != "admin.test" and not forwarded.endswith(".corp.test"), record


# ------------------------------------------------------- WebSocket upgrade smuggling (h2c/ws smuggling)

_WS_SMUGGLING_BUG = ("BUG: bytes sent after a WebSocket upgrade request are relayed to the upstream before it "
                     "agreed to switch protocols (101); an upstream that declines the upgrade parses them as a "
                     "new HTTP request, so an unauthenticated request with forged identity headers reaches the "
                     "backend (connection.py ClientConnection._attach writes ex.tunnel_buffer right after the "
                     "request head; it must wait for the 101 and drop the buffer otherwise)")


class SequentialBackend:
    """A plain HTTP/1.1 server that declines upgrades (answers 200) and keeps parsing whatever
    follows on the connection as further requests -- what most application servers do."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, list[bytes]]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> SequentialBackend:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            buffer = b""
            try:
                while True:
                    data = await asyncio.wait_for(reader.read(65536), 2)
                    if not data:
                        break
                    buffer += data
                    while b"\r\n\r\n" in buffer:
                        head, _, buffer = buffer.partition(b"\r\n\r\n")
                        lines = head.split(b"\r\n")
                        self.requests.append((lines[0], lines[1:]))
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        await writer.drain()
            except (asyncio.TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def sequential_backend() -> AsyncIterator[SequentialBackend]:
    server = await SequentialBackend().start()
    yield server
    await server.stop()


@pytest.mark.parametrize("route", ["open", "authenticated"])
async def test_websocket_upgrade_smuggling_declined_upgrade(make_gateway, sequential_backend, rsa_key, route):
    """The upgrade request is allowed (open route, or a valid low-privilege token); the upstream
    declines the upgrade. The smuggled request written right behind it must never reach the
    upstream -- it was never authenticated and it carries a forged X-User-Id."""
    gw = await make_gateway(routes=ROUTES, backend_port=sequential_backend.port)
    path = b"/public/ws" if route == "open" else b"/ws"
    auth = b"" if route == "open" else b"Authorization: Bearer " + rsa_key.token(sub="mallory").encode() + b"\r\n"
    wire = (b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n" + auth + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            b"GET /admin/secret HTTP/1.1\r\nHost: a\r\nX-User-Id: admin\r\nX-User-Role: admin\r\n\r\n")
    raw, _ = await exchange(gw.port, wire)
    assert statuses(raw)[:1] == [200]
    lines = [line for line, _ in sequential_backend.requests]
    assert lines == [b"GET " + path + b" HTTP/1.1"], lines


async def test_websocket_bytes_after_accepted_upgrade_are_tunnelled(make_gateway, rsa_key):
    """Control: when the upstream does switch protocols, bytes after the upgrade are tunnel data."""
    received = bytearray()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        await writer.drain()
        try:
            while len(received) < 8:
                data = await asyncio.wait_for(reader.read(100), 2)
                if not data:
                    break
                received.extend(data)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        gw = await make_gateway(routes=ROUTES, backend_port=server.sockets[0].getsockname()[1])
        wire = (b"GET /public/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(wire)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 101")
        writer.write(b"tunnel!!")
        await writer.drain()
        for _ in range(100):
            if len(received) >= 8:
                break
            await asyncio.sleep(0.02)
        writer.close()
        assert bytes(received) == b"tunnel!!"


# ---------------------------------------------- duplicate token carriers in the other token sources

_DUPLICATE_SOURCE_BUG = ("BUG: with a non-Authorization token source, a request carrying the token twice (two "
                         "X-Api-Token headers, two session cookies, two access_token parameters) is verified on "
                         "the first and forwarded with both, so the unverified second token reaches the upstream "
                         "next to the verified identity; contract §4 refuses the same ambiguity for Authorization "
                         "with 400 (auth.py extract_token takes the first; headerpolicy.scan_request_head only "
                         "counts Authorization)")


@pytest.mark.parametrize("source", ["header:x-api-token", "cookie:session", "cookie:session-two-headers",
                                    "query:access_token"])
async def test_duplicate_token_in_other_sources_is_refused(make_gateway, backend, rsa_key, source):
    """HTTP parameter pollution (OWASP WSTG-INPV-04) on the token carrier: refuse it (400) or at
    least never let an unverified token travel to the upstream."""
    good = rsa_key.token(sub="alice")
    forged = SigningKey.rsa("rsa-1").token(sub="admin", role="admin")
    kind, name = source.split(":")
    gw = await make_gateway(routes=ROUTES, token={"sources": [f"{kind}:{name.replace('-two-headers', '')}"]})
    if source == "header:x-api-token":
        wire = get("/x", None, f"X-Api-Token: {good}\r\nX-Api-Token: {forged}\r\n".encode())
    elif source == "cookie:session":
        wire = get("/x", None, f"Cookie: session={good}; session={forged}\r\n".encode())
    elif source == "cookie:session-two-headers":
        wire = get("/x", None, f"Cookie: session={good}\r\nCookie: session={forged}\r\n".encode())
    else:
        wire = get(f"/x?access_token={good}&access_token={forged}")
    raw, _ = await exchange(gw.port, wire)
    status = statuses(raw)[0]
    forwarded = " ".join(v for r in backend.seen for _, v in r["headers"]) + " ".join(r["path"] for r in backend.seen)
    assert status == 400 or forged not in forwarded, status
