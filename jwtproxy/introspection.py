"""RFC 7662 token introspection: opaque tokens judged by their issuer, cached in bounded memory.

A token that is not a compact JWS cannot be verified locally; an issuer with an
``introspection_endpoint`` is asked about it instead. This module is the client of that endpoint:
a sans-I/O core (:func:`parse_response`, :func:`introspection_verdict`, :class:`OutcomeCache`)
inside a thin aiohttp shell (:class:`Introspector`).

Theory of operation
-------------------
*The question.* ``POST`` to the endpoint, body ``token=...&token_type_hint=access_token``
(``application/x-www-form-urlencoded``, RFC 7662 §2.1), authenticated with HTTP Basic
``client_id:client_secret``, each part form-urlencoded first (``client_secret_basic``,
RFC 6749 §2.3.1). Redirects are not followed (a redirected POST would carry the credentials
somewhere else). HTTPS is verified against the issuer's ``ca_file`` when one is set (then
*only* against it), else against the system store.

*The answer* is one of three outcomes, and nothing else:

==============================  ===========================================  ==================
what came back                  outcome                                      cached for
==============================  ===========================================  ==================
200, JSON object, ``active``    the verdict the JWT path produces for the    ``introspection_
exactly ``true``, every claim   same claims (:class:`~jwtproxy.verifier.     cache`, never past
rule holds                      Verified`), rendered by the caller           ``exp`` + leeway
200, ``active: false``, or a    :class:`~jwtproxy.jose.TokenRejected`        10 s
claim rule fails                (401 ``invalid_token``)
timeout (5 s), connection       :class:`IntrospectionFailed` (503)           never: the next
error, non-200, a body that                                                  request asks again
is not a JSON object, no                                                     
boolean ``active``, too many                                                 
calls in flight                                                              
==============================  ===========================================  ==================

There is no fourth path: an unexpected exception inside a call is an :class:`IntrospectionFailed`
too, so nothing but an active, fully checked response ever lets a token through (fail closed).

*Claim rules* (:func:`introspection_verdict`) are the JWT verifier's, applied by the same code
(:meth:`jwtproxy.verifier.IssuerVerifier.check_claims`): numeric ``exp``/``nbf``/``iat`` as JSON
numbers that fit a double, ``exp`` required and in the future (with leeway), ``sub``/``jti``
non-empty strings when present, ``required_claims``, ``max_lifetime``. On top of them, for an
introspection response: ``token_type``, when present, is a string and not ``refresh_token``;
``iss``, when present, equals the issuer exactly; ``aud`` is optional (RFC 7662 §2.2), and when
present must name an accepted audience -- the caller may test that membership itself, per
request (:attr:`Verified.audience`), when accepted audiences depend on the route.

*Single flight.* Concurrent requests carrying one token share one call: the first starts a
task, the others wait on ``asyncio.shield`` wrappers of it, so a client that goes away never
cancels the call for the others. At most ``max_inflight`` distinct tokens are being asked about
at once; beyond that a new token gets :class:`IntrospectionFailed` at once (503), which bounds
the memory and the load a flood of invented tokens can cause.

*Cache.* :class:`OutcomeCache` is an LRU of at most ``max_entries`` outcomes keyed by the
SHA-256 digest of the token: the token itself is never a key, never kept after its call ends,
and never logged. A flood of distinct random tokens therefore costs at most ``max_entries``
small entries (each a digest, an expiry and a shared rejection object) plus ``max_inflight``
calls in flight.

*Clock.* The verdict is judged at the moment the answer arrives, on the wall clock the caller
uses for ``now`` (``time.time`` by default; injectable for tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeAlias, TypeVar, Union
from urllib.parse import quote, urlencode

import aiohttp

from jwtproxy import __version__
from jwtproxy.accesslog import log_event
from jwtproxy.config import IssuerConfig
from jwtproxy.jose import TokenRejected
from jwtproxy.tokencache import cache_key
from jwtproxy.tracing import OperationTracer
from jwtproxy.upstream_tls import client_context
from jwtproxy.verifier import IssuerVerifier, Verified

__all__ = [
    "INACTIVE",
    "IntrospectionEndpoint",
    "IntrospectionFailed",
    "IntrospectionPolicy",
    "Introspector",
    "OutcomeCache",
    "introspection_verdict",
    "parse_response",
    "token_digest",
]

T = TypeVar("T")

#: The outcome for ``"active": false``: one object for every inactive token in the cache. It is
#: never raised itself -- a raised exception keeps its traceback, and with it the frames (and the
#: token) it passed through, and re-raising one instance grows that traceback every time.
INACTIVE = TokenRejected("token_inactive", "token is not active")


class IntrospectionFailed(Exception):
    """The endpoint gave no usable answer: the request is answered 503 and nothing is cached.

    ``str()`` is the precise reason for the log line; it never contains the token.
    """


@dataclass(frozen=True, slots=True)
class IntrospectionEndpoint:
    """Where and how one issuer is asked (the issuer's ``introspection_*`` and ``ca_file`` keys,
    secrets already resolved by the config loader)."""

    url: str
    client_id: str
    client_secret: str = field(repr=False)
    cache_seconds: float = 60.0  # how long an active outcome is reused (never past exp)
    ca_file: str = ""  # PEM bundle that alone verifies an https endpoint; "" = system store

    @classmethod
    def of(cls, issuer: IssuerConfig) -> IntrospectionEndpoint:
        """The endpoint an issuer's config describes (``introspection_endpoint`` must be set)."""
        if not issuer.introspection_endpoint:
            raise ValueError(f"issuer {issuer.name} has no introspection_endpoint")
        return cls(
            issuer.introspection_endpoint, issuer.introspection_client_id, issuer.introspection_client_secret,
            issuer.introspection_cache, issuer.ca_file,
        )


