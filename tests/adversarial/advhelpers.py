"""Helpers for the adversarial suite: token forgery, a fake IdP, a counting listener, and
gateways wired to the real :class:`jwtproxy.jwks.KeyManager` (fixtures in conftest.py).

Everything listens on 127.0.0.1 port 0. The parent ``tests/conftest.py`` provides ``parser``
(both codecs), ``backend``, ``rsa_key``, ``ec_key``, ``jwks_path`` and ``make_gateway``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from helpers import (
    AUDIENCE,
    ISSUER,
    AppServer,
    Backend,
    RunningGateway,
    SigningKey,
    b64url,
    free_port,
    header_values,
    parse_responses,
    raw_exchange,
)

from jwtproxy.headerpolicy import header_key

IDENTITY_NAMES = ("x-user-id", "x-user-role", "x-scope")
IDENTITY_KEYS = frozenset(header_key(n.encode()) for n in IDENTITY_NAMES)

# Routes used by most adversarial tests: a required catch-all, an optional and an open route,
# and a route with a claim requirement (per-route rules that path tricks try to dodge).
ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/maybe", "upstream": "backend", "auth": "optional"},
    {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/public", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/admin", "upstream": "backend", "require_claims": {"role": ["admin"]}},
    {"path_prefix": "/smuggled", "upstream": "backend"},
]


# ------------------------------------------------------------------------------ token forgery


def seg(value: Any) -> str:
    """One token segment: a dict/list is JSON-encoded, a str is UTF-8, bytes are taken as is."""
    if isinstance(value, (dict, list)):
        value = json.dumps(value, separators=(",", ":"))
    if isinstance(value, str):
        value = value.encode("utf-8")
    return b64url(value)


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid claim set (drop a claim by passing ``None``)."""
    now = int(time.time())
    body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now,
                            "exp": now + 600, "role": "member", "scope": "read"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def signed(key: SigningKey, header: Any, payload: Any) -> str:
    """A token whose header/payload segments are exactly ``seg(header)``/``seg(payload)`` (dicts,
    or raw JSON text for duplicate members, NaN and the like), validly signed by ``key``."""
    signing_input = seg(header) + "." + seg(payload)
    return signing_input + "." + b64url(key.sign(signing_input.encode()))


def raw_signed(key: SigningKey, header_json: str, payload_json: str) -> str:
    return signed(key, header_json, payload_json)


def hs_token(secret: bytes, header: Any, payload: Any, digest: str = "sha256") -> str:
    import hashlib
    import hmac

    signing_input = seg(header) + "." + seg(payload)
    mac = hmac.new(secret, signing_input.encode(), getattr(hashlib, digest)).digest()
    return signing_input + "." + b64url(mac)


