"""Sender-constrained tokens through the running gateway (contract §5.2), on both codecs.

DPoP: every proof check of RFC 9449 §4.3 over real sockets, with the exact status, challenge,
JSON error and metrics reason; replay, nonces, the downgrade to Bearer, the verdict cache, htu
behind a trusted proxy. mTLS (RFC 8705): certificates from trustme on our own TLS listener and
from a trusted proxy's header; the header from an untrusted address is ignored and removed.
Cross-node replay with two gateways on one Redis. (Two workers of one daemon: test_daemon_dpop.py.)
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme
from dpop_client import DPoPClient, b64url, unsigned
from helpers import AUDIENCE, ISSUER, SigningKey, header_values, parse_responses, raw_exchange
from joserfc.jwk import OctKey
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

from jwtproxy.dpop import NonceIssuer
from jwtproxy.mtls import certificate_thumbprint

HOST = "api.test"
URL = f"http://{HOST}/orders"
ALGS = 'DPoP algs="ES256 EdDSA PS256 RS256"'


@pytest.fixture(scope="module")
def client() -> DPoPClient:
    return DPoPClient("ES256")


def issuer(jwks_path: str, **settings: Any) -> list[dict[str, Any]]:
    return [{"name": "test", "issuer": ISSUER, "jwks_file": jwks_path, "audiences": [AUDIENCE], **settings}]


def request(path: str = "/orders", *, token: str | None = None, scheme: str = "DPoP", proofs: tuple[str, ...] = (),
            method: str = "GET", host: str = HOST, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token is not None:
        lines.append(f"Authorization: {scheme} {token}")
    lines += [f"DPoP: {p}" for p in proofs]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def call(port: int, wire: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = parse_responses(await raw_exchange(port, wire))[0]
    return status, headers, json.loads(body) if body else {}


def failures(gw: Any, reason: str) -> int:
    return int(gw.gateway.metrics._auth_failures.get(reason, 0))


# ---------------------------------------------------------------------------------------------
# DPoP: accepted
# ---------------------------------------------------------------------------------------------


async def test_dpop_request_reaches_the_backend_without_its_proof(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt}, sub="alice")
    status, _, body = await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),)))
    assert status == 200, body
    seen = backend.seen[-1]
    assert header_values(seen, "x-user-id") == ["alice"]
    assert header_values(seen, "dpop") == []
    assert header_values(seen, "authorization") == [f"DPoP {token}"]


@pytest.mark.parametrize("alg", ["EdDSA", "PS256", "RS256"])
async def test_other_proof_algorithms(make_gateway, backend, ec_key, alg):
    gw = await make_gateway()
    c = DPoPClient(alg)
    token = ec_key.token(cnf={"jkt": c.jkt})
    status, _, body = await call(gw.port, request(token=token, proofs=(c.proof("GET", URL, token),)))
    assert status == 200, body


async def test_query_is_ignored_by_htu(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    proof = client.proof("GET", URL + "?page=1", token)
    status, _, body = await call(gw.port, request("/orders?page=2&sort=x", token=token, proofs=(proof,)))
    assert status == 200, body
    assert backend.seen[-1]["path"] == "/orders?page=2&sort=x"


async def test_absolute_form_target(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    wire = request(f"http://{HOST}/orders", token=token, proofs=(client.proof("GET", URL, token),), host="other")
    status, _, body = await call(gw.port, wire)
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# DPoP: every proof check, over the wire
# ---------------------------------------------------------------------------------------------


def _private_jwk(c: DPoPClient) -> dict[str, Any]:
    return c.key.as_dict(private=True)


PROOF_CASES: list[tuple[str, Any, str, str]] = [
    ("wrong htm", lambda c, t: c.proof("POST", URL, t), "dpop_htm", "DPoP proof htm does not match the request method"),
    ("htu other host", lambda c, t: c.proof("GET", "http://evil.test/orders", t), "dpop_htu",
     "DPoP proof htu does not match the request URI"),
    ("htu other scheme", lambda c, t: c.proof("GET", f"https://{HOST}/orders", t), "dpop_htu",
     "DPoP proof htu does not match the request URI"),
    ("htu other path", lambda c, t: c.proof("GET", f"http://{HOST}/order", t), "dpop_htu",
     "DPoP proof htu does not match the request URI"),
    ("htu other port", lambda c, t: c.proof("GET", f"http://{HOST}:8080/orders", t), "dpop_htu",
     "DPoP proof htu does not match the request URI"),
    ("stale iat", lambda c, t: c.proof("GET", URL, t, iat=int(time.time()) - 120), "dpop_iat", "DPoP proof too old"),
    ("future iat", lambda c, t: c.proof("GET", URL, t, iat=int(time.time()) + 120), "dpop_iat",
     "DPoP proof issued in the future"),
    ("ath of another token", lambda c, t: c.proof("GET", URL, "another.access.token"), "dpop_ath",
     "DPoP proof ath does not match the access token"),
    ("private members in jwk", lambda c, t: c.proof("GET", URL, t, header={"jwk": _private_jwk(c)}), "dpop_jwk",
     "DPoP proof jwk holds private key members"),
    ("alg none", lambda c, t: unsigned({"typ": "dpop+jwt", "alg": "none", "jwk": c.public_jwk},
                                       {"jti": "n", "htm": "GET", "htu": URL, "iat": int(time.time())}),
     "dpop_alg", "DPoP proof algorithm not allowed"),
    ("wrong typ", lambda c, t: c.proof("GET", URL, t, header={"typ": "JWT"}), "dpop_typ",
     "DPoP proof typ is not dpop+jwt"),
    ("thumbprint mismatch", lambda c, t: DPoPClient("ES256").proof("GET", URL, t), "dpop_key_mismatch",
     "DPoP proof key does not match the token binding"),
    ("bad signature", lambda c, t: c.proof("GET", URL, t)[:-6] + "AAAAAA", "dpop_signature",
     "DPoP proof signature verification failed"),
    ("no jti", lambda c, t: c.proof("GET", URL, t, drop=("jti",)), "dpop_jti", "DPoP proof jti missing or not a string"),
]


@pytest.mark.parametrize(("make_proof", "reason", "description"), [c[1:] for c in PROOF_CASES],
                         ids=[c[0] for c in PROOF_CASES])
async def test_proof_check(make_gateway, backend, ec_key, client, make_proof, reason, description):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    status, headers, body = await call(gw.port, request(token=token, proofs=(make_proof(client, token),)))
    assert status == 401
    assert body == {"error": "invalid_dpop_proof", "error_description": description}
    assert headers["www-authenticate"] == f'{ALGS}, error="invalid_dpop_proof", error_description="{description}"'
    assert failures(gw, reason) == 1
    assert backend.seen == []


async def test_hs256_proof(make_gateway, backend, ec_key):
    gw = await make_gateway()
    secret = OctKey.generate_key(256)
    c = DPoPClient("HS256", key=secret)
    c.public_jwk = secret.as_dict(private=True)
    token = ec_key.token(cnf={"jkt": secret.thumbprint()})
    status, headers, body = await call(gw.port, request(token=token, proofs=(c.proof("GET", URL, token),)))
    assert status == 401
    assert body["error_description"] == "DPoP proof algorithm not allowed"
    assert failures(gw, "dpop_alg") == 1


async def test_two_dpop_headers(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    proofs = (client.proof("GET", URL, token), client.proof("GET", URL, token))
    status, headers, body = await call(gw.port, request(token=token, proofs=proofs))
    assert status == 401
    assert body == {"error": "invalid_dpop_proof", "error_description": "more than one DPoP header"}
    assert headers["www-authenticate"].startswith(f'{ALGS}, error="invalid_dpop_proof"')
    assert failures(gw, "dpop_multiple") == 1


async def test_missing_dpop_header(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    status, headers, body = await call(gw.port, request(token=token))
    assert status == 401
    assert body == {"error": "invalid_token", "error_description": "DPoP proof missing"}
    assert headers["www-authenticate"] == f'{ALGS}, error="invalid_token", error_description="DPoP proof missing"'
    assert failures(gw, "binding_dpop_missing") == 1


async def test_dpop_bound_token_sent_as_bearer(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    proof = client.proof("GET", URL, token)
    for proofs in ((), (proof,)):
        status, headers, body = await call(gw.port, request(token=token, scheme="Bearer", proofs=proofs))
        assert status == 401
        assert body["error"] == "invalid_token"
        assert headers["www-authenticate"].startswith(f'{ALGS}, error="invalid_token"')
    assert failures(gw, "binding_dpop_scheme") == 2
    assert backend.seen == []


async def test_unbound_token_with_dpop_scheme(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token()
    status, _, body = await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),)))
    assert status == 401
    assert body["error_description"] == "token sent with the DPoP scheme is not DPoP-bound"


async def test_reused_proof_is_refused(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    proof = client.proof("GET", URL, token)
    assert (await call(gw.port, request(token=token, proofs=(proof,))))[0] == 200
    status, headers, body = await call(gw.port, request(token=token, proofs=(proof,)))
    assert status == 401
    assert body == {"error": "invalid_dpop_proof", "error_description": "DPoP proof already used"}
    assert failures(gw, "dpop_replay") == 1
    assert len(backend.seen) == 1


async def test_cache_hit_still_checks_binding_and_proof(make_gateway, backend, ec_key, client):
    gw = await make_gateway()
    token = ec_key.token(cnf={"jkt": client.jkt})
    for _ in range(3):  # a miss, then hits: each with a fresh proof
        assert (await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),))))[0] == 200
    cache = gw.gateway.metrics._token_cache
    assert (cache["miss"], cache["hit"]) == (1, 2)
    assert (await call(gw.port, request(token=token, scheme="Bearer")))[0] == 401
    assert (await call(gw.port, request(token=token)))[0] == 401
    assert len(backend.seen) == 3


async def test_nonce_flow(make_gateway, backend, ec_key, jwks_path, client):
    gw = await make_gateway(issuers=issuer(jwks_path, dpop_nonce=True))
    token = ec_key.token(cnf={"jkt": client.jkt})
    status, headers, body = await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),)))
    assert status == 401
    assert body == {"error": "use_dpop_nonce", "error_description": "DPoP proof nonce required"}
    assert headers["www-authenticate"] == (
        f'{ALGS}, error="use_dpop_nonce", error_description="DPoP proof nonce required"'
    )
    nonce = headers["dpop-nonce"]
    proof = client.proof("GET", URL, token, nonce=nonce)
    assert (await call(gw.port, request(token=token, proofs=(proof,))))[0] == 200
    stale = gw.gateway.auth.proofs.nonces.current(time.time() - 180)
    status, headers, body = await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token, nonce=stale),)))
    assert status == 401
    assert body["error"] == "use_dpop_nonce"
    assert body["error_description"] == "DPoP proof nonce is stale or unknown"
    assert headers["dpop-nonce"] == nonce
    forged = NonceIssuer(b"x" * 32).current(time.time())
    assert (await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token, nonce=forged),))))[0] == 401
    assert failures(gw, "dpop_nonce") == 3


async def test_token_binding_require(make_gateway, backend, ec_key, jwks_path, client):
    gw = await make_gateway(issuers=issuer(jwks_path, token_binding="require"))
    status, headers, body = await call(gw.port, request(token=ec_key.token(), scheme="Bearer"))
    assert status == 401
    assert body == {"error": "invalid_token", "error_description": "token is not sender-constrained"}
    assert headers["www-authenticate"].startswith('Bearer realm="jwtproxy", error="invalid_token"')
    token = ec_key.token(cnf={"jkt": client.jkt})
    assert (await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),))))[0] == 200


async def test_route_token_binding_require(make_gateway, backend, ec_key):
    gw = await make_gateway(routes=[{"path_prefix": "/", "upstream": "backend"},
                                    {"path_prefix": "/strict", "upstream": "backend", "token_binding": "require"}])
    token = ec_key.token()
    assert (await call(gw.port, request("/x", token=token, scheme="Bearer")))[0] == 200
    assert (await call(gw.port, request("/strict", token=token, scheme="Bearer")))[0] == 401


# ---------------------------------------------------------------------------------------------
# htu behind a trusted front proxy
# ---------------------------------------------------------------------------------------------


async def test_htu_from_a_trusted_proxy(make_gateway, backend, ec_key, client):
    gw = await make_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    token = ec_key.token(cnf={"jkt": client.jkt})
    public = "https://api.example.com/orders"
    wire = request(token=token, proofs=(client.proof("GET", public, token),),
                   extra={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com",
                          "X-Forwarded-For": "203.0.113.7"})
    status, _, body = await call(gw.port, wire)
    assert status == 200, body
    seen = backend.seen[-1]
    assert header_values(seen, "x-forwarded-proto") == ["https"]
    assert header_values(seen, "x-forwarded-host") == ["api.example.com"]


async def test_forwarded_headers_from_an_untrusted_address_are_ignored(make_gateway, backend, ec_key, client):
    gw = await make_gateway(server={"trusted_proxies": ["10.0.0.0/8"]})
    token = ec_key.token(cnf={"jkt": client.jkt})
    public = "https://api.example.com/orders"
    wire = request(token=token, proofs=(client.proof("GET", public, token),),
                   extra={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"})
    status, _, body = await call(gw.port, wire)
    assert status == 401
    assert body["error_description"] == "DPoP proof htu does not match the request URI"


# ---------------------------------------------------------------------------------------------
# mTLS: the certificate in a trusted proxy's header
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client@example.com")


def thumbprint(cert: trustme.LeafCert) -> str:
    return certificate_thumbprint(ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode()))


def escaped(cert: trustme.LeafCert) -> str:
    return quote(cert.cert_chain_pems[0].bytes().decode(), safe="")


PROXY = {"trusted_proxies": ["127.0.0.1/32"], "client_cert_header": "X-Client-Cert"}


async def test_certificate_from_a_trusted_proxy(make_gateway, backend, ec_key, ca, client_cert):
    gw = await make_gateway(server=PROXY)
    token = ec_key.token(cnf={"x5t#S256": thumbprint(client_cert)})
    wire = request(token=token, scheme="Bearer", extra={"X-Client-Cert": escaped(client_cert)})
    status, _, body = await call(gw.port, wire)
    assert status == 200, body
    assert header_values(backend.seen[-1], "x-client-cert") == [escaped(client_cert)]  # believed, kept


async def test_other_certificate_from_a_trusted_proxy(make_gateway, backend, ec_key, ca, client_cert):
    gw = await make_gateway(server=PROXY)
    token = ec_key.token(cnf={"x5t#S256": thumbprint(client_cert)})
    other = ca.issue_cert("other@example.com")
    status, headers, body = await call(gw.port, request(token=token, scheme="Bearer",
                                                         extra={"X-Client-Cert": escaped(other)}))
    assert status == 401
    assert body == {"error": "invalid_token", "error_description": "client certificate does not match the token binding"}
    assert headers["www-authenticate"].startswith('Bearer realm="jwtproxy", error="invalid_token"')
    assert failures(gw, "binding_cert_mismatch") == 1


async def test_no_certificate_from_a_trusted_proxy(make_gateway, backend, ec_key, client_cert):
    gw = await make_gateway(server=PROXY)
    token = ec_key.token(cnf={"x5t#S256": thumbprint(client_cert)})
    status, _, body = await call(gw.port, request(token=token, scheme="Bearer"))
    assert status == 401
    assert body["error_description"] == "client certificate required by the token binding"


async def test_certificate_header_from_an_untrusted_address(make_gateway, backend, ec_key, client_cert):
    gw = await make_gateway(server={"trusted_proxies": ["10.0.0.0/8"], "client_cert_header": "x-client-cert"})
    token = ec_key.token(cnf={"x5t#S256": thumbprint(client_cert)})
    forged = {"X-Client-Cert": escaped(client_cert)}
    status, _, body = await call(gw.port, request(token=token, scheme="Bearer", extra=forged))
    assert status == 401
    assert body["error_description"] == "client certificate required by the token binding"
    # ...and with an unbound token the forged header does not reach the backend either.
    assert (await call(gw.port, request(token=ec_key.token(), scheme="Bearer", extra=forged)))[0] == 200
    assert header_values(backend.seen[-1], "x-client-cert") == []


# ---------------------------------------------------------------------------------------------
# mTLS: our own TLS listener
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("mtls")
    server = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"cert": d / "cert.pem", "key": d / "key.pem", "ca": d / "ca.pem"}
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    ca.cert_pem.write_to_path(str(paths["ca"]))
    return {k: str(v) for k, v in paths.items()}


def tls_server(tls_files: dict[str, str], mode: str = "optional") -> dict[str, Any]:
    return {"tls_cert": tls_files["cert"], "tls_key": tls_files["key"], "tls_client_ca": tls_files["ca"],
            "tls_client_cert": mode}


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def tls_call(port: int, ctx: ssl.SSLContext, wire: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(wire)
        await writer.drain()
        data = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            data += chunk
            if not chunk and not data:
                raise ConnectionError("closed without a response")  # TLS 1.3: a refused certificate
            try:
                status, headers, body = parse_responses(data)[0]
                return status, headers, json.loads(body) if body else {}
            except (ValueError, IndexError):
                if not chunk:
                    raise
    finally:
        writer.close()


async def test_tls_client_certificate_binding(make_gateway, backend, ec_key, ca, client_cert, tls_files):
    gw = await make_gateway(server=tls_server(tls_files))
    token = ec_key.token(cnf={"x5t#S256": thumbprint(client_cert)})
    wire = request(token=token, scheme="Bearer", host="localhost")
    assert (await tls_call(gw.port, client_context(ca, client_cert), wire))[0] == 200
    other = ca.issue_cert("other@example.com")
    status, _, body = await tls_call(gw.port, client_context(ca, other), wire)
    assert (status, body["error_description"]) == (401, "client certificate does not match the token binding")
    status, _, body = await tls_call(gw.port, client_context(ca, None), wire)  # optional: no certificate
    assert (status, body["error_description"]) == (401, "client certificate required by the token binding")
    assert len(backend.seen) == 1


async def test_tls_certificate_of_another_ca_fails_the_handshake(make_gateway, backend, ec_key, ca, tls_files):
    gw = await make_gateway(server=tls_server(tls_files))
    stranger = trustme.CA().issue_cert("client@example.com")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_call(gw.port, client_context(ca, stranger), request(token=ec_key.token(), scheme="Bearer",
                                                                         host="localhost"))


async def test_tls_client_certificate_required(make_gateway, backend, ec_key, ca, client_cert, tls_files):
    gw = await make_gateway(server=tls_server(tls_files, "required"))
    wire = request(token=ec_key.token(), scheme="Bearer", host="localhost")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_call(gw.port, client_context(ca, None), wire)
    assert (await tls_call(gw.port, client_context(ca, client_cert), wire))[0] == 200


async def test_dpop_on_a_tls_listener_uses_https(make_gateway, backend, ec_key, ca, client, tls_files):
    gw = await make_gateway(server=tls_server(tls_files))
    token = ec_key.token(cnf={"jkt": client.jkt})
    ctx = client_context(ca, None)
    good = request(token=token, proofs=(client.proof("GET", f"https://localhost:{gw.port}/orders", token),),
                   host=f"localhost:{gw.port}")
    assert (await tls_call(gw.port, ctx, good))[0] == 200
    http = request(token=token, proofs=(client.proof("GET", f"http://localhost:{gw.port}/orders", token),),
                   host=f"localhost:{gw.port}")
    status, _, body = await tls_call(gw.port, ctx, http)
    assert (status, body["error_description"]) == (401, "DPoP proof htu does not match the request URI")


# ---------------------------------------------------------------------------------------------
# across nodes: two gateways, one Redis
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_proof_is_single_use_across_nodes(make_gateway, backend, ec_key, client, redis_server):
    revocation = {"revocation": {"backend": "redis", "redis_url": redis_server.url}}
    node_a = await make_gateway(extra=revocation)
    node_b = await make_gateway(extra=revocation)
    assert node_a.gateway.auth.host_replay is node_b.gateway.auth.host_replay  # one process: one table
    # Separate host tables, as on two machines: only Redis can see the replay.
    from jwtproxy.dpopreplay import HostReplayGuard
    from jwtproxy.sharedtable import SharedTable
    node_b.gateway.auth.host_replay = HostReplayGuard(SharedTable(1024, values=0))
    token = ec_key.token(cnf={"jkt": client.jkt})
    proof = client.proof("GET", URL, token)
    assert (await call(node_a.port, request(token=token, proofs=(proof,))))[0] == 200
    status, _, body = await call(node_b.port, request(token=token, proofs=(proof,)))
    assert (status, body["error_description"]) == (401, "DPoP proof already used")
    assert (await call(node_b.port, request(token=token, proofs=(client.proof("GET", URL, token),))))[0] == 200


@pytest.mark.redis
async def test_redis_unreachable_fails_closed(make_gateway, backend, ec_key, client, redis_server):
    gw = await make_gateway(extra={"revocation": {"backend": "redis", "redis_url": redis_server.url}})
    token = ec_key.token(cnf={"jkt": client.jkt})
    redis_server.stop()
    status, headers, body = await call(gw.port, request(token=token, proofs=(client.proof("GET", URL, token),)))
    assert status == 503
    assert body["error_description"] == "DPoP replay check unavailable"
    assert headers["retry-after"] == "1"
    assert backend.seen == []
    # A bearer request does not depend on it.
    assert (await call(gw.port, request(token=ec_key.token(), scheme="Bearer")))[0] == 200
