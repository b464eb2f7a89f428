"""Interoperability with a real, certified OpenID provider (issue 8).

The provider is panva/oidc-provider (OpenID Certified), pinned in ``package-lock.json`` and run
by ``provider.js`` on a loopback port with a ``client_credentials`` client and a resource server
(RFC 8707 resource indicator) whose access tokens are RFC 9068 JWTs: ``typ: at+jwt``,
``aud: "api"``, ``scope`` and an extra ``role`` claim, ``sub`` = the client_id. The signing keys
(a JWKS with private parts) are generated here with ``cryptography`` and handed to the provider,
so a key rotation is "restart the provider with another key file".

jwtproxy is configured only with ``discovery`` = the provider's
``/.well-known/openid-configuration``; every token comes from the provider's token endpoint.
Most tests run an in-process worker built by ``worker.build_worker``, as the daemon's are (the real
``KeyManager`` fetching over HTTP, refetching on an unknown ``kid``, evicting cached verdicts on a
key change); two tests run the real daemon, ``python -m jwtproxy serve -c FILE``, and one the
``jwtproxy verify`` command.

Skips (never fails) when node, npm or node_modules are missing: see ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from helpers import Backend, RunningGateway, header_values  # tests/ is on sys.path (tests/conftest.py)

INTEROP_DIR = Path(__file__).resolve().parent
REPO_ROOT = INTEROP_DIR.parent.parent
PROVIDER_JS = INTEROP_DIR / "provider.js"

RESOURCE = "https://api.jwtproxy.test"  # the resource indicator provider.js serves
AUDIENCE = "api"
MERCHANT = ("merchant-app", "merchant-app-secret-0123456789abcdef")  # payments:read payments:write, role merchant
REPORTING = ("reporting-app", "reporting-app-secret-0123456789abcdef")  # payments:read only, role auditor

# The algorithms the issue asks about. oidc-provider 8.x signs JWT access tokens with any of them
# (its enabledJWA defaults: RS256, PS256, ES256, EdDSA); a provider that lacks one skips it.
ALGORITHMS = ["RS256", "PS256", "ES256", "EdDSA"]

pytestmark = pytest.mark.usefixtures("node_executable")


# --------------------------------------------------------------------------- keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int, length: int | None = None) -> str:
    return _b64(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


@dataclass
class ProviderKey:
    """A signing key handed to the provider (private JWK) and usable here to mint tokens."""

    kid: str
    alg: str
    private: Any
    publish_alg: bool = True  # False: the JWK has no "alg" member (the provider infers it)
    use: str = "sig"
    jwk_alg: str | None = None  # the JWK "alg" member when it differs from the JWS alg (RSA-OAEP)

    @classmethod
    def generate(cls, alg: str, kid: str, publish_alg: bool = True, use: str = "sig",
                 jwk_alg: str | None = None) -> ProviderKey:
        private: Any
        if alg[:2] in ("RS", "PS"):
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(alg)
        return cls(kid, alg, private, publish_alg, use, jwk_alg)

    def private_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": self.kid, "use": self.use}
        if self.publish_alg:
            jwk["alg"] = self.jwk_alg or self.alg
        key = self.private
        if isinstance(key, rsa.RSAPrivateKey):
            rn = key.private_numbers()
            jwk.update(kty="RSA", n=_int(rn.public_numbers.n), e=_int(rn.public_numbers.e), d=_int(rn.d),
                       p=_int(rn.p), q=_int(rn.q), dp=_int(rn.dmp1), dq=_int(rn.dmq1), qi=_int(rn.iqmp))
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            en = key.private_numbers()
            jwk.update(kty="EC", crv="P-256", x=_int(en.public_numbers.x, 32), y=_int(en.public_numbers.y, 32),
                       d=_int(en.private_value, 32))
        else:
            raw_private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            raw_public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            jwk.update(kty="OKP", crv="Ed25519", x=_b64(raw_public), d=_b64(raw_private))
        return jwk

    def sign(self, signing_input: bytes) -> bytes:
        key = self.private
        if self.alg == "RS256":
            return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        if self.alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return key.sign(signing_input, pss, hashes.SHA256())
        if self.alg == "ES256":
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return key.sign(signing_input)  # Ed25519

    def mint(self, header: dict[str, Any], payload: dict[str, Any]) -> str:
        """A compact JWS over exactly these header and payload members."""
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}".encode()
        return f"{signing_input.decode()}.{_b64(self.sign(signing_input))}"


def decode_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def free_port() -> int:
    """A loopback port that was free a moment ago (for a process that must bind it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the provider


class ProviderProcess:
    """``node provider.js`` on loopback; ``start`` again (same port) after ``stop`` = restart.
    ``flags`` are extra provider.js options (e.g. ``--introspection``)."""

    def __init__(self, node: str, workdir: Path, flags: tuple[str, ...] = ()) -> None:
        self.node = node
        self.workdir = workdir
        self.flags = flags
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def start(self, keys: list[ProviderKey], alg: str, port: int | None = None) -> ProviderProcess:
        if port is not None:
            self.port = port
        self.starts += 1
        keys_file = self.workdir / f"provider-keys-{self.starts}.json"
        keys_file.write_text(json.dumps({"keys": [k.private_jwk() for k in keys]}))
        stderr = open(self.workdir / f"provider-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [self.node, str(PROVIDER_JS), "--port", str(self.port), "--keys", str(keys_file), "--alg", alg,
             *self.flags],
            cwd=INTEROP_DIR, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
        )
        stderr.close()
        line = self._read_line(timeout=20.0)
        try:
            ready = json.loads(line)
        except ValueError:
            ready = {}
        if not ready.get("ready"):
            self.stop()
            raise AssertionError(f"provider.js did not start: {line!r}\n{self.log()}")
        self.port = int(ready["port"])
        return self

    def _read_line(self, timeout: float) -> str:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return ""
        fd = proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace").strip()

    def log(self) -> str:
        return (self.workdir / f"provider-{self.starts}.log").read_text(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def token(self, client: tuple[str, str] = MERCHANT, scope: str = "payments:read payments:write",
              resource: str = RESOURCE) -> str:
        """An access token from the token endpoint (client_credentials grant)."""
        form = {"grant_type": "client_credentials", "scope": scope, "resource": resource}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if client == REPORTING:  # registered with client_secret_post
            form.update(client_id=client[0], client_secret=client[1])
        else:  # client_secret_basic (RFC 6749 §2.3.1: form-urlencoded id and secret)
            basic = f"{urllib.parse.quote(client[0])}:{urllib.parse.quote(client[1])}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(basic).decode()
        request = urllib.request.Request(
            f"{self.issuer}/token", data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"token endpoint: HTTP {exc.code} {exc.read()!r}") from None
        if body.get("token_type") != "Bearer" or "access_token" not in body:
            raise AssertionError(f"token endpoint answered {body!r}")
        return str(body["access_token"])

    def get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.issuer}{path}", timeout=10) as response:
            return dict(json.loads(response.read()))

    def stats(self) -> dict[str, int]:
        """Requests per path since this provider process started (provider.js test endpoint)."""
        return dict(self.get_json("/__test/stats")["counts"])


