"""Every provider (contract §5.3): the config keys, opaque tokens through the running gateway
(RFC 7662 introspection), audience-less tokens (Cognito, ``aud_claim``), per-route audiences,
``required_claims`` defaulting to exp and sub, and ``jwtproxy verify`` on an opaque token.

Gateway tests run on both codecs (the ``parser`` fixture). The introspection endpoint is a local
aiohttp app answering per token what each test sets, and counting its calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import AUDIENCE, ISSUER, AppServer, Backend, RunningGateway, SigningKey, base_config, header_values

from jwtproxy.config import ConfigError, parse_config

AS_ISSUER = "https://as.example.com"
OPAQUE = "2YotnFZFEjr1zCsicMWpAA"  # RFC 6749's example access token: no dots
SECRET = "introspection-secret-0123456789"


# ----------------------------------------------------------------------------- config


def config_data(**issuer: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "as", "issuer": AS_ISSUER, "audiences": ["api"]}
    entry.update(issuer)
    return {
        "upstream": {"b": {"targets": ["http://127.0.0.1:9"]}},
        "issuer": [entry],
        "route": [{"path_prefix": "/", "upstream": "b"}],
    }


INTROSPECTION = {
    "introspection_endpoint": "https://as.example.com/introspect",
    "introspection_client_id": "jwtproxy",
    "introspection_client_secret": SECRET,
}


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.toml", env or {})
    return [p.removeprefix("t.toml: ") for p in info.value.problems]


def test_introspecting_issuer_needs_no_key_source() -> None:
    issuer = parse_config(config_data(**INTROSPECTION), "t.toml", {}).issuers[0]
    assert issuer.introspection_endpoint == "https://as.example.com/introspect"
    assert (issuer.introspection_client_id, issuer.introspection_client_secret) == ("jwtproxy", SECRET)
    assert issuer.introspection_cache == 60.0 and not issuer.fetches_keys
    assert SECRET not in repr(issuer)  # a logged config never shows the secret
    # ... and may have one (its JWTs are then verified locally).
    both = parse_config(config_data(**INTROSPECTION, discovery="https://as.example.com/.well-known/x"), "t.toml", {})
    assert both.issuers[0].fetches_keys


def test_introspection_credentials_may_come_from_the_environment() -> None:
    data = config_data(**{**INTROSPECTION, "introspection_client_secret": "env:AS_SECRET"})
    assert parse_config(data, "t.toml", {"AS_SECRET": "from-env"}).issuers[0].introspection_client_secret == "from-env"
    assert problems(data) == ["issuer[0].introspection_client_secret: environment variable 'AS_SECRET' is not set"]


@pytest.mark.parametrize(("settings", "expected"), [
    ({**INTROSPECTION, "introspection_client_id": ""},
     "issuer[0].introspection_client_id: is required with introspection_endpoint (client_secret_basic credentials)"),
    ({k: v for k, v in INTROSPECTION.items() if k != "introspection_client_secret"},
     "issuer[0].introspection_client_secret: is required with introspection_endpoint (client_secret_basic credentials)"),
    ({**INTROSPECTION, "introspection_endpoint": "as.example.com/introspect"},
     "issuer[0].introspection_endpoint: expected an http:// or https:// URL"),
    ({**INTROSPECTION, "introspection_cache": 0}, "issuer[0].introspection_cache: must be greater than 0, got 0"),
    ({**INTROSPECTION, "introspection_cache": -5}, "issuer[0].introspection_cache: must be greater than 0, got -5"),
    ({"jwks_uri": "https://a/jwks", "introspection_client_id": "x"},
     "issuer[0].introspection_client_id: has no effect without introspection_endpoint"),
    ({"jwks_uri": "https://a/jwks", "introspection_cache": 30},
     "issuer[0].introspection_cache: has no effect without introspection_endpoint"),
    ({**INTROSPECTION, "jwks_uri": "https://a/jwks", "discovery": "https://a/d"},
     "issuer[0]: set only one of jwks_uri, discovery or jwks_file (got jwks_uri and discovery)"),
    ({"jwks_uri": []}, "issuer[0].jwks_uri: must not be empty"),
    ({"jwks_uri": 7}, "issuer[0].jwks_uri: expected a URL or an array of URLs, got integer"),
    ({"jwks_uri": ["https://a/jwks", "ftp://b/jwks"]}, "issuer[0].jwks_uri[1]: expected an http:// or https:// URL"),
    ({"jwks_uri": ["https://a/jwks", "https://a/jwks"]}, "issuer[0].jwks_uri[1]: duplicate value 'https://a/jwks'"),
    ({"jwks_uri": ["https://a/jwks", 3]}, "issuer[0].jwks_uri[1]: expected a string, got integer"),
    ({"jwks_uri": "https://a/jwks", "aud_claim": ""}, "issuer[0].aud_claim: must not be empty"),
    ({"jwks_uri": "https://a/jwks", "aud_claim": ["client_id"]}, "issuer[0].aud_claim: expected a string, got array"),
    ({"jwks_file": "/etc/jwks.json", "ca_file": "/nonexistent/ca.pem"},
     "issuer[0].ca_file: cannot load ca_file: No such file or directory"),
])
def test_issuer_key_problems(settings: dict[str, Any], expected: str) -> None:
    assert problems(config_data(**settings)) == [expected]


def test_ca_file_must_load_and_serve_a_fetch(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    for source in ({"jwks_uri": "https://a/jwks"}, {"discovery": "https://a/d"}, INTROSPECTION):
        assert parse_config(config_data(**source, ca_file=str(bundle)), "t.toml", {}).issuers[0].ca_file == str(bundle)
    assert problems(config_data(jwks_file="/etc/jwks.json", ca_file=str(bundle))) == [
        "issuer[0].ca_file: has no effect: nothing of this issuer is fetched (jwks_uri, discovery or introspection_endpoint)"
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    [problem] = problems(config_data(jwks_uri="https://a/jwks", ca_file=str(garbage)))
    assert problem.startswith("issuer[0].ca_file: cannot load ca_file:")


def test_jwks_uri_is_one_url_or_a_list() -> None:
    one = parse_config(config_data(jwks_uri="https://a/jwks"), "t.toml", {}).issuers[0]
    two = parse_config(config_data(jwks_uri=["https://a/jwks", "https://b/jwks"]), "t.toml", {}).issuers[0]
    assert one.jwks_uri == ("https://a/jwks",) and two.jwks_uri == ("https://a/jwks", "https://b/jwks")


def test_required_claims_default_is_exp_and_sub_and_can_be_relaxed() -> None:
    assert parse_config(config_data(jwks_uri="https://a/jwks"), "t.toml", {}).issuers[0].required_claims == ("exp", "sub")
    relaxed = parse_config(config_data(jwks_uri="https://a/jwks", required_claims=["exp"]), "t.toml", {})
    assert relaxed.issuers[0].required_claims == ("exp",)


def two_introspecting(routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "upstream": {"b": {"targets": ["http://127.0.0.1:9"]}},
        "issuer": [
            {"name": "as1", "issuer": "https://as1", "audiences": ["api"], **INTROSPECTION},
            {"name": "as2", "issuer": "https://as2", "audiences": ["api"], **INTROSPECTION},
            {"name": "jwt", "issuer": "https://jwt", "audiences": ["api"], "jwks_uri": "https://jwt/jwks"},
        ],
        "route": routes,
    }


def test_a_route_may_allow_at_most_one_introspecting_issuer() -> None:
    assert problems(two_introspecting([{"path_prefix": "/", "upstream": "b", "issuers": ["as1", "jwt", "as2"]}])) == [
        "route[0].issuers: allows 2 introspecting issuers (as1, as2); a route may allow at most one (name it in issuers)"
    ]
    # No issuers listed means every issuer: the same ambiguity.
    assert problems(two_introspecting([{"path_prefix": "/", "upstream": "b"}])) == [
        "route[0].auth: allows every issuer, so 2 introspecting issuers (as1, as2); a route may allow at most one "
        "(name it in issuers)"
    ]
    fine = parse_config(two_introspecting([
        {"path_prefix": "/a", "upstream": "b", "issuers": ["as1", "jwt"]},
        {"path_prefix": "/b", "upstream": "b", "issuers": ["as2"]},
        {"path_prefix": "/open", "upstream": "b", "auth": "off"},  # nothing is verified there
    ]), "t.toml", {})
    assert [r.issuers for r in fine.routes] == [("as1", "jwt"), ("as2",), ()]


def test_route_audiences() -> None:
    data = config_data(jwks_uri="https://a/jwks")
    data["route"] = [{"path_prefix": "/", "upstream": "b", "audiences": ["billing", "api"]}]
    assert parse_config(data, "t.toml", {}).routes[0].audiences == ("billing", "api")
    data["route"] = [{"path_prefix": "/", "upstream": "b", "audiences": "billing"}]
    assert problems(data) == ["route[0].audiences: expected an array of strings, got string"]
    data["route"] = [{"path_prefix": "/", "upstream": "b", "auth": "off", "audiences": ["billing"]}]
    assert problems(data) == ['route[0].audiences: has no effect with auth = "off"']


# ----------------------------------------------------------------------------- an RFC 7662 endpoint


def active(**members: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {
        "active": True, "sub": "alice", "client_id": "web", "scope": "read write", "role": "merchant",
        "iss": AS_ISSUER, "aud": AUDIENCE, "exp": now + 600, "iat": now - 5, "token_type": "Bearer",
    }
    body.update(members)
    return {k: v for k, v in body.items() if v is not None}


class Endpoint:
    """The authorization server's introspection endpoint: ``answers[token]`` (default inactive)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.status = 200
        self.calls: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        app = web.Application()
        app.router.add_post("/introspect", self._introspect)
        self.server = AppServer(app)

    @property
    def url(self) -> str:
        return f"{self.server.url}/introspect"

    def count(self, token: str) -> int:
        return sum(1 for call in self.calls if call["form"].get("token") == [token])

    async def _introspect(self, request: web.Request) -> web.Response:
        form = urllib.parse.parse_qs((await request.read()).decode())
        self.calls.append({"form": form, "authorization": request.headers.get("Authorization")})
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.get(form["token"][0], {"active": False})
        if isinstance(answer, bytes):
            return web.Response(status=self.status, body=answer, content_type="application/json")
        return web.json_response(answer, status=self.status)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    server = Endpoint()
    await server.server.start()
    yield server
    await server.server.stop()


ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/jwt-only", "upstream": "backend", "issuers": ["jwt"]},
    {"path_prefix": "/write", "upstream": "backend", "require_scopes": ["write"]},
    {"path_prefix": "/admin", "upstream": "backend", "require_claims": {"role": ["admin"]}},
    {"path_prefix": "/billing", "upstream": "backend", "audiences": ["billing"]},
]

