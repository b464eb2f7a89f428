"""Signed assertions and upstream TLS in the real daemon (``python -m jwtproxy serve``).

* The admin JWKS (no admin token) verifies the assertions with PyJWT's ``PyJWKClient``, as a
  backend would; nothing of jwtproxy's own code verifies here.
* Several workers sign with the one key the supervisor generated, across reloads.
* Rotation: reordering ``key_files`` and SIGHUP switches the signing key; an assertion of the old
  key verifies while that key is listed, and stops verifying once it is removed.
* Upstream mTLS against a real TLS backend (trustme certificates): the right certificate passes; no
  certificate or an untrusted server certificate is a 502 counted as ``kind="tls"`` with its reason
  logged; the files are read again on SIGHUP.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from daemon_harness import ADMIN_TOKEN, Daemon, DaemonStarter, Reply, free_port, http, worker_of
from helpers import AUDIENCE, ISSUER, Backend, SigningKey
from jwtproxy.headerpolicy import header_key
from tls_backend import TLSBackend

pytestmark = pytest.mark.slow

JWKS_PATH = "/.well-known/jwks.json"
ASSERTION = "[assertion]\nenabled = true\n"
SPELLINGS = {"X-JWTProxy-Assertion": "forged", "x_jwtproxy_assertion": "forged", "X.Jwtproxy.Assertion": "forged"}


@pytest.fixture
async def start_daemon(tmp_path: Path, backend: Backend, jwks_path: str) -> AsyncIterator[Any]:
    starter = DaemonStarter(tmp_path, backend.port, jwks_path, admin_token=ADMIN_TOKEN)
    yield starter
    starter.kill_all()


def _assertions(reply: Reply) -> list[str]:
    """The assertion headers the echo backend received (every spelling a server might fold)."""
    key = header_key(b"x-jwtproxy-assertion")
    return [v for k, v in reply.json()["headers"] if header_key(k.encode()) == key]


def _verify(daemon: Daemon, assertion: str, audience: str = "backend") -> dict[str, Any]:
    """What a backend does: the daemon's JWKS over HTTP, the key by kid, the claims checked."""
    client = pyjwt.PyJWKClient(daemon.admin_url(JWKS_PATH), cache_keys=False, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(assertion)
    claims: dict[str, Any] = pyjwt.decode(
        assertion, key, algorithms=["ES256", "EdDSA"], issuer="jwtproxy", audience=audience,
        options={"require": ["iss", "aud", "iat", "exp"]})
    return claims


async def _verify_async(daemon: Daemon, assertion: str) -> dict[str, Any]:
    # PyJWKClient blocks on urllib: off the loop, so the daemon's echo backend keeps serving.
    return await asyncio.to_thread(_verify, daemon, assertion)


def _kid(assertion: str) -> str:
    return str(pyjwt.get_unverified_header(assertion)["kid"])


async def _reload(daemon: Daemon) -> None:
    done = len(daemon.events("reload_done"))
    daemon.signal(signal.SIGHUP)
    await daemon.wait_event("reload_done", count=done + 1, timeout=30)


def _key_file(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_assertion_verifies_against_the_admin_jwks(start_daemon: Any, rsa_key: SigningKey, parser: str) -> None:
    d = await start_daemon(parser=parser, extra_sections=ASSERTION)
    # The JWKS needs no admin token; everything else on the admin listener still does.
    reply = await http("GET", d.admin_url(JWKS_PATH))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/jwk-set+json"
    assert reply.headers["cache-control"] == "public, max-age=300"
    (jwk,) = reply.json()["keys"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256" and jwk["use"] == "sig"
    assert "d" not in jwk
    assert (await http("GET", d.admin_url("/metrics"))).status == 401
    assert (await http("POST", d.admin_url(JWKS_PATH))).status == 401

    token = rsa_key.token(sub="alice", role="admin", scope="read", jti="t-1", exp=int(time.time()) + 30)
    reply = await http("GET", d.url("/orders"), token=token, headers=SPELLINGS)
    assert reply.status == 200
    (assertion,) = _assertions(reply)
    assert assertion != "forged" and _kid(assertion) == jwk["kid"]
    claims = await _verify_async(d, assertion)
    assert claims["sub"] == "alice" and claims["role"] == "admin" and claims["scope"] == "read"
    assert claims["jti"] == "t-1" and claims["aud"] == "backend"
    assert claims["exp"] <= int(time.time()) + 30  # capped by the token's exp (lifetime is 60)
    # auth = "off": the client's copies are dropped and nothing is added.
    reply = await http("GET", d.url("/open/x"), headers=SPELLINGS)
    assert reply.status == 200 and _assertions(reply) == []


async def test_jwks_is_404_while_assertions_are_off(start_daemon: Any) -> None:
    d = await start_daemon()
    reply = await http("GET", d.admin_url(JWKS_PATH))
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"


async def test_every_worker_signs_with_the_generated_key_across_reloads(start_daemon: Any,
                                                                        rsa_key: SigningKey) -> None:
    d = await start_daemon(workers=2, extra_sections=ASSERTION)
    await d.wait_event("worker_serving", count=2)
    (generated,) = d.events("assertion_key_generated")
    kids_by_worker: dict[str, set[str]] = {}
    samples: list[str] = []
    for _ in range(20):
        replies = await asyncio.gather(*(http("GET", d.url("/w"), token=rsa_key.token(sub=f"u{i}"))
                                         for i in range(16)))
        for r in replies:
            assert r.status == 200
            (assertion,) = _assertions(r)
            kids_by_worker.setdefault(worker_of(r), set()).add(_kid(assertion))
            samples.append(assertion)
        if len(kids_by_worker) >= 2:
            break
    assert len(kids_by_worker) == 2, kids_by_worker
    assert set().union(*kids_by_worker.values()) == {generated["kid"]}
    for assertion in samples[:4] + samples[-4:]:
        await _verify_async(d, assertion)
    # A reload keeps the key: assertions signed before it still verify, new ones carry it.
    await _reload(d)
    reply = await http("GET", d.url("/after"), token=rsa_key.token(sub="after"))
    (after,) = _assertions(reply)
    assert _kid(after) == generated["kid"]
    await _verify_async(d, samples[0])
    assert len(d.events("assertion_key_generated")) == 1
    jwks = (await http("GET", d.admin_url(JWKS_PATH))).json()
    assert [k["kid"] for k in jwks["keys"]] == [generated["kid"]]


async def test_rotation_by_reordering_key_files(start_daemon: Any, rsa_key: SigningKey, tmp_path: Path) -> None:
    old = _key_file(tmp_path / "old.pem")
    new = _key_file(tmp_path / "new.pem")
    d = await start_daemon(extra_sections=ASSERTION + f'key_files = ["{old}", "{new}"]\n')
    jwks = (await http("GET", d.admin_url(JWKS_PATH))).json()
    old_kid, new_kid = (k["kid"] for k in jwks["keys"])
    (before,) = _assertions(await http("GET", d.url("/a"), token=rsa_key.token(sub="before")))
    assert _kid(before) == old_kid

    # Step 2 of the procedure: the new key signs, the old one stays published.
    d.rewrite(extra_sections=ASSERTION + f'key_files = ["{new}", "{old}"]\n')
    await _reload(d)
    (after,) = _assertions(await http("GET", d.url("/a"), token=rsa_key.token(sub="after")))
    assert _kid(after) == new_kid
    assert (await _verify_async(d, before))["sub"] == "before"
    assert (await _verify_async(d, after))["sub"] == "after"

    # Step 3: the old key is removed; what it signed no longer verifies.
    d.rewrite(extra_sections=ASSERTION + f'key_files = ["{new}"]\n')
    await _reload(d)
    jwks = (await http("GET", d.admin_url(JWKS_PATH))).json()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid]
    with pytest.raises(pyjwt.PyJWKClientError):
        await _verify_async(d, before)
    assert (await _verify_async(d, after))["sub"] == "after"


async def test_a_broken_key_file_fails_the_reload_and_keeps_the_key(start_daemon: Any, rsa_key: SigningKey,
                                                                    tmp_path: Path) -> None:
    good = _key_file(tmp_path / "good.pem")
    d = await start_daemon(extra_sections=ASSERTION + f'key_files = ["{good}"]\n')
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    d.rewrite(extra_sections=ASSERTION + f'key_files = ["{bad}"]\n')
    failed = len(d.events("reload_failed"))
    d.signal(signal.SIGHUP)
    await d.wait_event("reload_failed", count=failed + 1)
    problems = [e["problem"] for e in d.events("config_problem")]
    assert any("assertion.key_files[0]: not a PEM private key" in p for p in problems), problems
    (assertion,) = _assertions(await http("GET", d.url("/a"), token=rsa_key.token()))
    await _verify_async(d, assertion)


# -- upstream TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cas() -> tuple[trustme.CA, trustme.CA]:
    return trustme.CA(), trustme.CA()


@pytest.fixture
def mtls_backend(cas: tuple[trustme.CA, trustme.CA]) -> Iterator[TLSBackend]:
    server = TLSBackend(cas[0], client_ca=cas[0]).start()
    yield server
    server.stop()


async def _metric(d: Daemon, name: str, **labels: str) -> float:
    _, text = await d.admin("GET", "/metrics")
    body = text.decode() if isinstance(text, bytes) else str(text)
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _until_metric(d: Daemon, minimum: float, name: str, **labels: str) -> float:
    deadline = time.monotonic() + 10
    while True:
        value = await _metric(d, name, **labels)
        if value >= minimum or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)  # workers publish their counters about once a second


async def test_upstream_mtls_and_its_failures(start_daemon: Any, mtls_backend: TLSBackend,
                                              cas: tuple[trustme.CA, trustme.CA], tmp_path: Path) -> None:
    ca, other = cas
    client = ca.issue_cert("gateway", common_name="gateway")
    ca_file, cert, key = tmp_path / "backend-ca.pem", tmp_path / "gw.pem", tmp_path / "gw.key"
    ca.cert_pem.write_to_path(str(ca_file))
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    with_cert = f'ca_file = "{ca_file}"\nclient_cert = "{cert}"\nclient_key = "{key}"\n'
    d = await start_daemon(backend_scheme="https", backend_port=mtls_backend.port, upstream_extra=with_cert)

    reply = await http("GET", d.url("/open/x"))
    assert reply.status == 200
    assert reply.json()["client_cn"] == "gateway"  # the backend verified the gateway's certificate

    # Without a client certificate the backend refuses the handshake: 502, kind="tls", reason logged.
    d.rewrite(upstream_extra=f'ca_file = "{ca_file}"\n')
    await _reload(d)
    reply = await http("GET", d.url("/open/x"))
    assert reply.status == 502
    assert reply.json()["error_description"] == "upstream TLS handshake failed"
    assert await _until_metric(d, 1, "jwtproxy_upstream_errors_total", upstream="backend", kind="tls") >= 1
    (event,) = (await d.wait_event("upstream_tls_error"))[-1:]
    assert event["upstream"] == "backend" and event["reason"]

    # The CA file is read again on SIGHUP: another CA's certificate in it makes the server untrusted.
    d.rewrite(upstream_extra=with_cert)
    other.cert_pem.write_to_path(str(ca_file))
    await _reload(d)
    reply = await http("GET", d.url("/open/x"))
    assert reply.status == 502
    events = await d.wait_event("upstream_tls_error", where=lambda e: e["reason"].startswith("certificate verify failed"))
    assert events
    assert await _until_metric(d, 2, "jwtproxy_upstream_errors_total", upstream="backend", kind="tls") >= 2

    # And the right CA again: 200, no restart needed.
    ca.cert_pem.write_to_path(str(ca_file))
    await _reload(d)
    reply = await http("GET", d.url("/open/x"))
    assert reply.status == 200 and reply.json()["client_cn"] == "gateway"