@pytest.fixture
def provider(node_executable: str, tmp_path: Path) -> Iterator[ProviderProcess]:
    proc = ProviderProcess(node_executable, tmp_path)
    yield proc
    proc.stop()


# --------------------------------------------------------------------------- the gateway


def gateway_config(backend_port: int, issuer: str, *, typ: tuple[str, ...] = (),
                   cache_size: int = 10000, parser: str = "httptools", **issuer_settings: Any) -> dict[str, Any]:
    """jwtproxy config for one issuer found by discovery, with scope and claim routes."""
    return {
        "server": {"listen": ["127.0.0.1:0"], "access_log": False, "http_parser": parser},
        "admin": {"listen": ""},
        "token": {"cache_size": cache_size},
        "upstream": {"backend": {"targets": [f"http://127.0.0.1:{backend_port}"]}},
        "issuer": [{
            "name": "oidc",
            "issuer": issuer,
            "discovery": f"{issuer}/.well-known/openid-configuration",
            "audiences": [AUDIENCE],
            "required_claims": ["exp", "sub"],
            "typ": list(typ),
            **issuer_settings,
        }],
        "route": [
            {"path_prefix": "/", "upstream": "backend"},
            {"path_prefix": "/payments", "upstream": "backend", "require_scopes": ["payments:read"]},
            {"path_prefix": "/payments/refunds", "upstream": "backend", "require_scopes": ["payments:write"]},
            {"path_prefix": "/merchants", "upstream": "backend", "require_claims": {"role": ["merchant"]}},
        ],
    }


