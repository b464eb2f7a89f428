"""The verification stage: one call from the connection loop decides a request's fate.

Theory of operation
-------------------
:meth:`AuthStage.authorize` takes a route and the request's token and returns one of

* :class:`Allow` – forward, with these identity headers;
* :class:`Deny` – answer this status and RFC 6750 error now;
* :class:`Pending` – the token names a key we do not have: await ``Pending.wait`` (one shared
  JWKS refetch, rate-limited by ``jwks_cooldown``) and call again once.

The order of checks is fixed: token presence, size, the verified-token cache (a hit skips JOSE
parsing and the signature, never ``exp``, revocation, issuer or route checks), then full
verification (:mod:`jwtproxy.verifier`), then what depends on the route (allowed issuers, scopes,
claims). What a cached entry holds is the verdict on the *token*; what the *route* demands is
checked on every request, so one cache serves every route.

Everything here is synchronous and reads the clock only through the ``now`` it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

from jwtproxy.config import Config, RouteConfig, TokenSource
from jwtproxy.identity import render_identity_headers
from jwtproxy.jose import TokenRejected
from jwtproxy.responses import www_authenticate
from jwtproxy.revocation import IsRevoked
from jwtproxy.tokencache import TokenCache, cache_key
from jwtproxy.verifier import KeysNotLoaded, TokenVerifier, UnknownKid, Verified

__all__ = ["Allow", "AmbiguousToken", "AuthStage", "CachedToken", "Deny", "Pending", "RouteRules", "extract_token"]


class Allow:
    __slots__ = ("identity", "sub", "jti", "issuer")

    def __init__(
        self,
        identity: list[tuple[bytes, bytes]],
        sub: str | None = None,
        jti: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self.identity = identity
        self.sub = sub
        self.jti = jti
        self.issuer = issuer


ANONYMOUS = Allow([])


class Deny:
    __slots__ = ("status", "error", "description", "reason", "www_authenticate", "retry_after")

    def __init__(
        self,
        status: int,
        description: str,
        reason: str,
        *,
        error: str | None = None,
        www_auth: bytes | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason
        self.www_authenticate = www_auth
        self.retry_after = retry_after


class Pending:
    __slots__ = ("wait",)

    def __init__(self, wait: asyncio.Future[Any]) -> None:
        self.wait = wait


@lru_cache(maxsize=256)
def invalid_token(reason: str, description: str) -> Deny:
    """The 401 for a rejected token; one shared object per (reason, description)."""
    return Deny(
        401,
        description,
        reason,
        error="invalid_token",
        www_auth=www_authenticate("invalid_token", description),
    )


MISSING_TOKEN = Deny(401, "bearer token required", "missing_token", error="unauthorized", www_auth=www_authenticate())


@dataclass(frozen=True, slots=True)
class CachedToken:
    """The verdict on one token, as the cache keeps it."""

    issuer: str
    exp: float
    leeway: float
    sub: str | None
    jti: str | None
    iat: float | None
    scopes: frozenset[str]
    claims: Mapping[str, Any]
    identity: list[tuple[bytes, bytes]]
    allow: Allow


class RouteRules:
    """What one route demands, compiled once per config."""

    __slots__ = ("auth", "issuers", "scopes", "scope_text", "claims")

    def __init__(self, route: RouteConfig) -> None:
        self.auth = route.auth
        self.issuers = frozenset(route.issuers) if route.issuers else None
        self.scopes = frozenset(route.require_scopes)
        self.scope_text = " ".join(route.require_scopes)
        self.claims = tuple((name, frozenset(values)) for name, values in route.require_claims)


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes granted by ``scope`` (space-separated string, RFC 8693) and ``scp`` (array or string)."""
    granted: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        granted.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        granted.update(scp.split())
    elif isinstance(scp, list):
        granted.update(s for s in scp if isinstance(s, str))
    return frozenset(granted)


def _claim_allows(value: Any, allowed: frozenset[str]) -> bool:
    if isinstance(value, str):
        return value in allowed
    if isinstance(value, list):
        return any(isinstance(v, str) and v in allowed for v in value)
    return False


