"""The verification stage: one call from the connection loop decides a request's fate.

Theory of operation
-------------------
:meth:`AuthStage.authorize` takes a route and the request's token and returns one of

* :class:`Allow` – forward, with these identity headers;
* :class:`Deny` – answer this status and RFC 6750 error now;
* :class:`Pending` – the token names a key we do not have: await ``Pending.wait`` (one shared
  JWKS refetch, rate-limited by ``jwks_cooldown``) and call again once;
* :class:`Deferred` – the token is not in the cache and this event-loop turn's verifications
  are spent (:mod:`jwtproxy.turns`): wait for a slot and call again with ``Deferred.key``
  (the token's cache key, so that asking again does not hash the token again), nothing decided
  yet;
* :class:`CheckReplay` – everything passed, including a DPoP proof, and the proof's ``jti`` is
  recorded on this host; the shell must still record it across nodes (Redis) before forwarding
  ``CheckReplay.allow`` (only when a cross-node guard is configured).

The order of checks is fixed: token presence, size, the verified-token cache (a hit skips JOSE
parsing and the signature, never ``exp``, revocation, issuer, binding or route checks), then full
verification (:mod:`jwtproxy.verifier`), then what depends on the request and the route: allowed
issuers, audiences, revocation, the token's sender binding (:mod:`jwtproxy.binding`: the DPoP proof or the
client certificate, checked on **every** request because a proof is single-use), scopes and
claims, and last the proof's single use on this host (:mod:`jwtproxy.dpopreplay`). What a cached
entry holds is the verdict on the *token* (with its ``cnf``); what the *request* and the *route*
demand is checked every time, so one cache serves every route. A binding failure (401) comes
before scopes (403): a thief learns nothing about what the token would have allowed. The audience
is a route rule because a route's ``audiences`` may replace the issuer's: the verifier checks the
claim's presence and shape, :meth:`AuthStage._route_checks` its membership.

A token that is not a compact JWS (not exactly three segments) on a route that allows an
introspecting issuer (at most one, by the config's rule) is judged by that issuer's RFC 7662
endpoint instead (:mod:`jwtproxy.introspection`): a cached outcome answers at once; otherwise
:class:`Pending` waits on the (shared) introspection call and the caller asks again with
``refetched=True``, which finds the outcome in the introspection cache -- or, when the call
failed (failures are never cached), answers 503. Introspected verdicts live only in the
introspection cache (bounded by ``introspection_cache`` and ``exp``), never in the verified-token
cache; the route checks (binding included: an introspection response may carry ``cnf``) are the
same for both kinds of verdict.

Everything here is synchronous and reads the clock only through the ``now`` it is given.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final, Protocol
from urllib.parse import unquote_plus

from jwtproxy.binding import (
    BEARER,
    FAILURE_REASONS,
    UNBOUND,
    BindingRejected,
    Confirmation,
    Presentation,
    enforce,
    read_confirmation,
)
from jwtproxy.config import Config, IssuerConfig, RouteConfig, TokenSource
from jwtproxy.dpop import USE_DPOP_NONCE, AcceptedProof, DPoPPolicy, NonceIssuer, ProofChecker
from jwtproxy.dpopreplay import HostReplayGuard, ReplayCheckUnavailable
from jwtproxy.identity import render_identity_headers
from jwtproxy.introspection import Introspector
from jwtproxy.jose import TokenRejected
from jwtproxy.responses import www_authenticate, www_authenticate_dpop
from jwtproxy.revocation import IsRevoked
from jwtproxy.sharedtable import SharedTable
from jwtproxy.tokencache import TokenCache, cache_key
from jwtproxy.turns import VerificationTurns
from jwtproxy.verifier import KeysNotLoaded, TokenVerifier, UnknownKid, Verified

__all__ = [
    "AUTH_FAILURE_REASONS",
    "Allow",
    "AmbiguousToken",
    "AuthStage",
    "CachedToken",
    "CheckReplay",
    "Deferred",
    "Deny",
    "Pending",
    "RouteRules",
    "cached_token",
    "extract_token",
    "uses_dpop_scheme",
]


#: Every ``reason`` of ``jwtproxy_auth_failures_total`` (the access log's ``auth``), each counted
#: from 0 from the start so rate() and alerts work before the first failure. A check that rejects
#: with a new reason adds it here -- tests/test_metrics_zero.py finds every reason literal in the
#: code and fails otherwise; a feature with many keeps its own tuple, added at the end as the
#: sender-constrained tokens' (binding.FAILURE_REASONS) are.
AUTH_FAILURE_REASONS: Final[tuple[str, ...]] = (
    # the request: no token, or not one usable token
    "missing_token", "malformed_header", "ambiguous_token", "token_too_large",
    # the token: JOSE structure, signature and claims (jose, verifier, identity)
    "malformed", "unsupported_jwe", "bad_header", "alg_not_allowed", "bad_typ", "no_matching_key",
    "unknown_kid", "bad_signature", "expired", "not_yet_valid", "issued_in_future",
    "lifetime_exceeded", "missing_claim", "bad_claim", "audience_not_allowed", "issuer_not_allowed",
    "bad_claim_value", "keys_unavailable",
    # opaque tokens (introspection)
    "token_inactive", "bad_token_type", "introspection_unavailable",
    # the route and revocation
    "revoked", "insufficient_scope", "claim_not_allowed",
    # limits (contract §5.5): the client address is past its verification-failure budget
    "failure_budget",
) + FAILURE_REASONS  # fmt: skip


#: Slots of the replay table of a process that was handed none (``jwtproxy verify``, tests).
LOCAL_REPLAY_CAPACITY = 1 << 16


@lru_cache(maxsize=1)
def _process_replay_guard() -> HostReplayGuard:
    """One jti table for every stage of a process that has no supervisor's table: in one process,
    the process is the host."""
    return HostReplayGuard(SharedTable(LOCAL_REPLAY_CAPACITY, values=0))


class Allow:
    """Forward the request, with these identity headers. For a verified token also what a signed
    assertion is made from (contract §5.4): the token's cache key, its claims and ``exp``;
    ``token_key`` is None for an anonymous request, which carries no assertion.
    ``identity_block`` is the identity headers as ``name: value\\r\\n`` lines, rendered once per
    verified token: an authz listener's answer carries them (contract §5.1), so a cached token's
    answer costs no rendering."""

    __slots__ = ("identity", "identity_block", "sub", "jti", "issuer", "token_key", "claims", "exp")

    def __init__(
        self,
        identity: list[tuple[bytes, bytes]],
        sub: str | None = None,
        jti: str | None = None,
        issuer: str | None = None,
        *,
        token_key: bytes | None = None,
        claims: Mapping[str, Any] | None = None,
        exp: float | None = None,
    ) -> None:
        self.identity = identity
        self.identity_block = b"".join(b"%b: %b\r\n" % pair for pair in identity)
        self.sub = sub
        self.jti = jti
        self.issuer = issuer
        self.token_key = token_key
        self.claims: Mapping[str, Any] = claims if claims is not None else {}
        self.exp = exp


ANONYMOUS = Allow([])


class Deny:
    __slots__ = ("status", "error", "description", "reason", "www_authenticate", "retry_after", "dpop_nonce",
                 "headers")

    def __init__(
        self,
        status: int,
        description: str,
        reason: str,
        *,
        error: str | None = None,
        www_auth: bytes | None = None,
        retry_after: int | None = None,
        dpop_nonce: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason
        self.www_authenticate = www_auth
        self.retry_after = retry_after
        #: A fresh ``DPoP-Nonce`` to send with this answer (``use_dpop_nonce``).
        self.dpop_nonce = dpop_nonce
        self.headers = headers  # further fields of the answer (a 429's RateLimit fields)


class Pending:
    __slots__ = ("wait",)

    def __init__(self, wait: asyncio.Future[Any]) -> None:
        self.wait = wait


class Deferred:
    """The token needs signature work and this event-loop turn's share is spent: wait for a slot
    (:class:`jwtproxy.turns.VerificationTurns`), then ask again with ``key``, the token's cache
    key (a SHA-256 of the token: about a microsecond a request that a flood would pay twice)."""

    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key


class CheckReplay:
    """Allowed once ``proof``'s ``jti`` is recorded across nodes too (else ``dpop_replay``)."""

    __slots__ = ("allow", "proof")

    def __init__(self, allow: Allow, proof: AcceptedProof) -> None:
        self.allow = allow
        self.proof = proof


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
KEYS_UNAVAILABLE = Deny(503, "issuer keys not available", "keys_unavailable", retry_after=5)
INTROSPECTION_UNAVAILABLE = Deny(503, "token introspection unavailable", "introspection_unavailable", retry_after=5)
AUDIENCE_NOT_ALLOWED = invalid_token("audience_not_allowed", "audience not allowed")