Start = Callable[..., Any]


@pytest.fixture
async def start(parser: str, backend: Backend, jwks_path: str, endpoint: Endpoint) -> AsyncIterator[Start]:
    """A gateway with a JWT issuer (``jwt``, keys from a file) and an introspecting one (``as``)."""
    started: list[RunningGateway] = []

    async def factory(routes: list[dict[str, Any]] | None = None, **as_settings: Any) -> RunningGateway:
        as_issuer: dict[str, Any] = {
            "name": "as", "issuer": AS_ISSUER, "audiences": [AUDIENCE],
            "introspection_endpoint": endpoint.url, "introspection_client_id": "jwtproxy rs",
            "introspection_client_secret": SECRET,
        }
        as_issuer.update(as_settings)
        issuers = [{"name": "jwt", "issuer": ISSUER, "jwks_file": jwks_path, "audiences": [AUDIENCE]}, as_issuer]
        gw = await RunningGateway(base_config(backend.port, parser=parser, issuers=issuers,
                                              routes=routes or ROUTES)).start()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.stop()


async def call(port: int, path: str, token: str | None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers=sent) as response:
            raw = await response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(raw) if raw else None


# ----------------------------------------------------------------------------- opaque tokens


async def test_opaque_token_is_introspected_and_forwarded_with_identity_from_the_answer(
    start: Start, endpoint: Endpoint, backend: Backend
) -> None:
    endpoint.answers[OPAQUE] = active()
    gw = await start()
    status, _, _ = await call(gw.port, "/orders", OPAQUE, {"x-user-id": "mallory", "X_User_Role": "admin"})
    assert status == 200
    seen = backend.seen[-1]
    assert header_values(seen, "x-user-id") == ["alice"]
    assert header_values(seen, "x-user-role") == ["merchant"]
    assert header_values(seen, "x-scope") == ["read write"]
    assert header_values(seen, "authorization") == [f"Bearer {OPAQUE}"]
    [request] = endpoint.calls
    assert request["form"] == {"token": [OPAQUE], "token_type_hint": ["access_token"]}
    user, _, password = base64.b64decode(request["authorization"].removeprefix("Basic ")).decode().partition(":")
    assert (urllib.parse.unquote(user), urllib.parse.unquote(password)) == ("jwtproxy rs", SECRET)
    # The answer is cached: the next requests make no call.
    for _ in range(3):
        assert (await call(gw.port, "/orders", OPAQUE))[0] == 200
    assert len(endpoint.calls) == 1
    assert len(gw.gateway.cache) == 0  # never in the verified-token cache (contract §5.3)


