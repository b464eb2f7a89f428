"""introspection: the RFC 7662 client -- the verdict on a response, the cache, single flight,
fail-closed handling of every way the endpoint can fail, TLS with a private CA.

The endpoint is a local aiohttp server whose answer each test sets; the wall clock is injected
where a test is about cache lifetimes, so no test sleeps to see an entry expire.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import AppServer

from jwtproxy.config import IssuerConfig
from jwtproxy.introspection import (
    INACTIVE,
    IntrospectionEndpoint,
    IntrospectionFailed,
    IntrospectionPolicy,
    Introspector,
    OutcomeCache,
    introspection_verdict,
    parse_response,
    token_digest,
)
from jwtproxy.jose import TokenRejected
from jwtproxy.verifier import IssuerVerifier, Verified

NOW = 1_800_000_000.0
ISS = "https://as.example.com"
TOKEN = "opaque-token-Zm9vYmFyYmF6cXV4"  # what a reference token looks like: no dots


def issuer(**kw: Any) -> IssuerConfig:
    settings: dict[str, Any] = dict(
        name="as", issuer=ISS, jwks_uri="https://as.example.com/jwks", audiences=("api",),
        required_claims=("exp", "sub"),
    )
    settings.update(kw)
    return IssuerConfig(**settings)


CHECKS = IssuerVerifier(issuer(), None)
API = frozenset({"api"})


def active(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "active": True, "sub": "user-1", "client_id": "app", "scope": "read write",
        "exp": NOW + 600, "iat": NOW - 5, "iss": ISS, "aud": "api", "token_type": "Bearer",
    }
    body.update(kw)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


def rejected(response: dict[str, Any], reason: str, description: str, **kw: Any) -> None:
    with pytest.raises(TokenRejected) as info:
        introspection_verdict(response, CHECKS, NOW, **kw)
    assert (info.value.reason, info.value.description) == (reason, description)


# ----------------------------------------------------------------------------- sans-I/O verdict


def test_active_response_gives_the_jwt_verdict_shape() -> None:
    verified = introspection_verdict(active(role="admin"), CHECKS, NOW, audiences=API)
    assert isinstance(verified, Verified)
    assert verified.issuer.name == "as"
    assert verified.sub == "user-1" and verified.exp == NOW + 600 and verified.iat == NOW - 5
    assert verified.audience == frozenset({"api"})
    assert verified.claims["role"] == "admin" and verified.claims["client_id"] == "app"


def test_inactive_is_a_rejection() -> None:
    rejected({"active": False}, "token_inactive", "token is not active")
    rejected({"active": False, "sub": "user-1", "exp": NOW + 600}, "token_inactive", "token is not active")


@pytest.mark.parametrize("response", [
    {}, {"active": "true"}, {"active": 1}, {"active": None}, {"sub": "user-1", "exp": NOW + 600},
    {"active": [True]},
])
def test_active_that_is_not_exactly_a_boolean_is_an_endpoint_failure(response: dict[str, Any]) -> None:
    with pytest.raises(IntrospectionFailed, match="no boolean active member"):
        introspection_verdict({**response}, CHECKS, NOW)


@pytest.mark.parametrize("token_type", ["refresh_token", "Refresh_Token", "REFRESH_TOKEN"])
def test_refresh_tokens_are_refused(token_type: str) -> None:
    rejected(active(token_type=token_type), "bad_token_type", "refresh tokens are not accepted")


def test_token_type_must_be_a_string_when_present() -> None:
    rejected(active(token_type=7), "bad_claim", "token_type is not a string")
    rejected(active(token_type=None), "bad_claim", "token_type is not a string")
    # Absent, Bearer and DPoP are all access tokens.
    for kind in (DROP, "Bearer", "DPoP", "access_token"):
        assert introspection_verdict(active(token_type=kind), CHECKS, NOW).sub == "user-1"


def test_iss_when_present_must_equal_the_issuer() -> None:
    rejected(active(iss="https://other.example.com"), "issuer_not_allowed", "issuer not allowed")
    rejected(active(iss=ISS + "/"), "issuer_not_allowed", "issuer not allowed")
    rejected(active(iss=None), "issuer_not_allowed", "issuer not allowed")
    assert introspection_verdict(active(iss=DROP), CHECKS, NOW).sub == "user-1"


def test_audience_is_optional_but_checked_when_present() -> None:
    assert introspection_verdict(active(aud=DROP), CHECKS, NOW, audiences=API).audience is None
    assert introspection_verdict(active(aud=["x", "api"]), CHECKS, NOW, audiences=API).sub == "user-1"
    rejected(active(aud="other"), "audience_not_allowed", "audience not allowed", audiences=API)
    rejected(active(aud=["x", "y"]), "audience_not_allowed", "audience not allowed", audiences=API)
    rejected(active(aud=[]), "audience_not_allowed", "audience not allowed", audiences=API)
    rejected(active(aud=None), "bad_claim", "aud claim is not a string or array of strings", audiences=API)
    rejected(active(aud=["api", 3]), "bad_claim", "aud claim is not a string or array of strings")
    rejected(active(aud={"api": 1}), "bad_claim", "aud claim is not a string or array of strings")


def test_audience_membership_can_be_left_to_the_caller() -> None:
    verified = introspection_verdict(active(aud="other"), CHECKS, NOW, audiences=None)
    assert verified.audience == frozenset({"other"})


@pytest.mark.parametrize(("members", "reason", "description"), [
    ({"exp": DROP}, "missing_claim", "required claim missing: exp"),
    ({"exp": str(NOW + 600)}, "bad_claim", "exp claim is not a number"),
    ({"exp": True}, "bad_claim", "exp claim is not a number"),
    ({"exp": float("inf")}, "bad_claim", "exp claim is not a number"),
    ({"exp": 10**400}, "bad_claim", "exp claim is not a number"),
    ({"exp": NOW - 31}, "expired", "token expired"),
    ({"nbf": NOW + 31}, "not_yet_valid", "token not yet valid"),
    ({"nbf": "0"}, "bad_claim", "nbf claim is not a number"),
    ({"iat": NOW + 31}, "issued_in_future", "token issued in the future"),
    ({"iat": [1]}, "bad_claim", "iat claim is not a number"),
    ({"sub": ""}, "bad_claim", "sub claim is not a non-empty string"),
    ({"sub": 42}, "bad_claim", "sub claim is not a non-empty string"),
    ({"sub": DROP}, "missing_claim", "required claim missing: sub"),
    ({"jti": ""}, "bad_claim", "jti claim is not a non-empty string"),
])
def test_claim_rules_are_the_jwt_rules(members: dict[str, Any], reason: str, description: str) -> None:
    rejected(active(**members), reason, description)


def test_required_claims_and_max_lifetime_come_from_the_issuer() -> None:
    checks = IssuerVerifier(issuer(required_claims=("exp", "sub", "tenant"), max_lifetime=300), None)
    with pytest.raises(TokenRejected, match="required claim missing: tenant"):
        introspection_verdict(active(exp=NOW + 100, tenant=""), checks, NOW)
    with pytest.raises(TokenRejected, match="lifetime exceeds"):
        introspection_verdict(active(tenant="t1"), checks, NOW)  # exp - iat = 605 > 300
    assert introspection_verdict(active(exp=NOW + 100, tenant="t1"), checks, NOW).sub == "user-1"


@pytest.mark.parametrize(("body", "message"), [
    (b"", "not valid JSON"),
    (b"<html>502 Bad Gateway</html>", "not valid JSON"),
    (b'[{"active": true}]', "JSON list, not an object"),
    (b'"active"', "JSON str, not an object"),
    (b'{"active": true, "active": false}', "duplicate member"),
    (b'{"active": false, "exp": NaN}', "not valid JSON"),
    (b'{"active": true, "exp": Infinity}', "not valid JSON"),
    (b'{"active": true, "sub": "\xff"}', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_a_body_that_is_not_a_json_object_is_an_endpoint_failure(body: bytes, message: str) -> None:
    with pytest.raises(IntrospectionFailed, match=message):
        parse_response(body)


def test_parse_response_keeps_members() -> None:
    assert parse_response(b'{"active": true, "exp": 1e3, "aud": ["a"]}') == {"active": True, "exp": 1000.0, "aud": ["a"]}


# ----------------------------------------------------------------------------- the cache


def test_outcome_cache_is_bounded_lru_and_expires() -> None:
    cache: OutcomeCache[str] = OutcomeCache(3)
    for i in range(3):
        cache.put(bytes([i]) * 32, NOW + 10, f"v{i}")
    assert cache.get(bytes([0]) * 32, NOW) == "v0"  # 0 is now the most recent
    cache.put(bytes([9]) * 32, NOW + 10, "v9")
    assert len(cache) == 3
    assert cache.get(bytes([1]) * 32, NOW) is None  # the least recently used went
    assert cache.get(bytes([0]) * 32, NOW + 9.9) == "v0"
    assert cache.get(bytes([0]) * 32, NOW + 10) is None  # until is exclusive
    assert len(cache) == 2
    with pytest.raises(ValueError):
        OutcomeCache(0)


def test_token_digest_is_sha256() -> None:
    import hashlib

    assert token_digest(TOKEN) == hashlib.sha256(TOKEN.encode()).digest()


# ----------------------------------------------------------------------------- the endpoint


@dataclass
class Endpoint:
    """A local RFC 7662 endpoint: records each request, answers ``answer`` after ``delay``."""

    status: int = 200
    body: bytes | None = None
    answer: dict[str, Any] = field(default_factory=active)
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    server: AppServer | None = None
    port: int = 0
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Endpoint:
        app = web.Application()
        app.router.add_post("/introspect", self._handle)
        self.server = await AppServer(app, ssl_context=ssl_context).start()
        self.port = self.server.port
        self.scheme = "https" if ssl_context else "http"
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/introspect"

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append({
            "content_type": request.headers.get("Content-Type"),
            "authorization": request.headers.get("Authorization"),
            "form": urllib.parse.parse_qs(raw.decode(), keep_blank_values=True, strict_parsing=True),
        })
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(status=self.status, body=self.body, headers=self.headers)
        return web.json_response(self.answer, status=self.status, headers=self.headers)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    server = await Endpoint().start()
    yield server
    await server.close()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., Introspector[Verified]]


@pytest.fixture
async def make(endpoint: Endpoint) -> AsyncIterator[Factory]:
    made: list[Introspector[Verified]] = []

    def factory(url: str | None = None, *, cache_seconds: float = 60.0, ca_file: str = "",
                client_id: str = "jwtproxy", client_secret: str = "s3cret", **kw: Any) -> Introspector[Verified]:
        kw.setdefault("wall_clock", Clock())
        kw.setdefault("log", [].append)
        kw.setdefault("audiences", API)
        target = IntrospectionEndpoint(url or endpoint.url, client_id, client_secret, cache_seconds, ca_file)
        introspector: Introspector[Verified] = Introspector(kw.pop("issuer", issuer()), target, lambda v, digest: v, **kw)
        made.append(introspector)
        return introspector

    yield factory
    for introspector in made:
        await introspector.close()


async def test_request_is_rfc7662_form_with_client_secret_basic(endpoint: Endpoint, make: Factory) -> None:
    # Characters that RFC 6749 §2.3.1 wants form-urlencoded before base64: ':' '%' '+' ' ' non-ASCII.
    intro = make(client_id="rs:1 ü", client_secret="p%ss+w:rd")
    outcome = await intro.introspect(TOKEN)
    assert isinstance(outcome, Verified) and outcome.sub == "user-1"
    [request] = endpoint.requests
    assert request["content_type"] == "application/x-www-form-urlencoded"
    assert request["form"] == {"token": [TOKEN], "token_type_hint": ["access_token"]}
    scheme, _, encoded = request["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    assert user == "rs%3A1%20%C3%BC" and password == "p%25ss%2Bw%3Ard"
    assert (urllib.parse.unquote(user), urllib.parse.unquote(password)) == ("rs:1 ü", "p%ss+w:rd")


async def test_active_outcome_is_cached_until_cache_seconds(endpoint: Endpoint, make: Factory) -> None:
    clock = Clock()
    intro = make(cache_seconds=30, wall_clock=clock)
    digest = token_digest(TOKEN)
    assert intro.cached(digest, NOW) is None
    first = await intro.introspect(TOKEN, digest)
    assert isinstance(first, Verified)
    assert intro.cached(digest, NOW + 29.9) is first
    assert len(endpoint.requests) == 1
    assert intro.cached(digest, NOW + 30) is None  # introspection_cache ended: ask again
    clock.now = NOW + 30
    assert isinstance(await intro.introspect(TOKEN, digest), Verified)
    assert len(endpoint.requests) == 2


async def test_active_outcome_is_never_cached_past_exp(endpoint: Endpoint, make: Factory) -> None:
    endpoint.answer = active(exp=NOW + 5)
    intro = make(cache_seconds=600)
    digest = token_digest(TOKEN)
    assert isinstance(await intro.introspect(TOKEN, digest), Verified)
    # exp + leeway (30 s) is the end, as for a JWT verdict: 35 s, not 600 s.
    assert intro.cached(digest, NOW + 34.9) is not None
    assert intro.cached(digest, NOW + 35) is None


async def test_inactive_outcome_is_cached_ten_seconds(endpoint: Endpoint, make: Factory) -> None:
    endpoint.answer = {"active": False}
    clock = Clock()
    intro = make(wall_clock=clock)
    digest = token_digest(TOKEN)
    assert await intro.introspect(TOKEN, digest) is INACTIVE
    assert intro.cached(digest, NOW + 9.9) is INACTIVE
    assert intro.cached(digest, NOW + 10) is None
    clock.now = NOW + 10
    endpoint.answer = active()  # the AS changed its mind (it may: a token not yet valid)
    assert isinstance(await intro.introspect(TOKEN, digest), Verified)
    assert len(endpoint.requests) == 2


async def test_rejected_active_outcome_is_cached_like_an_inactive_one(endpoint: Endpoint, make: Factory) -> None:
    endpoint.answer = active(aud="other")
    intro = make()
    digest = token_digest(TOKEN)
    outcome = await intro.introspect(TOKEN, digest)
    assert isinstance(outcome, TokenRejected) and outcome.reason == "audience_not_allowed"
    assert intro.cached(digest, NOW + 9) is outcome
    assert intro.cached(digest, NOW + 10) is None


async def test_outcomes_hold_no_traceback_and_so_no_token(endpoint: Endpoint, make: Factory) -> None:
    # A raised exception keeps the frames it passed through (and their locals: the token); one
    # instance raised again and again grows its traceback each time. Outcomes must be neither.
    intro = make()
    endpoint.answer = {"active": False}
    for i in range(3):
        assert await intro.introspect(f"{TOKEN}-{i}") is INACTIVE
    assert INACTIVE.__traceback__ is None
    endpoint.answer = active(aud="other")
    rejection = await intro.introspect(TOKEN + "-aud")
    assert isinstance(rejection, TokenRejected) and rejection.__traceback__ is None
    assert rejection.__context__ is None
    endpoint.status = 500
    failure = await intro.introspect(TOKEN + "-down")
    assert isinstance(failure, IntrospectionFailed) and failure.__traceback__ is None


async def test_concurrent_requests_share_one_call(endpoint: Endpoint, make: Factory) -> None:
    endpoint.gate = asyncio.Event()
    counted: list[str] = []
    intro = make(on_result=lambda name, result: counted.append(result))
    waiters = [intro.introspect(TOKEN) for _ in range(50)]
    other = intro.introspect(TOKEN + "x")  # another token: its own call
    await asyncio.sleep(0.05)
    assert intro.in_flight == 2
    endpoint.gate.set()
    outcomes = await asyncio.gather(*waiters, other)
    assert len(endpoint.requests) == 2 and intro.calls == 2
    assert all(o is outcomes[0] for o in outcomes[:50])  # one verdict object for all 50
    assert counted.count("shared") == 49 and counted.count("active") == 2
    assert intro.in_flight == 0


async def test_a_waiter_that_goes_away_does_not_cancel_the_call(endpoint: Endpoint, make: Factory) -> None:
    endpoint.gate = asyncio.Event()
    intro = make()
    first = intro.introspect(TOKEN)
    second = intro.introspect(TOKEN)
    await asyncio.sleep(0.05)
    first.cancel()
    endpoint.gate.set()
    assert isinstance(await second, Verified)
    assert intro.cached(token_digest(TOKEN), NOW) is not None


async def _failure(intro: Introspector[Verified], token: str = TOKEN) -> str:
    outcome = await intro.introspect(token)
    assert isinstance(outcome, IntrospectionFailed), outcome
    assert intro.cached(token_digest(token), NOW) is None  # never cached
    return str(outcome)


@pytest.mark.parametrize(("status", "body", "message"), [
    (500, b'{"active": true}', "HTTP 500"),
    (401, b'{"error": "invalid_client"}', "HTTP 401"),
    (302, b"", "HTTP 302"),
    (200, b"<html>maintenance</html>", "not valid JSON"),
    (200, b'{"active": "yes"}', "no boolean active member"),
    (200, b'["active"]', "not an object"),
    (200, b'{"active": true, "x": "' + b"a" * 70_000 + b'"}', "exceeds 65536 bytes"),
])
async def test_endpoint_failures_are_503_and_never_cached(
    endpoint: Endpoint, make: Factory, status: int, body: bytes, message: str
) -> None:
    endpoint.status, endpoint.body = status, body
    if status == 302:
        endpoint.headers = {"Location": "http://127.0.0.1:1/elsewhere"}
    intro = make()
    assert message in await _failure(intro)
    assert message in await _failure(intro)  # asked again: errors are not remembered
    assert len(endpoint.requests) == 2


async def test_a_body_without_content_length_is_capped_too(endpoint: Endpoint, make: Factory) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b" " * 1024)
        return response

    app = web.Application()
    app.router.add_post("/", chunked)
    async with AppServer(app) as upstream:
        assert "body exceeds 65536 bytes" in await _failure(make(upstream.url + "/"))


async def test_no_answer_within_the_timeout_is_503(endpoint: Endpoint, make: Factory) -> None:
    endpoint.gate = asyncio.Event()  # never set: the endpoint accepts and then says nothing
    intro = make(policy=IntrospectionPolicy(timeout=0.2))
    assert "no answer within 0.2 s" in await _failure(intro)
    assert intro.in_flight == 0
    endpoint.gate.set()


async def test_default_timeout_is_five_seconds() -> None:
    assert IntrospectionPolicy().timeout == 5.0


async def test_unreachable_endpoint_is_503(make: Factory) -> None:
    sock = socket.socket()  # bound, never listening: connections are refused
    sock.bind(("127.0.0.1", 0))
    try:
        intro = make(f"http://127.0.0.1:{sock.getsockname()[1]}/introspect")
        assert "ClientConnectorError" in await _failure(intro)
    finally:
        sock.close()


async def test_too_many_calls_in_flight_is_503_without_a_call(endpoint: Endpoint, make: Factory) -> None:
    endpoint.gate = asyncio.Event()
    intro = make(policy=IntrospectionPolicy(max_inflight=2))
    slow = [intro.introspect(f"token-{i}") for i in range(2)]
    await asyncio.sleep(0.05)
    assert "more than 2 introspection calls in flight" in await _failure(intro, "token-3")
    # ... but a token already in flight still joins its call.
    joined = intro.introspect("token-0")
    endpoint.gate.set()
    assert all(isinstance(o, Verified) for o in await asyncio.gather(*slow, joined))
    assert len(endpoint.requests) == 2


async def test_failures_are_logged_without_the_token_and_rate_limited(endpoint: Endpoint, make: Factory) -> None:
    lines: list[str] = []
    endpoint.status = 503
    intro = make(log=lines.append)
    for _ in range(5):
        await _failure(intro)
    assert len(lines) == 1 and "HTTP 503" in lines[0] and "issuer as" in lines[0]
    endpoint.status = 200
    assert isinstance(await intro.introspect(TOKEN), Verified)
    assert len(lines) == 2 and "answers again" in lines[1]
    assert not any(TOKEN in line or "s3cret" in line for line in lines)


async def test_structured_log_lines_carry_no_token(
    endpoint: Endpoint, make: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.status = 500
    intro = make(log=None)
    await _failure(intro)
    err = capsys.readouterr().err
    assert '"event":"introspection_failed"' in err and "HTTP 500" in err
    assert TOKEN not in err and "s3cret" not in err


async def test_close_cancels_calls_and_refuses_new_ones(endpoint: Endpoint, make: Factory) -> None:
    endpoint.gate = asyncio.Event()
    intro = make()
    waiting = intro.introspect(TOKEN)
    await asyncio.sleep(0.05)
    await intro.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert "closed" in await _failure(intro)
    endpoint.gate.set()


async def test_flood_of_distinct_tokens_stays_bounded(endpoint: Endpoint, make: Factory) -> None:
    endpoint.answer = {"active": False}
    intro = make(policy=IntrospectionPolicy(max_entries=100, max_inflight=16))
    for batch in range(10):
        outcomes = await asyncio.gather(*(intro.introspect(os.urandom(24).hex()) for _ in range(40)))
        assert all(o is INACTIVE or isinstance(o, IntrospectionFailed) for o in outcomes)
        assert len(intro.cache) <= 100 and intro.in_flight == 0
    assert len(intro.cache) == 100
    assert len(endpoint.requests) <= 10 * 16  # the rest were refused before any call


# ----------------------------------------------------------------------------- TLS, ca_file


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[Any, ssl.SSLContext, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, server, str(bundle)


async def test_https_endpoint_of_a_private_ca_needs_ca_file(
    private_ca: tuple[Any, ssl.SSLContext, str], make: Factory, tmp_path: Path
) -> None:
    _, server_ctx, bundle = private_ca
    tls = await Endpoint().start(ssl_context=server_ctx)
    try:
        assert "certificate verify failed" in await _failure(make(tls.url))  # system store only
        other = tmp_path / "other.pem"
        __import__("trustme").CA().cert_pem.write_to_path(str(other))
        assert "certificate verify failed" in await _failure(make(tls.url, ca_file=str(other)))
        outcome = await make(tls.url, ca_file=bundle).introspect(TOKEN)
        assert isinstance(outcome, Verified) and outcome.sub == "user-1"
        assert len(tls.requests) == 1  # the failed handshakes sent nothing
    finally:
        await tls.close()


async def test_an_injected_session_is_used_and_not_closed(endpoint: Endpoint, make: Factory) -> None:
    session = aiohttp.ClientSession()
    try:
        intro = make(session=session)
        assert isinstance(await intro.introspect(TOKEN), Verified)
        await intro.close()
        assert not session.closed
    finally:
        await session.close()
