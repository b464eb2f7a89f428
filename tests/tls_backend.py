"""A real HTTPS backend for upstream-TLS tests: Python's ``ssl`` in a thread, optional client certificates.

The server is deliberately not on the test's event loop: a failed handshake must look exactly as
it does with any other server (an alert, then a closed socket), and a blocking ``ssl`` server is
the plainest such server. It answers every request with ``200`` and a JSON body naming the path,
the request headers and the subject CN of the client certificate it verified (``null`` without
one), with keep-alive.
"""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        subject = None
        if peer:
            subject = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), None)
        body = json.dumps(
            {"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()], "client_cn": subject}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        # The handshake runs in the request's thread (finish_request), not in the accept loop.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError):
            self.failed_handshakes += 1
            return
        super().finish_request(request, client_address)

    failed_handshakes = 0


class TLSBackend:
    """``TLSBackend(ca, hostnames, client_ca=...)``: serves on 127.0.0.1 with a certificate from ``ca``.

    ``client_ca`` set: a client certificate chaining to it is required (the handshake fails
    without one, as with any ``verify_mode = CERT_REQUIRED`` server).
    """

    def __init__(self, ca: trustme.CA, hostnames: tuple[str, ...] = ("127.0.0.1", "localhost"),
                 client_ca: trustme.CA | None = None) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*hostnames).configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.context = context
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def failed_handshakes(self) -> int:
        return self._server.failed_handshakes

    def start(self) -> TLSBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
