"""Key sources of contract §5.3: ``jwks_uri`` as a list (keys merged, each source on its own, a
kid published with two different keys refused) and ``ca_file`` (a private CA for discovery and
JWKS over HTTPS, accepted only with it).

Real HTTP(S) servers on loopback (helpers.AppServer); certificates from a trustme CA that the
system store does not know. Requests through the gateway run on both codecs.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import AUDIENCE, ISSUER, AppServer, Backend, RunningGateway, SigningKey, base_config

trustme = pytest.importorskip("trustme")


class JwksServer:
    """Serves ``keys`` at /jwks (and discovery at /.well-known/openid-configuration); ``status``
    other than 200 makes /jwks fail."""

    def __init__(self, keys: list[SigningKey], ssl_context: ssl.SSLContext | None = None) -> None:
        self.keys = keys
        self.status = 200
        self.hits = 0
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        self.server = AppServer(app, ssl_context=ssl_context)

    @property
    def jwks_uri(self) -> str:
        return f"{self.server.url}/jwks"

    @property
    def discovery(self) -> str:
        return f"{self.server.url}/.well-known/openid-configuration"

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": [k.jwk() for k in self.keys]})

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": self.jwks_uri})


async def call(port: int, token: str) -> tuple[int, dict[str, Any] | None]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/x", headers={"Authorization": f"Bearer {token}"}) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None


@pytest.fixture
async def servers() -> AsyncIterator[list[JwksServer]]:
    started: list[JwksServer] = []
    yield started
    for server in started:
        await server.server.stop()


async def serve(started: list[JwksServer], keys: list[SigningKey], ssl_context: ssl.SSLContext | None = None) -> JwksServer:
    server = JwksServer(keys, ssl_context)
    await server.server.start()
    started.append(server)
    return server


@pytest.fixture
async def gateways() -> AsyncIterator[list[RunningGateway]]:
    started: list[RunningGateway] = []
    yield started
    for gw in started:
        await gw.stop()


async def gateway(started: list[RunningGateway], parser: str, backend: Backend, log: list[str] | None = None,
                  **issuer: Any) -> RunningGateway:
    entry = {"name": "idp", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_cooldown": 0, **issuer}
    gw = RunningGateway(base_config(backend.port, parser=parser, issuers=[entry]),
                        key_log=log.append if log is not None else None)
    started.append(gw)
    return await gw.start()


# ----------------------------------------------------------------------------- jwks_uri as a list


async def test_two_sources_keys_merged(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway]
) -> None:
    key_a, key_b = SigningKey.rsa("a-1"), SigningKey.ec("b-1")
    a, b = await serve(servers, [key_a]), await serve(servers, [key_b])
    gw = await gateway(gateways, parser, backend, jwks_uri=[a.jwks_uri, b.jwks_uri])
    status = gw.keys.status()["idp"]
    assert status["loaded"] and status["kids"] == ["a-1", "b-1"]
    assert [s["kids"] for s in status["sources"]] == [["a-1"], ["b-1"]]
    assert (await call(gw.port, key_a.token()))[0] == 200
    assert (await call(gw.port, key_b.token()))[0] == 200
    stranger = SigningKey.rsa("a-1")  # a kid the issuer knows, a key it does not
    assert (await call(gw.port, stranger.token()))[0] == 401


async def test_a_failing_source_keeps_its_last_good_keys_while_the_other_refreshes(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway]
) -> None:
    key_a, key_b = SigningKey.rsa("a-1"), SigningKey.rsa("b-1")
    a, b = await serve(servers, [key_a]), await serve(servers, [key_b])
    gw = await gateway(gateways, parser, backend, jwks_uri=[a.jwks_uri, b.jwks_uri])
    b.status = 503
    rotated = SigningKey.rsa("a-2")
    a.keys = [rotated]
    # A token with the new kid makes every source refetch; b fails, a rotates.
    assert (await call(gw.port, rotated.token()))[0] == 200
    status = gw.keys.status()["idp"]
    assert status["kids"] == ["a-2", "b-1"]
    assert "HTTP 503" in status["last_error"] and b.jwks_uri in status["last_error"]
    assert (await call(gw.port, key_b.token()))[0] == 200  # b's last good key still verifies
    assert (await call(gw.port, key_a.token()))[0] == 401  # a's removed key does not


async def test_a_kid_with_different_keys_in_two_sources_is_refused(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway]
) -> None:
    same, other = SigningKey.rsa("shared"), SigningKey.rsa("shared")
    unique = SigningKey.rsa("unique")
    a, b = await serve(servers, [same, unique]), await serve(servers, [other])
    log: list[str] = []
    gw = await gateway(gateways, parser, backend, log, jwks_uri=[a.jwks_uri, b.jwks_uri])
    status = gw.keys.status()["idp"]
    assert status["kids"] == ["unique"] and status["refused_kids"] == ["shared"]
    assert any("['shared']" in line and "refused" in line for line in log), log
    for key in (same, other):
        reply = await call(gw.port, key.token())
        assert reply[0] == 401 and reply[1] is not None and reply[1]["error_description"] == "unknown key"
    assert (await call(gw.port, unique.token()))[0] == 200


async def test_the_same_key_in_two_sources_is_used_once(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway]
) -> None:
    key = SigningKey.rsa("both")
    a, b = await serve(servers, [key]), await serve(servers, [key])
    gw = await gateway(gateways, parser, backend, jwks_uri=[a.jwks_uri, b.jwks_uri])
    status = gw.keys.status()["idp"]
    assert status["kids"] == ["both"] and "refused_kids" not in status
    keyset = gw.gateway.verifier._by_name["idp"].keys
    assert keyset is not None and len(keyset) == 1
    assert (await call(gw.port, key.token()))[0] == 200


async def test_one_source_down_at_start_the_issuer_is_ready_with_the_other(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway]
) -> None:
    key_a = SigningKey.rsa("a-1")
    a, b = await serve(servers, [key_a]), await serve(servers, [SigningKey.rsa("b-1")])
    b.status = 500
    gw = await gateway(gateways, parser, backend, jwks_uri=[a.jwks_uri, b.jwks_uri])
    assert gw.gateway.status()["issuers"]["idp"]["loaded"] is True
    assert (await call(gw.port, key_a.token()))[0] == 200


def test_merge_sources_is_pure() -> None:
    from jwtproxy.config import IssuerConfig
    from jwtproxy.keys import keyset_from_jwks, merge_sources

    cfg = IssuerConfig(name="i", issuer=ISSUER, audiences=(AUDIENCE,))
    k1, k2, k2b, nokid = SigningKey.rsa("k1"), SigningKey.rsa("k2"), SigningKey.rsa("k2"), SigningKey.rsa("x")
    anonymous = {**nokid.jwk()}
    anonymous.pop("kid")

    def ks(*jwks: dict[str, Any]) -> Any:
        return keyset_from_jwks({"keys": list(jwks)}, cfg, lambda m: None)

    merged, refused = merge_sources([ks(k1.jwk(), k2.jwk(), anonymous), ks(k1.jwk(), k2b.jwk(), anonymous)])
    assert refused == ["k2"]
    assert sorted(merged.by_kid) == ["k1"] and len(merged) == 2  # k1 once, the kid-less key once
    alone, none_refused = merge_sources([ks(k1.jwk())])
    assert none_refused == [] and alone.fingerprint == ks(k1.jwk()).fingerprint


# ----------------------------------------------------------------------------- ca_file


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path / "idp-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return server, str(bundle)


async def test_https_jwks_of_a_private_ca_is_accepted_only_with_ca_file(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway],
    private_ca: tuple[ssl.SSLContext, str],
) -> None:
    server_ctx, bundle = private_ca
    key = SigningKey.rsa("tls-1")
    idp = await serve(servers, [key], server_ctx)
    assert idp.jwks_uri.startswith("https://")

    without = await gateway(gateways, parser, backend, jwks_uri=idp.jwks_uri)
    status = without.keys.status()["idp"]
    assert status["loaded"] is False and "certificate verify failed" in status["last_error"]
    reply = await call(without.port, key.token())
    assert reply[0] == 503 and reply[1] is not None and reply[1]["error_description"] == "issuer keys not available"

    with_ca = await gateway(gateways, parser, backend, jwks_uri=idp.jwks_uri, ca_file=bundle)
    assert with_ca.keys.status()["idp"]["loaded"] is True
    assert (await call(with_ca.port, key.token()))[0] == 200


async def test_another_ca_file_does_not_trust_the_private_ca(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway],
    private_ca: tuple[ssl.SSLContext, str], tmp_path: Path,
) -> None:
    server_ctx, _ = private_ca
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    idp = await serve(servers, [SigningKey.rsa("tls-1")], server_ctx)
    gw = await gateway(gateways, parser, backend, jwks_uri=idp.jwks_uri, ca_file=str(other))
    status = gw.keys.status()["idp"]
    assert status["loaded"] is False and "certificate verify failed" in status["last_error"]


async def test_discovery_over_https_uses_ca_file_for_both_fetches(
    parser: str, backend: Backend, servers: list[JwksServer], gateways: list[RunningGateway],
    private_ca: tuple[ssl.SSLContext, str],
) -> None:
    server_ctx, bundle = private_ca
    key = SigningKey.ec("disc-1")
    idp = await serve(servers, [key], server_ctx)
    gw = await gateway(gateways, parser, backend, discovery=idp.discovery, ca_file=bundle)
    assert gw.keys.status()["idp"]["loaded"] is True and idp.hits == 1
    assert (await call(gw.port, key.token()))[0] == 200
    without = await gateway(gateways, parser, backend, discovery=idp.discovery)
    assert "certificate verify failed" in without.keys.status()["idp"]["last_error"]
