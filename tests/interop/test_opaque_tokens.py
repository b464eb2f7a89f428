"""Opaque access tokens from a real OpenID provider, judged by RFC 7662 introspection (issue 14).

``provider.js --introspection`` (panva/oidc-provider) issues opaque reference tokens for the
resource indicator ``OPAQUE_RESOURCE`` and enables its introspection and revocation endpoints;
``jwtproxy-rs`` is the client jwtproxy authenticates as (client_secret_basic). The provider's
``/__test/stats`` counts requests per path, which is how these tests count introspection calls.

The first tests drive the introspection client alone; the rest run the gateway (both codecs)
configured with the provider's discovery *and* its introspection endpoint: its JWT access tokens
are verified locally, its opaque ones introspected.

Skips (never fails) when node, npm or node_modules are missing: see ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Backend, header_values
from jwtproxy.config import IssuerConfig
from jwtproxy.introspection import INACTIVE, IntrospectionEndpoint, IntrospectionFailed, Introspector, token_digest
from jwtproxy.verifier import Verified
from test_oidc_provider import (  # the provider harness, and fixtures used here by name
    AUDIENCE,
    MERCHANT,
    REPORTING,
    LiveGateway,
    ProviderKey,
    ProviderProcess,
    backend,  # noqa: F401 - a fixture
    call,
    gateway_config,
    gateways,  # noqa: F401 - a fixture
    live_gateway,
)

OPAQUE_RESOURCE = "https://opaque.jwtproxy.test"  # provider.js: accessTokenFormat 'opaque'
INTROSPECTOR = ("jwtproxy-rs", "jwtproxy-rs-secret-0123456789abcdef")

pytestmark = pytest.mark.usefixtures("node_executable")


PROVIDER_KEY = ProviderKey.generate("RS256", "opaque-idp")


@pytest.fixture
def opaque_provider(node_executable: str, tmp_path: Path) -> Iterator[ProviderProcess]:
    proc = ProviderProcess(node_executable, tmp_path, flags=("--introspection",))
    proc.start([PROVIDER_KEY], "RS256")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        os.kill(proc.proc.pid, signal.SIGCONT)  # a test that paused it and then failed
    proc.stop()


def revoke(provider: ProviderProcess, token: str, client: tuple[str, str] = MERCHANT) -> None:
    """RFC 7009 revocation at the provider, by the client the token was issued to, with the
    client authentication method it is registered with."""
    form = {"token": token}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if client == REPORTING:  # client_secret_post
        form.update(client_id=client[0], client_secret=client[1])
    else:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
    request = urllib.request.Request(
        f"{provider.issuer}/token/revocation", data=urllib.parse.urlencode(form).encode(), headers=headers,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def introspection_calls(provider: ProviderProcess) -> int:
    return provider.stats().get("/token/introspection", 0)


def issuer_config(provider: ProviderProcess) -> IssuerConfig:
    return IssuerConfig(name="oidc", issuer=provider.issuer, audiences=(AUDIENCE,), required_claims=("exp", "sub"))


def introspector(provider: ProviderProcess, secret: str = INTROSPECTOR[1]) -> Introspector[Verified]:
    endpoint = IntrospectionEndpoint(f"{provider.issuer}/token/introspection", INTROSPECTOR[0], secret, 60.0)
    return Introspector(issuer_config(provider), endpoint, lambda verified, digest: verified,
                        audiences=frozenset({AUDIENCE}), log=[].append)


def test_provider_issues_opaque_tokens_and_announces_the_endpoints(opaque_provider: ProviderProcess) -> None:
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    assert "." not in token  # a reference token, not a JWS
    metadata = opaque_provider.get_json("/.well-known/openid-configuration")
    assert metadata["introspection_endpoint"] == f"{opaque_provider.issuer}/token/introspection"
    assert metadata["revocation_endpoint"] == f"{opaque_provider.issuer}/token/revocation"
    # The JWT resource server is unchanged by --introspection.
    assert opaque_provider.token(MERCHANT).count(".") == 2


async def test_introspected_verdict_revocation_and_single_flight(opaque_provider: ProviderProcess) -> None:
    intro = introspector(opaque_provider)
    try:
        token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
        before = introspection_calls(opaque_provider)
        outcomes = await asyncio.gather(*(intro.introspect(token) for _ in range(20)))
        assert introspection_calls(opaque_provider) - before == 1  # twenty requests, one call
        verified = outcomes[0]
        assert isinstance(verified, Verified) and all(o is verified for o in outcomes)
        claims = verified.claims
        assert claims["sub"] == MERCHANT[0] and claims["client_id"] == MERCHANT[0]
        assert claims["role"] == "merchant" and claims["scope"] == "payments:read payments:write"
        assert claims["iss"] == opaque_provider.issuer and verified.audience == frozenset({AUDIENCE})
        assert intro.cached(token_digest(token), time.time()) is verified
        assert intro.cached(token_digest(token), time.time() + 61) is None  # introspection_cache = 60

        reader = opaque_provider.token(REPORTING, scope="payments:read", resource=OPAQUE_RESOURCE)
        revoke(opaque_provider, reader, REPORTING)
        assert await intro.introspect(reader) is INACTIVE
    finally:
        await intro.close()


async def test_wrong_introspection_credentials_fail_closed(opaque_provider: ProviderProcess) -> None:
    intro = introspector(opaque_provider, secret="not-the-secret")
    try:
        token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
        outcome = await intro.introspect(token)
        assert isinstance(outcome, IntrospectionFailed) and "HTTP 401" in str(outcome)
        assert intro.cached(token_digest(token), 0) is None
    finally:
        await intro.close()


def test_opaque_introspection_response_is_what_the_gateway_expects(opaque_provider: ProviderProcess) -> None:
    """The raw RFC 7662 answer, so the tests above mean what they say."""
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    basic = base64.b64encode(f"{INTROSPECTOR[0]}:{INTROSPECTOR[1]}".encode()).decode()
    request = urllib.request.Request(
        f"{opaque_provider.issuer}/token/introspection",
        data=urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode(),
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert body["active"] is True and body["token_type"] == "Bearer" and body["aud"] == AUDIENCE
    assert isinstance(body["exp"], int) and isinstance(body["iat"], int)


# ----------------------------------------------------------------------------- through the gateway


def opaque_gateway(backend_port: int, provider: ProviderProcess, parser: str, cache: float = 60.0) -> dict:
    return gateway_config(
        backend_port, provider.issuer, parser=parser, typ=("at+jwt",),
        introspection_endpoint=f"{provider.issuer}/token/introspection",
        introspection_client_id=INTROSPECTOR[0], introspection_client_secret=INTROSPECTOR[1],
        introspection_cache=cache,
    )


async def test_opaque_token_reaches_the_backend_with_identity_from_introspection(
    parser: str, opaque_provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    gw = await live_gateway(gateways, opaque_gateway(backend.port, opaque_provider, parser))
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    before = introspection_calls(opaque_provider)
    reply = await call(gw.port, "/payments/refunds/9", token, headers={"x-user-role": "admin"})
    assert reply.status == 200, reply
    seen = backend.seen[-1]
    assert header_values(seen, "x-user-id") == [MERCHANT[0]]
    assert header_values(seen, "x-user-role") == ["merchant"]  # the client's "admin" is gone
    assert header_values(seen, "x-scope") == ["payments:read payments:write"]
    # The route rules read the introspection response as they read JWT claims.
    assert (await call(gw.port, "/merchants/1", token)).status == 200
    auditor = opaque_provider.token(REPORTING, scope="payments:read", resource=OPAQUE_RESOURCE)
    assert (await call(gw.port, "/payments/1", auditor)).status == 200
    refused = await call(gw.port, "/payments/refunds/1", auditor)
    assert refused.status == 403 and 'scope="payments:write"' in refused.headers["www-authenticate"]
    assert (await call(gw.port, "/merchants/1", auditor)).status == 403
    assert introspection_calls(opaque_provider) - before == 2  # one per token, then cached
    # The same provider's JWT access tokens are verified locally, without a call.
    jwt = opaque_provider.token(MERCHANT)
    assert (await call(gw.port, "/payments/1", jwt)).status == 200
    assert introspection_calls(opaque_provider) - before == 2


async def test_token_revoked_at_the_provider_is_rejected_once_its_cache_entry_ends(
    parser: str, opaque_provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    gw = await live_gateway(gateways, opaque_gateway(backend.port, opaque_provider, parser, cache=1.5))
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    assert (await call(gw.port, "/payments/1", token)).status == 200
    accepted_at = time.monotonic()
    calls = introspection_calls(opaque_provider)
    revoke(opaque_provider, token)
    if time.monotonic() - accepted_at < 1.0:
        # Inside introspection_cache the cached answer still holds (that is what the setting buys).
        assert (await call(gw.port, "/payments/1", token)).status == 200
        assert introspection_calls(opaque_provider) == calls
    await asyncio.sleep(max(0.0, 1.6 - (time.monotonic() - accepted_at)))
    reply = await call(gw.port, "/payments/1", token)
    assert reply.status == 401 and reply.body["error_description"] == "token is not active"
    assert (await call(gw.port, "/payments/1", token)).status == 401
    assert introspection_calls(opaque_provider) == calls + 1  # the inactive answer is kept too


async def test_introspection_calls_prove_the_cache_and_the_single_flight(
    parser: str, opaque_provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    gw = await live_gateway(gateways, opaque_gateway(backend.port, opaque_provider, parser))
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    before = introspection_calls(opaque_provider)
    replies = await asyncio.gather(*(call(gw.port, "/payments/1", token) for _ in range(30)))
    assert [r.status for r in replies] == [200] * 30
    assert introspection_calls(opaque_provider) - before == 1
    for _ in range(10):
        assert (await call(gw.port, "/payments/1", token)).status == 200
    assert introspection_calls(opaque_provider) - before == 1
    other = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    assert (await call(gw.port, "/payments/1", other)).status == 200
    assert introspection_calls(opaque_provider) - before == 2


async def test_provider_down_is_503_then_recovery(
    parser: str, opaque_provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    gw = await live_gateway(gateways, opaque_gateway(backend.port, opaque_provider, parser))
    token = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)

    # 1. The provider answers nothing (process paused): 503 after the 5 s timeout, never a pass.
    assert opaque_provider.proc is not None
    os.kill(opaque_provider.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = await call(gw.port, "/payments/1", token)
        waited = time.monotonic() - started
    finally:
        os.kill(opaque_provider.proc.pid, signal.SIGCONT)
    assert reply.status == 503 and reply.headers["retry-after"] == "5", reply
    assert reply.body["error_description"] == "token introspection unavailable"
    assert waited >= 4.5  # the call's own 5 s timeout ended it, not something sooner
    # Recovery: the failure was not cached, the next request asks again and passes.
    assert (await call(gw.port, "/payments/1", token)).status == 200

    # 2. The provider is gone (connection refused): 503 at once for a token not yet cached ...
    fresh = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    port = opaque_provider.port
    opaque_provider.stop()
    reply = await call(gw.port, "/payments/1", fresh)
    assert reply.status == 503 and reply.headers["retry-after"] == "5"
    assert (await call(gw.port, "/payments/1", token)).status == 200  # ... a cached answer still holds
    # ... and once it is back, tokens are judged again (its in-memory store forgot the old ones).
    opaque_provider.start([PROVIDER_KEY], "RS256", port=port)
    reply = await call(gw.port, "/payments/1", fresh)
    assert reply.status == 401 and reply.body["error_description"] == "token is not active"
    reissued = opaque_provider.token(MERCHANT, resource=OPAQUE_RESOURCE)
    assert (await call(gw.port, "/payments/1", reissued)).status == 200
