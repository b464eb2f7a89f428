"""Tests for jwtproxy.mtls: RFC 8705 §3.1 thumbprints from TLS and from a proxy's header."""

from __future__ import annotations

import base64
import hashlib
import ssl
from urllib.parse import quote

import pytest
import trustme

from jwtproxy import mtls
from jwtproxy.mtls import binding_matches, certificate_thumbprint, header_thumbprint, peer_thumbprint


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client@example.com")


def der_of(cert: trustme.LeafCert) -> bytes:
    # The standard library's PEM reader, independent of the one under test.
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def expected(cert: trustme.LeafCert) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der_of(cert)).digest()).rstrip(b"=").decode()


def test_thumbprint_is_base64url_sha256_of_der(client_cert: trustme.LeafCert) -> None:
    thumb = certificate_thumbprint(der_of(client_cert))
    assert thumb == expected(client_cert)
    assert len(thumb) == 43 and "=" not in thumb


def test_header_url_encoded_pem(client_cert: trustme.LeafCert) -> None:
    # nginx $ssl_client_escaped_cert
    value = quote(client_cert.cert_chain_pems[0].bytes().decode(), safe="").encode()
    assert header_thumbprint(value) == expected(client_cert)


def test_header_plain_pem_with_folded_lines(client_cert: trustme.LeafCert) -> None:
    value = client_cert.cert_chain_pems[0].bytes().replace(b"\n", b" ").strip()
    assert header_thumbprint(value) == expected(client_cert)


def test_header_chain_uses_the_first_certificate(ca: trustme.CA, client_cert: trustme.LeafCert) -> None:
    chain = client_cert.cert_chain_pems[0].bytes() + ca.cert_pem.bytes()
    assert header_thumbprint(quote(chain.decode(), safe="").encode()) == expected(client_cert)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
        b"-----END CERTIFICATE----- -----BEGIN CERTIFICATE-----",
        b"-----BEGIN CERTIFICATE-----" + b"A" * (mtls.MAX_CERT_HEADER_BYTES),
    ],
)
def test_header_unusable(value: bytes) -> None:
    assert header_thumbprint(value) is None


def test_header_memo_is_bounded(client_cert: trustme.LeafCert) -> None:
    for i in range(mtls._HEADER_MEMO_LIMIT + 50):
        header_thumbprint(b"junk-%d" % i)
    assert len(mtls._HEADER_MEMO) <= mtls._HEADER_MEMO_LIMIT


def test_binding_matches(client_cert: trustme.LeafCert) -> None:
    thumb = expected(client_cert)
    assert binding_matches(thumb, thumb)
    assert not binding_matches(thumb, None)
    assert not binding_matches(thumb, thumb[:-1] + ("A" if thumb[-1] != "A" else "B"))
    assert not binding_matches("caf\u00e9", thumb)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLObject:
    """An in-memory TLS handshake; returns the server side's SSLObject."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj, out, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            break
    assert all(done.values())
    return server


def test_peer_thumbprint_from_a_tls_handshake(ca: trustme.CA, client_cert: trustme.LeafCert) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_cert.configure_cert(client_ctx)
    assert peer_thumbprint(_handshake(server_ctx, client_ctx)) == expected(client_cert)

    anonymous = ssl.create_default_context()
    ca.configure_trust(anonymous)
    assert peer_thumbprint(_handshake(server_ctx, anonymous)) is None
    assert peer_thumbprint(None) is None
