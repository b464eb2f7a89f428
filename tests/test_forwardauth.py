"""The ``[authz]`` listener (forward-auth, contract §5.1): which request it is asked about, and that
it decides it exactly as a traffic listener would, without contacting the upstream.

The first part tests ``jwtproxy.forwardauth.original_request`` on its own (every header, their
precedence, the path prefix, each refusal). The rest sends real requests to an in-process gateway's
authz listener, on both codecs, in the three shapes the front proxies send (nginx ``auth_request``,
Traefik ``forwardAuth``, Envoy ``ext_authz``); tests/test_forwardauth_proxies.py puts the real nginx
and Envoy in front.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from helpers import RunningGateway, SigningKey, parse_responses, raw_exchange

from jwtproxy.codec import RequestHead
from jwtproxy.keys import keyset_from_jwks
from jwtproxy.forwardauth import OUTSIDE_PREFIX, original_request, prefix_key
from jwtproxy.routing import BadRequest

# -- which request is described (sans-I/O) ------------------------------------------------------


def head(method: bytes = b"GET", target: bytes = b"/", **headers: str) -> RequestHead:
    pairs = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return RequestHead(method, target, b"1.1", [(b"host", b"authz.local"), *pairs], True, False)


def describe(h: RequestHead, path_prefix: str = "/") -> tuple[bytes, bytes, bytes | None]:
    return original_request(h, prefix_key(path_prefix))


def test_without_describing_headers_the_request_describes_itself() -> None:
    assert describe(head(b"POST", b"/api/x?y=1")) == (b"POST", b"/api/x?y=1", None)


def test_nginx_shape_x_original_uri_and_method() -> None:
    h = head(b"GET", b"/_jwtproxy_authz", x_original_uri="/api/orders?id=7", x_original_method="DELETE")
    assert describe(h) == (b"DELETE", b"/api/orders?id=7", None)


def test_traefik_shape_x_forwarded_headers() -> None:
    h = head(
        b"GET", b"/", x_forwarded_method="PUT", x_forwarded_proto="https", x_forwarded_host="api.example.com",
        x_forwarded_uri="/api/items/3?x=1", x_forwarded_for="203.0.113.9",
    )
    assert describe(h) == (b"PUT", b"/api/items/3?x=1", b"api.example.com")


def test_envoy_shape_own_path_after_the_prefix() -> None:
    assert describe(head(b"PATCH", b"/authz/api/x?q=1"), "/authz") == (b"PATCH", b"/api/x?q=1", None)
    assert describe(head(b"GET", b"/authz"), "/authz") == (b"GET", b"/", None)
    assert describe(head(b"GET", b"/authz?q=1"), "/authz") == (b"GET", b"/?q=1", None)
    # A prefix written with a trailing slash strips the same (Envoy prepends it literally).
    assert describe(head(b"GET", b"/authz/api"), "/authz/") == (b"GET", b"/api", None)
    # Stripped before normalisation: a dot-segment cannot climb out of the prefix.
    assert describe(head(b"GET", b"/authz/../admin"), "/authz") == (b"GET", b"/../admin", None)


def test_the_prefix_is_ignored_when_a_header_names_the_uri() -> None:
    h = head(b"GET", b"/elsewhere", x_original_uri="/api")
    assert describe(h, "/authz") == (b"GET", b"/api", None)


@pytest.mark.parametrize("target", [b"/other/api", b"/authzx/api", b"/auth"])
def test_own_path_outside_the_prefix_is_404(target: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        describe(head(b"GET", target), "/authz")
    assert info.value.status == 404
    assert info.value.description == OUTSIDE_PREFIX


def test_x_original_beats_x_forwarded() -> None:
    h = head(
        x_forwarded_uri="/forwarded", x_original_uri="/original",
        x_forwarded_method="PUT", x_original_method="POST",
    )
    assert describe(h) == (b"POST", b"/original", None)


def test_each_header_is_read_on_its_own() -> None:
    # nginx may set only the URI: the method then comes from X-Forwarded-Method, else the request.
    assert describe(head(b"HEAD", x_original_uri="/a", x_forwarded_method="PUT"))[:2] == (b"PUT", b"/a")
    assert describe(head(b"HEAD", x_original_method="PUT"))[:2] == (b"PUT", b"/")


@pytest.mark.parametrize(
    "name", ["x_original_uri", "x_forwarded_uri", "x_original_method", "x_forwarded_method", "x_forwarded_host"]
)
def test_a_describing_header_present_twice_is_400(name: str) -> None:
    value = "GET" if "method" in name else ("a.example" if "host" in name else "/a")
    h = head()
    h.headers += [(name.replace("_", "-").encode(), value.encode())] * 2
    with pytest.raises(BadRequest) as info:
        describe(h)
    assert info.value.status == 400 and "more than one" in info.value.description


@pytest.mark.parametrize("name", ["x_original_uri", "x_forwarded_uri", "x_original_method", "x_forwarded_host"])
def test_an_empty_describing_header_is_400_not_the_own_path(name: str) -> None:
    with pytest.raises(BadRequest) as info:
        describe(head(b"GET", b"/public", **{name: " "}))
    assert info.value.status == 400 and "empty" in info.value.description


@pytest.mark.parametrize("method", ["G ET", "GET\x01", "(GET)", "X" * 33])
def test_a_method_that_is_not_a_token_is_400(method: str) -> None:
    with pytest.raises(BadRequest):
        describe(head(x_original_method=method))


def test_connect_is_refused_as_on_traffic() -> None:
    with pytest.raises(BadRequest):
        describe(head(x_forwarded_method="CONNECT"))
    with pytest.raises(BadRequest):
        describe(head(b"CONNECT", b"/"))


# -- the authz listener in the gateway ---------------------------------------------------------

ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/maybe", "upstream": "backend", "auth": "optional"},
    {"path_prefix": "/write", "upstream": "backend", "require_scopes": ["write"]},
    {"path_prefix": "/admin", "upstream": "backend", "require_claims": {"role": ["admin"]}},
    {"path_prefix": "/strict-cors", "upstream": "backend", "cors_preflight": "auth"},
    {"path_prefix": "/", "host": "internal.example", "upstream": "backend", "auth": "off"},
]
AUTHZ = {"authz": {"listen": ["127.0.0.1:0"]}}


@pytest.fixture
async def gw(make_gateway: Any) -> RunningGateway:
    gateway: RunningGateway = await make_gateway(routes=ROUTES, extra=AUTHZ)
    return gateway


def ask(target: str = "/_authz", token: str | None = None, **headers: str) -> bytes:
    """One request to the authz listener, as a front proxy sends it."""
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def authz(gw: RunningGateway, wire: bytes) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = parse_responses(await raw_exchange(gw.authz_port, wire))[0]
    return status, headers, body


def identity(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in ("x-user-id", "x-user-role", "x-scope")}


async def test_allowed_is_200_with_the_identity_and_no_upstream(gw: RunningGateway, backend: Any, rsa_key: SigningKey) -> None:
    token = rsa_key.token(sub="alice", role="admin", scope="read write")
    status, headers, body = await authz(gw, ask(token=token, x_original_uri="/orders/1", x_original_method="POST"))
    assert status == 200 and body == b""
    assert headers["content-length"] == "0"
    assert identity(headers) == {"x-user-id": "alice", "x-user-role": "admin", "x-scope": "read write"}
    assert headers["x-request-id"]
    assert backend.seen == []  # the upstream is never contacted


async def test_denials_are_the_traffic_listeners_answers(gw: RunningGateway, backend: Any, rsa_key: SigningKey) -> None:
    now = int(time.time())
    cases = [
        (None, 401, 'Bearer realm="jwtproxy"', "bearer token required"),
        (rsa_key.token()[:-4] + "AAAA", 401, 'error="invalid_token"', "signature verification failed"),
        (rsa_key.token(iat=now - 7200, exp=now - 3600), 401, 'error="invalid_token"', "token expired"),
    ]
    for token, status, challenge, description in cases:
        wire = ask(token=token, x_original_uri="/orders")
        got = await authz(gw, wire)
        traffic = parse_responses(await raw_exchange(gw.port, wire.replace(b"GET /_authz", b"GET /orders")))[0]
        assert got[0] == traffic[0] == status
        assert challenge in got[1]["www-authenticate"]
        assert got[1]["www-authenticate"] == traffic[1]["www-authenticate"]
        assert json.loads(got[2]) == json.loads(traffic[2])
        assert json.loads(got[2])["error_description"] == description
        assert identity(got[1]) == {}
    assert backend.seen == []


async def test_revoked_token_is_401(gw: RunningGateway, rsa_key: SigningKey) -> None:
    token = rsa_key.token(jti="t-revoked")
    assert (await authz(gw, ask(token=token, x_original_uri="/orders")))[0] == 200  # and now cached
    await gw.worker.store.revoke_jti("t-revoked", time.time() + 600)
    status, headers, body = await authz(gw, ask(token=token, x_original_uri="/orders"))
    assert status == 401 and json.loads(body)["error_description"] == "token revoked"
    assert 'error="invalid_token"' in headers["www-authenticate"]


async def test_scope_and_claims_follow_the_original_path(gw: RunningGateway, rsa_key: SigningKey) -> None:
    reader = rsa_key.token(scope="read", role="member")
    status, headers, body = await authz(gw, ask(token=reader, x_original_uri="/write/doc"))
    assert status == 403
    assert headers["www-authenticate"] == 'Bearer realm="jwtproxy", error="insufficient_scope", error_description="insufficient scope", scope="write"'
    assert json.loads(body) == {"error": "insufficient_scope", "error_description": "insufficient scope"}
    assert (await authz(gw, ask(token=reader, x_original_uri="/admin")))[0] == 403
    # The same token on a path without those requirements passes: the decision is about the
    # original path, not the authz request's own.
    assert (await authz(gw, ask(token=reader, x_original_uri="/read/doc")))[0] == 200
    writer = rsa_key.token(scope="read write")
    assert (await authz(gw, ask(token=writer, x_original_uri="/write/doc")))[0] == 200


async def test_a_public_route_stays_public(gw: RunningGateway, rsa_key: SigningKey) -> None:
    status, headers, _ = await authz(gw, ask(x_original_uri="/open/page"))
    assert status == 200 and identity(headers) == {}
    # auth = "off" ignores a token as on traffic, so a bad one does not turn the route private.
    assert (await authz(gw, ask(token="not.a.token", x_original_uri="/open/page")))[0] == 200
    # optional: anonymous passes, a valid token gives its identity, a bad one is still refused.
    assert (await authz(gw, ask(x_original_uri="/maybe")))[0] == 200
    status, headers, _ = await authz(gw, ask(token=rsa_key.token(sub="bob"), x_original_uri="/maybe"))
    assert status == 200 and headers["x-user-id"] == "bob"
    assert (await authz(gw, ask(token="not.a.token", x_original_uri="/maybe")))[0] == 401


async def test_the_own_path_is_ignored_when_a_uri_header_is_sent(gw: RunningGateway) -> None:
    # nginx asks on its own internal location: "/open/x" as the own path must not make
    # the original "/private" public.
    status, _, _ = await authz(gw, ask("/open/x", x_original_uri="/private"))
    assert status == 401
    assert (await authz(gw, ask("/open/x", x_forwarded_uri="/private")))[0] == 401


async def test_traefik_request_shape(gw: RunningGateway, rsa_key: SigningKey) -> None:
    # What forwardAuth sends (trustForwardHeader = false): GET on the configured address, the
    # client's headers, and X-Forwarded-Method/Proto/Host/Uri/For describing the request.
    token = rsa_key.token(sub="carol", scope="read write")
    wire = ask(
        "/", token, x_forwarded_method="POST", x_forwarded_proto="https", x_forwarded_host="api.example.com",
        x_forwarded_uri="/write/doc?draft=1", x_forwarded_for="198.51.100.7", accept_encoding="gzip",
    )
    status, headers, _ = await authz(gw, wire)
    assert status == 200 and headers["x-user-id"] == "carol"
    reader = rsa_key.token(scope="read")
    assert (await authz(gw, wire.replace(token.encode(), reader.encode())))[0] == 403


async def test_x_forwarded_host_picks_the_route(gw: RunningGateway) -> None:
    # internal.example has a public catch-all route; other hosts need a token.
    assert (await authz(gw, ask(x_original_uri="/x", x_forwarded_host="internal.example")))[0] == 200
    assert (await authz(gw, ask(x_original_uri="/x", x_forwarded_host="INTERNAL.example:443")))[0] == 200
    assert (await authz(gw, ask(x_original_uri="/x", x_forwarded_host="api.example")))[0] == 401
    # Without X-Forwarded-Host the request's own Host is the original one (nginx, Envoy).
    wire = ask(x_original_uri="/x").replace(b"Host: 127.0.0.1", b"Host: internal.example")
    assert (await authz(gw, wire))[0] == 200
    # An absolute-form original URI names its host itself (as on traffic, RFC 9112 §3.2.2).
    wire = ask(x_original_uri="http://internal.example/x", x_forwarded_host="api.example")
    assert (await authz(gw, wire))[0] == 200
    status, _, body = await authz(gw, ask(x_original_uri="/x", x_forwarded_host="bad host"))
    assert status == 400 and json.loads(body)["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("uri", "description"),
    [
        ("/a/%2F/b", "encoded '/' (%2F) in path"),
        ("/../etc", ".."),
        ("/a%zz", "malformed percent-encoding in path"),
        ("*", "asterisk-form"),
    ],
)
async def test_an_original_uri_that_fails_normalisation_is_400(gw: RunningGateway, uri: str, description: str) -> None:
    status, _, body = await authz(gw, ask(x_original_uri=uri))
    assert status == 400 and description in json.loads(body)["error_description"]


async def test_the_original_uri_is_normalised_before_routing(gw: RunningGateway, rsa_key: SigningKey) -> None:
    reader = rsa_key.token(scope="read")
    # /open/../write is /write, which needs the write scope: dot-segments cannot escape a route.
    assert (await authz(gw, ask(token=reader, x_original_uri="/open/../write/x")))[0] == 403
    assert (await authz(gw, ask(x_original_uri="/open/%2e%2e/write")))[0] == 401
    assert (await authz(gw, ask(x_original_uri="//open//x")))[0] == 200


async def test_describing_header_problems_are_400(gw: RunningGateway) -> None:
    wire = ask(x_original_uri="/open").replace(b"\r\n\r\n", b"\r\nX-Original-URI: /private\r\n\r\n")
    status, _, body = await authz(gw, wire)
    assert status == 400 and json.loads(body)["error_description"] == "more than one X-Original-URI header"
    assert (await authz(gw, ask(x_original_uri="/open", x_original_method="G:T")))[0] == 400
    assert (await authz(gw, ask(x_original_uri="/open", x_forwarded_method="CONNECT")))[0] == 400


async def test_the_token_sources_read_the_original_request(make_gateway: Any, rsa_key: SigningKey) -> None:
    gw = await make_gateway(
        routes=ROUTES, extra=AUTHZ,
        token={"sources": ["header:authorization", "query:access_token", "cookie:session"]},
    )
    token = rsa_key.token(sub="dave")
    status, headers, _ = await authz(gw, ask(x_original_uri=f"/orders?access_token={token}"))
    assert status == 200 and headers["x-user-id"] == "dave"
    status, headers, _ = await authz(gw, ask(x_original_uri="/orders", cookie=f"theme=dark; session={token}"))
    assert status == 200 and headers["x-user-id"] == "dave"
    # The authz request's own query is not the original one.
    assert (await authz(gw, ask(f"/_authz?access_token={token}", x_original_uri="/orders")))[0] == 401


async def test_cors_preflight_follows_the_original_method(gw: RunningGateway) -> None:
    preflight = {"origin": "https://app.example", "access_control_request_method": "POST"}
    assert (await authz(gw, ask(x_original_uri="/orders", x_original_method="OPTIONS", **preflight)))[0] == 200
    # The same headers on a GET are no preflight; a route with cors_preflight = "auth" wants a token.
    assert (await authz(gw, ask(x_original_uri="/orders", x_original_method="GET", **preflight)))[0] == 401
    assert (await authz(gw, ask(x_original_uri="/strict-cors", x_original_method="OPTIONS", **preflight)))[0] == 401


async def test_no_route_is_404(make_gateway: Any) -> None:
    gw = await make_gateway(routes=[{"path_prefix": "/api", "upstream": "backend"}], extra=AUTHZ)
    status, _, body = await authz(gw, ask(x_original_uri="/other"))
    assert status == 404 and json.loads(body)["error"] == "not_found"


async def test_envoy_shape_with_path_prefix(make_gateway: Any, rsa_key: SigningKey) -> None:
    gw = await make_gateway(routes=ROUTES, extra={"authz": {"listen": ["127.0.0.1:0"], "path_prefix": "/ext-authz"}})
    reader = rsa_key.token(scope="read")
    # Envoy: the original method and Host, its path behind the prefix; Content-Length 0.
    wire = b"POST /ext-authz/write/doc?x=1 HTTP/1.1\r\nHost: api.example\r\ncontent-length: 0\r\n" \
           b"authorization: Bearer " + reader.encode() + b"\r\n\r\n"
    assert (await authz(gw, wire))[0] == 403
    assert (await authz(gw, wire.replace(b"/write/doc", b"/read/doc")))[0] == 200
    status, _, _ = await authz(gw, wire.replace(b"/ext-authz/write", b"/elsewhere/write"))
    assert status == 404


async def test_keep_alive_and_pipelining_on_the_authz_listener(gw: RunningGateway, rsa_key: SigningKey) -> None:
    token = rsa_key.token(sub="erin", scope="read")
    wire = ask(token=token, x_original_uri="/a") + ask(x_original_uri="/a") + ask(token=token, x_original_uri="/write")
    responses = parse_responses(await raw_exchange(gw.authz_port, wire, responses=3))
    assert [r[0] for r in responses] == [200, 401, 403]
    assert responses[0][1]["x-user-id"] == "erin" and "connection" not in responses[0][1]
    # The second decision on the token came from the verified-token cache.
    assert gw.gateway.metrics._token_cache["hit"] >= 1


async def test_a_traffic_listener_never_believes_describing_headers(gw: RunningGateway, backend: Any) -> None:
    # The same headers sent to a traffic listener describe nothing: its own path is routed.
    wire = b"GET /private HTTP/1.1\r\nHost: internal.example.org\r\nX-Original-URI: /open\r\n" \
           b"X-Forwarded-Uri: /open\r\nX-Forwarded-Host: internal.example\r\n\r\n"
    status, _, _ = parse_responses(await raw_exchange(gw.port, wire))[0]
    assert status == 401 and backend.seen == []


async def test_an_upgrade_request_is_never_tunnelled(gw: RunningGateway, rsa_key: SigningKey) -> None:
    wire = ask(token=rsa_key.token(), x_original_uri="/ws").replace(
        b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ) + ask(x_original_uri="/open")
    responses = parse_responses(await raw_exchange(gw.authz_port, wire, responses=2))
    assert [r[0] for r in responses] == [200, 200]


async def test_requests_count_with_the_listener_label(gw: RunningGateway, rsa_key: SigningKey) -> None:
    await authz(gw, ask(token=rsa_key.token(), x_original_uri="/orders"))
    await authz(gw, ask(x_original_uri="/orders"))
    await authz(gw, ask(x_original_uri="/open"))
    await raw_exchange(gw.port, b"GET /open HTTP/1.1\r\nHost: a\r\n\r\n")
    counts = dict(gw.gateway.metrics._requests)
    assert counts[("/", 200, "authz")] == 1
    assert counts[("/", 401, "authz")] == 1
    assert counts[("/open", 200, "authz")] == 1
    assert counts[("/open", 200, "traffic")] == 1


async def test_an_unknown_kid_waits_for_the_refetch_then_decides(gw: RunningGateway, rsa_key: SigningKey) -> None:
    # The deferred decision (one JWKS refetch) ends in an authz answer too, never a forward.
    newcomer = SigningKey.rsa("rsa-new")
    issuer = gw.config.issuers[0]

    def refetch(name: str) -> asyncio.Future[bool]:
        future = asyncio.get_running_loop().create_future()
        keyset = keyset_from_jwks({"keys": [rsa_key.jwk(), newcomer.jwk()]}, issuer, lambda m: None)
        asyncio.get_running_loop().call_later(
            0.05, lambda: (gw.gateway.verifier.set_keyset(name, keyset), future.set_result(True))
        )
        return future

    gw.gateway.auth.refetch_unknown_kid = refetch
    status, headers, _ = await authz(gw, ask(token=newcomer.token(sub="rotated"), x_original_uri="/orders"))
    assert status == 200 and headers["x-user-id"] == "rotated"
    status, _, body = await authz(gw, ask(token=SigningKey.rsa("unpublished").token(), x_original_uri="/orders"))
    assert status == 401 and json.loads(body)["error_description"] == "unknown key"


async def test_a_request_with_a_body_is_answered(gw: RunningGateway, rsa_key: SigningKey) -> None:
    wire = ask(token=rsa_key.token(), x_original_uri="/orders").replace(
        b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, _, body = await authz(gw, wire)
    assert status == 200 and body == b""


# -- sender-constrained tokens (contract §5.2) through the authz listener -------------------------


async def test_dpop_proof_is_checked_against_the_original_request(gw: RunningGateway, ec_key: SigningKey) -> None:
    from dpop_client import DPoPClient

    client = DPoPClient("ES256")
    token = ec_key.token(cnf={"jkt": client.jkt}, sub="dora")
    public = "https://api.example/orders/9"

    def wire(proof: str, method: str = "POST") -> bytes:
        # nginx's shape: the original method and URI, and the host and scheme the client used.
        return (
            "GET /_authz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: DPoP {token}\r\nDPoP: {proof}\r\n"
            f"X-Original-Method: {method}\r\nX-Original-URI: /orders/9?page=2\r\n"
            "X-Forwarded-Host: api.example\r\nX-Forwarded-Proto: https\r\n\r\n"
        ).encode()

    proof = client.proof("POST", public, token)
    status, headers, body = await authz(gw, wire(proof))
    assert status == 200 and headers["x-user-id"] == "dora", body
    # The same proof again: single use, as on a traffic listener.
    status, headers, body = await authz(gw, wire(proof))
    assert status == 401 and json.loads(body)["error"] == "invalid_dpop_proof"
    assert headers["www-authenticate"].startswith("DPoP ")
    # htm is the original method, not the authz request's own GET.
    status, _, body = await authz(gw, wire(client.proof("GET", public, token)))
    assert status == 401 and "htm" in json.loads(body)["error_description"]
    # htu is built from X-Forwarded-Proto/Host and the original path, which the listener believes
    # without any trusted_proxies: a proof for the authz listener's own URL does not pass.
    status, _, body = await authz(gw, wire(client.proof("POST", "http://127.0.0.1/_authz", token)))
    assert status == 401 and "htu" in json.loads(body)["error_description"]
    # Presented as a plain bearer token, the bound token is refused.
    status, _, _ = await authz(gw, ask(token=token, x_original_uri="/orders/9"))
    assert status == 401


async def test_certificate_bound_token_with_the_front_proxys_certificate_header(
    make_gateway: Any, ec_key: SigningKey
) -> None:
    import ssl
    from urllib.parse import quote

    import trustme

    from jwtproxy.mtls import certificate_thumbprint

    ca = trustme.CA()
    cert, other = ca.issue_cert("client@example.com"), ca.issue_cert("other@example.com")
    pem = cert.cert_chain_pems[0].bytes().decode()
    token = ec_key.token(cnf={"x5t#S256": certificate_thumbprint(ssl.PEM_cert_to_DER_cert(pem))})
    gw = await make_gateway(routes=ROUTES, extra=AUTHZ, server={"client_cert_header": "x-client-cert"})
    status, _, body = await authz(gw, ask(token=token, x_original_uri="/orders", x_client_cert=quote(pem, safe="")))
    assert status == 200, body
    wrong = quote(other.cert_chain_pems[0].bytes().decode(), safe="")
    assert (await authz(gw, ask(token=token, x_original_uri="/orders", x_client_cert=wrong)))[0] == 401
    assert (await authz(gw, ask(token=token, x_original_uri="/orders")))[0] == 401


async def test_the_client_address_is_the_front_proxys_word(make_gateway: Any, capsys: Any) -> None:
    gw = await make_gateway(routes=ROUTES, extra=AUTHZ, server={"access_log": True})
    capsys.readouterr()
    # The rightmost X-Forwarded-For entry is what the front proxy saw; entries left of it are
    # the client's own claims (trusted_proxies, empty here, would let the walk go further).
    await authz(gw, ask(x_original_uri="/open", x_forwarded_for="198.51.100.1, 203.0.113.9"))
    line = [json.loads(x) for x in capsys.readouterr().err.splitlines() if '"listener":"authz"' in x][-1]
    assert line["client"] == "203.0.113.9"
    assert line["upstream"] is None and line["method"] == "GET" and line["path"] == "/open"
