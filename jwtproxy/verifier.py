"""Sans-I/O token verification: token + ``now`` + key sets in, a verdict out.

Theory of operation
-------------------
:meth:`TokenVerifier.verify` runs a fixed pipeline and the first failed step raises; nothing
after a failure runs, and nothing returns a verdict without passing every step (fail closed).
Each raising function has a ``*_verdict``/``verdict`` twin that returns the
:class:`TokenRejected` instead; the gateway calls those. Forged and expired tokens are the
common rejections, and in the compiled build an exception raised through a chain of compiled
functions costs a traceback entry (a code and a frame object) per function, about a tenth of a
rejected request's Python work: the twins hand the rejection up as a value.

====  =====================================================  ==================================
step  check                                                  rejection ``reason``
====  =====================================================  ==================================
1     size, segments, base64url, JSON, header (:mod:`jose`)  token_too_large, unsupported_jwe,
                                                             malformed, bad_header
2     ``iss`` is a string naming a configured issuer that    issuer_not_allowed
      the caller allows (exact match)
3     ``alg`` in the issuer's allowlist (``none`` never)     alg_not_allowed
4     ``typ`` header, when the issuer configures ``typ``     bad_typ
      (case-insensitive, ``application/`` optional,
      RFC 7515 §4.1.9 / RFC 8725 §3.11)
5     key selection: HS* -> the configured secret; else by   raises :class:`KeysNotLoaded` /
      ``kid`` (unknown kid -> :class:`UnknownKid` so the      :class:`UnknownKid`;
      shell can refetch once), without ``kid`` every key      no_matching_key
      that fits ``alg``
6     signature (any candidate key)                          bad_signature
7     claims (below)                                         missing_claim, bad_claim, expired,
                                                             not_yet_valid, issued_in_future,
                                                             lifetime_exceeded,
                                                             audience_not_allowed
====  =====================================================  ==================================

Claims (RFC 7519 §4.1, contract §4): numeric claims must be JSON numbers that fit an IEEE double
(no bool, no NaN/Infinity, no 1e400, no 400-digit integers). ``exp`` is always required and
``now < exp + leeway``; ``nbf`` and ``iat``, when present, are ``<= now + leeway``;
``max_lifetime > 0`` requires ``iat`` and ``exp - iat <= max_lifetime``; the audience claim
(``aud``, or the issuer's ``aud_claim``, e.g. Cognito's ``client_id``) is a string or an array of
strings containing a configured audience; ``sub`` and ``jti``, when present (JSON ``null`` counts
as present), are non-empty strings; every ``required_claims`` member is present and not
null/""/[]/{}.

Two callers need the audience rule loosened, and say so explicitly: the gateway decides accepted
audiences per route (``defer_audience``: the claim is checked for shape here, its membership by
the caller against :attr:`Verified.audience`), and an RFC 7662 introspection response may lack an
audience altogether (:meth:`IssuerVerifier.check_claims` with ``audience_required=False``).

The issuer is chosen from the *unverified* ``iss`` only to pick keys; the signature is checked
with that issuer's keys before any other claim is trusted, so a forged ``iss`` buys nothing.

Only this module's :class:`TokenRejected` / :class:`UnknownKid` / :class:`KeysNotLoaded` ever
leave ``verify``; descriptions are fixed strings naming the check, never token content.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from jwtproxy.jose import ParsedJWS, ParsedToken, TokenRejected, parse_compact
from jwtproxy.keys import HMAC_ALGORITHMS, KeySet, SignatureVerifier, keyset_from_secret
from jwtproxy.tokencache import Repeats

# At run time, not only for type checking: the compiled module (jwtproxy.compiled) checks an
# argument annotated with a class against that class when it is called.
from jwtproxy.config import IssuerConfig

__all__ = [
    "IssuerVerifier",
    "KeysNotLoaded",
    "TokenRejected",
    "TokenVerifier",
    "UnknownKid",
    "Verified",
    "check_signature",
    "normalise_typ",
    "signature_verdict",
]


_Found = TypeVar("_Found")


class UnknownKid(Exception):
    """The token names a ``kid`` the issuer's key set lacks: the caller may refetch once and retry.

    ``kid`` is token content: keep it out of logs and responses.
    """

    def __init__(self, issuer: str, kid: str) -> None:
        super().__init__(f"unknown kid for issuer {issuer}")
        self.issuer = issuer
        self.kid = kid


class KeysNotLoaded(Exception):
    """The issuer's keys were never loaded (IdP unreachable since start): answer 503."""

    def __init__(self, issuer: str) -> None:
        super().__init__(f"keys of issuer {issuer} are not loaded")
        self.issuer = issuer


