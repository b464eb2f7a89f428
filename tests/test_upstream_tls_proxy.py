"""Upstream TLS inside the running gateway (both codecs): a private CA and mTLS towards a real
TLS backend (Python's ``ssl`` in a thread, trustme certificates).

Right certificate: 200, and the backend saw the gateway's client certificate. No certificate,
a certificate from another CA, a server certificate the gateway does not trust or for another
name: 502, counted as ``kind="tls"``, its reason in one ``upstream_tls_error`` log line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import parse_responses, raw_exchange
from tls_backend import TLSBackend


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, other_ca: trustme.CA) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("upstream-tls")
    client = ca.issue_cert("gateway", common_name="gateway")
    stranger = other_ca.issue_cert("stranger", common_name="stranger")
    out: dict[str, Path] = {
        "ca": folder / "ca.pem", "other_ca": folder / "other-ca.pem",
        "cert": folder / "client.pem", "key": folder / "client.key",
        "stranger_cert": folder / "stranger.pem", "stranger_key": folder / "stranger.key",
    }
    ca.cert_pem.write_to_path(str(out["ca"]))
    other_ca.cert_pem.write_to_path(str(out["other_ca"]))
    client.cert_chain_pems[0].write_to_path(str(out["cert"]))
    client.private_key_pem.write_to_path(str(out["key"]))
    stranger.cert_chain_pems[0].write_to_path(str(out["stranger_cert"]))
    stranger.private_key_pem.write_to_path(str(out["stranger_key"]))
    return {name: str(path) for name, path in out.items()}


@pytest.fixture(scope="module")
def mtls_backend(ca: trustme.CA) -> Iterator[TLSBackend]:
    server = TLSBackend(ca, client_ca=ca).start()
    yield server
    server.stop()


async def _gateway(make_gateway: Any, port: int, host: str = "127.0.0.1", **tls: str) -> Any:
    return await make_gateway(
        routes=[{"path_prefix": "/", "upstream": "backend", "auth": "off"}],
        backend_port=port,
        extra={"upstream": {"backend": {"targets": [f"https://{host}:{port}"], **tls}}},
    )


async def _get(gw: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = parse_responses(await raw_exchange(gw.port, b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n"))[0]
    return status, json.loads(body) if body else {}


def _tls_errors(gw: Any) -> int:
    return int(gw.gateway.metrics._upstream_errors.get(("backend", "tls"), 0))


def _logged_reasons(capfd: pytest.CaptureFixture[str]) -> list[str]:
    reasons = []
    for line in capfd.readouterr().err.splitlines():
        if line.startswith("{") and '"upstream_tls_error"' in line:
            event = json.loads(line)
            assert event["upstream"] == "backend" and event["target"].startswith("127.0.0.1:")
            reasons.append(event["reason"])
    return reasons


async def test_private_ca_and_client_certificate(make_gateway, files, mtls_backend) -> None:
    gw = await _gateway(make_gateway, mtls_backend.port, ca_file=files["ca"], client_cert=files["cert"],
                        client_key=files["key"])
    for _ in range(3):  # the first opens the connection, the others reuse it
        status, answer = await _get(gw)
        assert status == 200
        assert answer["client_cn"] == "gateway"
    assert _tls_errors(gw) == 0


async def test_no_client_certificate_is_a_502(make_gateway, files, mtls_backend, capfd) -> None:
    gw = await _gateway(make_gateway, mtls_backend.port, ca_file=files["ca"])
    status, answer = await _get(gw)
    assert status == 502
    assert answer["error_description"] == "upstream TLS handshake failed"
    assert _tls_errors(gw) == 1
    (reason,) = _logged_reasons(capfd)
    # The server's alert, or -- when the request was already on its way -- the reset it caused.
    assert reason in ("tlsv13 alert certificate required", "Connection reset by peer", "Broken pipe"), reason


async def test_client_certificate_from_another_ca_is_a_502(make_gateway, files, mtls_backend, capfd) -> None:
    gw = await _gateway(make_gateway, mtls_backend.port, ca_file=files["ca"], client_cert=files["stranger_cert"],
                        client_key=files["stranger_key"])
    status, _ = await _get(gw)
    assert status == 502 and _tls_errors(gw) == 1
    (reason,) = _logged_reasons(capfd)
    assert reason in ("tlsv1 alert unknown ca", "Connection reset by peer", "Broken pipe"), reason


async def test_server_certificate_from_another_ca_is_a_502(make_gateway, files, mtls_backend, capfd) -> None:
    gw = await _gateway(make_gateway, mtls_backend.port, ca_file=files["other_ca"], client_cert=files["cert"],
                        client_key=files["key"])
    status, answer = await _get(gw)
    assert status == 502 and _tls_errors(gw) == 1
    assert "certificate" not in answer["error_description"].replace("TLS handshake", "")  # no detail to clients
    (reason,) = _logged_reasons(capfd)
    assert reason.startswith("certificate verify failed: "), reason


async def test_system_store_rejects_a_private_ca(make_gateway, ca, capfd) -> None:
    server = TLSBackend(ca).start()
    try:
        gw = await _gateway(make_gateway, server.port)
        status, _ = await _get(gw)
        assert status == 502 and _tls_errors(gw) == 1
        (reason,) = _logged_reasons(capfd)
        assert reason.startswith("certificate verify failed: ")
    finally:
        server.stop()


async def test_hostname_is_verified(make_gateway, ca, files, capfd) -> None:
    server = TLSBackend(ca, hostnames=("backend.internal",)).start()
    try:
        gw = await _gateway(make_gateway, server.port, ca_file=files["ca"])
        status, _ = await _get(gw)
        assert status == 502 and _tls_errors(gw) == 1
        (reason,) = _logged_reasons(capfd)
        assert "mismatch" in reason, reason
    finally:
        server.stop()


async def test_repeated_failures_log_once_per_interval(make_gateway, files, mtls_backend, capfd) -> None:
    gw = await _gateway(make_gateway, mtls_backend.port, ca_file=files["other_ca"])
    for _ in range(5):
        status, _ = await _get(gw)
        assert status == 502
    assert _tls_errors(gw) == 5
    assert len(_logged_reasons(capfd)) == 1  # the journal gets the reason, not a flood