async def test_inactive_token_is_401_and_the_answer_is_kept_ten_seconds(
    start: Start, endpoint: Endpoint, backend: Backend
) -> None:
    gw = await start()
    for _ in range(3):
        status, headers, body = await call(gw.port, "/", OPAQUE)
        assert status == 401
        assert body == {"error": "invalid_token", "error_description": "token is not active"}
        assert 'error="invalid_token"' in headers["www-authenticate"]
    assert endpoint.count(OPAQUE) == 1 and backend.seen == []


async def test_endpoint_failure_is_503_never_cached_then_recovers(
    start: Start, endpoint: Endpoint, backend: Backend
) -> None:
    endpoint.answers[OPAQUE] = active()
    endpoint.status = 500
    gw = await start()
    for attempt in (1, 2):
        status, headers, body = await call(gw.port, "/", OPAQUE)
        assert status == 503 and headers["retry-after"] == "5"
        assert body["error_description"] == "token introspection unavailable"
        assert endpoint.count(OPAQUE) == attempt  # asked again: a failure is never remembered
    endpoint.answers["garbage"] = b"<html>oops</html>"
    endpoint.status = 200
    assert (await call(gw.port, "/", "garbage"))[0] == 503
    assert (await call(gw.port, "/", OPAQUE))[0] == 200
    assert backend.seen and len(backend.seen) == 1


