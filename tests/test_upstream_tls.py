"""upstream_tls: the client context against a real TLS server (trustme certificates), on uvloop.

Each case makes the connection the upstream pool makes (``loop.create_connection`` with the
context and the target host as ``server_hostname``), sends one request and reports either the
response or the exception that ended the exchange, with :func:`failure_reason` of it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from cryptography.hazmat.primitives import serialization

from jwtproxy.upstream_tls import client_context, context_problem, failure_reason
from tls_backend import TLSBackend


class _Client(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[tuple[bytes, BaseException | None]]) -> None:
        self.done = done
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if sep and b"content-length: %d" % len(body) in head.lower() and not self.done.done():
            self.done.set_result((self.data, None))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result((self.data, exc))


def _exchange(
    context: ssl.SSLContext, port: int, host: str = "127.0.0.1", write_delay: float = 0.0
) -> tuple[dict[str, Any] | None, BaseException | None]:
    """(the backend's JSON answer, None) or (None, the exception that ended the exchange)."""

    async def run() -> tuple[dict[str, Any] | None, BaseException | None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[bytes, BaseException | None]] = loop.create_future()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Client(done), "127.0.0.1", port, ssl=context, server_hostname=host),
                5,
            )
        except (OSError, ssl.SSLError) as exc:
            return None, exc
        if write_delay:
            await asyncio.sleep(write_delay)
        if not done.done():
            transport.write(b"GET /x HTTP/1.1\r\nhost: backend\r\n\r\n")
        data, exc = await asyncio.wait_for(done, 5)
        transport.close()
        if exc is not None or not data:
            return None, exc or ConnectionResetError("closed without a response")
        return json.loads(data.partition(b"\r\n\r\n")[2]), None

    return uvloop.run(run())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, other_ca: trustme.CA) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    client = ca.issue_cert("gateway-client", common_name="gateway-client")
    stranger = other_ca.issue_cert("stranger")
    paths = {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other-ca.pem",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
        "stranger_cert": folder / "stranger.pem",
        "stranger_key": folder / "stranger.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other_ca.cert_pem.write_to_path(str(paths["other_ca"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    stranger.cert_chain_pems[0].write_to_path(str(paths["stranger_cert"]))
    stranger.private_key_pem.write_to_path(str(paths["stranger_key"]))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def mtls_backend(ca: trustme.CA) -> Iterator[TLSBackend]:
    server = TLSBackend(ca, client_ca=ca).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_backend(ca: trustme.CA) -> Iterator[TLSBackend]:
    server = TLSBackend(ca).start()
    yield server
    server.stop()


def test_private_ca_and_client_certificate_pass(files: dict[str, str], mtls_backend: TLSBackend) -> None:
    answer, exc = _exchange(client_context(files["ca"], files["client_cert"], files["client_key"]), mtls_backend.port)
    assert exc is None and answer is not None
    assert answer["client_cn"] == "gateway-client"  # the backend saw the gateway's certificate
    assert answer["path"] == "/x"


def test_private_ca_without_client_certificate_on_a_plain_tls_backend(
    files: dict[str, str], tls_backend: TLSBackend
) -> None:
    answer, exc = _exchange(client_context(files["ca"]), tls_backend.port)
    assert exc is None and answer is not None and answer["client_cn"] is None


def test_no_client_certificate_fails_with_the_servers_alert(files: dict[str, str], mtls_backend: TLSBackend) -> None:
    before = mtls_backend.failed_handshakes
    # TLS 1.3: the client finishes first; the server checks the certificate last and answers with a
    # "certificate required" alert, which ends the connection on uvloop as an ssl.SSLError.
    answer, exc = _exchange(client_context(files["ca"]), mtls_backend.port, write_delay=0.3)
    assert answer is None
    assert isinstance(exc, ssl.SSLError), exc
    assert failure_reason(exc) == "tlsv13 alert certificate required"
    assert mtls_backend.failed_handshakes == before + 1


def test_no_client_certificate_and_an_immediate_request_race_the_alert(
    files: dict[str, str], mtls_backend: TLSBackend
) -> None:
    # Writing at once (as the pool does) races the alert: the write can meet the closed socket first
    # (EPIPE / ECONNRESET) and the alert is never read. The exchange still fails, never succeeds;
    # the pool labels a fresh TLS connection that ends before its first response byte "tls".
    for _ in range(5):
        answer, exc = _exchange(client_context(files["ca"]), mtls_backend.port)
        assert answer is None
        assert isinstance(exc, (ssl.SSLError, BrokenPipeError, ConnectionResetError)), exc
        assert failure_reason(exc)


def test_no_client_certificate_fails_during_a_tls12_handshake(files: dict[str, str], mtls_backend: TLSBackend) -> None:
    context = client_context(files["ca"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    answer, exc = _exchange(context, mtls_backend.port)
    assert answer is None and isinstance(exc, ssl.SSLError)
    assert "handshake failure" in failure_reason(exc)


def test_client_certificate_from_another_ca_is_refused(files: dict[str, str], mtls_backend: TLSBackend) -> None:
    answer, exc = _exchange(
        client_context(files["ca"], files["stranger_cert"], files["stranger_key"]), mtls_backend.port
    )
    assert answer is None and isinstance(exc, ssl.SSLError)
    assert "unknown ca" in failure_reason(exc)


def test_server_certificate_from_another_ca_fails_verification(files: dict[str, str], mtls_backend: TLSBackend) -> None:
    answer, exc = _exchange(
        client_context(files["other_ca"], files["client_cert"], files["client_key"]), mtls_backend.port
    )
    assert answer is None and isinstance(exc, ssl.SSLCertVerificationError)
    assert failure_reason(exc).startswith("certificate verify failed: ")


def test_system_store_does_not_trust_a_private_ca(tls_backend: TLSBackend) -> None:
    answer, exc = _exchange(client_context(), tls_backend.port)
    assert answer is None and isinstance(exc, ssl.SSLCertVerificationError)


def test_hostname_is_verified(ca: trustme.CA, files: dict[str, str]) -> None:
    server = TLSBackend(ca, hostnames=("backend.internal",)).start()
    try:
        answer, exc = _exchange(client_context(files["ca"]), server.port, host="127.0.0.1")
        assert answer is None and isinstance(exc, ssl.SSLCertVerificationError)
        assert "mismatch" in failure_reason(exc).lower()
        answer, exc = _exchange(client_context(files["ca"]), server.port, host="backend.internal")
        assert exc is None and answer is not None
    finally:
        server.stop()


def test_plain_http_target_is_a_tls_failure(files: dict[str, str]) -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def plain() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=plain, daemon=True)
    thread.start()
    try:
        answer, exc = _exchange(client_context(files["ca"]), listener.getsockname()[1])
        assert answer is None and isinstance(exc, ssl.SSLError)
        assert failure_reason(exc)
    finally:
        thread.join(5)
        listener.close()


# -- validation of the files -------------------------------------------------------------------------


def test_context_problem_accepts_good_files(files: dict[str, str]) -> None:
    assert context_problem(files["ca"]) is None
    assert context_problem(files["ca"], files["client_cert"], files["client_key"]) is None
    assert context_problem("", files["client_cert"], files["client_key"]) is None


def test_context_problem_reports_each_bad_file(files: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    key = serialization.load_pem_private_key(Path(files["client_key"]).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    missing = str(tmp_path / "missing.pem")
    assert context_problem(missing) == "cannot load ca_file: No such file or directory"
    assert context_problem(str(empty)) == "cannot load ca_file: no certificate or crl found"
    assert context_problem("", files["client_cert"], "") == "client_cert and client_key must be set together"
    assert context_problem("", "", files["client_key"]) == "client_cert and client_key must be set together"
    assert context_problem("", files["client_cert"], str(encrypted)) == (
        "client_key is encrypted; give an unencrypted PEM key"
    )
    mismatch = context_problem("", files["client_cert"], files["stranger_key"])
    assert mismatch is not None and "key values mismatch" in mismatch
    swapped = context_problem("", files["client_key"], files["client_cert"])
    assert swapped is not None and swapped.startswith("cannot load client_cert and client_key: not a PEM")
    assert context_problem("", missing, files["client_key"]) == (
        "cannot load client_cert and client_key: No such file or directory"
    )