@lru_cache(maxsize=256)
def binding_denied(reason: str, description: str, error: str, dpop_algs: str | None) -> Deny:
    """The 401 for a request that does not prove possession (contract §5.2): with a ``DPoP``
    challenge naming ``dpop_algs`` when the failure is about DPoP, else the ``Bearer`` one."""
    www_auth = (
        www_authenticate_dpop(dpop_algs, error, description)
        if dpop_algs is not None
        else www_authenticate(error, description)
    )
    return Deny(401, description, reason, error=error, www_auth=www_auth)


@lru_cache(maxsize=64)
def nonce_denied(description: str, dpop_algs: str, nonce: str) -> Deny:
    """``use_dpop_nonce`` with the current nonce (one shared object per nonce slot)."""
    return Deny(
        401,
        description,
        "dpop_nonce",
        error=USE_DPOP_NONCE,
        www_auth=www_authenticate_dpop(dpop_algs, USE_DPOP_NONCE, description),
        dpop_nonce=nonce,
    )


def replay_denied(dpop_algs: str) -> Deny:
    return binding_denied("dpop_replay", "DPoP proof already used", "invalid_dpop_proof", dpop_algs)


REPLAY_UNAVAILABLE = Deny(503, "DPoP replay check unavailable", "dpop_replay_unavailable", retry_after=1)


