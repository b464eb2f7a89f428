"""What every cached verdict would otherwise copy is shared: scope sets, identity header names."""

from __future__ import annotations

from jwtproxy import auth
from jwtproxy.auth import token_scopes
from jwtproxy.identity import render_identity_headers


def test_equal_scope_strings_share_one_set() -> None:
    a = token_scopes({"scope": "read write"})
    b = token_scopes({"scope": "read " + "write"})  # an equal string, not the same object
    assert a == frozenset({"read", "write"})
    assert a is b


def test_scope_sets_stay_bounded_and_scp_still_counts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(auth, "_SCOPE_SETS", {})
    monkeypatch.setattr(auth, "_SCOPE_SETS_MAX", 4)
    for i in range(10):
        assert token_scopes({"scope": f"s{i} t"}) == {f"s{i}", "t"}
        assert len(auth._SCOPE_SETS) <= 4
    assert token_scopes({"scope": "a", "scp": ["b", 1]}) == {"a", "b"}
    assert token_scopes({"scope": "a", "scp": "c d"}) == {"a", "c", "d"}
    assert token_scopes({"scope": 5}) == frozenset()


def test_identity_header_names_are_shared() -> None:
    mapping = (("x-user-id", "sub"), ("x-scope", "scope"))
    first = render_identity_headers({"sub": "u1", "scope": "a"}, mapping)
    second = render_identity_headers({"sub": "u2", "scope": "a"}, mapping)
    assert first == [(b"x-user-id", b"u1"), (b"x-scope", b"a")]
    assert all(n1 is n2 for (n1, _), (n2, _) in zip(first, second))


def test_repeated_claim_values_become_one_object_and_per_token_values_are_given_up() -> None:
    from jwtproxy.tokencache import Repeats

    repeats = Repeats(per_kind=3)
    first = {"iss": "https://idp" + "", "sub": "u0", "n": 1}
    repeats.share_strings(first)
    for i in range(1, 10):
        claims = {"iss": "".join(["https://", "idp"]), "sub": f"u{i}", "n": 1}
        repeats.share_strings(claims)
        assert claims["iss"] is first["iss"]  # equal strings, one object
        assert claims == {"iss": "https://idp", "sub": f"u{i}", "n": 1}
    assert repeats.lookup("sub", "u1") is None  # more than per_kind distinct values: given up
    assert repeats.lookup("iss", "https://idp") == "https://idp"


def test_repeats_bounds_its_kinds() -> None:
    from jwtproxy.tokencache import Repeats

    repeats = Repeats(per_kind=2, max_kinds=2)
    for kind in ("a", "b", "c"):
        repeats.remember(kind, "k", kind)
    assert repeats.lookup("a", "k") == "a" and repeats.lookup("c", "k") is None


def test_identity_pairs_of_repeated_values_are_shared_and_bad_values_never_remembered() -> None:
    import pytest

    from jwtproxy.jose import TokenRejected

    mapping = (("x-user-role", "role"),)
    a = render_identity_headers({"role": "member"}, mapping)
    b = render_identity_headers({"role": "mem" + "ber"}, mapping)
    assert a == [(b"x-user-role", b"member")] and a[0] is b[0]
    for _ in range(2):  # the second time must still be refused, not served from a memo
        with pytest.raises(TokenRejected):
            render_identity_headers({"role": "a\r\nx-evil: 1"}, mapping)
