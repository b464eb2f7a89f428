"""Class 5 -- identity header forgery (contract §4 "Identity headers"; CWE-290, CWE-113).

Every check looks at what the Backend recorded: header names exactly as the upstream received
them. The invariant: the only identity headers an upstream ever sees are the gateway's own,
carrying the verified claims, exactly once each.
"""

from __future__ import annotations

import json

import pytest
from advhelpers import (
    ROUTES,
    SigningKey,
    assert_rejected,
    claims,
    get,
    header_values,
    identity_headers_seen,
    signed,
    status_of,
)

SPELLINGS = {
    "x-user-id": ["X-User-Id", "x-user-id", "X-USER-ID", "x_user_id", "X_User_Id", "x.user.id", "xuserid",
                  "X-User_Id", "x--user--id", "x~user~id", "x!user!id", "x|user|id", "x'user'id", "x*user*id",
                  "x^user^id", "x`user`id", "x#user#id", "x$user$id", "x%user%id", "x&user&id", "x+user+id",
                  "-x-user-id-", "_x_user_id_", "X-UsEr-Id"],
    "x-user-role": ["X-User-Role", "x_user_role", "X.USER.ROLE", "xuserrole", "x-user_role", "X~User~Role"],
    "x-scope": ["X-Scope", "x_scope", "X.Scope", "xscope", "X-SCOPE", "x--scope"],
}
ALL_SPOOFS = [name for names in SPELLINGS.values() for name in names]


def _spoof_block(names, value: str = "forged") -> bytes:
    return b"".join(f"{n}: {value}\r\n".encode() for n in names)


def _assert_only_real_identity(record, expected: dict[str, str]) -> None:
    """The upstream saw exactly the gateway's identity headers (canonical names) and nothing else."""
    seen = identity_headers_seen(record)
    assert sorted(seen) == sorted(expected.items()), seen


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


@pytest.mark.parametrize("route", ["/x", "/maybe/x", "/open/x", "/public/x"])
@pytest.mark.parametrize("with_token", [True, False])
async def test_every_spelling_of_identity_headers_is_stripped(gw, backend, rsa_key, route, with_token):
    """All spellings at once, each twice, on required/optional/open routes, with and without a token."""
    token = rsa_key.token(sub="alice", role="member", scope="read") if with_token else None
    wire = get(route, token, _spoof_block(ALL_SPOOFS) + _spoof_block(ALL_SPOOFS, "again"))
    status = await status_of(gw, wire)
    if not with_token and route == "/x":
        assert status == 401
        assert backend.seen == []
        return
    assert status == 200
    expected = {"x-user-id": "alice", "x-user-role": "member", "x-scope": "read"} if with_token and route in (
        "/x", "/maybe/x") else {}
    _assert_only_real_identity(backend.seen[-1], expected)


@pytest.mark.parametrize("name", ALL_SPOOFS)
async def test_each_spelling_alone_on_optional_route(gw, backend, name):
    """One spoofed spelling per request on the optional route (anonymous): nothing gets through."""
    status = await status_of(gw, get("/maybe/x", None, _spoof_block([name], "admin")))
    assert status == 200
    _assert_only_real_identity(backend.seen[-1], {})


async def test_spoofed_headers_do_not_displace_or_duplicate_real_ones(gw, backend, rsa_key):
    """Spoofed values before and after the token, and the claim missing: never two x-user-id."""
    token = rsa_key.token(sub="alice", role=None, scope=None)
    wire = get("/x", token, _spoof_block(["X-User-Role", "x-scope", "X-User-Id"], "admin"))
    assert await status_of(gw, wire) == 200
    _assert_only_real_identity(backend.seen[-1], {"x-user-id": "alice"})


@pytest.mark.parametrize("connection", [
    "x-user-id", "X-User-Id", "x-user-id, x-user-role, x-scope", "authorization", "close, x-user-id",
    "x-forwarded-for", "x-request-id, x-forwarded-host, x-forwarded-proto", "host", "keep-alive, x_user_id",
    "content-length",
])
async def test_connection_header_cannot_drop_injected_headers_rfc9110_7_6_1(gw, backend, rsa_key, connection):
    """``Connection: x-user-id`` names a header hop-by-hop; the gateway adds its identity (and
    X-Forwarded-*) after that filtering, so nothing it injects can be removed this way."""
    token = rsa_key.token(sub="alice", role="admin", scope="read write")
    wire = get("/x", token, f"Connection: {connection}\r\n".encode() + _spoof_block(["X-User-Id"]))
    assert await status_of(gw, wire) == 200
    record = backend.seen[-1]
    _assert_only_real_identity(record, {"x-user-id": "alice", "x-user-role": "admin", "x-scope": "read write"})
    assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]
    assert len(header_values(record, "x-request-id")) == 1
    assert header_values(record, "host") == ["api.test"]


async def test_connection_authorization_does_not_skip_authentication(gw, backend):
    """Listing Authorization as hop-by-hop must not make the gateway skip checking the token."""
    for token in ("forged.token.value", None):
        assert await status_of(gw, get("/x", token, b"Connection: authorization\r\n")) == 401
    assert backend.seen == []


# ------------------------------------------------------------------------- hostile claim values

