"""Opaque access tokens from a real OpenID provider, judged by RFC 7662 introspection (issue 14).

``provider.js --introspection`` (panva/oidc-provider) issues opaque reference tokens for the
resource indicator ``OPAQUE_RESOURCE`` and enables its introspection and revocation endpoints;
``jwtproxy-rs`` is the client jwtproxy authenticates as (client_secret_basic). The provider's
``/__test/stats`` counts requests per path, which is how these tests count introspection calls.

Skips (never fails) when node, npm or node_modules are missing: see ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from jwtproxy.config import IssuerConfig
from jwtproxy.introspection import INACTIVE, IntrospectionEndpoint, IntrospectionFailed, Introspector, token_digest
from jwtproxy.verifier import Verified
from test_oidc_provider import AUDIENCE, MERCHANT, REPORTING, ProviderKey, ProviderProcess

OPAQUE_RESOURCE = "https://opaque.jwtproxy.test"  # provider.js: accessTokenFormat 'opaque'
INTROSPECTOR = ("jwtproxy-rs", "jwtproxy-rs-secret-0123456789abcdef")

pytestmark = pytest.mark.usefixtures("node_executable")


@pytest.fixture
def opaque_provider(node_executable: str, tmp_path: Path) -> Iterator[ProviderProcess]:
    proc = ProviderProcess(node_executable, tmp_path, flags=("--introspection",))
    proc.start([ProviderKey.generate("RS256", "opaque-idp")], "RS256")
    yield proc
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
    return Introspector(issuer_config(provider), endpoint, lambda verified: verified,
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
