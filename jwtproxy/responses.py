"""Responses the gateway answers itself: JSON errors in the RFC 6750 shape, and an authz
listener's ``200``.

Every byte of these responses comes from the gateway's own vocabulary (fixed descriptions, the
configured scope names) or from verified claims already rendered as identity headers; nothing a
client sent is echoed, so no escaping question arises beyond JSON encoding.
"""

from __future__ import annotations

import json
from functools import lru_cache

REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    429: "rate_limited",
    431: "request_header_fields_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "temporarily_unavailable",
    504: "gateway_timeout",
}

REALM = b'Bearer realm="jwtproxy"'


def _quoted(value: str) -> bytes:
    """An RFC 9110 quoted-string of our own text (never client input)."""
    return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace") + b'"'


def www_authenticate(error: str | None = None, description: str | None = None, scope: str | None = None) -> bytes:
    """The ``WWW-Authenticate`` value of contract §4's error table."""
    if error is None:
        return REALM
    value = REALM + b", error=" + _quoted(error)
    if description:
        value += b", error_description=" + _quoted(description)
    if scope:
        value += b", scope=" + _quoted(scope)
    return value


def www_authenticate_dpop(algs: str, error: str | None = None, description: str | None = None) -> bytes:
    """The ``DPoP`` challenge of RFC 9449 §7.1 (contract §5.2): ``DPoP algs="...", error=...``."""
    value = b"DPoP algs=" + _quoted(algs)
    if error is not None:
        value += b", error=" + _quoted(error)
    if description:
        value += b", error_description=" + _quoted(description)
    return value


def error_response(
    status: int,
    description: str,
    *,
    error: str | None = None,
    request_id: bytes = b"",
    close: bool = False,
    www_auth: bytes | None = None,
    retry_after: int | None = None,
    head_only: bool = False,
    dpop_nonce: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A complete HTTP/1.1 response with a JSON body ``{"error", "error_description"}``.

    ``dpop_nonce``: a fresh server nonce for the ``DPoP-Nonce`` header (RFC 9449 §8).
    ``headers``: further fields of the gateway's own (a 429's ``RateLimit`` fields)."""
    before, after = _error_parts(
        status, description, error, www_auth, retry_after, close, head_only, dpop_nonce, headers
    )
    if request_id:
        return b"".join((before, b"x-request-id: ", request_id, b"\r\n", after))
    return before + after


@lru_cache(maxsize=1024)
def _error_parts(
    status: int,
    description: str,
    error: str | None,
    www_auth: bytes | None,
    retry_after: int | None,
    close: bool,
    head_only: bool,
    dpop_nonce: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[bytes, bytes]:
    """The response around its request id, rendered once: attack traffic is rejected often,
    and the vocabulary of descriptions is fixed (contract: never client content)."""
    body = json.dumps(
        {"error": error or ERROR_CODES.get(status, "error"), "error_description": description},
        separators=(",", ":"),
    ).encode()
    parts = [
        b"HTTP/1.1 ",
        str(status).encode(),
        b" ",
        REASONS.get(status, b"Error"),
        b"\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: ",
        str(len(body)).encode(),
        b"\r\n",
    ]
    if www_auth is not None:
        parts += (b"www-authenticate: ", www_auth, b"\r\n")
    if retry_after is not None:
        parts += (b"retry-after: ", str(retry_after).encode(), b"\r\n")
    if dpop_nonce is not None:
        parts += (b"dpop-nonce: ", dpop_nonce.encode("ascii"), b"\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    tail = [b"connection: close\r\n" if close else b"", b"\r\n", b"" if head_only else body]
    return b"".join(parts), b"".join(tail)


# An authz listener's allowed answer around its request id and identity headers. no-store: the
# identity headers are this token's, never to be replayed from a cache to another request.
_ALLOWED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncache-control: no-store\r\nx-request-id: "
_ALLOWED_KEEP = b"\r\n"
_ALLOWED_CLOSE = b"connection: close\r\n\r\n"


def allowed_response(request_id: bytes, identity_block: bytes, close: bool) -> bytes:
    """The ``200`` of an authz listener: no body, ``identity_block`` (``name: value\\r\\n`` lines,
    :attr:`jwtproxy.auth.Allow.identity_block`) for the front proxy to copy upstream."""
    return b"".join((_ALLOWED_HEAD, request_id, b"\r\n", identity_block, _ALLOWED_CLOSE if close else _ALLOWED_KEEP))