async def test_unreachable_endpoint_is_503(start: Start, backend: Backend) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    try:
        gw = await start(introspection_endpoint=f"http://127.0.0.1:{closed.getsockname()[1]}/introspect")
        status, headers, _ = await call(gw.port, "/", OPAQUE)
        assert status == 503 and headers["retry-after"] == "5"
    finally:
        closed.close()
    assert backend.seen == []


async def test_concurrent_requests_with_one_token_make_one_call(start: Start, endpoint: Endpoint) -> None:
    endpoint.answers[OPAQUE] = active()
    endpoint.gate = asyncio.Event()
    gw = await start()
    requests = [asyncio.ensure_future(call(gw.port, "/", OPAQUE)) for _ in range(20)]
    while len(endpoint.calls) < 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # every request has reached the gateway and waits on the call
    endpoint.gate.set()
    assert [r[0] for r in await asyncio.gather(*requests)] == [200] * 20
    assert len(endpoint.calls) == 1


async def test_route_rules_and_revocation_apply_to_introspected_tokens(start: Start, endpoint: Endpoint) -> None:
    endpoint.answers[OPAQUE] = active(scope="read", jti="tok-1")
    endpoint.answers["other"] = active(sub="bob", scope="read write", jti="tok-2")
    gw = await start()
    status, headers, _ = await call(gw.port, "/write", OPAQUE)
    assert status == 403 and 'scope="write"' in headers["www-authenticate"]
    assert (await call(gw.port, "/write", "other"))[0] == 200
    status, _, body = await call(gw.port, "/admin", OPAQUE)
    assert status == 403 and body["error_description"] == "claim requirement not met: role"
    # Revocation is checked on every request, also against a cached answer.
    await gw.worker.store.revoke_jti("tok-1", time.time() + 600)
    status, _, body = await call(gw.port, "/", OPAQUE)
    assert (status, body["error_description"]) == (401, "token revoked")
    await gw.worker.store.revoke_sub("bob", time.time() + 1)
    assert (await call(gw.port, "/", "other"))[:1] == (401,)
    assert len(endpoint.calls) == 2


