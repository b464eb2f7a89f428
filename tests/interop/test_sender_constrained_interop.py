"""Sender-constrained tokens from a real, certified OpenID provider (contract §5.2).

panva/oidc-provider (``provider.js``) issues DPoP-bound access tokens (its ``dPoP`` feature: the
client sends a DPoP proof to the token endpoint and gets ``cnf.jkt``) and certificate-bound ones
(``mTLS.certificateBoundAccessTokens``: client ``mtls-app`` gets ``cnf["x5t#S256"]`` of the
certificate it presented; on this plain-HTTP test provider the certificate travels URL-encoded in
``X-Client-Cert``, as from a TLS-terminating proxy). The DPoP client is the tests' own (joserfc,
``tests/dpop_client.py``), certificates come from trustme. Tokens obtained this way pass the
gateway with their proof; the same token replayed without its proof, or with another key or
certificate, fails. Both codecs.

Skips (never fails) when node, npm or node_modules are missing: see ``conftest.py``.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
import trustme
from dpop_client import DPoPClient
from test_oidc_provider import (  # noqa: F401  (fixtures: provider, backend, gateways)
    RESOURCE,
    LiveGateway,
    ProviderKey,
    ProviderProcess,
    backend,
    call,
    gateway_config,
    gateways,
    live_gateway,
    provider,
)

from helpers import Backend, header_values
from jwtproxy.mtls import certificate_thumbprint

pytestmark = pytest.mark.usefixtures("node_executable")

MERCHANT = ("merchant-app", "merchant-app-secret-0123456789abcdef")
MTLS_APP = ("mtls-app", "mtls-app-secret-0123456789abcdef0123")


def token_response(provider: ProviderProcess, client: tuple[str, str], headers: dict[str, str]) -> dict[str, Any]:
    form = {"grant_type": "client_credentials", "scope": "payments:read", "resource": RESOURCE}
    basic = base64.b64encode(f"{client[0]}:{client[1]}".encode()).decode()
    request = urllib.request.Request(
        f"{provider.issuer}/token", data=urllib.parse.urlencode(form).encode(), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Basic " + basic, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"token endpoint: HTTP {exc.code} {exc.read()!r}") from None


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def escaped_pem(cert: trustme.LeafCert) -> str:
    return urllib.parse.quote(cert.cert_chain_pems[0].bytes().decode(), safe="")


def thumbprint(cert: trustme.LeafCert) -> str:
    return certificate_thumbprint(ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode()))


async def start(provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway], parser: str,
                **server: Any) -> LiveGateway:
    provider.start([ProviderKey.generate("ES256", "idp-es256")], "ES256")
    data = gateway_config(backend.port, provider.issuer, parser=parser)
    data["server"].update(server)
    return await live_gateway(gateways, data)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
async def test_dpop_bound_token_from_the_provider(parser: str, alg: str, provider: ProviderProcess,
                                                  backend: Backend, gateways: list[LiveGateway]) -> None:
    gw = await start(provider, backend, gateways, parser)
    client = DPoPClient(alg)
    issued = token_response(provider, MERCHANT, {"DPoP": client.proof("POST", f"{provider.issuer}/token")})
    assert issued["token_type"] == "DPoP"
    token = issued["access_token"]
    assert claims_of(token)["cnf"] == {"jkt": client.jkt}
    url = f"http://127.0.0.1:{gw.port}/payments/1"

    def dpop(proof: str) -> dict[str, str]:
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    reply = await call(gw.port, "/payments/1", headers=dpop(client.proof("GET", url, token)))
    assert reply.status == 200, reply.body
    assert header_values(backend.seen[-1], "x-user-id") == ["merchant-app"]
    assert header_values(backend.seen[-1], "dpop") == []

    # The same token, replayed: as Bearer, without a proof, with another key, with a used proof.
    assert (await call(gw.port, "/payments/1", token=token)).status == 401
    assert (await call(gw.port, "/payments/1", headers={"Authorization": f"DPoP {token}"})).status == 401
    thief = DPoPClient(alg)
    reply = await call(gw.port, "/payments/1", headers=dpop(thief.proof("GET", url, token)))
    assert (reply.status, reply.body["error"]) == (401, "invalid_dpop_proof")
    assert reply.body["error_description"] == "DPoP proof key does not match the token binding"
    used = client.proof("GET", url, token)
    assert (await call(gw.port, "/payments/1", headers=dpop(used))).status == 200
    reply = await call(gw.port, "/payments/1", headers=dpop(used))
    assert (reply.status, reply.body["error_description"]) == (401, "DPoP proof already used")
    assert len(backend.seen) == 2


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_certificate_bound_token_from_the_provider(parser: str, provider: ProviderProcess,
                                                         backend: Backend, gateways: list[LiveGateway]) -> None:
    gw = await start(provider, backend, gateways, parser, trusted_proxies=["127.0.0.1/32"],
                     client_cert_header="x-client-cert")
    ca = trustme.CA()
    cert = ca.issue_cert("mtls-app@example.com")
    issued = token_response(provider, MTLS_APP, {"X-Client-Cert": escaped_pem(cert)})
    token = issued["access_token"]
    assert claims_of(token)["cnf"] == {"x5t#S256": thumbprint(cert)}

    reply = await call(gw.port, "/payments/1", token=token, headers={"X-Client-Cert": escaped_pem(cert)})
    assert reply.status == 200, reply.body
    assert header_values(backend.seen[-1], "x-user-id") == ["mtls-app"]

    # Replayed without the certificate, or with another one (even from the same CA): refused.
    reply = await call(gw.port, "/payments/1", token=token)
    assert (reply.status, reply.body["error_description"]) == (401, "client certificate required by the token binding")
    other = ca.issue_cert("thief@example.com")
    reply = await call(gw.port, "/payments/1", token=token, headers={"X-Client-Cert": escaped_pem(other)})
    assert (reply.status, reply.body["error_description"]) == (
        401, "client certificate does not match the token binding"
    )
    assert len(backend.seen) == 1


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_unbound_provider_token_still_passes_as_bearer(parser: str, provider: ProviderProcess,
                                                             backend: Backend, gateways: list[LiveGateway]) -> None:
    gw = await start(provider, backend, gateways, parser)
    token = provider.token(MERCHANT, scope="payments:read")
    assert "cnf" not in claims_of(token)
    assert (await call(gw.port, "/payments/1", token=token)).status == 200