class CachedToken:
    """The verdict on one token, as the cache keeps it, shared by every request that presents the
    token: never changed after it is made (``Final``: the type checker refuses an assignment).

    A plain class with its own ``__init__``, not a dataclass: a dataclass's generated ``__init__``
    is interpreted Python even where this module is compiled, and a frozen one assigns each field
    through ``object.__setattr__`` (about 2 µs a verified token for these thirteen)."""

    __slots__ = ("issuer", "exp", "leeway", "sub", "jti", "iat", "scopes", "claims", "identity", "allow",
                 "audience", "issuer_audiences", "cnf")

    def __init__(
        self,
        issuer: str,
        exp: float,
        leeway: float,
        sub: str | None,
        jti: str | None,
        iat: float | None,
        scopes: frozenset[str],
        claims: Mapping[str, Any],
        identity: list[tuple[bytes, bytes]],
        allow: Allow,
        audience: frozenset[str] | None,
        issuer_audiences: frozenset[str],
        cnf: Confirmation = UNBOUND,
    ) -> None:
        self.issuer: Final = issuer
        self.exp: Final = exp
        self.leeway: Final = leeway
        self.sub: Final = sub
        self.jti: Final = jti
        self.iat: Final = iat
        self.scopes: Final = scopes
        self.claims: Final = claims
        self.identity: Final = identity
        self.allow: Final = allow
        # The token's audience values; None: it named none (introspection).
        self.audience: Final = audience
        # What the issuer accepts, where the route does not say.
        self.issuer_audiences: Final = issuer_audiences
        self.cnf: Final = cnf


@lru_cache(maxsize=256)
def _accepted_audiences(audiences: tuple[str, ...]) -> frozenset[str]:
    """An issuer's accepted audiences, one set shared by all its cached verdicts."""
    return frozenset(audiences)


def cached_token(verified: Verified, key: bytes, claims_to_headers: tuple[tuple[str, str], ...]) -> CachedToken:
    """The cacheable verdict on a verified token (a JWT, or an introspection response) whose cache
    key is ``key``: identity headers rendered once, the binding read, what an assertion is made
    from. Raises :class:`TokenRejected` for a claim that cannot be a header or a ``cnf`` that
    cannot be honoured."""
    claims = verified.claims
    identity = render_identity_headers(claims, claims_to_headers)
    issuer = verified.issuer
    return CachedToken(
        issuer=issuer.name,
        exp=verified.exp,
        leeway=issuer.leeway,
        sub=verified.sub,
        jti=verified.jti,
        iat=verified.iat,
        scopes=token_scopes(claims),
        claims=claims,
        identity=identity,
        allow=Allow(
            identity, verified.sub, verified.jti, issuer.name, token_key=key, claims=claims, exp=verified.exp
        ),
        audience=verified.audience,
        issuer_audiences=_accepted_audiences(issuer.audiences),
        cnf=read_confirmation(claims),
    )


