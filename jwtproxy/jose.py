"""Strict parsing of compact JWS tokens (RFC 7515 §7.1) -- no keys, no clock, no I/O.

Theory of operation
-------------------
A bearer token is attacker-controlled input, so this module accepts exactly one spelling of a
token and rejects everything else with :class:`TokenRejected` before any key is looked at:

1. *Size first.* ``len(token) > max_bytes`` is rejected before any decoding, so the cost of a
   rejection is bounded by the configured size, never by the token.
2. *Shape.* Exactly three ``.``-separated segments. Five segments is a JWE (RFC 7516), which is
   rejected as unsupported (never decrypted); any other count is malformed.
3. *Strict base64url* (RFC 7515 §2, RFC 4648 §5): only ``A-Z a-z 0-9 - _``, no padding, no
   whitespace, no ``+`` or ``/``, and no non-canonical encodings: a segment whose length is
   ``1 mod 4`` is impossible, and the unused low bits of the last character must be zero (so
   ``...Q`` and ``...R`` cannot both decode to the same bytes -- otherwise one signed token has
   many spellings, which defeats token-keyed caches and revocation lists).
4. *JSON.* Header and payload are UTF-8 JSON objects (RFC 7519 §7.2) with no duplicate member
   names (RFC 7515 §4: a duplicate-tolerant parser would let two parsers disagree on the claims),
   no ``NaN``/``Infinity`` literals, and a bounded nesting depth (:data:`MAX_JSON_DEPTH`) so no
   later recursive walk (rendering identity headers, ``json.dumps``) can hit a RecursionError.
   The definition is :func:`_strict_json` (the standard library's parser with the hooks of
   :mod:`jwtproxy.strictjson`). :func:`_canonical_json` is a shortcut in C for the spelling
   issuers use: ``orjson`` parses the segment and writes the value back; when that output is the
   segment byte for byte, the segment is the one compact spelling of that value, so no object in
   it names a member twice (the output names each member once), no number is out of range or
   non-finite (those come back spelled differently, or not at all), and the standard library
   would read the same value. Anything else -- whitespace, an escaped ``/``, ``1E5``,
   big integers, duplicates, invalid input -- takes the strict parser, which alone decides
   rejections. The shortcut saves ~2 µs per token and keeps the member names of every cached
   verdict shared (orjson reuses key strings).
5. *Header.* ``alg`` is a string. ``crit`` (RFC 7515 §4.1.11: we understand no extension),
   ``b64`` (RFC 7797 unencoded payloads) and ``cty: JWT`` (RFC 7519 §5.2 nested tokens) are
   rejected; ``kid`` and ``typ`` must be strings when present.
6. *Embedded key references are ignored, not rejected.* ``jwk``, ``jku``, ``x5u``, ``x5c`` and
   ``x5t`` are never read by jwtproxy: keys come only from the issuer's configured JWKS or
   secret. Ignoring keeps tokens from IdPs that add ``x5t``/``x5c`` working, and is safe because
   no code path looks at those members (contract §4: "never used to find keys").

``TokenRejected.description`` is fixed text chosen here, never a piece of the token.
"""

from __future__ import annotations

import binascii
from typing import Any, Final

import orjson

from jwtproxy.strictjson import DECODER, DuplicateMember

__all__ = [
    "MAX_JSON_DEPTH",
    "ParsedJWS",
    "ParsedToken",
    "TokenRejected",
    "b64url_decode",
    "parse_compact",
    "parse_jws",
]

#: Deepest JSON nesting accepted in a header or payload (an object holding an array is depth 2).
MAX_JSON_DEPTH: Final = 32

# base64url -> standard alphabet for binascii; '+', '/' and '=' become '!', which strict mode
# rejects, so only the url-safe alphabet without padding survives (RFC 7515 §2).
_TO_STD: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_PAD: Final = (b"", b"", b"==", b"=")  # indexed by len % 4 (1 never gets this far)
# Indexed by len % 4: the last characters whose unused low bits are zero.
_CANONICAL_LAST: Final[tuple[frozenset[int], ...]] = (
    frozenset(),  # 0: no unused bits (not consulted)
    frozenset(),  # 1: impossible length, nothing is canonical
    frozenset(b"AQgw"),  # 12 bits carry 8: the low 4 bits of the last sextet must be 0
    frozenset(b"AEIMQUYcgkosw048"),  # 18 bits carry 16: the low 2 bits must be 0
)


class TokenRejected(Exception):
    """A token that must be answered 401 ``invalid_token``.

    ``reason`` is a short snake_case label for metrics (bounded set, see the verifier docs);
    ``description`` is the RFC 6750 ``error_description``: it names the failed check and never
    echoes token content.
    """

    __slots__ = ("reason", "description")

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description


# The two results below are plain classes with their own ``__init__``, not dataclasses: a
# dataclass's generated ``__init__`` is interpreted Python even where this module is compiled,
# and one is made for every token parsed.


class ParsedJWS:
    """A syntactically valid compact JWS whose payload may be any bytes (signature layer)."""

    __slots__ = ("header", "payload", "signing_input", "signature", "raw")

    def __init__(self, header: dict[str, Any], payload: bytes, signing_input: bytes, signature: bytes,
                 raw: str) -> None:
        self.header = header
        self.payload = payload
        self.signing_input = signing_input
        self.signature = signature
        self.raw = raw


class ParsedToken:
    """A syntactically valid JWT: a JWS whose payload is a JSON object (the claims)."""

    __slots__ = ("header", "payload", "signing_input", "signature", "raw")

    def __init__(self, header: dict[str, Any], payload: dict[str, Any], signing_input: bytes, signature: bytes,
                 raw: str) -> None:
        self.header = header
        self.payload = payload
        self.signing_input = signing_input
        self.signature = signature
        self.raw = raw