class Verified:
    """A verified token: its issuer, claims, and the claims the gateway uses on every request.

    A plain class with its own ``__init__``, not a dataclass: a dataclass's generated ``__init__``
    is interpreted Python even where this module is compiled, and one is made per verification."""

    __slots__ = ("issuer", "claims", "exp", "iat", "sub", "jti", "audience")

    def __init__(self, issuer: IssuerConfig, claims: dict[str, Any], exp: float, iat: float | None,
                 sub: str | None, jti: str | None, audience: frozenset[str] | None = None) -> None:
        self.issuer = issuer
        self.claims = claims
        self.exp = exp
        self.iat = iat
        self.sub = sub
        self.jti = jti
        # The token's audience values; None when the claim is absent (allowed only where the
        # caller said so). Kept so that a caller deciding audiences per request can test
        # membership again.
        self.audience = audience


def normalise_typ(value: str) -> str:
    """``typ`` comparison form: lower case, without the optional ``application/`` prefix."""
    value = value.lower()
    return value[12:] if value.startswith("application/") else value


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a JSON number that fits an IEEE double, else None."""
    kind = type(value)  # exact type: bool is an int subclass and must not count as a number
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _raised(found: _Found | TokenRejected) -> _Found:
    """``found``, or the rejection raised: what each raising twin of a ``*verdict`` function does."""
    if isinstance(found, TokenRejected):
        raise found
    return found


def signature_verdict(
    jws: ParsedJWS | ParsedToken,
    keys: KeySet | None,
    secret_keys: KeySet | None,
    allowed_algs: Collection[str],
    issuer_name: str,
    refetchable: bool = True,
) -> SignatureVerifier | TokenRejected:
    """Steps 3, 5 and 6 of the pipeline: the signature layer, on any payload.

    ``keys`` are the issuer's JWKS keys (None: never loaded), ``secret_keys`` its HMAC keys.
    ``refetchable`` False (no JWKS source) turns an unknown ``kid`` into ``no_matching_key``.
    Returns the verifier that accepted the signature, or the rejection (returned, see the module
    docstring); raises :class:`UnknownKid` or :class:`KeysNotLoaded`.
    """
    header = jws.header
    alg = header["alg"]  # a non-empty str: jose checked it
    if alg not in allowed_algs or alg.lower() == "none":
        return TokenRejected("alg_not_allowed", "algorithm not allowed")
    candidates: list[SignatureVerifier] | None
    if alg in HMAC_ALGORITHMS:
        # The secret is not a JWK and has no kid: a token kid does not select among HMAC keys.
        candidates = secret_keys.unkeyed(alg) if secret_keys is not None else []
    else:
        if keys is None:
            raise KeysNotLoaded(issuer_name)
        kid = header.get("kid")
        if kid is None:
            candidates = keys.unkeyed(alg)
        else:
            candidates = keys.for_kid(kid, alg)
            if candidates is None:
                if refetchable:
                    raise UnknownKid(issuer_name, kid)
                candidates = []
    if not candidates:
        return TokenRejected("no_matching_key", "no key for this algorithm")
    signing_input, signature = jws.signing_input, jws.signature
    for candidate in candidates:
        if candidate.verify(signing_input, signature):
            return candidate
    return TokenRejected("bad_signature", "signature verification failed")


def check_signature(
    jws: ParsedJWS | ParsedToken,
    keys: KeySet | None,
    secret_keys: KeySet | None,
    allowed_algs: Collection[str],
    issuer_name: str,
    refetchable: bool = True,
) -> SignatureVerifier:
    """:func:`signature_verdict` that raises its rejection."""
    return _raised(signature_verdict(jws, keys, secret_keys, allowed_algs, issuer_name, refetchable))


class IssuerVerifier:
    """Everything one issuer's checks need, computed once per (issuer config, key set)."""

    __slots__ = (
        "issuer", "name", "keys", "secret_keys", "algs", "typs", "audiences", "aud_claim", "leeway",
        "max_lifetime", "required", "fetches_keys",
    )  # fmt: skip

    def __init__(self, issuer: IssuerConfig, keyset: KeySet | None, log: Callable[[str], None] | None = None) -> None:
        self.issuer = issuer
        self.name: str = issuer.name
        self.keys = keyset
        self.secret_keys = keyset_from_secret(issuer, log)
        self.algs = frozenset(a for a in issuer.algorithms if a.lower() != "none")
        self.typs = frozenset(normalise_typ(t) for t in issuer.typ) if issuer.typ else None
        self.audiences = frozenset(issuer.audiences)
        self.aud_claim = issuer.aud_claim
        self.leeway = float(issuer.leeway)
        self.max_lifetime = float(issuer.max_lifetime)
        self.required = tuple(issuer.required_claims)
        # An issuer with no JWKS source (HMAC or introspection only) has an empty key set, not an
        # unloaded one.
        self.fetches_keys = issuer.fetches_keys
        if self.keys is None and not self.fetches_keys:
            self.keys = KeySet(())

    def verify(self, token: ParsedToken, now: float, defer_audience: bool = False) -> Verified:
        """Steps 3-7 for a token whose ``iss`` is this issuer (``defer_audience``: see
        :meth:`TokenVerifier.verify`). Raises :class:`TokenRejected` (and see
        :func:`signature_verdict`)."""
        return _raised(self.verdict(token, now, defer_audience))

    def verdict(self, token: ParsedToken, now: float, defer_audience: bool = False) -> Verified | TokenRejected:
        """:meth:`verify` that returns its rejection."""
        if token.header["alg"] not in self.algs:
            return TokenRejected("alg_not_allowed", "algorithm not allowed")
        typs = self.typs
        if typs is not None:
            typ = token.header.get("typ")
            if typ is None or normalise_typ(typ) not in typs:
                return TokenRejected("bad_typ", "token type not allowed")
        found = signature_verdict(token, self.keys, self.secret_keys, self.algs, self.name, self.fetches_keys)
        if isinstance(found, TokenRejected):
            return found
        return self.claims_verdict(token.payload, now, None if defer_audience else self.audiences, True)

    def check_claims(
        self,
        claims: dict[str, Any],
        now: float,
        *,
        audiences: frozenset[str] | None = None,
        audience_required: bool = True,
    ) -> Verified:
        """Step 7 on signature-verified claims (or on an introspection response's members).

        The audience is read from the issuer's ``aud_claim`` (``aud`` unless configured).
        ``audiences`` are the accepted audiences; None leaves the membership test to the caller
        (the claim's shape is still checked, its values are in :attr:`Verified.audience`).
        ``audience_required`` False lets a token without the audience claim pass.
        """
        return _raised(self.claims_verdict(claims, now, audiences, audience_required))

    def claims_verdict(
        self, claims: dict[str, Any], now: float, audiences: frozenset[str] | None, audience_required: bool
    ) -> Verified | TokenRejected:
        """:meth:`check_claims` that returns its rejection."""
        leeway = self.leeway
        if "exp" not in claims:
            return TokenRejected("missing_claim", "required claim missing: exp")
        exp = _number(claims["exp"])
        if exp is None:
            return TokenRejected("bad_claim", "exp claim is not a number")
        if not now < exp + leeway:
            return TokenRejected("expired", "token expired")
        if "nbf" in claims:
            nbf = _number(claims["nbf"])
            if nbf is None:
                return TokenRejected("bad_claim", "nbf claim is not a number")
            if nbf > now + leeway:
                return TokenRejected("not_yet_valid", "token not yet valid")
        iat: float | None = None
        if "iat" in claims:
            iat = _number(claims["iat"])
            if iat is None:
                return TokenRejected("bad_claim", "iat claim is not a number")
            if iat > now + leeway:
                return TokenRejected("issued_in_future", "token issued in the future")
        if self.max_lifetime > 0:
            if iat is None:
                return TokenRejected("missing_claim", "required claim missing: iat")
            if exp - iat > self.max_lifetime:
                return TokenRejected("lifetime_exceeded", "token lifetime exceeds the allowed maximum")
        # The claim name comes from the configuration, never from the token.
        aud_claim = self.aud_claim
        aud = claims.get(aud_claim)
        audience: frozenset[str] | None
        if aud is None:
            if audience_required:
                return TokenRejected("missing_claim", f"required claim missing: {aud_claim}")
            if aud_claim in claims:  # JSON null is a malformed audience, not an absent one
                return TokenRejected("bad_claim", f"{aud_claim} claim is not a string or array of strings")
            audience = None
        elif isinstance(aud, str):
            audience = AUDIENCE_SETS.lookup("aud", aud) or AUDIENCE_SETS.remember("aud", aud, frozenset((aud,)))
        elif isinstance(aud, list):
            if not all(isinstance(a, str) for a in aud):
                return TokenRejected("bad_claim", f"{aud_claim} claim is not a string or array of strings")
            key = tuple(aud)
            audience = AUDIENCE_SETS.lookup("auds", key) or AUDIENCE_SETS.remember("auds", key, frozenset(aud))
        else:
            return TokenRejected("bad_claim", f"{aud_claim} claim is not a string or array of strings")
        if audiences is not None and audience is not None and audiences.isdisjoint(audience):
            return TokenRejected("audience_not_allowed", "audience not allowed")
        # "Present" includes JSON null: {"sub": null} is a malformed subject, not a missing one.
        sub = claims.get("sub")
        if "sub" in claims and (not isinstance(sub, str) or not sub):
            return TokenRejected("bad_claim", "sub claim is not a non-empty string")
        jti = claims.get("jti")
        if "jti" in claims and (not isinstance(jti, str) or not jti):
            return TokenRejected("bad_claim", "jti claim is not a non-empty string")
        for name in self.required:
            if _empty(claims.get(name)):
                # The claim name comes from the configuration, not from the token.
                return TokenRejected("missing_claim", f"required claim missing: {name}")
        return Verified(self.issuer, claims, exp, iat, sub, jti, audience)