class LiveGateway(RunningGateway):
    """A worker from ``build_worker`` (as the daemon builds it) on a loopback port, with its key
    manager's log lines collected in ``log_lines``; revocations live in memory."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.log_lines: list[str] = []
        super().__init__(data, key_log=self.log_lines.append)

    def status(self) -> dict[str, Any]:
        return dict(self.keys.status()["oidc"])


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = await Backend().start()
    yield server
    await server.stop()


@pytest.fixture
async def gateways() -> AsyncIterator[list[LiveGateway]]:
    started: list[LiveGateway] = []
    yield started
    for gw in started:
        await gw.stop()


async def live_gateway(started: list[LiveGateway], data: dict[str, Any]) -> LiveGateway:
    gw = LiveGateway(data)
    started.append(gw)
    return await gw.start()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


async def call(port: int, path: str, token: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", headers=sent) as response:
            raw = await response.read()
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, body)


def id_token_shaped(key: ProviderKey, issuer: str) -> str:
    """An OpenID Connect ID Token as oidc-provider would shape it (typ "JWT"), signed with the
    provider's own key, with the same iss and aud as the access tokens: only ``typ`` (and the ID
    token claims) tell it apart from an access token (RFC 9068 §4, RFC 8725 §3.11)."""
    now = int(time.time())
    header = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
    payload = {"iss": issuer, "sub": MERCHANT[0], "aud": AUDIENCE, "iat": now, "exp": now + 600,
               "auth_time": now, "nonce": "n-0S6_WzA2Mj", "at_hash": "77QmUPtjPfzWtF2AnpK9RQ",
               "role": "merchant", "scope": "payments:read payments:write"}
    return key.mint(header, payload)


# --------------------------------------------------------------------------- 1. discovery end to end


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_discovery_token_reaches_backend_with_identity(
    parser: str, provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    key = ProviderKey.generate("RS256", "idp-rs256")
    provider.start([key], "RS256")
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, parser=parser))
    assert gw.status()["loaded"], gw.log_lines
    assert gw.status()["kids"] == [key.kid]

    token = provider.token(MERCHANT)
    header, claims = decode_part(token, 0), decode_part(token, 1)
    # What the provider really issued (RFC 9068): checked so the test means what it says.
    assert header["typ"] == "at+jwt" and header["kid"] == key.kid and header["alg"] == "RS256"
    assert claims["iss"] == provider.issuer and claims["aud"] == AUDIENCE
    assert claims["sub"] == MERCHANT[0] and claims["client_id"] == MERCHANT[0]
    assert claims["role"] == "merchant" and claims["scope"] == "payments:read payments:write"

    # A client-supplied identity header must not survive next to the verified one.
    reply = await call(gw.port, "/payments/refunds/42", token, headers={"x-user-role": "admin"})
    assert reply.status == 200, reply
    seen = backend.seen[-1]
    assert seen["path"] == "/payments/refunds/42"
    assert header_values(seen, "x-user-id") == [MERCHANT[0]]
    assert header_values(seen, "x-user-role") == ["merchant"]
    assert header_values(seen, "x-scope") == ["payments:read payments:write"]
    assert header_values(seen, "authorization") == [f"Bearer {token}"]  # forward_token default

    # The real role claim drives require_claims: reporting-app is an auditor, not a merchant.
    assert (await call(gw.port, "/merchants/1", token)).status == 200
    auditor = provider.token(REPORTING, scope="payments:read")
    denied = await call(gw.port, "/merchants/1", auditor)
    assert denied.status == 403 and denied.body["error"] == "insufficient_scope"

    # No token, and a token for another issuer's audience, never reach the backend.
    before = len(backend.seen)
    assert (await call(gw.port, "/payments/1")).status == 401
    foreign = key.mint({"alg": "RS256", "typ": "at+jwt", "kid": key.kid},
                       {**claims, "aud": "https://other.example", "jti": "foreign-aud"})
    wrong_aud = await call(gw.port, "/payments/1", foreign)
    assert wrong_aud.status == 401 and wrong_aud.body["error_description"] == "audience not allowed"
    assert len(backend.seen) == before


# --------------------------------------------------------------------------- 2. typ = at+jwt


async def test_typ_at_jwt_accepts_access_tokens_and_rejects_id_token_shape(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    key = ProviderKey.generate("RS256", "idp-typ")
    provider.start([key], "RS256")
    strict = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))
    lax = await live_gateway(gateways, gateway_config(backend.port, provider.issuer))

    access = provider.token(MERCHANT)
    assert (await call(strict.port, "/payments/1", access)).status == 200

    id_token = id_token_shaped(key, provider.issuer)
    # Control: the same token passes every other check (signature, iss, aud, exp) ...
    assert (await call(lax.port, "/payments/1", id_token)).status == 200
    # ... so its rejection under typ = ["at+jwt"] is the typ check and nothing else.
    before = len(backend.seen)
    reply = await call(strict.port, "/payments/1", id_token)
    assert reply.status == 401
    assert reply.body == {"error": "invalid_token", "error_description": "token type not allowed"}
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    # No typ header at all is not an access token either.
    claims = decode_part(access, 1)
    untyped = key.mint({"alg": "RS256", "kid": key.kid}, {**claims, "jti": "untyped"})
    assert (await call(strict.port, "/payments/1", untyped)).status == 401
    assert len(backend.seen) == before
    # RFC 7515 §4.1.9: "application/at+jwt" is the same media type as "at+jwt" (RFC 9068 §2.1).
    long_form = key.mint({"alg": "RS256", "typ": "application/AT+JWT", "kid": key.kid},
                         {**claims, "jti": "long-form"})
    assert (await call(strict.port, "/payments/1", long_form)).status == 200


# --------------------------------------------------------------------------- 3. scopes


async def test_token_without_write_scope_is_403_insufficient_scope(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    provider.start([ProviderKey.generate("ES256", "idp-es-scope")], "ES256")
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))

    read_only = provider.token(REPORTING, scope="payments:read")
    assert decode_part(read_only, 1)["scope"] == "payments:read"
    # The merchant client asking for less also gets less: scopes are what was granted.
    merchant_read = provider.token(MERCHANT, scope="payments:read")
    assert decode_part(merchant_read, 1)["scope"] == "payments:read"

    ok = await call(gw.port, "/payments/7", read_only)
    assert ok.status == 200
    assert header_values(backend.seen[-1], "x-scope") == ["payments:read"]
    assert header_values(backend.seen[-1], "x-user-role") == ["auditor"]

    before = len(backend.seen)
    for token in (read_only, merchant_read):
        reply = await call(gw.port, "/payments/refunds/7", token)
        assert reply.status == 403
        assert reply.body["error"] == "insufficient_scope"
        www = reply.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in www and 'scope="payments:write"' in www
    assert len(backend.seen) == before

    writer = provider.token(MERCHANT, scope="payments:read payments:write")
    assert (await call(gw.port, "/payments/refunds/7", writer)).status == 200


# --------------------------------------------------------------------------- 4. rotation


async def test_rotation_new_key_after_one_refetch_removed_key_rejected(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    old = ProviderKey.generate("RS256", "rotation-old")
    provider.start([old], "RS256")
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))
    old_seen = provider.token(MERCHANT)
    old_unseen = provider.token(MERCHANT)  # never presented before the rotation: no cached verdict
    assert (await call(gw.port, "/payments/1", old_seen)).status == 200
    assert gw.status()["kids"] == [old.kid]

    # The provider restarts on the same issuer URL with a new key; the old key is gone.
    new = ProviderKey.generate("RS256", "rotation-new")
    provider.stop()
    provider.start([new], "RS256", port=provider.port)
    assert provider.stats() == {}
    new_token = provider.token(MERCHANT)
    assert decode_part(new_token, 0)["kid"] == new.kid

    # Many concurrent requests with the new kid share one refetch.
    replies = await asyncio.gather(*(call(gw.port, f"/payments/{i}", new_token) for i in range(20)))
    assert [r.status for r in replies] == [200] * 20
    assert header_values(backend.seen[-1], "x-user-id") == [MERCHANT[0]]
    assert gw.status()["kids"] == [new.kid]

    # Tokens of the removed key: rejected, the cached verdict included (evicted on the change).
    before = len(backend.seen)
    for token in [old_seen, old_unseen] * 5:
        reply = await call(gw.port, "/payments/1", token)
        assert reply.status == 401
        assert reply.body["error_description"] == "unknown key"
    assert len(backend.seen) == before
    # And the new key keeps working, from the cache and freshly.
    assert (await call(gw.port, "/payments/2", new_token)).status == 200
    assert (await call(gw.port, "/payments/3", provider.token(MERCHANT))).status == 200

    # One refetch in all (discovery + JWKS), not one per request or per unknown kid.
    stats = provider.stats()
    assert stats.get("/.well-known/openid-configuration") == 1, stats
    assert stats.get("/jwks") == 1, stats


async def test_rotation_with_overlap_keeps_old_tokens_valid(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    """The usual graceful rotation: the new key signs, the old one stays published a while."""
    old = ProviderKey.generate("ES256", "overlap-old")
    provider.start([old], "ES256")
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))
    old_seen, old_unseen = provider.token(MERCHANT), provider.token(MERCHANT)
    assert (await call(gw.port, "/payments/1", old_seen)).status == 200

    new = ProviderKey.generate("ES256", "overlap-new")
    provider.stop()
    provider.start([new, old], "ES256", port=provider.port)
    new_token = provider.token(MERCHANT)
    assert decode_part(new_token, 0)["kid"] == new.kid

    replies = await asyncio.gather(*(call(gw.port, f"/payments/{i}", new_token) for i in range(10)))
    assert [r.status for r in replies] == [200] * 10
    assert gw.status()["kids"] == sorted([new.kid, old.kid])
    for token in (old_seen, old_unseen):
        assert (await call(gw.port, "/payments/2", token)).status == 200
    stats = provider.stats()
    assert stats.get("/.well-known/openid-configuration") == 1 and stats.get("/jwks") == 1, stats


async def test_background_refresh_drops_removed_key_without_any_new_kid(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    """A key the provider withdrew (say, compromised) stops verifying at the next scheduled
    refresh, even if no token with the new kid ever arrives and the old token is cached."""
    old = ProviderKey.generate("RS256", "withdrawn")
    provider.start([old], "RS256")
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, jwks_refresh=1))
    cached = provider.token(MERCHANT)
    assert (await call(gw.port, "/payments/1", cached)).status == 200

    new = ProviderKey.generate("RS256", "replacement")
    provider.stop()
    provider.start([new], "RS256", port=provider.port)
    deadline = time.monotonic() + 10.0
    while gw.status()["kids"] != [new.kid] and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert gw.status()["kids"] == [new.kid], gw.log_lines
    reply = await call(gw.port, "/payments/1", cached)
    assert reply.status == 401 and reply.body["error_description"] == "unknown key"


# --------------------------------------------------------------------------- 5. algorithms


@pytest.mark.parametrize(
    ("alg", "publish_alg"),
    [(alg, True) for alg in ALGORITHMS] + [("RS256", False)],
    ids=ALGORITHMS + ["RS256-jwk-without-alg"],
)
async def test_each_provider_signing_algorithm(
    alg: str, publish_alg: bool, provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    key = ProviderKey.generate(alg, f"idp-{alg.lower()}", publish_alg=publish_alg)
    provider.start([key], alg)
    metadata = provider.get_json("/.well-known/openid-configuration")
    if alg not in metadata.get("id_token_signing_alg_values_supported", []):
        pytest.skip(f"this oidc-provider does not sign with {alg}")
    published = provider.get_json("/jwks")["keys"]
    assert [k["kid"] for k in published] == [key.kid] and "d" not in published[0]

    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))
    assert gw.status()["kids"] == [key.kid], gw.log_lines
    token = provider.token(MERCHANT)
    assert decode_part(token, 0)["alg"] == alg
    reply = await call(gw.port, "/payments/refunds/1", token)
    assert reply.status == 200, reply
    assert header_values(backend.seen[-1], "x-user-id") == [MERCHANT[0]]

    # The signature is really checked for this algorithm: one flipped bit is rejected.
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    forged = f"{head}.{payload}.{_b64(bytes(raw))}"
    bad = await call(gw.port, "/payments/refunds/1", forged)
    assert bad.status == 401 and bad.body["error_description"] == "signature verification failed"


async def test_published_encryption_key_is_skipped(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    """Providers publish encryption keys in the same JWKS (Keycloak does by default): the
    signing key is used, the ``use: enc`` key is skipped with a log line, not an error."""
    encryption = ProviderKey.generate("RS256", "idp-enc", use="enc", jwk_alg="RSA-OAEP")
    signing = ProviderKey.generate("ES256", "idp-sig")
    provider.start([encryption, signing], "ES256")
    published = {k["kid"]: k for k in provider.get_json("/jwks")["keys"]}
    assert published[encryption.kid]["use"] == "enc" and published[signing.kid]["use"] == "sig"

    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, typ=("at+jwt",)))
    status = gw.status()
    assert status["loaded"] and status["kids"] == [signing.kid], gw.log_lines
    assert any(encryption.kid in line for line in gw.log_lines), gw.log_lines
    assert (await call(gw.port, "/payments/1", provider.token(MERCHANT))).status == 200
    # A token naming the encryption key's kid is never verified with it.
    claims = decode_part(provider.token(MERCHANT), 1)
    misuse = encryption.mint({"alg": "RS256", "typ": "at+jwt", "kid": encryption.kid}, {**claims, "jti": "enc"})
    reply = await call(gw.port, "/payments/1", misuse)
    assert reply.status == 401


def test_cli_verify_against_provider(provider: ProviderProcess, tmp_path: Path) -> None:
    """``jwtproxy verify`` fetches the keys by discovery and shows the headers it would inject."""
    provider.start([ProviderKey.generate("EdDSA", "cli-eddsa")], "EdDSA")
    config = tmp_path / "verify.toml"
    config.write_text(f"""
