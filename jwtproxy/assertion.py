"""Signed identity assertions: what lets a backend stop trusting plain identity headers (contract §5.4).

Theory of operation
-------------------
For every authenticated request the gateway forwards, it can add one header (``[assertion]
header``) holding a compact JWS (RFC 7515 §7.1) that the gateway signs itself. A backend verifies
it with any JOSE library against the gateway's public JWKS and then knows that *this gateway*
vouched for these claims, for *this* upstream, recently -- something a header such as
``x-user-id`` can never say, because anything that reaches the backend around the gateway can set
it.

The assertion
    Protected header ``{"alg", "kid", "typ": "JWT"}``: ``alg`` is ``ES256`` (P-256, RFC 7518
    §3.4) or ``EdDSA`` (Ed25519, RFC 8037), ``kid`` the key's RFC 7638 SHA-256 thumbprint, so a
    verifier picks the key from the JWKS by ``kid`` and an operator can match a kid to a key file
    without a table. ``typ`` is the generic ``JWT`` (RFC 7519 §5.1): an assertion is an ordinary
    JWT that any library verifies (and that a second jwtproxy could accept as a token); what tells
    it apart from an access token is its own ``iss`` and its ``aud`` (the upstream's name), which a
    backend must check.

    Claims, in this order: ``iss`` (``[assertion] issuer``), ``aud`` = the upstream's name (a
    string, not an array), ``iat`` = now, ``exp`` = min(iat + lifetime, the token's ``exp``),
    then each claim named in ``[assertion] claims`` that the verified token has (a JSON ``null``
    counts as absent, as for identity headers), copied unchanged, then ``jti`` = the token's
    ``jti`` when it has one (so a backend can correlate with revocations and logs). Times are whole
    seconds (NumericDate, RFC 7519 §2), rounded down so the assertion never outlives the token.
    A token accepted within the issuer's ``leeway`` after its ``exp`` therefore yields an already
    expired assertion: the gateway's leniency for clock skew is not passed on to backends.

Keys
    :class:`AssertionKey` is one private key with what is derived from it once: the algorithm
    (from the key type: P-256 -> ES256, Ed25519 -> EdDSA; nothing else is accepted), the ``kid``
    (computed with joserfc, off the hot path), the public JWK and the encoded protected header.
    :class:`KeyRing` is the signing key plus every published key. From ``key_files`` the first key
    signs and all are published, so rotation is: add the new key at the end (published, not yet
    signing), reload, let backends' JWKS caches refresh, move it first, reload, and remove the old
    key once no assertion signed by it is still live (``lifetime``). Without ``key_files`` the
    supervisor generates one key before it forks, so every worker signs with the same key, and it
    stays published until the process exits.

Per-request cost
    Signing is one ``cryptography`` call (ES256 or Ed25519) plus a small JSON dump and two base64
    encodings. :class:`AssertionSigner` keeps what it signed in a bounded map keyed by (token
    digest, upstream name) and hands the same assertion out again while it has more than
    ``reuse_margin`` seconds to live (5 s, or half the lifetime when that is shorter), so a token
    that hits the verified-token cache costs one dict lookup here, not a signature. The map is
    bounded by ``cache_size`` entries, oldest insertion evicted first: every entry is re-inserted
    when it is re-signed, so insertion order is age order and no LRU bookkeeping is needed on a hit.
    A reused assertion is identical, ``iat`` included: the contract allows reuse while it is valid.
    A revoked token never reaches the signer (the verification stage denies it first), and a
    reload builds new workers, hence a new signer and an empty map.

Sans-I/O: the clock is the ``now`` parameter, keys arrive as objects or PEM bytes (:func:`load_key_file`
is the one helper that reads a file, for the config loader).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey, OKPKey

__all__ = [
    "ASSERTION_ALGORITHMS",
    "ASSERTION_TYP",
    "AssertionKey",
    "AssertionKeyError",
    "AssertionSigner",
    "GATEWAY_CLAIMS",
    "KeyRing",
    "generate_key",
    "jwks_json",
    "key_from_private",
    "load_key_file",
    "load_key_pem",
]

AssertionAlgorithm = Literal["ES256", "EdDSA"]
ASSERTION_ALGORITHMS: Final[tuple[AssertionAlgorithm, ...]] = ("ES256", "EdDSA")
ASSERTION_TYP: Final = "JWT"
# Claims the gateway sets itself: a configured ``claims`` list must not name them (config.py).
GATEWAY_CLAIMS: Final[frozenset[str]] = frozenset({"iss", "aud", "iat", "exp", "nbf", "jti"})
# An assertion is handed out again while it has more than this many seconds to live, so a backend
# (with a little clock skew and its own processing time) never receives one that is about to expire.
REUSE_MARGIN: Final = 5.0

# An explicit alias: also a valid type where the build reads cryptography as Any (setup.py).
PrivateKey: TypeAlias = "ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey"
_ES256 = ec.ECDSA(hashes.SHA256())
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class AssertionKeyError(ValueError):
    """A key that cannot sign assertions; the message says why (it names no key material)."""


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@dataclass(frozen=True, slots=True, eq=False)
class AssertionKey:
    """One signing key and what is derived from it once (see the module docstring)."""

    algorithm: AssertionAlgorithm
    kid: str
    private_key: PrivateKey
    public_jwk: Mapping[str, str]
    # base64url of the protected header, with the trailing "." of the signing input.
    header_prefix: bytes

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature of ``signing_input``: raw R||S for ES256 (RFC 7518 §3.4), 64 bytes for EdDSA."""
        key = self.private_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(signing_input)
        r, s = decode_dss_signature(key.sign(signing_input, _ES256))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def key_from_private(private_key: object) -> AssertionKey:
    """Wrap a ``cryptography`` private key; raises :class:`AssertionKeyError` for anything but P-256 or Ed25519."""
    algorithm: AssertionAlgorithm
    jwk: ECKey | OKPKey
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
        jwk = OKPKey.import_key(private_key)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise AssertionKeyError(
                f"an EC key on {private_key.curve.name}; ES256 needs a P-256 (secp256r1) key"
            )
        algorithm = "ES256"
        jwk = ECKey.import_key(private_key)
    else:
        raise AssertionKeyError(
            f"a {type(private_key).__name__.lstrip('_')}; expected a P-256 (ES256) or Ed25519 (EdDSA) private key"
        )
    kid = jwk.thumbprint()  # RFC 7638, SHA-256
    public = {str(k): str(v) for k, v in jwk.as_dict(private=False).items()}
    public.update(kid=kid, alg=algorithm, use="sig")
    header = _JSON.encode({"alg": algorithm, "kid": kid, "typ": ASSERTION_TYP}).encode("ascii")
    return AssertionKey(algorithm, kid, private_key, public, _b64(header) + b".")