@pytest.mark.parametrize(("answer", "status", "description"), [
    (active(sub=None), 401, "required claim missing: sub"),
    (active(aud="other-api"), 401, "audience not allowed"),
    (active(aud=["x", "y"]), 401, "audience not allowed"),
    (active(iss="https://evil.example.com"), 401, "issuer not allowed"),
    (active(token_type="refresh_token"), 401, "refresh tokens are not accepted"),
    (active(exp=int(time.time()) - 3600), 401, "token expired"),
    (active(exp=str(int(time.time()) + 600)), 401, "exp claim is not a number"),
    (active(exp=None), 401, "required claim missing: exp"),
    (active(role="admin\r\nx-injected: 1"), 401, "claim value not allowed in a header"),
    (active(active="true"), 503, "token introspection unavailable"),
    (["active", True], 503, "token introspection unavailable"),
])
async def test_every_claim_rule_applies_to_the_answer(
    start: Start, endpoint: Endpoint, backend: Backend, answer: Any, status: int, description: str
) -> None:
    endpoint.answers[OPAQUE] = answer
    gw = await start()
    got, _, body = await call(gw.port, "/", OPAQUE)
    assert (got, body["error_description"]) == (status, description)
    assert backend.seen == []


async def test_audience_is_optional_in_the_answer_and_route_audiences_apply(
    start: Start, endpoint: Endpoint
) -> None:
    endpoint.answers["no-aud"] = active(aud=None)
    endpoint.answers["billing"] = active(aud="billing")
    gw = await start()
    assert (await call(gw.port, "/", "no-aud"))[0] == 200
    assert (await call(gw.port, "/billing", "no-aud"))[0] == 200
    assert (await call(gw.port, "/billing", "billing"))[0] == 200
    # The same cached answer on a route that keeps the issuer's audiences: refused.
    status, _, body = await call(gw.port, "/", "billing")
    assert (status, body["error_description"]) == (401, "audience not allowed")
    assert endpoint.count("billing") == 1


async def test_opaque_token_on_a_route_without_an_introspecting_issuer_is_not_sent_anywhere(
    start: Start, endpoint: Endpoint
) -> None:
    endpoint.answers[OPAQUE] = active()
    gw = await start()
    status, _, body = await call(gw.port, "/jwt-only", OPAQUE)
    assert (status, body["error_description"]) == (401, "token is not a compact JWS (three segments)")
    assert endpoint.calls == []


async def test_jws_of_an_introspecting_issuer_with_keys_is_verified_locally(
    start: Start, endpoint: Endpoint, jwks_path: str, rsa_key: SigningKey
) -> None:
    gw = await start(jwks_file=jwks_path)
    assert (await call(gw.port, "/", rsa_key.token(iss=AS_ISSUER)))[0] == 200
    # A token that is not JWS still goes to the endpoint (inactive here); a JWS never does.
    assert (await call(gw.port, "/", OPAQUE))[0] == 401
    assert [c["form"]["token"] for c in endpoint.calls] == [[OPAQUE]]


async def test_jwe_shaped_token_is_introspected_not_rejected_as_unsupported(start: Start, endpoint: Endpoint) -> None:
    jwe = "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"
    endpoint.answers[jwe] = active()
    gw = await start()
    assert (await call(gw.port, "/", jwe))[0] == 200
    assert endpoint.count(jwe) == 1


async def test_active_answer_is_reused_no_longer_than_introspection_cache(start: Start, endpoint: Endpoint) -> None:
    endpoint.answers[OPAQUE] = active()
    gw = await start(introspection_cache=0.3)
    assert (await call(gw.port, "/", OPAQUE))[0] == 200
    assert (await call(gw.port, "/", OPAQUE))[0] == 200
    assert endpoint.count(OPAQUE) == 1
    await asyncio.sleep(0.4)
    endpoint.answers[OPAQUE] = {"active": False}  # revoked at the authorization server
    assert (await call(gw.port, "/", OPAQUE))[0] == 401
    assert endpoint.count(OPAQUE) == 2


async def test_introspecting_issuer_without_keys_is_ready(start: Start) -> None:
    gw = await start()
    assert gw.gateway.status()["issuers"]["as"]["loaded"] is True
    status = gw.keys.status()["as"]
    assert status["loaded"] is True and status["kind"] == "introspection" and status["last_error"] is None


# ----------------------------------------------------------------------------- Cognito (aud_claim)


COGNITO = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Example"
APP_CLIENT = "3n4b5urk1ft4fl3mg5e62d9ado"


def cognito_access(key: SigningKey, **claims: Any) -> str:
    """A Cognito user-pool access token as Cognito shapes it: no aud, the app client in client_id."""
    body: dict[str, Any] = {
        "iss": COGNITO, "aud": None, "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "client_id": APP_CLIENT,
        "token_use": "access", "scope": "aws.cognito.signin.user.admin", "username": "alice",
        "cognito:groups": ["merchants"], "origin_jti": "o-1", "event_id": "e-1", "jti": "j-1",
        "role": None,
    }
    body.update(claims)
    return key.token(body)


