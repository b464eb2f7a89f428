"""Shared test machinery: an aiohttp server runner, an echo backend, an in-process gateway,
token minting, a raw client.

Everything listens on 127.0.0.1 port 0 so tests never collide.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from jwtproxy.config import parse_config
from jwtproxy.jwks import FetchPolicy
from jwtproxy.revocation.memory import MemoryRevocationStore
from jwtproxy.worker import build_worker

ISSUER = "https://idp.test"
AUDIENCE = "api"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers that must know it up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(value: int, length: int | None = None) -> str:
    length = length or (value.bit_length() + 7) // 8
    return b64url(value.to_bytes(length, "big"))


@dataclass
class SigningKey:
    """A private key the tests sign with, and its public JWK."""

    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))

    @classmethod
    def ec(cls, kid: str = "ec-1", alg: str = "ES256") -> SigningKey:
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        return cls(kid, alg, ec.generate_private_key(curve))

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            numbers = public.public_numbers()
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": self.alg,
                    "n": _int_b64(numbers.n), "e": _int_b64(numbers.e)}
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        crv = {256: "P-256", 384: "P-384", 521: "P-521"}[public.curve.key_size]
        return {"kty": "EC", "kid": self.kid, "use": "sig", "alg": self.alg, "crv": crv,
                "x": _int_b64(numbers.x, size), "y": _int_b64(numbers.y, size)}

    def sign(self, signing_input: bytes) -> bytes:
        hash_alg = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[self.alg[2:]]
        if self.alg.startswith("RS"):
            return self.private.sign(signing_input, padding.PKCS1v15(), hash_alg)
        if self.alg.startswith("PS"):
            return self.private.sign(
                signing_input, padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size), hash_alg
            )
        der = self.private.sign(signing_input, ec.ECDSA(hash_alg))
        r, s = decode_dss_signature(der)
        size = (self.private.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def token(self, claims: Mapping[str, Any] | None = None, header: Mapping[str, Any] | None = None,
              **overrides: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now,
                                "exp": now + 600, "role": "member", "scope": "read"}
        body.update(claims or {})
        body.update(overrides)
        body = {k: v for k, v in body.items() if v is not None}
        head = {"alg": self.alg, "typ": "JWT", "kid": self.kid}
        head.update(header or {})
        head = {k: v for k, v in head.items() if v is not None}
        signing_input = (b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(body).encode())).encode()
        return signing_input.decode() + "." + b64url(self.sign(signing_input))


class AppServer:
    """An aiohttp ``web.Application`` served on 127.0.0.1 in the running event loop.

    The tests' one copy of aiohttp's runner/site start and stop: the echo backend, the fake IdPs
    and JWKS servers and every one-off upstream use it. ``port=0`` takes a free port (read it
    from ``port`` after ``start``); ``async with AppServer(app) as server:`` stops it on the way
    out. ``runner_kwargs`` go to ``web.AppRunner`` (access log off unless given).
    """

    def __init__(self, app: web.Application, *, port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 **runner_kwargs: Any) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self._runner = web.AppRunner(app, **{"access_log": None, **runner_kwargs})
        self._running = False

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> AppServer:
        await self._runner.setup()
        self._running = True
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._running:
            self._running = False
            await self._runner.cleanup()

    async def __aenter__(self) -> AppServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@dataclass
class Backend:
    """An aiohttp echo server that records what reached it."""

    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    server: AppServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    async def start(self) -> Backend:
        self.server = await AppServer(self.app()).start()
        self.port = self.server.port
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.peers.add(peer)
        record = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
            "peer": list(peer) if peer else None,
        }
        self.seen.append(record)
        if request.path.startswith("/status/"):
            return web.Response(status=int(request.path.split("/")[2]), text="")
        if request.path.startswith("/slow/"):
            await asyncio.sleep(float(request.path.split("/")[2]))
        return web.json_response(record)


def header_values(record: Mapping[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k == name.lower()]


def base_config(backend_port: int, *, parser: str = "httptools", jwks_file: str = "", extra: Mapping[str, Any] | None = None,
                routes: list[dict[str, Any]] | None = None, issuers: list[dict[str, Any]] | None = None,
                server: Mapping[str, Any] | None = None, upstream: Mapping[str, Any] | None = None,
                token: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A config dict for tests; ``jwks_file`` given = one issuer ``test``."""
    data: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "http_parser": parser, "access_log": False, **(server or {})},
        "admin": {"listen": ""},
        "upstream": {"backend": {"targets": [f"http://127.0.0.1:{backend_port}"], **(upstream or {})}},
        "route": routes or [
            {"path_prefix": "/", "upstream": "backend"},
            {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
        ],
    }
    if token:
        data["token"] = dict(token)
    if issuers is not None:
        data["issuer"] = issuers
    elif jwks_file:
        data["issuer"] = [{"name": "test", "issuer": ISSUER, "jwks_file": jwks_file, "audiences": [AUDIENCE]}]
    if extra:
        data.update(extra)
    return data