def load_key_pem(data: bytes) -> AssertionKey:
    """An :class:`AssertionKey` from an unencrypted PEM private key (PKCS#8, SEC1 or OpenSSL traditional)."""
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise AssertionKeyError("the private key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise AssertionKeyError("not a PEM private key") from None
    return key_from_private(private_key)


def load_key_file(path: str) -> AssertionKey:
    """:func:`load_key_pem` of a file; an unreadable file raises :class:`AssertionKeyError` too."""
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
    except OSError as exc:
        raise AssertionKeyError(f"cannot read the key file: {exc.strerror or exc}") from None
    return load_key_pem(data)


def generate_key(algorithm: AssertionAlgorithm) -> AssertionKey:
    """A fresh key for ``algorithm`` (the supervisor's key when ``key_files`` is empty)."""
    if algorithm == "EdDSA":
        return key_from_private(ed25519.Ed25519PrivateKey.generate())
    if algorithm == "ES256":
        return key_from_private(ec.generate_private_key(ec.SECP256R1()))
    raise AssertionKeyError(f"unsupported assertion algorithm {algorithm!r}")


def jwks_json(keys: Iterable[AssertionKey]) -> bytes:
    """The public JWKS document (RFC 7517 §5) of ``keys``, each once, in order."""
    unique: dict[str, AssertionKey] = {}
    for key in keys:
        unique.setdefault(key.kid, key)
    return json.dumps(
        {"keys": [dict(k.public_jwk) for k in unique.values()]}, separators=(",", ":")
    ).encode("ascii")


class KeyRing:
    """The key that signs and every key that is published (the signing key first)."""

    __slots__ = ("signing", "published", "jwks_json")

    def __init__(self, signing: AssertionKey, published: Iterable[AssertionKey] = ()) -> None:
        keys: dict[str, AssertionKey] = {signing.kid: signing}
        for key in published:
            keys.setdefault(key.kid, key)
        self.signing = signing
        self.published: tuple[AssertionKey, ...] = tuple(keys.values())
        self.jwks_json: bytes = jwks_json(self.published)

    @classmethod
    def from_keys(cls, keys: Sequence[AssertionKey], algorithm: AssertionAlgorithm) -> KeyRing:
        """The ring of ``key_files``: the first key signs and must be an ``algorithm`` key; all are published.

        Raises :class:`AssertionKeyError` for an empty list, a first key of another algorithm, or the
        same key listed twice (its kid would appear twice in the JWKS).
        """
        if not keys:
            raise AssertionKeyError("no keys")
        if keys[0].algorithm != algorithm:
            raise AssertionKeyError(
                f"the first key signs and is an {keys[0].algorithm} key, but algorithm is {algorithm!r}"
            )
        seen: set[str] = set()
        for key in keys:
            if key.kid in seen:
                raise AssertionKeyError(f"the key {key.kid} is listed twice")
            seen.add(key.kid)
        return cls(keys[0], keys[1:])

    def jwks(self) -> dict[str, Any]:
        """The public JWKS (RFC 7517 §5) as a dict: each key with ``kid``, ``alg`` and ``use: sig``."""
        return {"keys": [dict(k.public_jwk) for k in self.published]}


class AssertionSigner:
    """Per-worker signer with its bounded reuse map (see the module docstring)."""

    __slots__ = ("key", "issuer", "lifetime", "claims", "cache_size", "reuse_margin", "_issued", "signed")

    def __init__(
        self,
        key: AssertionKey,
        *,
        issuer: str,
        lifetime: float,
        claims: Sequence[str],
        cache_size: int,
        reuse_margin: float = REUSE_MARGIN,
    ) -> None:
        if lifetime <= 0:
            raise ValueError("lifetime must be > 0")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.key = key
        self.issuer = issuer
        self.lifetime = lifetime
        self.claims = tuple(claims)
        self.cache_size = cache_size
        self.reuse_margin = min(reuse_margin, lifetime / 2)
        # (token digest, upstream name) -> (assertion, its exp). Insertion order is age order.
        self._issued: dict[tuple[bytes, str], tuple[bytes, int]] = {}
        self.signed = 0  # how many signatures this signer made (tests and the bench read it)

    def assertion(
        self,
        token_key: bytes,
        upstream: str,
        claims: Mapping[str, Any],
        token_exp: float | None,
        now: float,
    ) -> bytes:
        """The header value for a request with this verified token to ``upstream``.

        ``token_key`` identifies the token (the verified-token cache's sha256 digest); ``claims``
        are the token's verified claims (``jti`` is read from them); ``token_exp`` caps ``exp``.
        """
        issued = self._issued
        cache_key = (token_key, upstream)
        hit = issued.get(cache_key)
        if hit is not None:
            if hit[1] - now > self.reuse_margin:
                return hit[0]
            del issued[cache_key]  # re-inserted below, at the young end
        value, exp = self.sign(upstream, claims, token_exp, now)
        if self.cache_size and exp - now > self.reuse_margin:
            issued[cache_key] = (value, exp)
            if len(issued) > self.cache_size:
                del issued[next(iter(issued))]
        return value

    def sign(self, upstream: str, claims: Mapping[str, Any], token_exp: float | None, now: float) -> tuple[bytes, int]:
        """A freshly signed assertion and its ``exp`` (no reuse). Raises ``ValueError`` for a claim
        value JSON cannot carry (verified claims always can)."""
        iat = int(now)
        exp_limit = iat + self.lifetime
        if token_exp is not None and token_exp < exp_limit:
            exp_limit = token_exp
        exp = math.floor(exp_limit)
        payload: dict[str, Any] = {"iss": self.issuer, "aud": upstream, "iat": iat, "exp": exp}
        for name in self.claims:
            value = claims.get(name)
            if value is not None:
                payload[name] = value
        jti = claims.get("jti")
        if jti is not None:
            payload["jti"] = jti
        key = self.key
        signing_input = key.header_prefix + _b64(_JSON.encode(payload).encode("ascii"))
        self.signed += 1
        return signing_input + b"." + _b64(key.sign(signing_input)), exp

    def __len__(self) -> int:
        return len(self._issued)
