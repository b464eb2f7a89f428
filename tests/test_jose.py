"""jose.parse_compact / parse_jws: every strictness rule has a test that fails without it."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtproxy.jose import (
    MAX_JSON_DEPTH,
    ParsedToken,
    TokenRejected,
    b64url_decode,
    parse_compact,
    parse_jws,
)

MAX = 8192


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(obj: object) -> str:
    return b64(json.dumps(obj).encode() if not isinstance(obj, bytes) else obj)


HEADER = {"alg": "RS256", "kid": "k1"}
CLAIMS = {"iss": "https://idp", "sub": "u1", "exp": 2000000000}
SIG = b64(b"\x01" * 32)


def token(header: object = HEADER, payload: object = CLAIMS, sig: str = SIG) -> str:
    return f"{seg(header)}.{seg(payload)}.{sig}"


def rejected(tok: str, reason: str = "malformed", max_bytes: int = MAX) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        parse_compact(tok, max_bytes)
    assert info.value.reason == reason, info.value.description
    return info.value


def test_valid_token_parses() -> None:
    tok = token()
    parsed = parse_compact(tok, MAX)
    assert isinstance(parsed, ParsedToken)
    assert parsed.header == HEADER and parsed.payload == CLAIMS
    assert parsed.signature == b"\x01" * 32
    assert parsed.signing_input == tok.rsplit(".", 1)[0].encode()
    assert parsed.raw == tok


def test_size_is_checked_before_decoding() -> None:
    tok = token()
    assert parse_compact(tok, len(tok))
    rejected(tok, "token_too_large", max_bytes=len(tok) - 1)
    # Garbage of the wrong size is "too large", not "malformed": nothing was decoded.
    rejected("!" * (MAX + 1), "token_too_large")


def test_jwe_is_unsupported() -> None:
    exc = rejected("a.b.c.d.e", "unsupported_jwe")
    assert exc.description == "encrypted tokens (JWE) are not supported"


@pytest.mark.parametrize("tok", ["", "abc", "a.b", "a.b.c.d", "a.b.c.d.e.f", token() + "."])
def test_segment_count(tok: str) -> None:
    rejected(tok)


def test_empty_header_or_signature() -> None:
    h, p, s = token().split(".")
    rejected(f".{p}.{s}")
    rejected(f"{h}.{p}.")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s + "=",  # padding
        lambda s: s + "==",
        lambda s: s[:4] + " " + s[4:],  # whitespace
        lambda s: s[:4] + "\n" + s[4:],
        lambda s: s[:4] + "+" + s[5:],  # standard alphabet
        lambda s: s[:4] + "/" + s[5:],
        lambda s: s[:4] + "é" + s[5:],  # non-ASCII
        lambda s: s[:4] + "!" + s[5:],
    ],
)
def test_non_base64url_signature_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    h, p, s = token().split(".")
    rejected(f"{h}.{p}.{mutate(s)}")
    rejected(f"{h}.{mutate(p)}.{s}")


def test_non_canonical_trailing_bits_rejected() -> None:
    h, p, _ = token().split(".")
    # b"\x01"*32 -> 43 chars (len % 4 == 3): the last char carries 2 unused bits.
    good = b64(b"\x01" * 32)
    assert parse_jws(f"{h}.{p}.{good}", MAX)
    last = good[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) + 1]  # same decoded bytes, non-zero unused bits
    assert base64.urlsafe_b64decode(good[:-1] + twin + "=") == b"\x01" * 32
    rejected(f"{h}.{p}.{good[:-1]}{twin}")
    # len % 4 == 2: 4 unused bits.
    one = b64(b"\x01")
    assert one == "AQ"
    assert b64url_decode("AQ") == b"\x01"
    assert b64url_decode("AR") is None


def test_impossible_length_rejected() -> None:
    h, p, s = token().split(".")
    rejected(f"{h}.{p}.{s}A" if len(s) % 4 == 0 else f"{h}.{p}.{s[: len(s) - len(s) % 4]}A")
    assert b64url_decode("A") is None
    assert b64url_decode("AAAAA") is None


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (b"not json", json.dumps(CLAIMS).encode()),
        (json.dumps(HEADER).encode(), b"not json"),
        (b"[]", json.dumps(CLAIMS).encode()),
        (json.dumps(HEADER).encode(), b'"a string"'),
        (json.dumps(HEADER).encode(), b"123"),
        (json.dumps(HEADER).encode(), b""),
        (json.dumps(HEADER).encode("utf-16"), json.dumps(CLAIMS).encode()),  # not UTF-8
        (json.dumps(HEADER).encode(), json.dumps(CLAIMS).encode("utf-16-le")),
        (json.dumps(HEADER).encode(), b"\xef\xbb\xbf" + json.dumps(CLAIMS).encode()),  # BOM
        (json.dumps(HEADER).encode(), b'{"sub": "\xff"}'),  # invalid UTF-8
    ],
)
def test_header_and_payload_must_be_utf8_json_objects(header: bytes, payload: bytes) -> None:
    rejected(f"{b64(header)}.{b64(payload)}.{SIG}")


def test_duplicate_member_names_rejected() -> None:
    dup_header = b64(b'{"alg":"RS256","alg":"HS256"}')
    exc = rejected(f"{dup_header}.{seg(CLAIMS)}.{SIG}")
    assert "duplicate" in exc.description
    dup_sub = b64(b'{"sub":"a","sub":"b"}')
    rejected(f"{seg(HEADER)}.{dup_sub}.{SIG}")
    nested = b64(b'{"x":{"a":1,"a":2}}')  # nested objects too
    rejected(f"{seg(HEADER)}.{nested}.{SIG}")


@pytest.mark.parametrize("const", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_constants_rejected(const: bytes) -> None:
    payload = b64(b'{"exp":' + const + b"}")
    rejected(f"{seg(HEADER)}.{payload}.{SIG}")


def test_huge_integer_literal_is_rejected_not_raised() -> None:
    # CPython refuses int literals of more than 4300 digits with a ValueError.
    payload = b64(b'{"exp":' + b"9" * 5000 + b"}")
    rejected(f"{seg(HEADER)}.{payload}.{SIG}", max_bytes=100000)


@pytest.mark.parametrize("depth", [5000, 100000])
def test_deep_nesting_is_rejected_not_recursion_error(depth: int) -> None:
    payload = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    exc = rejected(f"{seg(HEADER)}.{b64(payload)}.{SIG}", max_bytes=10**6)
    assert "deep" in exc.description or "JSON" in exc.description


def test_nesting_limit_is_exact() -> None:
    def nested(depth: int) -> bytes:  # the outer object counts as depth 1
        inner = depth - 1
        return b'{"a":' + b"[" * inner + b"]" * inner + b"}"

    assert parse_compact(f"{seg(HEADER)}.{b64(nested(MAX_JSON_DEPTH))}.{SIG}", MAX)
    exc = rejected(f"{seg(HEADER)}.{b64(nested(MAX_JSON_DEPTH + 1))}.{SIG}")
    assert "nests too deeply" in exc.description
    # Many sibling brackets are not depth.
    wide = json.dumps({"a": [[1]] * 200}).encode()
    assert parse_compact(f"{seg(HEADER)}.{b64(wide)}.{SIG}", MAX)


@pytest.mark.parametrize("header", [{}, {"alg": 256}, {"alg": None}, {"alg": ""}, {"alg": ["RS256"]}])
def test_alg_must_be_a_string(header: dict) -> None:  # type: ignore[type-arg]
    rejected(token(header=header), "bad_header")


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"]},
        {"crit": []},
        {"b64": False},
        {"b64": True},
        {"cty": "JWT"},
        {"cty": "jwt"},
        {"cty": "application/JWT"},
        {"cty": 1},
        {"kid": 1},
        {"kid": None},
        {"typ": ["JWT"]},
    ],
)
def test_forbidden_or_malformed_header_members(extra: dict) -> None:  # type: ignore[type-arg]
    if extra == {"kid": None}:
        # An explicit null kid is treated as absent, like a missing member.
        assert parse_compact(token(header={**HEADER, **extra}), MAX)
        return
    rejected(token(header={**HEADER, **extra}), "bad_header")


def test_other_cty_is_allowed() -> None:
    assert parse_compact(token(header={**HEADER, "cty": "json"}), MAX)


def test_embedded_key_references_are_ignored() -> None:
    """Documented choice: jwk/jku/x5u/x5c are never read (the verifier tests show they never
    supply a key); parsing keeps them in the header untouched."""
    hdr = {**HEADER, "jku": "https://evil/jwks", "x5u": "https://evil/x5", "jwk": {"kty": "oct", "k": "AA"}, "x5c": ["AA"]}
    assert parse_compact(token(header=hdr), MAX).header == hdr


def test_jws_layer_accepts_any_payload_bytes() -> None:
    jws = parse_jws(f"{seg(HEADER)}.{b64(b'foo')}.{SIG}", MAX)
    assert jws.payload == b"foo"
    assert parse_jws(f"{seg(HEADER)}..{SIG}", MAX).payload == b""
    rejected(f"{seg(HEADER)}..{SIG}")  # a JWT needs a JSON object payload


def test_description_never_echoes_token_content() -> None:
    secret = "SECRET-CONTENT"
    for tok in (
        f"{seg({'alg': secret, 'crit': [secret]})}.{seg(CLAIMS)}.{SIG}",
        f"{seg(HEADER)}.{b64(secret.encode())}.{SIG}",
        secret + "." + secret,
    ):
        with pytest.raises(TokenRejected) as info:
            parse_compact(tok, MAX)
        assert secret not in info.value.description and secret not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_token_rejected(text: str) -> None:
    try:
        parse_compact(text, 256)
    except TokenRejected:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values, json_values, st.binary(max_size=20))
def test_arbitrary_json_segments_only_raise_token_rejected(header: object, payload: object, sig: bytes) -> None:
    tok = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(sig)}"
    try:
        parsed = parse_compact(tok, 4096)
    except TokenRejected:
        return
    assert isinstance(parsed.header, dict) and isinstance(parsed.payload, dict)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_b64url_round_trip_and_canonical(data: bytes) -> None:
    enc = b64(data)
    assert b64url_decode(enc) == data
    assert b64url_decode(enc + "=") is None


def test_header_memo_is_bounded_and_never_admits_a_rejected_header() -> None:
    """parse_jws remembers accepted header segments only; what it rejects is rejected every time."""
    from jwtproxy import jose

    def seg(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    payload, signature = seg({"sub": "x"}), seg({"s": 1})
    crit = f"{seg({'alg': 'RS256', 'crit': ['exp']})}.{payload}.{signature}"
    for _ in range(2):
        with pytest.raises(jose.TokenRejected):
            jose.parse_jws(crit, 8192)
    ok_header = seg({"alg": "RS256", "kid": "k"})
    assert jose.parse_jws(f"{ok_header}.{payload}.{signature}", 8192).header == {"alg": "RS256", "kid": "k"}
    # A remembered header does not excuse a bad payload or signature segment.
    with pytest.raises(jose.TokenRejected):
        jose.parse_jws(f"{ok_header}.{payload}=.{signature}", 8192)
    with pytest.raises(jose.TokenRejected):
        jose.parse_jws(f"{ok_header}.{payload}.{signature}!", 8192)
    for i in range(jose._HEADERS_MAX + 50):
        jose.parse_jws(f"{seg({'alg': 'RS256', 'kid': str(i)})}.{payload}.{signature}", 8192)
    assert len(jose._HEADERS) <= jose._HEADERS_MAX