@dataclass(frozen=True, slots=True)
class IntrospectionPolicy:
    """Bounds of every call and of the cache."""

    timeout: float = 5.0  # one call: connect, send, status line, headers and body
    max_bytes: int = 64 * 1024  # response body cap
    max_entries: int = 10000  # outcomes kept per issuer (LRU)
    max_inflight: int = 256  # distinct tokens being introspected at once per issuer
    inactive_seconds: float = 10.0  # how long a negative outcome is reused


# The cache key of a token: the verified-token cache's one key function (SHA-256 of the token).
token_digest = cache_key


# ----------------------------------------------------------------------------- sans-I/O core


class _DuplicateMember(ValueError):
    pass


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two "active" (or two "sub") members: which one counts is parser-dependent.
        raise _DuplicateMember()
    return obj


def _reject_constant(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_strict_object, parse_constant=_reject_constant)


def parse_response(body: bytes) -> dict[str, Any]:
    """The response body as a JSON object (UTF-8, no duplicate members, no NaN/Infinity).

    Raises :class:`IntrospectionFailed`: a body that is not such an object is the endpoint's
    failure, not a verdict on the token.
    """
    try:
        document = _DECODER.decode(body.decode("utf-8"))
    except _DuplicateMember:
        raise IntrospectionFailed("response has a duplicate member name") from None
    except RecursionError:
        raise IntrospectionFailed("response is nested too deeply") from None
    except ValueError:  # UnicodeDecodeError, JSONDecodeError, NaN/Infinity, 4300-digit integers
        raise IntrospectionFailed("response is not valid JSON") from None
    if not isinstance(document, dict):
        raise IntrospectionFailed(f"response is a JSON {type(document).__name__}, not an object")
    return document


def introspection_verdict(
    response: Mapping[str, Any],
    checks: IssuerVerifier,
    now: float,
    *,
    audiences: frozenset[str] | None = None,
) -> Verified:
    """The verdict on an introspected token, from the endpoint's JSON object.

    ``checks`` is the issuer's claim checker (the one its JWTs go through); ``audiences`` the
    accepted audiences, None to leave the membership test to the caller. Raises
    :class:`TokenRejected` (the token is not acceptable: 401) or :class:`IntrospectionFailed`
    (``active`` missing or not a boolean: the endpoint did not answer the question, 503).
    """
    active = response.get("active")
    if active is not True:
        if active is False:
            raise TokenRejected(INACTIVE.reason, INACTIVE.description)
        # "active": "true", 1 or nothing: not RFC 7662, so not an answer we may act on.
        raise IntrospectionFailed("response has no boolean active member")
    token_type = response.get("token_type")
    if "token_type" in response:
        if not isinstance(token_type, str):
            raise TokenRejected("bad_claim", "token_type is not a string")
        if token_type.lower() == "refresh_token":
            raise TokenRejected("bad_token_type", "refresh tokens are not accepted")
    if "iss" in response and response["iss"] != checks.issuer.issuer:
        raise TokenRejected("issuer_not_allowed", "issuer not allowed")
    return checks.check_claims(dict(response), now, audiences=audiences, audience_required=False)


