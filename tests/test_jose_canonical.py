"""jose's JSON shortcut (orjson on a segment that is its own compact spelling) reads exactly what
the strict parser reads, and hands everything else to it."""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtproxy import jose
from jwtproxy.jose import TokenRejected, parse_compact

MAX = 8192


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


HEADER = b64(b'{"alg":"RS256"}')
SIG = b64(b"x" * 32)


def token_with_payload(payload: bytes) -> str:
    return f"{HEADER}.{b64(payload)}.{SIG}"


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 == 1.0 == True is not enough here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def strict(data: bytes) -> Any:
    """What the strict parser alone says: the value, or the rejection's description."""
    try:
        value = jose._strict_json(data, "payload")
    except TokenRejected as exc:
        return ("rejected", exc.description)
    return value


def either(data: bytes) -> Any:
    try:
        return jose._json_object(data, "payload")
    except TokenRejected as exc:
        return ("rejected", exc.description)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
spellings = st.sampled_from([
    lambda v: orjson.dumps(v),  # the issuer spelling: the shortcut's case
    lambda v: json.dumps(v).encode(),  # spaces after ':' and ','
    lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode(),
    lambda v: json.dumps(v, separators=(",", ":")).encode(),  # \\uXXXX escapes
])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6), spellings)
def test_the_shortcut_reads_what_the_strict_parser_reads(value: dict[str, Any], spell: Any) -> None:
    try:
        data = spell(value)
    except (TypeError, orjson.JSONEncodeError):  # orjson refuses integers past 64 bits
        data = json.dumps(value).encode()
    expected = strict(data)
    got = either(data)
    if isinstance(expected, dict):
        assert same(got, expected), (data, got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("payload", [
    b'{"sub":"a","sub":"b"}',
    b'{"sub":"a","x":{"k":1,"k":2}}',
    b'{"a":[{"k":1,"k":1}]}',
])
def test_duplicate_members_in_the_issuer_spelling_are_still_rejected(payload: bytes) -> None:
    assert jose._canonical_json(payload) is None  # the shortcut never answers for them
    with pytest.raises(TokenRejected) as info:
        parse_compact(token_with_payload(payload), MAX)
    assert info.value.description == "duplicate member name in token payload"


@pytest.mark.parametrize("payload, kind", [
    (b'{"exp":123456789012345678901234567890}', int),  # orjson reads it as a float
    (b'{"exp":18446744073709551615}', int),
    (b'{"exp":1.0}', float),
    (b'{"exp":-0}', int),
])
def test_numbers_keep_the_strict_parsers_type(payload: bytes, kind: type) -> None:
    claims = parse_compact(token_with_payload(payload), MAX).payload
    assert type(claims["exp"]) is kind
    assert same(claims, json.loads(payload))


@pytest.mark.parametrize("payload, expected", [
    (b'{"exp":1e400}', {"exp": float("inf")}),  # the verifier refuses it as a claim, as before
    (b'{"exp":NaN}', ("rejected", "token payload is not valid JSON")),
    (b'{"a":"\\ud800"}', {"a": "\ud800"}),  # identity rendering refuses it, as before
    (b"null", ("rejected", "token payload is not a JSON object")),
    (b"[1]", ("rejected", "token payload is not a JSON object")),
    (b'{"a":1} ', {"a": 1}),
])
def test_what_the_shortcut_refuses_gets_the_strict_parsers_verdict(payload: bytes, expected: Any) -> None:
    value = jose._canonical_json(payload)
    assert value is None or not isinstance(value, dict)
    got = either(payload)
    assert same(got, expected) if isinstance(expected, dict) else got == expected


def test_the_issuer_spelling_takes_the_shortcut() -> None:
    payload = b'{"iss":"https://idp","aud":"api","sub":"u1","scope":"read write","exp":4102444800,"iat":1.5}'
    assert same(jose._canonical_json(payload), json.loads(payload))
