"""Signed assertions inside the running gateway (both codecs): what reaches the backend.

The backend is the echo ``Backend``; every assertion it receives is verified with PyJWT against
the JWKS the gateway would publish, never with jwtproxy's own code.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt as pyjwt
import pytest
from helpers import Backend, header_values, parse_responses, raw_exchange

from jwtproxy.assertion import jwks_json
from jwtproxy.headerpolicy import header_key

ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/maybe", "upstream": "backend", "auth": "optional"},
    {"path_prefix": "/other", "upstream": "other"},
]
# Every way a client might spell the header so that some server folds it into the real one.
SPELLINGS = (
    "x-jwtproxy-assertion",
    "X-JWTProxy-Assertion",
    "x_jwtproxy_assertion",
    "X_JWTPROXY_ASSERTION",
    "x.jwtproxy.assertion",
    "xjwtproxyassertion",
    "x-jwtproxy_assertion",
)
FORGED = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."


def _config(backend: Backend, assertion: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "routes": ROUTES,
        "extra": {
            "upstream": {
                "backend": {"targets": [f"http://127.0.0.1:{backend.port}"]},
                "other": {"targets": [f"http://127.0.0.1:{backend.port}"]},
            },
            "assertion": {"enabled": True, **(assertion or {})},
            **extra,
        },
    }


def _get(path: str, token: str | None = None, extra: bytes = b"") -> bytes:
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token is not None else b""
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: api.test\r\n" + auth + extra + b"\r\n"


def _forged_headers() -> bytes:
    return b"".join(f"{name}: {FORGED}\r\n".encode() for name in SPELLINGS)


async def _status(gw: Any, wire: bytes) -> int:
    status: int = parse_responses(await raw_exchange(gw.port, wire))[0][0]
    return status


def _assertion_headers(record: dict[str, Any]) -> list[tuple[str, str]]:
    """Every header of ``record`` that any server could read as the assertion header."""
    key = header_key(b"x-jwtproxy-assertion")
    return [(k, v) for k, v in record["headers"] if header_key(k.encode()) == key]


def _verify(gw: Any, value: str, audience: str = "backend", **options: Any) -> dict[str, Any]:
    signer = gw.gateway.signer
    jwks = pyjwt.PyJWKSet.from_json(jwks_json([signer.key]).decode())
    kid = pyjwt.get_unverified_header(value)["kid"]
    claims: dict[str, Any] = pyjwt.decode(
        value, jwks[kid].key, algorithms=["ES256", "EdDSA"], audience=audience, issuer="jwtproxy",
        options={"require": ["iss", "aud", "iat", "exp"], **options},
    )
    return claims


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_authenticated_request_carries_a_verifiable_assertion(make_gateway, backend, rsa_key, algorithm):
    gw = await make_gateway(**_config(backend, {"algorithm": algorithm}))
    token = rsa_key.token(sub="alice", role="admin", scope="read write", jti="tok-1", email="a@example.com")
    assert await _status(gw, _get("/orders", token, _forged_headers())) == 200
    seen = _assertion_headers(backend.seen[-1])
    assert [name for name, _ in seen] == ["x-jwtproxy-assertion"]  # the forged copies are all gone
    value = seen[0][1]
    assert value != FORGED
    header = pyjwt.get_unverified_header(value)
    assert header == {"alg": algorithm, "kid": gw.gateway.signer.key.kid, "typ": "JWT"}
    claims = _verify(gw, value)
    iat = claims.pop("iat")
    assert abs(iat - time.time()) <= 2
    assert claims == {
        "iss": "jwtproxy", "aud": "backend", "exp": iat + 60,
        "sub": "alice", "scope": "read write", "role": "admin", "jti": "tok-1",
    }
    # The identity headers are still there, and the assertion says the same.
    assert header_values(backend.seen[-1], "x-user-id") == ["alice"]


async def test_aud_is_the_upstream_and_each_upstream_gets_its_own(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    token = rsa_key.token(sub="bob")
    assert await _status(gw, _get("/a", token)) == 200
    to_backend = _assertion_headers(backend.seen[-1])[0][1]
    assert await _status(gw, _get("/other/b", token)) == 200
    to_other = _assertion_headers(backend.seen[-1])[0][1]
    assert _verify(gw, to_backend)["aud"] == "backend"
    assert _verify(gw, to_other, audience="other")["aud"] == "other"
    with pytest.raises(pyjwt.InvalidAudienceError):
        _verify(gw, to_other, audience="backend")


async def test_lifetime_is_capped_by_the_token_exp(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend, {"lifetime": 300}))
    exp = int(time.time()) + 20
    assert await _status(gw, _get("/", rsa_key.token(exp=exp))) == 200
    claims = _verify(gw, _assertion_headers(backend.seen[-1])[0][1])
    assert claims["exp"] == exp
    assert await _status(gw, _get("/", rsa_key.token(sub="long", exp=int(time.time()) + 3600))) == 200
    claims = _verify(gw, _assertion_headers(backend.seen[-1])[0][1])
    assert 295 <= claims["exp"] - claims["iat"] <= 300


async def test_configured_claims_only(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend, {"claims": ["sub", "email", "groups"]}))
    token = rsa_key.token(sub="carol", email="c@example.com", role="admin", scope="read")
    assert await _status(gw, _get("/", token)) == 200
    claims = _verify(gw, _assertion_headers(backend.seen[-1])[0][1])
    assert set(claims) == {"iss", "aud", "iat", "exp", "sub", "email"}  # no role, scope; no groups


async def test_the_cached_token_path_reuses_the_assertion(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    token = rsa_key.token(sub="dave")
    for _ in range(5):
        assert await _status(gw, _get("/", token)) == 200
    values = {_assertion_headers(r)[0][1] for r in backend.seen[-5:]}
    assert len(values) == 1
    assert gw.gateway.signer.signed == 1


async def test_no_assertion_without_a_verified_token_and_the_forged_ones_are_dropped(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    for path in ("/open/x", "/maybe/x"):
        assert await _status(gw, _get(path, None, _forged_headers())) == 200
        assert _assertion_headers(backend.seen[-1]) == [], path
    # auth = "off" ignores a token: still no assertion (nothing was verified).
    assert await _status(gw, _get("/open/x", rsa_key.token(), _forged_headers())) == 200
    assert _assertion_headers(backend.seen[-1]) == []
    # An optional route with a token is authenticated: one assertion, the gateway's.
    assert await _status(gw, _get("/maybe/x", rsa_key.token(sub="erin"), _forged_headers())) == 200
    (only,) = _assertion_headers(backend.seen[-1])
    assert _verify(gw, only[1])["sub"] == "erin"


async def test_a_rejected_request_reaches_no_backend(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    before = len(backend.seen)
    assert await _status(gw, _get("/", rsa_key.token(exp=int(time.time()) - 3600), _forged_headers())) == 401
    assert await _status(gw, _get("/", None, _forged_headers())) == 401
    assert len(backend.seen) == before


async def test_connection_header_cannot_remove_the_assertion(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    extra = b"Connection: keep-alive, x-jwtproxy-assertion\r\n"
    assert await _status(gw, _get("/", rsa_key.token(sub="frank"), extra)) == 200
    (only,) = _assertion_headers(backend.seen[-1])
    assert _verify(gw, only[1])["sub"] == "frank"


async def test_client_copies_are_dropped_while_assertions_are_off(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend, {"enabled": False}))
    assert gw.gateway.signer is None
    for path, token in (("/", rsa_key.token()), ("/open/x", None), ("/maybe/x", None)):
        assert await _status(gw, _get(path, token, _forged_headers())) == 200
        assert _assertion_headers(backend.seen[-1]) == [], path


async def test_a_custom_header_name_is_set_and_stripped_in_every_spelling(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend, {"header": "X-Gateway-JWT"}))
    forged = b"x-gateway-jwt: forged\r\nX_Gateway_JWT: forged\r\nxgatewayjwt: forged\r\nX.GATEWAY.JWT: forged\r\n"
    assert await _status(gw, _get("/", rsa_key.token(sub="gina"), forged)) == 200
    record = backend.seen[-1]
    got = [(k, v) for k, v in record["headers"] if header_key(k.encode()) == b"xgatewayjwt"]
    assert [k for k, _ in got] == ["x-gateway-jwt"]
    assert _verify(gw, got[0][1])["sub"] == "gina"
    assert await _status(gw, _get("/open/x", None, forged)) == 200
    assert not [k for k, _ in backend.seen[-1]["headers"] if header_key(k.encode()) == b"xgatewayjwt"]


async def test_upstream_sees_the_assertion_on_a_post_with_a_body(make_gateway, backend, rsa_key):
    gw = await make_gateway(**_config(backend))
    body = json.dumps({"x": 1}).encode()
    wire = (
        b"POST /orders HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer " + rsa_key.token(sub="hank").encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        + _forged_headers() + b"\r\n" + body
    )
    assert await _status(gw, wire) == 200
    (only,) = _assertion_headers(backend.seen[-1])
    assert _verify(gw, only[1])["sub"] == "hank"
    assert backend.seen[-1]["body_size"] == len(body)
