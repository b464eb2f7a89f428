"""The verification stage inside the running gateway: statuses, RFC 6750 headers, identity headers.

Each test sends real requests through loopback sockets, with both codecs.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from helpers import AUDIENCE, ISSUER, SigningKey, header_values, parse_responses, raw_exchange

from jwtproxy.keys import keyset_from_jwks

ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/maybe", "upstream": "backend", "auth": "optional"},
    {"path_prefix": "/write", "upstream": "backend", "require_scopes": ["write", "read"]},
    {"path_prefix": "/admin", "upstream": "backend", "require_claims": {"role": ["admin"]}},
    {"path_prefix": "/notoken", "upstream": "backend", "forward_token": False},
    {"path_prefix": "/strict-cors", "upstream": "backend", "cors_preflight": "auth"},
]


def get(path: str, token: str | None = None, extra: bytes = b"", scheme: bytes = b"Bearer ") -> bytes:
    auth = b"Authorization: " + scheme + token.encode() + b"\r\n" if token is not None else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: api.test\r\n" + auth + extra + b"\r\n"


async def call(gw, wire: bytes):
    raw = await raw_exchange(gw.port, wire)
    status, headers, body = parse_responses(raw)[0]
    return status, headers, body


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


async def test_valid_token_is_forwarded_with_identity_headers(gw, backend, rsa_key):
    token = rsa_key.token(sub="alice", role="admin", scope="read write")
    status, _, _ = await call(gw, get("/orders", token, b"X-User-Id: mallory\r\nx_user_role: root\r\n"))
    assert status == 200
    seen = backend.seen[-1]
    assert header_values(seen, "x-user-id") == ["alice"]
    assert header_values(seen, "x-user-role") == ["admin"]
    assert header_values(seen, "x-scope") == ["read write"]
    assert header_values(seen, "x_user_role") == []
    assert header_values(seen, "authorization") == ["Bearer " + token]


async def test_es256_token_is_accepted(gw, backend, ec_key):
    status, _, _ = await call(gw, get("/x", ec_key.token()))
    assert status == 200


async def test_missing_token_is_401_with_bare_challenge(gw, backend):
    status, headers, body = await call(gw, get("/x"))
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="jwtproxy"'
    assert json.loads(body)["error_description"] == "bearer token required"
    assert backend.seen == []


@pytest.mark.parametrize(
    ("mutate", "description"),
    [
        (lambda k: k.token()[:-4] + "AAAA", "signature verification failed"),
        (lambda k: k.token(exp=int(time.time()) - 3600), "token expired"),
        (lambda k: k.token(aud="other-api"), "audience not allowed"),
        (lambda k: k.token(iss=ISSUER + "/"), "issuer not allowed"),
        (lambda k: k.token(header={"kid": None, "alg": "none"}), "algorithm not allowed"),
        (lambda k: "not.a.token", None),
        (lambda k: k.token(role="admin\r\nx-injected: 1"), None),
    ],
    ids=["bad-signature", "expired", "audience", "issuer", "alg-none", "garbage", "crlf-claim"],
)
async def test_invalid_tokens_are_401_invalid_token(gw, backend, rsa_key, mutate, description):
    status, headers, body = await call(gw, get("/x", mutate(rsa_key)))
    assert status == 401
    assert headers["www-authenticate"].startswith('Bearer realm="jwtproxy", error="invalid_token"')
    error = json.loads(body)
    assert error["error"] == "invalid_token"
    if description is not None:
        assert error["error_description"] == description
    assert backend.seen == []


async def test_missing_scope_is_403_with_scope_in_challenge(gw, backend, rsa_key):
    status, headers, body = await call(gw, get("/write", rsa_key.token(scope="read")))
    assert status == 403
    assert headers["www-authenticate"] == (
        'Bearer realm="jwtproxy", error="insufficient_scope", error_description="insufficient scope", scope="write read"'
    )
    assert json.loads(body)["error"] == "insufficient_scope"
    status, _, _ = await call(gw, get("/write", rsa_key.token(scope="read write")))
    assert status == 200
    status, _, _ = await call(gw, get("/write", rsa_key.token(scope=None, scp=["write", "read"])))
    assert status == 200


async def test_required_claim_is_403_unless_allowed(gw, backend, rsa_key):
    assert (await call(gw, get("/admin", rsa_key.token(role="member"))))[0] == 403
    assert (await call(gw, get("/admin", rsa_key.token(role=["member", "admin"]))))[0] == 200
    assert (await call(gw, get("/admin", rsa_key.token(role=None))))[0] == 403


async def test_optional_route(gw, backend, rsa_key):
    status, _, _ = await call(gw, get("/maybe", None, b"X-User-Id: forged\r\n"))
    assert status == 200
    assert header_values(backend.seen[-1], "x-user-id") == []
    assert (await call(gw, get("/maybe", "bad.token.here")))[0] == 401
    assert (await call(gw, get("/maybe", rsa_key.token(sub="bob"))))[0] == 200
    assert header_values(backend.seen[-1], "x-user-id") == ["bob"]


async def test_open_route_strips_identity_headers(gw, backend):
    status, _, _ = await call(gw, get("/open/x", None, b"X-USER-ID: forged\r\nX_Scope: all\r\n"))
    assert status == 200
    names = {k for k, _ in backend.seen[-1]["headers"]}
    assert not names & {"x-user-id", "x_scope", "x-scope"}


async def test_cors_preflight(gw, backend):
    preflight = b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nOrigin: https://app\r\nAccess-Control-Request-Method: POST\r\n\r\n"
    assert (await call(gw, preflight))[0] == 200
    assert (await call(gw, preflight.replace(b"/x", b"/strict-cors")))[0] == 401
    plain_options = b"OPTIONS /x HTTP/1.1\r\nHost: a\r\n\r\n"
    assert (await call(gw, plain_options))[0] == 401


async def test_forward_token_false_drops_authorization(gw, backend, rsa_key):
    assert (await call(gw, get("/notoken", rsa_key.token())))[0] == 200
    assert header_values(backend.seen[-1], "authorization") == []
    assert header_values(backend.seen[-1], "x-user-id") == ["user-1"]


async def test_bearer_scheme_parsing(gw, backend, rsa_key):
    token = rsa_key.token()
    assert (await call(gw, get("/x", token, scheme=b"bearer   ")))[0] == 200
    assert (await call(gw, get("/x", token, scheme=b"BEARER ")))[0] == 200
    status, headers, _ = await call(gw, get("/x", "dXNlcjpwYXNz", scheme=b"Basic "))
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="jwtproxy"'
    assert (await call(gw, get("/x", "", scheme=b"Bearer")))[0] == 401
    assert (await call(gw, get("/x", token + " extra", scheme=b"Bearer ")))[0] == 401


async def test_two_authorization_headers_are_400(gw, backend, rsa_key):
    token = rsa_key.token()
    raw = await raw_exchange(gw.port, get("/x", token, b"Authorization: Bearer " + token.encode() + b"\r\n"), until_close=True)
    assert raw.startswith(b"HTTP/1.1 400")
    assert backend.seen == []


async def test_cache_hit_still_checks_revocation(gw, backend, rsa_key):
    token = rsa_key.token(jti="t-1")
    assert (await call(gw, get("/x", token)))[0] == 200
    assert len(gw.gateway.cache) == 1
    await gw.worker.store.revoke_jti("t-1", 4102444800)  # the worker's own store (in memory)
    status, _, body = await call(gw, get("/x", token))
    assert status == 401 and json.loads(body)["error_description"] == "token revoked"


async def test_key_set_change_evicts_cached_verdicts(gw, backend, rsa_key, tmp_path):
    token = rsa_key.token()
    assert (await call(gw, get("/x", token)))[0] == 200
    other = SigningKey.rsa("rsa-2")
    issuer = gw.config.issuers[0]
    keyset = keyset_from_jwks({"keys": [other.jwk()]}, issuer, lambda m: None)
    assert gw.gateway.verifier.set_keyset("test", keyset)
    gw.gateway.auth.evict_issuer("test")
    assert (await call(gw, get("/x", token)))[0] == 401
    assert (await call(gw, get("/x", other.token())))[0] == 200


async def test_unknown_kid_waits_for_one_refetch(gw, backend, rsa_key):
    newcomer = SigningKey.rsa("rsa-new")
    issuer = gw.config.issuers[0]
    calls = []

    def refetch(name: str) -> asyncio.Future[bool]:
        calls.append(name)
        future = asyncio.get_running_loop().create_future()
        keyset = keyset_from_jwks({"keys": [rsa_key.jwk(), newcomer.jwk()]}, issuer, lambda m: None)
        asyncio.get_running_loop().call_later(
            0.05, lambda: (gw.gateway.verifier.set_keyset(name, keyset), future.set_result(True))
        )
        return future

    gw.gateway.auth.refetch_unknown_kid = refetch
    assert (await call(gw, get("/x", newcomer.token())))[0] == 200
    assert calls == ["test"]
    forged = SigningKey.rsa("never-published")
    status, _, body = await call(gw, get("/x", forged.token()))
    assert status == 401 and json.loads(body)["error_description"] == "unknown key"


async def test_keys_never_loaded_is_503(make_gateway, backend, rsa_key):
    gw = await make_gateway(
        routes=ROUTES,
        issuers=[{"name": "late", "issuer": ISSUER, "jwks_uri": "http://127.0.0.1:9/jwks", "audiences": [AUDIENCE]}],
    )
    status, headers, body = await call(gw, get("/x", rsa_key.token()))
    assert status == 503
    assert headers["retry-after"]
    assert backend.seen == []


async def test_expect_continue_with_bad_token_is_401_before_the_body(gw, backend):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer bad\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in head.lower()
    writer.close()
    assert backend.seen == []


async def test_pipelined_requests_with_different_tokens_are_judged_separately(gw, backend, rsa_key):
    wire = get("/x", rsa_key.token(sub="a")) + get("/x", "forged.token.x") + get("/x", rsa_key.token(sub="c")) + get("/x")
    raw = await raw_exchange(gw.port, wire, responses=4)
    assert [s for s, _, _ in parse_responses(raw)] == [200, 401, 200, 401]
    assert [header_values(r, "x-user-id") for r in backend.seen] == [["a"], ["c"]]


@pytest.mark.parametrize("source", ["query:access_token", "cookie:session", "header:x-api-token"])
async def test_other_token_sources(make_gateway, backend, rsa_key, source):
    gw = await make_gateway(routes=ROUTES, token={"sources": [source]})
    token = rsa_key.token(sub="src")
    kind, name = source.split(":")
    if kind == "query":
        wire = get(f"/x?{name}={token}")
    elif kind == "cookie":
        wire = get("/x", None, f"Cookie: a=b; {name}={token}\r\n".encode())
    else:
        wire = get("/x", None, f"{name}: {token}\r\n".encode())
    assert (await call(gw, wire))[0] == 200
    assert header_values(backend.seen[-1], "x-user-id") == ["src"]
    assert (await call(gw, get("/x", token)))[0] == 401  # Authorization is not a configured source
