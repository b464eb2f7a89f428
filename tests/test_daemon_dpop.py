"""Sender-constrained tokens in the real daemon (``python -m jwtproxy serve``, two workers).

What only a multi-process daemon can show (contract §5.2): a DPoP proof accepted by one worker is
refused by the other (the supervisor's shared-memory jti table), a server nonce issued by one
worker is good on the other (the supervisor's nonce secret), and a SIGHUP reload re-reads the TLS
client CA bundle. Connections learn their worker from the kernel (``daemon_harness.Conn``), so
each step provably runs where the test says.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trustme
from daemon_harness import Conn, Daemon, free_port, toml_config
from dpop_client import DPoPClient
from helpers import AUDIENCE, ISSUER, Backend, SigningKey, parse_responses

from jwtproxy.mtls import certificate_thumbprint

pytestmark = pytest.mark.slow

HOST = "gw.test"
URL = f"http://{HOST}/orders"


def dpop_request(token: str, proof: str) -> bytes:
    return (f"GET /orders HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: DPoP {token}\r\nDPoP: {proof}\r\n\r\n").encode()


async def send(conn: Conn, wire: bytes) -> tuple[int, dict[str, str]]:
    conn.writer.write(wire)
    await conn.writer.drain()
    data = b""
    while True:
        responses = parse_responses(data, strict=False) if data else []
        if responses:
            return responses[0][0], responses[0][1]
        chunk = await asyncio.wait_for(conn.reader.read(65536), 5)
        if not chunk:
            raise AssertionError("connection closed without a response")
        data += chunk


async def one_conn_per_worker(daemon: Daemon, max_tries: int = 400) -> dict[int, Conn]:
    """A kept-alive connection to each worker, found with requests to the open route."""
    pids = set(daemon.worker_pids())
    found: dict[int, Conn] = {}
    spare: list[Conn] = []
    for _ in range(max_tries):
        conn = await Conn.open(daemon)
        assert await conn.get(None, "/open/x") == 200
        if conn.pid in pids and conn.pid not in found:
            found[conn.pid] = conn
            if set(found) == pids:
                break
        else:
            spare.append(conn)
    for conn in spare:
        conn.close()
    assert set(found) == pids, f"reached workers {sorted(found)} of {sorted(pids)}"
    return found


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


async def start(started: list[Daemon], tmp_path: Path, backend: Backend, jwks_path: str, *,
                issuer_extra: str = "", server_extra: str = "", **settings: Any) -> Daemon:
    full: dict[str, Any] = dict(listen_port=free_port(), admin_port=None, backend_port=backend.port,
                                jwks_file=jwks_path, tmp=tmp_path, issuer=ISSUER, audience=AUDIENCE, workers=2)
    full.update(settings)
    text = toml_config(**full)
    text = text.replace(f'audiences = ["{AUDIENCE}"]\n', f'audiences = ["{AUDIENCE}"]\n{issuer_extra}', 1)
    text = text.replace("[admin]", f"{server_extra}\n[admin]", 1)
    config = tmp_path / f"daemon{len(started)}.toml"
    config.write_text(text)
    daemon = Daemon(tmp_path, None, config_path=config, name=f"daemon{len(started)}")
    daemon.port = full["listen_port"]
    daemon.workers = full["workers"]
    daemon.scheme = "https" if full.get("tls_cert") else "http"
    started.append(daemon)
    return await daemon.wait_ready()


async def test_proof_is_single_use_across_workers(daemons, tmp_path, backend, jwks_path, ec_key: SigningKey):
    d = await start(daemons, tmp_path, backend, jwks_path)
    (pid_a, a), (pid_b, b) = sorted((await one_conn_per_worker(d)).items())
    assert pid_a != pid_b
    client = DPoPClient("ES256")
    token = ec_key.token(cnf={"jkt": client.jkt})
    try:
        first = client.proof("GET", URL, token)
        assert (await send(a, dpop_request(token, first)))[0] == 200
        status, headers = await send(b, dpop_request(token, first))
        assert status == 401
        assert 'error_description="DPoP proof already used"' in headers["www-authenticate"]
        second = client.proof("GET", URL, token)
        assert (await send(b, dpop_request(token, second)))[0] == 200
        assert (await send(a, dpop_request(token, second)))[0] == 401
    finally:
        a.close()
        b.close()
    assert [r["path"] for r in backend.seen if r["path"] == "/orders"] == ["/orders"] * 2


async def test_nonce_from_one_worker_is_good_on_the_other(daemons, tmp_path, backend, jwks_path, ec_key):
    d = await start(daemons, tmp_path, backend, jwks_path, issuer_extra="dpop_nonce = true\n")
    (_, a), (_, b) = sorted((await one_conn_per_worker(d)).items())
    client = DPoPClient("EdDSA")
    token = ec_key.token(cnf={"jkt": client.jkt})
    try:
        status, headers = await send(a, dpop_request(token, client.proof("GET", URL, token)))
        assert status == 401 and 'error="use_dpop_nonce"' in headers["www-authenticate"]
        nonce = headers["dpop-nonce"]
        assert (await send(b, dpop_request(token, client.proof("GET", URL, token, nonce=nonce))))[0] == 200
        assert (await send(a, dpop_request(token, client.proof("GET", URL, token, nonce=nonce))))[0] == 200
    finally:
        a.close()
        b.close()


async def test_sighup_rereads_the_client_ca(daemons, tmp_path, backend, jwks_path, ec_key):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    server_cert = old_ca.issue_cert("localhost", "127.0.0.1")
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "clients.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert))
    server_cert.private_key_pem.write_to_path(str(key))
    old_ca.cert_pem.write_to_path(str(bundle))
    d = await start(daemons, tmp_path, backend, jwks_path, workers=1, tls_cert=str(cert), tls_key=str(key),
                    server_extra=f'tls_client_ca = "{bundle}"\ntls_client_cert = "required"\n')
    old_client, new_client = old_ca.issue_cert("c@old"), new_ca.issue_cert("c@new")

    async def status_with(client_cert: trustme.LeafCert) -> int | None:
        ctx = ssl.create_default_context()
        old_ca.configure_trust(ctx)
        client_cert.configure_cert(ctx)
        der = ssl.PEM_cert_to_DER_cert(client_cert.cert_chain_pems[0].bytes().decode())
        token = ec_key.token(cnf={"x5t#S256": certificate_thumbprint(der)})
        wire = f"GET /x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", d.port, ssl=ctx, server_hostname="localhost")
            writer.write(wire)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
        except (ssl.SSLError, ConnectionError):
            return None
        return parse_responses(data)[0][0] if data else None

    assert await status_with(old_client) == 200
    assert await status_with(new_client) is None  # refused at the handshake
    new_ca.cert_pem.write_to_path(str(bundle))
    d.signal(signal.SIGHUP)
    await d.wait_event("reload_done")
    deadline = time.monotonic() + 10
    while await status_with(new_client) != 200:
        assert time.monotonic() < deadline, "the new client CA was not taken on reload"
        await asyncio.sleep(0.2)
    assert await status_with(old_client) is None