#: Repeated claim values of verified tokens, shared (see :class:`jwtproxy.tokencache.Repeats`).
CLAIM_VALUES = Repeats()
#: The audience sets of verified tokens (Verified.audience): one frozenset per distinct audience.
AUDIENCE_SETS = Repeats()


class TokenVerifier:
    """All issuers of one worker. Key sets arrive through :meth:`set_keyset` (from the JWKS
    shell); :meth:`verify` is synchronous, pure and reads no clock."""

    def __init__(
        self, issuers: Sequence[IssuerConfig], max_bytes: int, log: Callable[[str], None] | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self._log = log
        self._by_name: dict[str, IssuerVerifier] = {}
        self._by_iss: dict[str, IssuerVerifier] = {}
        self._loaded: dict[str, KeySet] = {}
        for cfg in issuers:
            iv = IssuerVerifier(cfg, None, log)
            if cfg.name in self._by_name or cfg.issuer in self._by_iss:
                raise ValueError(f"issuer {cfg.name}: duplicate issuer name or iss value")
            self._by_name[cfg.name] = iv
            self._by_iss[cfg.issuer] = iv

    def set_keyset(self, issuer_name: str, keyset: KeySet) -> bool:
        """Install ``keyset`` for the named issuer; True if it differs from the installed one.

        Raises KeyError for an issuer this verifier was not built with.
        """
        old = self._by_name[issuer_name]
        previous = self._loaded.get(issuer_name)
        self._loaded[issuer_name] = keyset
        iv = IssuerVerifier(old.issuer, keyset, self._log)
        self._by_name[issuer_name] = iv
        self._by_iss[old.issuer.issuer] = iv
        return previous is None or previous.fingerprint != keyset.fingerprint

    def has_keys(self, issuer_name: str) -> bool:
        """True once a key set was installed for the issuer (or it needs none: HMAC only)."""
        iv = self._by_name.get(issuer_name)
        return iv is not None and (issuer_name in self._loaded or not iv.fetches_keys)

    def verify(
        self, token: str, now: float, allowed_issuers: Collection[str] | None = None, *, defer_audience: bool = False
    ) -> Verified:
        """Verify ``token`` at time ``now`` (seconds since the epoch) against the issuers named
        in ``allowed_issuers`` (None: every configured issuer).

        ``defer_audience`` leaves the audience *membership* test to the caller, who decides
        accepted audiences per request (per-route ``audiences``) and reads
        :attr:`Verified.audience`; the claim is still required and its shape checked.

        Raises :class:`TokenRejected`, :class:`UnknownKid` or :class:`KeysNotLoaded`.
        """
        return _raised(self.verdict(token, now, allowed_issuers, defer_audience=defer_audience))

    def verdict(
        self, token: str, now: float, allowed_issuers: Collection[str] | None = None, *, defer_audience: bool = False
    ) -> Verified | TokenRejected:
        """:meth:`verify` that returns its rejection (the gateway's call: see the module docstring)."""
        try:
            parsed = parse_compact(token, self.max_bytes)
        except TokenRejected as malformed:
            return malformed.with_traceback(None)
        iss = parsed.payload.get("iss")
        iv = self._by_iss.get(iss) if isinstance(iss, str) else None
        if iv is None or (allowed_issuers is not None and iv.name not in allowed_issuers):
            return TokenRejected("issuer_not_allowed", "issuer not allowed")
        found = iv.verdict(parsed, now, defer_audience)
        if isinstance(found, Verified):
            # Verified claims are kept (token cache): their repeated values (iss, aud, ...) as one object.
            CLAIM_VALUES.share_strings(found.claims)
        return found