BAD_VALUES = {
    "crlf": "alice\r\nx-user-role: admin",
    "lf": "alice\nx-user-role: admin",
    "cr": "alice\rx",
    "nul": "alice\u0000admin",
    "del": "alice\u007f",
    "tab": "alice\tadmin",
    "bell": "\u0007",
    "esc": "\u001b[31m",
    "nel-c1": "alice\u0085admin",
    "csi-c1": "alice\u009b",
    "lone-surrogate": "\ud800",
    "array-with-crlf": ["a", "b\r\nx-user-id: admin"],
    "nested-array-with-lf": [["a\nb"]],
    "object-value-crlf": {"k": "v\r\nx: y"},
    "object-key-lf": {"k\nx": "v"},
    "deep-object-nul": {"a": {"b": ["\u0000"]}},
}


@pytest.mark.parametrize("claim", ["sub", "role", "scope"])
@pytest.mark.parametrize("name", sorted(BAD_VALUES))
async def test_control_characters_in_claims_fail_the_request(gw, backend, rsa_key, claim, name):
    value = BAD_VALUES[name]
    if claim == "sub" and not isinstance(value, str):
        pytest.skip("sub must be a string anyway (covered in class 3)")
    token = signed(rsa_key, {"alg": "RS256", "kid": rsa_key.kid},
                   json.dumps(claims(**{claim: value}), ensure_ascii=True))
    await assert_rejected(gw, backend, token)


GOOD_VALUES = {
    "non-ascii-latin": ("José", "José"),
    "non-ascii-cjk": ("用户", "用户"),
    "emoji": ("\U0001f600", "\U0001f600"),
    "line-separator": ("a\u2028b", "a\u2028b"),
    "array": (["admin", "user"], "admin user"),
    "array-numbers": ([1, 2], "[1,2]"),
    "object": ({"a": "b", "n": 1}, '{"a":"b","n":1}'),
    "bool": (True, "true"),
    "int": (42, "42"),
    "float": (1.5, "1.5"),
    "colon-value": ("a: b", "a: b"),
    "empty-array": ([], ""),
}


@pytest.mark.parametrize("name", sorted(GOOD_VALUES))
async def test_claim_values_render_exactly(gw, backend, rsa_key, name):
    """Arrays, objects, numbers, non-ASCII: rendered per the contract, byte-exact (UTF-8) at the upstream."""
    value, rendered = GOOD_VALUES[name]
    token = signed(rsa_key, {"alg": "RS256", "kid": rsa_key.kid}, json.dumps(claims(role=value)))
    assert await status_of(gw, get("/x", token)) == 200
    seen = header_values(backend.seen[-1], "x-user-role")
    assert seen == [rendered.encode("utf-8").decode("latin-1").strip()] or (rendered == "" and seen in ([], [""]))


@pytest.mark.parametrize("size", [4096, 8192, 16384])
async def test_long_claim_values(make_gateway, big_backend, rsa_key, size):
    """8 KB+ claim values: forwarded intact or refused, never a 5xx, never truncated."""
    gw = await make_gateway(routes=ROUTES, backend_port=big_backend.port,
                            token={"max_bytes": 65536}, server={"max_header_bytes": 131072})
    value = "a" * size
    status = await status_of(gw, get("/x", rsa_key.token(sub=value)))
    assert status in (200, 401), status
    if status == 200:
        assert header_values(big_backend.seen[-1], "x-user-id") == [value]


async def test_long_claim_default_limits(gw, backend, rsa_key):
    status = await status_of(gw, get("/x", rsa_key.token(sub="a" * 8192)))
    assert status in (401, 431)
    assert backend.seen == []


async def test_attacker_key_claims_never_become_headers(gw, backend):
    """A forged token never produces an identity header, not even on the optional route."""
    forged = SigningKey.rsa("rsa-1").token(sub="admin", role="admin")
    for path in ("/x", "/maybe/x", "/admin/x"):
        await assert_rejected(gw, backend, forged, path=path)


async def test_pipelined_identities_never_bleed(gw, backend, rsa_key):
    """Pipelined requests for different users, with and without tokens, with spoofed headers:
    each upstream request carries only its own verified identity."""
    users = ["u0", None, "u2", "u3", None, "u5"]
    wire = b"".join(
        get("/maybe/r%d" % i, rsa_key.token(sub=u) if u else None, _spoof_block(["X-User-Id"], f"spoof{i}"))
        for i, u in enumerate(users)
    )
    from helpers import parse_responses, raw_exchange

    raw = await raw_exchange(gw.port, wire, responses=len(users))
    assert [s for s, _, _ in parse_responses(raw)] == [200] * len(users)
    by_path = {r["path"]: r for r in backend.seen}
    for i, u in enumerate(users):
        _assert_only_real_identity(by_path[f"/maybe/r{i}"], {"x-user-id": u, "x-user-role": "member",
                                                             "x-scope": "read"} if u else {})


def test_spelling_table_is_exhaustive_for_punctuation():
    """Every RFC 9110 tchar punctuation between the words is covered by SPELLINGS."""
    tchar_punct = "!#$%&'*+-.^_`|~"
    covered = {c for n in SPELLINGS["x-user-id"] for c in n if not c.isalnum()}
    assert set(tchar_punct) <= covered