class RouteRules:
    """What one route demands, compiled once per config.

    ``binding_required`` names the issuers whose tokens must be sender-constrained on this route:
    the route's ``token_binding`` when set, else each issuer's own (``issuers``: every configured
    issuer, needed for the latter).
    """

    __slots__ = ("auth", "issuers", "audiences", "scopes", "scope_text", "claims", "binding_required")

    def __init__(self, route: RouteConfig, issuers: tuple[IssuerConfig, ...] = ()) -> None:
        self.auth = route.auth
        self.issuers = frozenset(route.issuers) if route.issuers else None
        self.audiences = frozenset(route.audiences) if route.audiences else None  # None: the issuer's
        self.scopes = frozenset(route.require_scopes)
        self.scope_text = " ".join(route.require_scopes)
        self.claims = tuple((name, frozenset(values)) for name, values in route.require_claims)
        self.binding_required = frozenset(
            issuer.name
            for issuer in issuers
            if (route.token_binding or issuer.token_binding) == "require"
        )
        if route.token_binding == "require" and not issuers:
            raise ValueError("a route that requires bound tokens needs the issuers to name them")


# Tokens of one client carry the same ``scope`` string: one frozenset per distinct string, shared by
# every cached verdict (~320 bytes each otherwise). Bounded: a flood of distinct strings only
# empties it.
_SCOPE_SETS: dict[str, frozenset[str]] = {}
_SCOPE_SETS_MAX = 4096


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """Scopes granted by ``scope`` (space-separated string, RFC 8693) and ``scp`` (array or string)."""
    scope = claims.get("scope")
    scp = claims.get("scp")
    if scp is None and isinstance(scope, str):
        shared = _SCOPE_SETS.get(scope)
        if shared is None:
            if len(_SCOPE_SETS) >= _SCOPE_SETS_MAX:
                _SCOPE_SETS.clear()
            shared = _SCOPE_SETS[scope] = frozenset(scope.split())
        return shared
    granted: set[str] = set()
    if isinstance(scope, str):
        granted.update(scope.split())
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


class FailureGate(Protocol):
    """The per-address verification-failure budget (``[limits] failures_per_ip``; implemented
    by :class:`jwtproxy.limits.WorkerLimits`)."""

    def failure_wait(self, client: str, now: float) -> float: ...
    def record_failure(self, client: str, now: float) -> None: ...
    def failure_headers(self, wait: float) -> tuple[tuple[bytes, bytes], ...]: ...