def b64std(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------ client side


def get(path: str, token: str | None = None, extra: bytes = b"", scheme: bytes = b"Bearer ",
        method: bytes = b"GET", host: bytes = b"api.test") -> bytes:
    auth = b"Authorization: " + scheme + token.encode("utf-8", "surrogateescape") + b"\r\n" if token is not None else b""
    return method + b" " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + extra + b"\r\n"


async def status_of(gw: RunningGateway, wire: bytes, timeout: float = 5.0) -> int:
    raw = await raw_exchange(gw.port, wire, read_timeout=timeout)
    responses = parse_responses(raw, strict=False)
    assert responses, f"no response: {raw[:200]!r}"
    return responses[0][0]


async def call(gw: RunningGateway, wire: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    raw = await raw_exchange(gw.port, wire, read_timeout=timeout)
    responses = parse_responses(raw, strict=False)
    assert responses, f"no response: {raw[:200]!r}"
    return responses[0]


async def assert_rejected(gw: RunningGateway, backend: Backend, token: str, path: str = "/x",
                          allowed: tuple[int, ...] = (401,)) -> int:
    """The token must be refused (401 unless told otherwise) and nothing may reach the backend."""
    before = len(backend.seen)
    status = await status_of(gw, get(path, token))
    assert status in allowed, f"expected {allowed}, got {status} for token {token[:120]!r}"
    assert len(backend.seen) == before, "a rejected request reached the backend"
    return status


def identity_headers_seen(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every header the upstream received whose spelling-independent name is an identity name."""
    return [(k, v) for k, v in record["headers"] if header_key(k.encode("latin-1")) in IDENTITY_KEYS]


# ------------------------------------------------------------------------------ servers


class BigBackend(Backend):
    """The echo backend, accepting large header values (aiohttp's default field limit is 8 KB)."""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40,
                              handler_args={"max_field_size": 1 << 20, "max_line_size": 1 << 20,
                                            "max_headers": 100_000})
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app


@dataclass
class CountingListener:
    """A TCP listener that counts every connection (and serves a JWKS, should anyone ask)."""

    body: bytes = b'{"keys": []}'
    connections: int = 0
    port: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> CountingListener:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(self.body), self.body))
                await writer.drain()
            except Exception:
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class FakeIdP:
    """An aiohttp IdP serving ``/jwks.json`` in a configurable ``mode`` and counting fetches.

    Modes: ``ok`` (serve ``document``), ``slow`` (sleep ``delay`` first), ``garbage``, ``html``,
    ``huge`` (10 MB of JSON), ``redirect-loop``, ``500``, ``raw`` (serve ``raw_body`` as is).
    """

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    mode: str = "ok"
    delay: float = 10.0
    raw_body: bytes = b""
    fetches: int = 0
    port: int = 0
    server: AppServer | None = None

    async def start(self) -> FakeIdP:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_get("/loop", self._loop)
        self.server = await AppServer(app).start()
        self.port = self.server.port
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    @property
    def jwks_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def _loop(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        raise web.HTTPFound("/loop")

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(self.delay)
            return web.json_response(self.document)
        if mode == "garbage":
            return web.Response(body=bytes(range(256)) * 4, content_type="application/json")
        if mode == "html":
            return web.Response(text="<html><body>Service Unavailable</body></html>", content_type="text/html")
        if mode == "huge":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"keys": [' + b'{"kty":"RSA","n":"AQAB","e":"AQAB"},' * 8)
            block = b'{"kty":"oct","k":"' + b"A" * 65000 + b'"},'
            try:
                for _ in range(160):  # ~10 MB
                    await response.write(block)
                await response.write(b'{}]}')
            except (ConnectionResetError, RuntimeError):
                pass
            return response
        if mode == "redirect-loop":
            raise web.HTTPFound("/loop")
        if mode == "500":
            return web.Response(status=500, text="oops")
        if mode == "raw":
            return web.Response(body=self.raw_body, content_type="application/json")
        return web.json_response(self.document)


class IdPGateway:
    """A RunningGateway whose issuers are fetched by its worker's KeyManager (``keys``), with the
    key manager's log lines collected in ``log``."""

    def __init__(self, gw: RunningGateway, log: list[str]) -> None:
        self.gw = gw
        self.keys = gw.keys
        self.log = log

    @property
    def port(self) -> int:
        return self.gw.port

    @property
    def gateway(self):  # noqa: ANN201 - the jwtproxy Gateway
        return self.gw.gateway

    async def stop(self) -> None:
        await self.gw.stop()


IdPGatewayFactory = Callable[..., Awaitable[IdPGateway]]


__all__ = [
    "AUDIENCE", "ISSUER", "IDENTITY_KEYS", "IDENTITY_NAMES", "ROUTES", "BigBackend", "CountingListener",
    "FakeIdP", "IdPGateway", "SigningKey", "assert_rejected", "b64std", "b64url", "call", "claims", "free_port",
    "get", "header_values", "hs_token", "identity_headers_seen", "raw_signed", "seg", "signed", "status_of",
]