class AuthStage:
    """Per-worker verification stage: verifier, token cache, revocations and route rules."""

    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        cache: TokenCache[CachedToken],
        is_revoked: IsRevoked,
        refetch_unknown_kid: Callable[[str], asyncio.Future[bool]],
        on_cache: Callable[[str], None] | None = None,
    ) -> None:
        self.verifier = verifier
        self.cache = cache
        self.is_revoked = is_revoked
        self.refetch_unknown_kid = refetch_unknown_kid
        self.on_cache = on_cache
        self.max_bytes = config.token.max_bytes
        self.claims_to_headers = config.claims_to_headers

    def authorize(self, rules: RouteRules, token: str | None, now: float, refetched: bool = False) -> Allow | Deny | Pending:
        if token is None:
            return ANONYMOUS if rules.auth == "optional" else MISSING_TOKEN
        if len(token) > self.max_bytes:
            return invalid_token("token_too_large", "token too large")
        key = cache_key(token)
        entry = self.cache.get(key, now)
        if entry is None:
            if self.on_cache is not None:
                self.on_cache("miss")
            try:
                entry = self._verify(token, now, rules)
            except TokenRejected as exc:
                return invalid_token(exc.reason, exc.description)
            except UnknownKid as exc:
                if refetched:
                    return invalid_token("unknown_kid", "unknown key")
                return Pending(self.refetch_unknown_kid(exc.issuer))
            except KeysNotLoaded:
                return Deny(503, "issuer keys not available", "keys_unavailable", retry_after=5)
            self.cache.put(key, entry)
        elif self.on_cache is not None:
            self.on_cache("hit")  # the cache returns only entries that have not expired
        return self._route_checks(rules, entry, now)

    def _verify(self, token: str, now: float, rules: RouteRules) -> CachedToken:
        verified: Verified = self.verifier.verify(token, now, rules.issuers)
        claims = verified.claims
        identity = render_identity_headers(claims, self.claims_to_headers)
        return CachedToken(
            issuer=verified.issuer.name,
            exp=verified.exp,
            leeway=verified.issuer.leeway,
            sub=verified.sub,
            jti=verified.jti,
            iat=verified.iat,
            scopes=token_scopes(claims),
            claims=claims,
            identity=identity,
            allow=Allow(identity, verified.sub, verified.jti, verified.issuer.name),
        )

    def _route_checks(self, rules: RouteRules, entry: CachedToken, now: float) -> Allow | Deny:
        if rules.issuers is not None and entry.issuer not in rules.issuers:
            return invalid_token("issuer_not_allowed", "issuer not allowed")
        if self.is_revoked(entry.jti, entry.sub, entry.iat, now):
            return invalid_token("revoked", "token revoked")
        if rules.scopes and not rules.scopes <= entry.scopes:
            return Deny(
                403,
                "insufficient scope",
                "insufficient_scope",
                error="insufficient_scope",
                www_auth=www_authenticate("insufficient_scope", "insufficient scope", rules.scope_text),
            )
        for name, allowed in rules.claims:
            if not _claim_allows(entry.claims.get(name), allowed):
                return Deny(
                    403,
                    f"claim requirement not met: {name}",
                    "claim_not_allowed",
                    error="insufficient_scope",
                    www_auth=www_authenticate("insufficient_scope", f"claim requirement not met: {name}"),
                )
        return entry.allow

    def evict_issuer(self, issuer_name: str) -> None:
        self.cache.evict_issuer(issuer_name)


class MalformedAuthorization(Exception):
    """``Authorization: Bearer`` without a credential."""


class AmbiguousToken(Exception):
    """The token's carrier appears more than once (two headers, cookies or parameters).

    Which one a backend would read is anyone's guess, so the gateway refuses to pick (400), as
    contract §4 does for two ``Authorization`` headers (parameter pollution, OWASP WSTG-INPV-04).
    """


def bearer_credential(value: bytes) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive, one or more spaces), else None.

    A non-Bearer scheme (Basic, Digest) is not a bearer token, so it counts as no token.
    """
    if len(value) < 6 or value[:6].lower() != b"bearer":
        return None
    rest = value[6:]
    if not rest:
        raise MalformedAuthorization()
    if rest[:1] != b" ":
        return None  # "Bearerx ..." is another scheme
    token = rest.lstrip(b" ")
    if not token or b" " in token.rstrip(b" ") or b"\t" in token:
        raise MalformedAuthorization()
    return token.rstrip(b" ").decode("latin-1")


def _only(found: list[str]) -> str | None:
    if len(found) > 1:
        raise AmbiguousToken()
    return found[0] if found else None


def _query_param(query: str, name: str) -> str | None:
    found = []
    for pair in query.lstrip("?").split("&"):
        key, sep, value = pair.partition("=")
        if sep and unquote_plus(key) == name:
            found.append(unquote_plus(value))
    return _only(found)


def _cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    found = []
    for header, value in headers:
        if header != b"cookie":
            continue
        for part in value.split(b";"):
            key, sep, cookie = part.strip().partition(b"=")
            if sep and key == name:
                found.append(cookie.strip(b'"').decode("latin-1"))
    return _only(found)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return _only([value.strip().decode("latin-1") for header, value in headers if header == name])


def extract_token(
    sources: tuple[TokenSource, ...],
    headers: list[tuple[bytes, bytes]],
    authorization: bytes | None,
    query: str,
) -> tuple[str | None, TokenSource | None]:
    """The token from the first configured source that is present, and that source.

    Raises :class:`MalformedAuthorization` for ``Authorization: Bearer`` with nothing usable and
    :class:`AmbiguousToken` when the source that is present carries more than one value.
    """
    for source in sources:
        if source.kind == "header":
            if source.name == "authorization":
                if authorization is not None:
                    token = bearer_credential(authorization)
                    if token is not None:
                        return token, source
                continue
            token = _header(headers, source.name.encode("latin-1"))
            if token is not None:
                return token, source
        elif source.kind == "query":
            if query:
                token = _query_param(query, source.name)
                if token is not None:
                    return token, source
        elif source.kind == "cookie":
            token = _cookie(headers, source.name.encode("latin-1"))
            if token is not None:
                return token, source
    return None, None