class AuthStage:
    """Per-worker verification stage: verifier, token cache, revocations and route rules.

    With ``failures`` (a :class:`FailureGate`), a token that needs signature work (not in the
    cache) from a client address past its failure budget is refused 429 before any decoding, and
    every failed verification is counted against the address (contract §5.5)."""

    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        cache: TokenCache[CachedToken],
        is_revoked: IsRevoked,
        refetch_unknown_kid: Callable[[str], asyncio.Future[bool]],
        on_cache: Callable[[str], None] | None = None,
        *,
        proofs: ProofChecker | None = None,
        host_replay: HostReplayGuard | None = None,
        remote_replay: bool = False,
        introspectors: Mapping[str, Introspector[CachedToken]] | None = None,
        failures: FailureGate | None = None,
        turns: VerificationTurns | None = None,
    ) -> None:
        """``proofs``: the DPoP proof checker (default: one with a nonce secret of its own, right
        for a single process). ``host_replay``: the host-wide jti guard (default: a table of this
        process only). ``remote_replay``: the shell also records jtis across nodes
        (:class:`CheckReplay` is returned instead of :class:`Allow` after a DPoP proof).
        ``introspectors``: issuer name -> RFC 7662 client, for issuers with an
        ``introspection_endpoint``. ``turns``: the worker's per-turn verification budget (None:
        every verification at once, as a caller outside an event loop needs)."""
        self.verifier = verifier
        self.cache = cache
        self.is_revoked = is_revoked
        self.refetch_unknown_kid = refetch_unknown_kid
        self.on_cache = on_cache
        self.failures = failures
        self.turns = turns
        self.max_bytes = config.token.max_bytes
        self.claims_to_headers = config.claims_to_headers
        self.proofs = proofs if proofs is not None else ProofChecker(NonceIssuer(os.urandom(32)))
        self.host_replay = host_replay if host_replay is not None else _process_replay_guard()
        self.remote_replay = remote_replay
        self.dpop_policies = {
            issuer.name: DPoPPolicy.build(issuer.dpop_algorithms, issuer.dpop_max_age, issuer.leeway, issuer.dpop_nonce)
            for issuer in config.issuers
        }
        self.dpop_algs = {name: policy.algs_text() for name, policy in self.dpop_policies.items()}
        self.introspectors: dict[str, Introspector[CachedToken]] = dict(introspectors or {})
        self._introspector_of_route: dict[frozenset[str] | None, Introspector[CachedToken] | None] = {}

    def authorize(
        self,
        rules: RouteRules,
        token: str | None,
        now: float,
        refetched: bool = False,
        presented: Presentation = BEARER,
        client: str = "",
        key: bytes | None = None,
    ) -> Allow | Deny | Pending | CheckReplay | Deferred:
        """Decide one request (module docstring). ``presented``: the request's proof of possession
        (its ``Authorization`` scheme, ``DPoP`` headers, URI, client certificate). ``client``: the
        client address the failure budget counts against. ``key``: the token's cache key when a
        :class:`Deferred` answer gave it (else it is computed here)."""
        if token is None:
            return ANONYMOUS if rules.auth == "optional" else MISSING_TOKEN
        if len(token) > self.max_bytes:
            return invalid_token("token_too_large", "token too large")
        if self.introspectors and token.count(".") != 2:
            introspector = self._introspector_for(rules)
            if introspector is not None:
                return self._introspected(rules, introspector, token, now, refetched, presented)
        if key is None:
            key = cache_key(token)
        entry = self.cache.get(key, now)
        if entry is None:
            failures = self.failures
            if failures is not None:
                wait = failures.failure_wait(client, now)
                if wait > 0.0:
                    if self.on_cache is not None:
                        self.on_cache("miss")
                    return Deny(429, "too many failed token verifications from this address",
                                "failure_budget", error="rate_limited", headers=failures.failure_headers(wait))
            # After the failure budget, which refuses without signature work: a refused request
            # takes no verification slot.
            turns = self.turns
            if turns is not None and not turns.take():
                return Deferred(key)  # cached tokens first: see jwtproxy.turns
            if self.on_cache is not None:
                self.on_cache("miss")  # once, when the token is verified (not when it waits)
            try:
                found = self._verify(token, key, now, rules)
            except TokenRejected as exc:  # raised by cached_token (claims that cannot be headers)
                found = exc
            except UnknownKid as unknown:  # its own name: a compiled function types each name once
                if refetched:
                    if failures is not None:
                        failures.record_failure(client, now)
                    return invalid_token("unknown_kid", "unknown key")
                return Pending(self.refetch_unknown_kid(unknown.issuer))
            except KeysNotLoaded:
                return KEYS_UNAVAILABLE
            if isinstance(found, TokenRejected):
                if failures is not None:
                    failures.record_failure(client, now)
                return invalid_token(found.reason, found.description)
            entry = found
            self.cache.put(key, entry)
        elif self.on_cache is not None:
            self.on_cache("hit")  # the cache returns only entries that have not expired
        return self._route_checks(rules, entry, now, token, presented)

    def _verify(self, token: str, key: bytes, now: float, rules: RouteRules) -> CachedToken | TokenRejected:
        # The audience's membership is a route rule (see the module docstring).
        verified = self.verifier.verdict(token, now, rules.issuers, defer_audience=True)
        if isinstance(verified, TokenRejected):
            return verified
        return cached_token(verified, key, self.claims_to_headers)

    def _introspector_for(self, rules: RouteRules) -> Introspector[CachedToken] | None:
        """The introspecting issuer this route allows (the config allows at most one)."""
        try:
            return self._introspector_of_route[rules.issuers]
        except KeyError:
            found = next(
                (i for name, i in self.introspectors.items() if rules.issuers is None or name in rules.issuers), None
            )
            self._introspector_of_route[rules.issuers] = found
            return found

    def _introspected(
        self,
        rules: RouteRules,
        introspector: Introspector[CachedToken],
        token: str,
        now: float,
        refetched: bool,
        presented: Presentation,
    ) -> Allow | Deny | Pending | CheckReplay:
        key = cache_key(token)
        outcome = introspector.cached(key, now)
        if outcome is None:
            if refetched:
                # The call this request waited for ended without a cached outcome: it failed
                # (failures are never cached), so fail closed.
                return INTROSPECTION_UNAVAILABLE
            return Pending(introspector.introspect(token, key))
        if isinstance(outcome, TokenRejected):
            return invalid_token(outcome.reason, outcome.description)
        return self._route_checks(rules, outcome, now, token, presented)

    def _route_checks(
        self, rules: RouteRules, entry: CachedToken, now: float, token: str, presented: Presentation
    ) -> Allow | Deny | CheckReplay:
        if rules.issuers is not None and entry.issuer not in rules.issuers:
            return invalid_token("issuer_not_allowed", "issuer not allowed")
        audience = entry.audience
        if audience is not None:
            accepted = rules.audiences if rules.audiences is not None else entry.issuer_audiences
            if accepted.isdisjoint(audience):
                return AUDIENCE_NOT_ALLOWED
        if self.is_revoked(entry.jti, entry.sub, entry.iat, now):
            return invalid_token("revoked", "token revoked")
        proof: AcceptedProof | None = None
        require = entry.issuer in rules.binding_required
        if entry.cnf is not UNBOUND or require or presented is not BEARER:
            policy = self.dpop_policies[entry.issuer]
            try:
                proof = enforce(
                    entry.cnf, presented, require=require, token=token, now=now, policy=policy, checker=self.proofs
                )
            except BindingRejected as exc:
                algs = self.dpop_algs[entry.issuer]
                if exc.error == USE_DPOP_NONCE:
                    return nonce_denied(exc.description, algs, self.proofs.nonces.current(now))
                return binding_denied(exc.reason, exc.description, exc.error, algs if exc.dpop else None)
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
        if proof is not None:
            # Last, so that only a request that would be forwarded spends its proof.
            try:
                if not self.host_replay.first_use(proof.replay_key, proof.replay_until, now):
                    return replay_denied(self.dpop_algs[entry.issuer])
            except ReplayCheckUnavailable:
                return REPLAY_UNAVAILABLE
            if self.remote_replay:
                return CheckReplay(entry.allow, proof)
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