class RunningGateway:
    """A worker from ``jwtproxy.worker.build_worker`` (as the daemon builds it) serving in this
    event loop on a free loopback port (``port``), and on one more per ``[authz] listen`` entry
    (``authz_ports``, the first also as ``authz_port``). Keys come from the issuers' configured
    sources through the worker's own key manager; revocations live in memory (``worker.store``)."""

    def __init__(self, config_data: dict[str, Any], *, key_log: Callable[[str], None] | None = None,
                 fetch_policy: FetchPolicy | None = None) -> None:
        self.config = parse_config(config_data, "test.toml")
        self.worker = build_worker(self.config, store=MemoryRevocationStore(), key_log=key_log,
                                   fetch_policy=fetch_policy)
        self.gateway = self.worker.gateway
        self.keys = self.worker.keys
        self.port = 0
        self.authz_ports: list[int] = []
        self.authz_port = 0
        self._stopped = False

    async def start(self) -> RunningGateway:
        sock = _loopback_listener()
        self.port = sock.getsockname()[1]
        authz = [_loopback_listener() for _ in self.config.authz.listen]
        self.authz_ports = [s.getsockname()[1] for s in authz]
        self.authz_port = self.authz_ports[0] if authz else 0
        await self.worker.start([sock], authz)
        return self

    async def stop(self) -> None:
        """Stop serving (drain, close); a second call does nothing."""
        if not self._stopped:
            self._stopped = True
            await self.worker.stop(1.0)


def _loopback_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0, until_close: bool = False,
                       responses: int = 1) -> bytes:
    """Send raw bytes, return raw bytes received (``responses`` complete responses, or until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        deadline = time.monotonic() + read_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), remaining)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            if not until_close and count_responses(received) >= responses:
                break
        return received
    finally:
        writer.close()


def count_responses(data: bytes) -> int:
    """How many complete responses ``data`` holds (Content-Length or chunked framing)."""
    try:
        return len(parse_responses(data, strict=False))
    except ValueError:  # e.g. the head of a HEAD response followed by another response
        return 0


def parse_responses(data: bytes, strict: bool = True) -> list[tuple[int, dict[str, str], bytes]]:
    """Split raw bytes into (status, headers, body) triples, de-chunking bodies."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if strict:
                raise ValueError(f"incomplete head: {data[:80]!r}")
            break
        head = data[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4:]
        if status in (100, 101):
            out.append((status, headers, b""))
            data = rest
            if status == 101:
                break
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                if strict:
                    raise ValueError("incomplete body")
                break
            out.append((status, headers, rest[:n]))
            data = rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                line_end = rest.find(b"\r\n")
                if line_end < 0:
                    return out if not strict else _raise("incomplete chunk")
                size = int(rest[:line_end].split(b";")[0], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return out if not strict else _raise("incomplete chunk")
                body += rest[line_end + 2: line_end + 2 + size]
                rest = rest[line_end + 2 + size + 2:]
                if size == 0:
                    break
            out.append((status, headers, body))
            data = rest
        else:
            out.append((status, headers, rest))
            data = b""
    return out


def _raise(message: str) -> Any:
    raise ValueError(message)


def write_jwks(path: str, *keys: SigningKey) -> str:
    with open(path, "w") as f:
        json.dump({"keys": [k.jwk() for k in keys]}, f)
    return path
