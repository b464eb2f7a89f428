"""Certificate-bound tokens (RFC 8705 §3): the client certificate's thumbprint, from TLS or a proxy.

Theory of operation
-------------------
A token whose ``cnf`` claim has ``x5t#S256`` may only be used on a connection whose client
certificate has that thumbprint: base64url (no padding) of the SHA-256 of the certificate's DER
encoding (RFC 8705 §3.1). The thumbprint of the certificate the client actually presented comes
from one of two places:

* *our own TLS listener*: the DER of the peer certificate the handshake verified against
  ``[server] tls_client_ca`` (:func:`peer_thumbprint`, computed once per connection);
* *a trusted TLS-terminating proxy*: the URL-encoded PEM it puts in ``[server]
  client_cert_header`` (nginx ``$ssl_client_escaped_cert``), believed only when
  :mod:`jwtproxy.forwarded` trusts the peer. :func:`header_thumbprint` decodes it; the proxy
  verified the chain, we only fingerprint what it vouches for. A client sends the same certificate
  on every request, so decoded values are remembered (bounded, keyed by the header value).

The comparison itself (:func:`binding_matches`) is constant-time: the expected thumbprint comes
from the token and the presented one from the connection, neither is secret, but there is no
reason to leak a prefix length.

Everything here is pure apart from reading the ``ssl`` object handed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
from collections import OrderedDict
from typing import Final
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["binding_matches", "certificate_thumbprint", "header_thumbprint", "peer_thumbprint"]

_HEADER_MEMO: OrderedDict[bytes, str | None] = OrderedDict()
_HEADER_MEMO_LIMIT: Final = 1024
#: A certificate header longer than this is refused unread (a chain of a few certificates fits).
MAX_CERT_HEADER_BYTES: Final = 16384


def certificate_thumbprint(der: bytes) -> str:
    """``x5t#S256`` of a DER certificate: base64url(SHA-256(DER)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def peer_thumbprint(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The thumbprint of the certificate the TLS peer presented, or None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return certificate_thumbprint(der) if der else None


def _decode_header(value: bytes) -> str | None:
    if len(value) > MAX_CERT_HEADER_BYTES:
        return None
    # nginx escapes the PEM like a URL component; a proxy that sends plain PEM (newlines folded
    # into spaces or tabs) is read the same way.
    pem = unquote_to_bytes(value.strip())
    begin = pem.find(b"-----BEGIN CERTIFICATE-----")
    end = pem.find(b"-----END CERTIFICATE-----")
    if begin < 0 or end < begin:
        return None
    body = pem[begin + 27 : end]
    # Only the first certificate (the client's own; a chain may follow) is fingerprinted.
    text = b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(body.split()) + b"\n-----END CERTIFICATE-----\n"
    try:
        certificate = x509.load_pem_x509_certificate(text)
    except ValueError:
        return None
    return certificate_thumbprint(certificate.public_bytes(Encoding.DER))


def header_thumbprint(value: bytes) -> str | None:
    """The thumbprint of the first certificate in a ``client_cert_header`` value, else None."""
    memo = _HEADER_MEMO
    if value in memo:
        memo.move_to_end(value)
        return memo[value]
    thumbprint = _decode_header(value)
    memo[value] = thumbprint
    if len(memo) > _HEADER_MEMO_LIMIT:
        memo.popitem(last=False)
    return thumbprint


def binding_matches(expected: str, presented: str | None) -> bool:
    """True if the token's ``x5t#S256`` equals the presented certificate's thumbprint."""
    return presented is not None and hmac.compare_digest(expected.encode("ascii", "replace"), presented.encode("ascii"))
