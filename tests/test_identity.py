"""identity.render_identity_headers: rendering rules and the control-character rejection."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtproxy.identity import render_claim, render_identity_headers
from jwtproxy.jose import TokenRejected

MAPPING = (("x-user-id", "sub"), ("x-user-role", "role"), ("x-scope", "scope"))


def test_default_mapping() -> None:
    claims = {"sub": "user-1", "role": "admin", "scope": "read write", "other": "x"}
    assert render_identity_headers(claims, MAPPING) == [
        (b"x-user-id", b"user-1"),
        (b"x-user-role", b"admin"),
        (b"x-scope", b"read write"),
    ]


def test_missing_and_null_claims_add_no_header() -> None:
    assert render_identity_headers({"sub": "u", "role": None}, MAPPING) == [(b"x-user-id", b"u")]
    assert render_identity_headers({}, MAPPING) == []


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        ("", ""),
        ("Zoë 名前", "Zoë 名前"),
        (42, "42"),
        (-1.5, "-1.5"),
        (True, "true"),
        (False, "false"),
        (["a", "b", "c"], "a b c"),
        ([], ""),
        ([1, "a"], '[1,"a"]'),
        ([["a"]], '[["a"]]'),
        ({"k": "v", "n": [1, 2]}, '{"k":"v","n":[1,2]}'),
        ({"é": "ü"}, '{"é":"ü"}'),
    ],
)
def test_rendering_rules(value: Any, text: str) -> None:
    assert render_claim(value) == text
    assert render_identity_headers({"c": value}, (("x-c", "c"),)) == [(b"x-c", text.encode("utf-8"))]


@pytest.mark.parametrize(
    "value",
    [
        "a\r\nx-admin: true",
        "a\nb",
        "a\rb",
        "nul\x00",
        "tab\there",
        "del\x7f",
        "c1\x85",
        "esc\x1b[31m",
        ["ok", "bad\n"],
        {"k": "v\r\n"},
        {"k\n": "v"},
        [1, "a\x00"],
        {"deep": [{"x": "\x01"}]},
    ],
)
def test_control_characters_fail_the_request(value: Any) -> None:
    with pytest.raises(TokenRejected) as info:
        render_identity_headers({"sub": value}, MAPPING)
    assert info.value.reason == "bad_claim_value"
    assert "\n" not in info.value.description and "x-admin" not in info.value.description


def test_lone_surrogate_fails_instead_of_raising_unicode_error() -> None:
    with pytest.raises(TokenRejected) as info:
        render_identity_headers({"sub": "\ud800"}, MAPPING)
    assert info.value.reason == "bad_claim_value"


def test_unmapped_claims_are_not_inspected() -> None:
    assert render_identity_headers({"sub": "u", "evil": "a\nb"}, MAPPING) == [(b"x-user-id", b"u")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_output_never_holds_control_bytes(value: Any) -> None:
    try:
        out = render_identity_headers({"sub": value}, MAPPING)
    except TokenRejected as exc:
        assert exc.reason == "bad_claim_value"
        return
    for _, v in out:
        text = v.decode("utf-8")
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