[[issuer]]
name = "oidc"
issuer = "{provider.issuer}"
discovery = "{provider.discovery}"
audiences = ["{AUDIENCE}"]
typ = ["at+jwt"]

[[route]]
path_prefix = "/payments/refunds"
upstream = "payments"
require_scopes = ["payments:write"]

[upstream.payments]
targets = ["http://127.0.0.1:9"]

[revocation]
sqlite_path = "{tmp_path / 'revocations.db'}"
""")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    def verify(token: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, "-m", "jwtproxy", "verify", "-c", str(config), "--route", "/payments/refunds", token],
            capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env,
        )
        return done.returncode, json.loads(done.stdout)

    code, verdict = verify(provider.token(MERCHANT))
    assert code == 0 and verdict["verdict"] == "valid", verdict
    assert verdict["headers"] == {"x-user-id": MERCHANT[0], "x-user-role": "merchant",
                                  "x-scope": "payments:read payments:write"}
    code, verdict = verify(provider.token(REPORTING, scope="payments:read"))
    assert code == 1 and verdict["status"] == 403 and verdict["label"] == "insufficient_scope", verdict


# --------------------------------------------------------------------------- 6. provider down


async def test_provider_down_existing_keys_keep_working(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    key = ProviderKey.generate("ES256", "idp-outage")
    provider.start([key], "ES256")
    # cache_size 0: every request really verifies the signature with the kept keys.
    gw = await live_gateway(gateways, gateway_config(backend.port, provider.issuer, cache_size=0))
    tokens = [provider.token(MERCHANT) for _ in range(3)]
    assert (await call(gw.port, "/payments/1", tokens[0])).status == 200

    provider.stop()
    assert (await call(gw.port, "/payments/2", tokens[1])).status == 200

    # An unknown kid while the provider is down: the refetch fails, the token is rejected ...
    stranger = ProviderKey.generate("ES256", "not-published")
    claims = decode_part(tokens[0], 1)
    reply = await call(gw.port, "/payments/3", stranger.mint({"alg": "ES256", "typ": "at+jwt", "kid": stranger.kid},
                                                             {**claims, "jti": "stranger"}))
    assert reply.status == 401 and reply.body["error_description"] == "unknown key"
    status = gw.status()
    assert status["last_error"], gw.log_lines  # the failed refetch is on record ...
    assert status["loaded"] and status["kids"] == [key.kid]  # ... and removed no key
    # ... and the last good keys still verify tokens never seen before.
    assert (await call(gw.port, "/payments/4", tokens[2])).status == 200
    assert (await call(gw.port, "/payments/5", tokens[1])).status == 200


async def _until_status(port: int, path: str, token: str, wanted: int, timeout: float) -> Reply:
    deadline = time.monotonic() + timeout
    while True:
        reply = await call(port, path, token)
        if reply.status == wanted or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.2)


async def test_started_while_provider_down_503_then_200(
    provider: ProviderProcess, backend: Backend, gateways: list[LiveGateway]
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    key = ProviderKey.generate("RS256", "idp-late")
    gw = await live_gateway(gateways, gateway_config(backend.port, issuer, typ=("at+jwt",)))
    assert not gw.status()["loaded"] and gw.status()["last_error"]

    early = key.mint({"alg": "RS256", "typ": "at+jwt", "kid": key.kid},
                     {"iss": issuer, "aud": AUDIENCE, "sub": MERCHANT[0], "exp": int(time.time()) + 600})
    before = len(backend.seen)
    reply = await call(gw.port, "/payments/1", early)
    assert reply.status == 503
    assert int(reply.headers["retry-after"]) > 0
    assert len(backend.seen) == before

    provider.start([key], "RS256", port=port)
    token = provider.token(MERCHANT)
    # The KeyManager retries with backoff (1 s, 2 s, ...): the provider is up within the first.
    reply = await _until_status(gw.port, "/payments/1", token, 200, timeout=15.0)
    assert reply.status == 200, (reply, gw.log_lines)
    assert header_values(backend.seen[-1], "x-user-role") == ["merchant"]
    assert gw.status()["kids"] == [key.kid]


# --------------------------------------------------------------------------- the real daemon


class Daemon:
    """``python -m jwtproxy serve -c FILE`` in a subprocess (supervisor + one worker + admin)."""

    def __init__(self, tmp: Path, config_text: str, admin_port: int) -> None:
        self.tmp = tmp
        self.admin_port = admin_port
        config = tmp / "jwtproxy.toml"
        config.write_text(config_text)
        self.stderr_path = tmp / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "JWTPROXY_CONFIG"):
            env.pop(name, None)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)],
                cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
            )

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def admin(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
        except (urllib.error.URLError, ConnectionError):
            return 0, None

    async def wait_admin(self, path: str, wanted: int, timeout: float) -> tuple[int, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.admin(path)
            if status == wanted or time.monotonic() > deadline or self.proc.poll() is not None:
                return status, body
            await asyncio.sleep(0.1)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """After a failed test: our daemon and its workers, by pid."""
        if self.proc.poll() is None:
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()


def daemon_config(tmp: Path, issuer: str, listen_port: int, admin_port: int, backend_port: int) -> str:
    return f"""