def _malformed(description: str) -> TokenRejected:
    return TokenRejected("malformed", description)


def b64url_decode(segment: str | bytes) -> bytes | None:
    """Strict unpadded base64url decode; None unless ``segment`` is the canonical encoding."""
    if isinstance(segment, str):
        try:
            segment = segment.encode("ascii")
        except UnicodeEncodeError:
            return None
    return _decode(segment)


def _decode(segment: bytes) -> bytes | None:
    rem = len(segment) & 3
    # len % 4 == 1 cannot be base64 (no last character is canonical: _CANONICAL_LAST[1] is
    # empty); for 2 and 3 the unused low bits of the last character must be zero.
    if rem and segment[-1] not in _CANONICAL_LAST[rem]:
        return None
    try:
        # strict_mode rejects every byte outside the alphabet (whitespace, '!' from _TO_STD, ...).
        return binascii.a2b_base64(segment.translate(_TO_STD) + _PAD[rem], strict_mode=True)
    except binascii.Error:
        return None


def _too_deep(value: Any) -> bool:
    """True if ``value`` nests containers deeper than :data:`MAX_JSON_DEPTH` (iterative walk)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _strict_json(data: bytes, what: str) -> Any:
    """The JSON value of ``data`` by the rules of the module docstring, or :class:`TokenRejected`."""
    try:
        # Decoded explicitly as UTF-8 (RFC 7519 §7.2): json.loads(bytes) would also accept UTF-16/32.
        return DECODER.decode(data.decode("utf-8"))
    except RecursionError:
        raise _malformed(f"token {what} nests too deeply") from None
    except DuplicateMember:  # the member's name is token content: never echoed
        raise _malformed(f"duplicate member name in token {what}") from None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, non-finite constants, huge ints
        raise _malformed(f"token {what} is not valid JSON") from None


def _canonical_json(data: bytes) -> Any:
    """The value of ``data`` if ``data`` is its own compact orjson spelling, else None (the caller
    then asks :func:`_strict_json`). See the module docstring for why this reads exactly what
    the strict parser reads."""
    try:
        value = orjson.loads(data)
        return value if orjson.dumps(value) == data else None
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # invalid, or nested past orjson's limit
        return None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    value = _canonical_json(data)
    if value is None:  # also a literal "null": the strict parser says what is wrong with it
        value = _strict_json(data, what)
    if not isinstance(value, dict):
        raise _malformed(f"token {what} is not a JSON object")
    # Cheap bound first: fewer brackets than the limit cannot nest deeper than it.
    if data.count(b"{") + data.count(b"[") > MAX_JSON_DEPTH and _too_deep(value):
        raise _malformed(f"token {what} nests too deeply")
    return value


def _check_header(header: dict[str, Any]) -> None:
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise TokenRejected("bad_header", "alg header missing or not a string")
    if "crit" in header:
        raise TokenRejected("bad_header", "crit header is not supported")
    if "b64" in header:
        raise TokenRejected("bad_header", "unencoded payload (b64) is not supported")
    cty = header.get("cty")
    if cty is not None:
        if not isinstance(cty, str):
            raise TokenRejected("bad_header", "cty header is not a string")
        if cty.lower() in ("jwt", "application/jwt"):
            raise TokenRejected("bad_header", "nested tokens (cty JWT) are not supported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("bad_header", "kid header is not a string")
    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        raise TokenRejected("bad_header", "typ header is not a string")


# Header segments already parsed and checked, to the (never mutated) header object.
_HEADERS: dict[bytes, dict[str, Any]] = {}
_HEADERS_MAX = 256


def _split(token: str, max_bytes: int) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """``(header, payload bytes, signing input, signature)`` of a compact JWS; see :func:`parse_jws`."""
    if len(token) > max_bytes:
        raise TokenRejected("token_too_large", "token too large")
    dots = token.count(".")
    if dots != 2:
        if dots == 4:
            raise TokenRejected("unsupported_jwe", "encrypted tokens (JWE) are not supported")
        raise _malformed("token is not a compact JWS (three segments)")
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise _malformed("token segment is not canonical base64url") from None
    h64, p64, s64 = raw.split(b".")
    if not h64 or not s64:
        raise _malformed("token header or signature segment is empty")
    header = _HEADERS.get(h64)
    payload = _decode(p64)
    signature = _decode(s64)
    if header is None:
        header_bytes = _decode(h64)
        if header_bytes is None or payload is None or signature is None:
            raise _malformed("token segment is not canonical base64url")
        header = _json_object(header_bytes, "header")
        _check_header(header)
        # An issuer signs every token with one of a few headers: remember the accepted ones
        # (bounded: a flood of distinct headers only empties the memo).
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        _HEADERS[h64] = header
    elif payload is None or signature is None:
        raise _malformed("token segment is not canonical base64url")
    return header, payload, raw[: len(h64) + 1 + len(p64)], signature


def parse_jws(token: str, max_bytes: int) -> ParsedJWS:
    """Parse a compact JWS with every strictness rule of the module docstring except that the
    payload may be arbitrary bytes. Raises :class:`TokenRejected`."""
    header, payload, signing_input, signature = _split(token, max_bytes)
    return ParsedJWS(header, payload, signing_input, signature, token)


def parse_compact(token: str, max_bytes: int) -> ParsedToken:
    """Parse a compact JWS whose payload is a JSON object (a JWT). Raises :class:`TokenRejected`.

    Nothing here is trusted yet: the caller must verify the signature over ``signing_input``.
    """
    header, payload, signing_input, signature = _split(token, max_bytes)
    if not payload:
        raise _malformed("token payload is empty")
    return ParsedToken(header, _json_object(payload, "payload"), signing_input, signature, token)