def _scheme_credential(value: bytes, scheme: bytes) -> str | None:
    n = len(scheme)
    if len(value) < n or value[:n].lower() != scheme:
        return None
    if len(value) == n:
        raise MalformedAuthorization()
    if value[n] != 0x20:
        return None  # "Bearerx ..." is another scheme
    # One copy of the credential: the spaces around it are stripped together (only spaces: a
    # tab anywhere, or a space inside, is malformed either way).
    token = value[n + 1:].strip(b" ")
    if not token or b" " in token or b"\t" in token:
        raise MalformedAuthorization()
    return token.decode("latin-1")


def bearer_credential(value: bytes) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive, one or more spaces), else None.

    A non-Bearer scheme (Basic, Digest) is not a bearer token, so it counts as no token.
    """
    return _scheme_credential(value, b"bearer")


def authorization_credential(value: bytes) -> str | None:
    """The token of ``Bearer <token>`` or ``DPoP <token>`` (RFC 9449 §7.1), else None."""
    token = _scheme_credential(value, b"bearer")
    return token if token is not None else _scheme_credential(value, b"dpop")


def uses_dpop_scheme(authorization: bytes | None) -> bool:
    """True if the ``Authorization`` value uses the ``DPoP`` scheme (case-insensitive)."""
    return authorization is not None and authorization[:5].lower() == b"dpop "


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
                    token = authorization_credential(authorization)
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