[server]
listen = ["127.0.0.1:{listen_port}"]
workers = 1
access_log = false
shutdown_timeout = 2

[admin]
listen = "127.0.0.1:{admin_port}"

[[issuer]]
name = "oidc"
issuer = "{issuer}"
discovery = "{issuer}/.well-known/openid-configuration"
audiences = ["{AUDIENCE}"]
typ = ["at+jwt"]
required_claims = ["exp", "sub"]

[[route]]
path_prefix = "/payments"
upstream = "payments"
require_scopes = ["payments:write"]

[upstream.payments]
targets = ["http://127.0.0.1:{backend_port}"]

[revocation]
sqlite_path = "{tmp / 'revocations.db'}"
"""


@pytest.mark.slow
async def test_daemon_with_discovery_503_until_provider_up_then_200(
    provider: ProviderProcess, backend: Backend, tmp_path: Path
) -> None:
    provider_port, listen_port, admin_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{provider_port}"
    config = daemon_config(tmp_path, issuer, listen_port, admin_port, backend.port)
    daemon = Daemon(tmp_path, config, admin_port)
    try:
        status, _ = await daemon.wait_admin("/healthz", 200, timeout=15.0)
        assert status == 200, daemon.log()
        # Started while the provider is down: not ready, and tokens get 503, not 401.
        status, body = daemon.admin("/readyz")
        assert status == 503, body
        key = ProviderKey.generate("PS256", "daemon-ps256")
        early = key.mint({"alg": "PS256", "typ": "at+jwt", "kid": key.kid},
                         {"iss": issuer, "aud": AUDIENCE, "sub": MERCHANT[0], "scope": "payments:write",
                          "exp": int(time.time()) + 600})
        reply = await call(listen_port, "/payments/1", early)
        assert reply.status == 503 and "retry-after" in reply.headers, (reply, daemon.log())

        provider.start([key], "PS256", port=provider_port)
        status, body = await daemon.wait_admin("/readyz", 200, timeout=15.0)
        assert status == 200, (body, daemon.log())

        token = provider.token(MERCHANT)
        reply = await call(listen_port, "/payments/refunds", token)
        assert reply.status == 200, (reply, daemon.log())
        seen = backend.seen[-1]
        assert header_values(seen, "x-user-id") == [MERCHANT[0]]
        assert header_values(seen, "x-user-role") == ["merchant"]
        assert header_values(seen, "x-scope") == ["payments:read payments:write"]
        read_only = provider.token(REPORTING, scope="payments:read")
        assert (await call(listen_port, "/payments/refunds", read_only)).status == 403

        assert daemon.stop() == 0, daemon.log()
        assert token not in daemon.log() and early not in daemon.log()  # tokens never logged
    finally:
        daemon.kill()


@pytest.mark.slow
async def test_daemon_reload_while_provider_down_keeps_working_keys(
    provider: ProviderProcess, backend: Backend, tmp_path: Path
) -> None:
    key = ProviderKey.generate("RS256", "daemon-reload")
    provider.start([key], "RS256")
    listen_port, admin_port = free_port(), free_port()
    daemon = Daemon(tmp_path, daemon_config(tmp_path, provider.issuer, listen_port, admin_port, backend.port),
                    admin_port)
    try:
        status, body = await daemon.wait_admin("/readyz", 200, timeout=15.0)
        assert status == 200, (body, daemon.log())
        tokens = [provider.token(MERCHANT) for _ in range(2)]
        assert (await call(listen_port, "/payments/refunds", tokens[0])).status == 200

        provider.stop()  # the IdP is down ...
        daemon.proc.send_signal(signal.SIGHUP)  # ... when the operator reloads the config
        deadline = time.monotonic() + 15.0
        while '"reload_done"' not in daemon.log() and '"reload_failed"' not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let the old generation finish draining

        # The keys the daemon had must keep working (contract: a failed refresh keeps the last
        # good keys; a reload fails no request).
        reply = await call(listen_port, "/payments/refunds", tokens[1])
        assert reply.status == 200, (reply, daemon.log())
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()
