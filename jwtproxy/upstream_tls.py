"""TLS towards upstreams: one client context per ``[upstream.NAME]``, and what a failure is called.

Theory of operation
-------------------
An upstream with ``https://`` targets gets one :class:`ssl.SSLContext`, built by
:func:`client_context` when its pool is made (once per worker generation: a SIGHUP builds new
workers, so edited CA or certificate files are read again; the config loader calls
:func:`context_problem` first, so a file that does not load fails the reload and the old workers
keep serving):

* *Trust.* ``ca_file`` (a PEM bundle) *replaces* the system store: a private CA is then the only
  authority a target's certificate may chain to. Empty: the system store.
* *Identity.* ``client_cert`` + ``client_key``: the gateway presents this certificate when the
  target asks for one (mTLS towards the backend). An encrypted key is refused with a precise
  message rather than left to OpenSSL's interactive passphrase prompt, which would hang a daemon.
* *Verification.* Certificates are verified and so are hostnames (``check_hostname``): the name
  checked is the target's host as written in ``targets`` (an IP address is matched against IP
  SANs), whatever ``Host`` header the request carries. TLS 1.2 is the floor; ALPN offers only
  ``http/1.1``, the one protocol the upstream connection speaks.

A failure is reported as ``kind = "tls"`` (``jwtproxy_upstream_errors_total{kind="tls"}``) and
answered 502. It can surface at two moments, and both count: during the handshake
(``create_connection`` raises: untrusted or mismatched server certificate, a TLS 1.2 server
rejecting our certificate, a target that does not speak TLS), or, with TLS 1.3, on the first read
after the client has already finished its side (the server checks the client certificate last and
answers with an alert such as ``certificate required``, which arrives as the ``ssl.SSLError`` that
closes the connection). :func:`failure_reason` gives a short text for the log line: the OpenSSL
verification message or alert, never key material.
"""

from __future__ import annotations

import ssl
from typing import NoReturn

__all__ = ["EncryptedKey", "client_context", "context_problem", "failure_reason"]


class EncryptedKey(Exception):
    """The client key needs a passphrase: refused, never prompted for."""


def _no_passphrase() -> NoReturn:
    raise EncryptedKey()


def client_context(ca_file: str = "", client_cert: str = "", client_key: str = "") -> ssl.SSLContext:
    """The context for an upstream's ``https://`` targets (see the module docstring).

    Raises ``OSError`` (``ssl.SSLError`` included) for a file that does not load and
    :class:`EncryptedKey` for a passphrase-protected key; :func:`context_problem` turns both into
    a config message.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None, password=_no_passphrase)
    return context


def context_problem(ca_file: str = "", client_cert: str = "", client_key: str = "") -> str | None:
    """Build the context as the workers will; a message naming what failed, or None."""
    if bool(client_cert) != bool(client_key):
        return "client_cert and client_key must be set together"
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ValueError) as exc:
            return f"cannot load ca_file: {_os_reason(exc)}"
    try:
        client_context(ca_file, client_cert, client_key)
    except EncryptedKey:
        return "client_key is encrypted; give an unencrypted PEM key"
    except OSError as exc:
        return f"cannot load client_cert and client_key: {_os_reason(exc)}"
    return None


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason
    if reason == "PEM lib" or (not reason and "PEM lib" in str(exc)):
        # OpenSSL's words for "this file is not the PEM it should be".
        return "not a PEM certificate or key, or the key does not belong to the certificate"
    if not reason:
        return str(exc)
    # OpenSSL names reasons like TLSV13_ALERT_CERTIFICATE_REQUIRED; the log reads better in words.
    return str(reason).lower().replace("_", " ")


def failure_reason(exc: BaseException) -> str:
    """A short, secret-free description of a TLS failure for the log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return _ssl_reason(exc)
    return _os_reason(exc)