class OutcomeCache(Generic[T]):
    """Bounded LRU ``digest -> (until, outcome)``; an outcome is served while ``now < until``."""

    __slots__ = ("max_entries", "_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, tuple[float, T | TokenRejected]] = OrderedDict()

    def get(self, digest: bytes, now: float) -> T | TokenRejected | None:
        entries = self._entries
        found = entries.get(digest)
        if found is None:
            return None
        if now >= found[0]:
            del entries[digest]
            return None
        entries.move_to_end(digest)
        return found[1]

    def put(self, digest: bytes, until: float, outcome: T | TokenRejected) -> None:
        entries = self._entries
        entries[digest] = (until, outcome)
        entries.move_to_end(digest)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# ----------------------------------------------------------------------------- I/O shell

# What a call ends with: the caller's rendering of an accepted verdict, a rejection, or a failure.
Outcome: TypeAlias = Union[T, TokenRejected, IntrospectionFailed]  # noqa: UP007 - generic alias

#: A failure line per issuer at most this often; the ones in between are counted in the next.
_LOG_INTERVAL = 10.0


def _basic_credentials(client_id: str, client_secret: str) -> str:
    # RFC 6749 §2.3.1: both parts are form-urlencoded before they are joined and base64-encoded.
    pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


class Introspector(Generic[T]):
    """The introspection client of one issuer (see the module docstring).

    ``render(verified, digest)`` turns an accepted :class:`Verified` (and the token's digest)
    into what the cache keeps and callers get (the gateway renders identity headers once per
    token this way). ``audiences`` are checked
    here unless None (then the caller checks :attr:`Verified.audience` per request).
    ``on_result(issuer_name, result)`` counts outcomes: ``active``, ``inactive``, ``rejected``,
    ``error``, ``busy``, ``hit`` (a cached outcome), ``shared`` (joined a call in flight).
    ``log`` receives one text line per event; without it events are JSON lines
    (``introspection_failed``, ``introspection_recovered``). ``tracer`` (tracing on) gets an
    ``introspection`` span per call, the child of the request that started it.
    """

    def __init__(
        self,
        issuer: IssuerConfig,
        endpoint: IntrospectionEndpoint,
        render: Callable[[Verified, bytes], T],
        *,
        audiences: frozenset[str] | None = None,
        policy: IntrospectionPolicy = IntrospectionPolicy(),
        on_result: Callable[[str, str], None] | None = None,
        log: Callable[[str], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        tracer: OperationTracer | None = None,
    ) -> None:
        self.name = issuer.name
        self._tracer = tracer
        self.endpoint = endpoint
        self.policy = policy
        self.cache: OutcomeCache[T] = OutcomeCache(policy.max_entries)
        self._checks = IssuerVerifier(issuer, None)
        self._leeway = float(issuer.leeway)
        self._render = render
        self._audiences = audiences
        self._on_result = on_result
        self._text_log = log
        self._session = session
        self._own_session = session is None
        self._wall_clock = wall_clock
        self._clock = clock
        self._flights: dict[bytes, asyncio.Task[Outcome[T]]] = {}
        self._authorization = _basic_credentials(endpoint.client_id, endpoint.client_secret)
        self._closed = False
        self._failing = False  # the last call failed: the next success logs a recovery line
        self._last_failure_log: float | None = None
        self._suppressed = 0
        self.calls = 0  # POSTs started (tests and operators read it)

    # ------------------------------------------------------------------ public API

    def cached(self, digest: bytes, now: float) -> T | TokenRejected | None:
        """The cached outcome for the token with this digest, else None (ask with ``introspect``)."""
        outcome = self.cache.get(digest, now)
        if outcome is not None:
            self._count("hit")
        return outcome

    def introspect(self, token: str, digest: bytes | None = None) -> asyncio.Future[Outcome[T]]:
        """Ask about ``token`` (its digest may be given if already computed); concurrent callers
        with one token share one call. The future never raises (except when cancelled): its
        result is the outcome, also stored in the cache unless it is a failure. Cancelling it
        does not cancel the shared call."""
        if digest is None:
            digest = token_digest(token)
        loop = asyncio.get_running_loop()
        flight = self._flights.get(digest)
        if flight is not None:
            self._count("shared")
            return asyncio.shield(flight)
        if self._closed or len(self._flights) >= self.policy.max_inflight:
            done: asyncio.Future[Outcome[T]] = loop.create_future()
            reason = "introspector is closed" if self._closed else (
                f"more than {self.policy.max_inflight} introspection calls in flight")
            done.set_result(IntrospectionFailed(reason))
            self._count("busy")
            return done
        task = loop.create_task(self._call(token, digest), name=f"introspect-{self.name}")
        self._flights[digest] = task

        def _landed(finished: asyncio.Task[Outcome[T]]) -> None:
            if self._flights.get(digest) is finished:
                del self._flights[digest]

        task.add_done_callback(_landed)
        return asyncio.shield(task)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def close(self) -> None:
        """Cancel the calls in flight and close the session if this object made it."""
        self._closed = True
        flights = list(self._flights.values())
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ one call

    async def _call(self, token: str, digest: bytes) -> Outcome[T]:
        if self._tracer is None:
            return await self._judged_call(token, digest)
        op = self._tracer.operation("introspection", {
            "http.request.method": "POST",
            "url.full": self.endpoint.url.split("?", 1)[0],
            "jwtproxy.issuer": self.name,
        })
        result, error = "error", "cancelled"
        try:
            outcome = await self._judged_call(token, digest)
            if isinstance(outcome, IntrospectionFailed):
                error = "failed"
            elif isinstance(outcome, TokenRejected):
                result, error = outcome.reason, ""
            else:
                result, error = "active", ""
            return outcome
        finally:
            op.end(result, error or None)

    async def _judged_call(self, token: str, digest: bytes) -> Outcome[T]:
        try:
            response = await self._post(token)
            now = self._wall_clock()
            verified = introspection_verdict(response, self._checks, now, audiences=self._audiences)
            outcome: T = self._render(verified, digest)
        # Outcomes are fresh exceptions that were never raised: a raised one holds its traceback,
        # whose frames hold the token, and a cached outcome must not keep the token alive.
        except IntrospectionFailed as exc:
            self._failed(str(exc))
            return IntrospectionFailed(str(exc))
        except TokenRejected as exc:
            self._succeeded()
            inactive = exc.reason == INACTIVE.reason
            rejection = INACTIVE if inactive else TokenRejected(exc.reason, exc.description)
            self.cache.put(digest, self._wall_clock() + self.policy.inactive_seconds, rejection)
            self._count("inactive" if inactive else "rejected")
            return rejection
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail closed: whatever went wrong, this is not a pass
            failure = IntrospectionFailed(f"unexpected {type(exc).__name__}: {exc}")
            self._failed(str(failure))
            return failure
        self._succeeded()
        # check_claims accepted now < exp + leeway, so this entry is live when stored.
        until = min(now + self.endpoint.cache_seconds, verified.exp + self._leeway)
        self.cache.put(digest, until, outcome)
        self._count("active")
        return outcome

    def _session_for_calls(self) -> aiohttp.ClientSession:
        if self._session is None:
            # ca_file given: only this bundle is trusted, not the system store.
            tls: ssl.SSLContext | bool = client_context(self.endpoint.ca_file) if self.endpoint.ca_file else True
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls, limit=self.policy.max_inflight),
                headers={"User-Agent": f"jwtproxy/{__version__}"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _post(self, token: str) -> dict[str, Any]:
        session = self._session_for_calls()
        body = urlencode({"token": token, "token_type_hint": "access_token"})
        headers = {
            "Authorization": self._authorization,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        self.calls += 1
        timeout = self.policy.timeout
        try:
            async with asyncio.timeout(timeout):
                async with session.post(self.endpoint.url, data=body, headers=headers, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise IntrospectionFailed(f"HTTP {resp.status}")
                    return parse_response(await self._read_capped(resp))
        except TimeoutError:
            raise IntrospectionFailed(f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise IntrospectionFailed(f"{type(exc).__name__}: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise IntrospectionFailed(f"{type(exc).__name__}: {exc}") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.policy.max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise IntrospectionFailed(f"Content-Length {resp.content_length} exceeds {cap} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(16384):
            body += chunk
            if len(body) > cap:
                resp.close()  # drop the connection rather than drain a huge body
                raise IntrospectionFailed(f"body exceeds {cap} bytes")
        return bytes(body)

    # ------------------------------------------------------------------ reporting

    def _failed(self, reason: str) -> None:
        self._failing = True
        self._count("error")
        now = self._clock()
        if self._last_failure_log is not None and now - self._last_failure_log < _LOG_INTERVAL:
            self._suppressed += 1  # an outage must not write one line per request
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last_failure_log = now
        text = f"introspection at {self.endpoint.url} failed: {reason} (answered 503)"
        if suppressed:
            text += f"; {suppressed} more failures since the last line"
        self._emit("introspection_failed", "warning", text, reason=reason, suppressed=suppressed)

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            self._last_failure_log = None
            suppressed, self._suppressed = self._suppressed, 0
            self._emit("introspection_recovered", "info", f"introspection at {self.endpoint.url} answers again",
                       suppressed=suppressed)

    def _emit(self, event: str, level: str, text: str, **fields: Any) -> None:
        if self._text_log is not None:
            self._text_log(f"introspection: issuer {self.name}: {text}")
        else:
            log_event(event, level=level, issuer=self.name, endpoint=self.endpoint.url, **fields)

    def _count(self, result: str) -> None:
        if self._on_result is not None:
            self._on_result(self.name, result)