@pytest.fixture
async def cognito(parser: str, backend: Backend, jwks_path: str) -> AsyncIterator[RunningGateway]:
    issuers = [{"name": "cognito", "issuer": COGNITO, "jwks_file": jwks_path, "aud_claim": "client_id",
                "audiences": [APP_CLIENT], "algorithms": ["RS256"]}]
    routes = [{"path_prefix": "/", "upstream": "backend", "require_claims": {"token_use": ["access"]}}]
    data = base_config(backend.port, parser=parser, issuers=issuers, routes=routes)
    data["claims_to_headers"] = {"x-user-id": "sub", "x-user-name": "username", "x-groups": "cognito:groups"}
    gw = await RunningGateway(data).start()
    yield gw
    await gw.stop()


async def test_cognito_access_token_without_aud_is_accepted(
    cognito: RunningGateway, backend: Backend, rsa_key: SigningKey
) -> None:
    status, _, _ = await call(cognito.port, "/", cognito_access(rsa_key))
    assert status == 200
    seen = backend.seen[-1]
    assert header_values(seen, "x-user-id") == ["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]
    assert header_values(seen, "x-user-name") == ["alice"]
    assert header_values(seen, "x-groups") == ["merchants"]


@pytest.mark.parametrize(("claims", "status", "description"), [
    # A Cognito ID token: aud is the app client, there is no client_id, token_use is "id".
    ({"aud": APP_CLIENT, "client_id": None, "token_use": "id"}, 401, "required claim missing: client_id"),
    ({"client_id": "another-app-client"}, 401, "audience not allowed"),
    ({"client_id": 42}, 401, "client_id claim is not a string or array of strings"),
    # An ID token that also carries client_id is still not an access token: token_use decides.
    ({"token_use": "id"}, 403, "claim requirement not met: token_use"),
    ({"token_use": None}, 403, "claim requirement not met: token_use"),
    # aud is not what is checked any more: an aud naming the app client does not replace client_id.
    ({"aud": APP_CLIENT, "client_id": "another-app-client"}, 401, "audience not allowed"),
])
async def test_cognito_rejections(
    cognito: RunningGateway, backend: Backend, rsa_key: SigningKey, claims: dict[str, Any], status: int,
    description: str,
) -> None:
    got, _, body = await call(cognito.port, "/", cognito_access(rsa_key, **claims))
    assert (got, body["error_description"]) == (status, description)
    assert backend.seen == []


# ----------------------------------------------------------------------------- per-route audiences


@pytest.fixture
async def audiences_gw(make_gateway: Callable[..., Any]) -> RunningGateway:
    gw: RunningGateway = await make_gateway(routes=[
        {"path_prefix": "/", "upstream": "backend"},
        {"path_prefix": "/billing", "upstream": "backend", "audiences": ["billing", "invoices"]},
    ])
    return gw


async def test_route_audiences_replace_the_issuers(audiences_gw: RunningGateway, rsa_key: SigningKey) -> None:
    port = audiences_gw.port
    billing = rsa_key.token(aud="billing")
    api = rsa_key.token(aud=AUDIENCE)
    both = rsa_key.token(aud=["invoices", AUDIENCE])
    assert (await call(port, "/billing/1", billing))[0] == 200
    assert (await call(port, "/billing/1", both))[0] == 200 and (await call(port, "/", both))[0] == 200
    assert (await call(port, "/", api))[0] == 200
    # Cached verdicts still meet each route's audiences: a hit is not a pass.
    for token, path in ((billing, "/"), (api, "/billing/1")):
        status, _, body = await call(port, path, token)
        assert (status, body["error_description"]) == (401, "audience not allowed")
    # And uncached ones.
    for token, path in ((rsa_key.token(aud="billing", jti="fresh-1"), "/"), (rsa_key.token(jti="fresh-2"), "/billing")):
        status, _, body = await call(port, path, token)
        assert (status, body["error_description"]) == (401, "audience not allowed")


# ----------------------------------------------------------------------------- required_claims


async def test_token_without_sub_is_refused_by_default(make_gateway: Callable[..., Any], rsa_key: SigningKey) -> None:
    gw = await make_gateway()
    status, _, body = await call(gw.port, "/", rsa_key.token(sub=None))
    assert (status, body["error_description"]) == (401, "required claim missing: sub")


async def test_required_claims_can_be_relaxed(
    parser: str, backend: Backend, jwks_path: str, rsa_key: SigningKey
) -> None:
    issuers = [{"name": "test", "issuer": ISSUER, "jwks_file": jwks_path, "audiences": [AUDIENCE],
                "required_claims": ["exp"]}]
    gw = await RunningGateway(base_config(backend.port, parser=parser, issuers=issuers)).start()
    try:
        assert (await call(gw.port, "/", rsa_key.token(sub=None)))[0] == 200
        assert header_values(backend.seen[-1], "x-user-id") == []
    finally:
        await gw.stop()


# ----------------------------------------------------------------------------- jwtproxy verify


async def test_verify_command_introspects_an_opaque_token(
    endpoint: Endpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jwtproxy.cli import _verify

    endpoint.answers[OPAQUE] = active()
    data = base_config(9, issuers=[{
        "name": "as", "issuer": AS_ISSUER, "audiences": [AUDIENCE], "introspection_endpoint": endpoint.url,
        "introspection_client_id": "jwtproxy", "introspection_client_secret": SECRET,
    }])
    data["revocation"] = {"sqlite_path": str(tmp_path / "revocations.db")}
    config = parse_config(data, "t.toml", {})
    verdict = await _verify(config, OPAQUE, None, None)
    assert verdict["verdict"] == "valid" and verdict["issuer"] == "as"
    assert verdict["claims"]["sub"] == "alice" and verdict["claims"]["client_id"] == "web"
    assert verdict["headers"]["x-user-id"] == "alice"
    rejected = await _verify(config, "unknown-opaque-token", None, None)
    assert (rejected["verdict"], rejected["reason"]) == ("rejected", "token is not active")
    endpoint.status = 502
    failed = await _verify(config, "another-token", None, None)
    assert (failed["verdict"], failed["status"]) == ("rejected", 503)
    assert SECRET not in json.dumps([verdict, rejected, failed])


async def test_introspection_answer_with_cnf_binds_the_opaque_token(start: Start, endpoint: Endpoint) -> None:
    from dpop_client import DPoPClient

    client = DPoPClient("ES256")
    endpoint.answers[OPAQUE] = active(cnf={"jkt": client.jkt}, token_type="DPoP")
    gw = await start()
    # Presented as a bearer token, without the proof of possession: refused.
    status, _, body = await call(gw.port, "/orders", OPAQUE)
    assert status == 401 and body["error"] == "invalid_token"
    url = f"http://127.0.0.1:{gw.port}/orders"
    proof = client.proof("GET", url, OPAQUE)
    status, _, _ = await call(gw.port, "/orders", None, {"Authorization": f"DPoP {OPAQUE}", "DPoP": proof})
    assert status == 200
    stranger = DPoPClient("ES256").proof("GET", url, OPAQUE)  # a proof by another key
    status, _, body = await call(gw.port, "/orders", None, {"Authorization": f"DPoP {OPAQUE}", "DPoP": stranger})
    assert status == 401 and body["error"] == "invalid_dpop_proof"
    assert endpoint.count(OPAQUE) == 1


def test_audience_sets_are_shared_between_cached_verdicts() -> None:
    """Each cached verdict keeps its token's audience (the route check needs it): equal audiences
    are one set, and an issuer's accepted audiences one set for all its verdicts."""
    from jwtproxy.auth import cached_token
    from jwtproxy.config import IssuerConfig
    from jwtproxy.verifier import IssuerVerifier

    issuer = IssuerConfig(name="i", issuer=ISSUER, audiences=("api", "billing"))
    checks = IssuerVerifier(issuer, None)
    now = time.time()
    verdicts = [
        cached_token(checks.check_claims({"sub": f"u{i}", "exp": now + 60, "aud": "a" + "pi"}, now), b"k", ())
        for i in range(3)
    ]
    assert verdicts[0].audience == frozenset({"api"})
    assert all(v.audience is verdicts[0].audience for v in verdicts)
    assert all(v.issuer_audiences is verdicts[0].issuer_audiences for v in verdicts)
    listed = [checks.check_claims({"sub": "u", "exp": now + 60, "aud": ["api", "x"]}, now) for _ in range(2)]
    assert listed[0].audience == frozenset({"api", "x"}) and listed[0].audience is listed[1].audience
