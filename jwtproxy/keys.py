"""Key import: a JWK Set (or the configured HMAC secret) in, precompiled signature verifiers out.

Theory of operation
-------------------
Everything expensive or judgement-laden happens here, once per key set, so that the per-request
path is one dictionary lookup and one direct ``cryptography`` call (no joserfc, no JWK parsing,
no padding/hash objects built per request).

A :class:`SignatureVerifier` is one (key, algorithm) pair. An RSA key without a JWK ``alg`` gives
one verifier per RS*/PS* algorithm the issuer allows; a key *with* ``alg`` gives exactly one
verifier, so ``alg`` pins the algorithm (RFC 7517 §4.4; a PS256 key never checks a PS384 token).

A JWK is **skipped, with one log line**, unless every point holds (fail closed -- one odd key
must not take the issuer's other keys down, and must never be half-used):

* it is an object with a string ``kty`` of ``RSA``, ``EC`` or ``OKP``. ``oct`` keys are never
  taken from a JWKS: HMAC keys come only from ``hs_secret``, so no published key (an RSA modulus,
  say) can ever become an HMAC secret (the classic RS256->HS256 confusion);
* it holds no private member (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``oth``, ``k``): a
  public JWKS that leaks a private key is an operator error we refuse to build on;
* ``use``, if present, is ``sig``; ``key_ops``, if present, is a list of strings containing
  ``verify``; ``kid``, if present, is a string; ``alg``, if present, is one we implement, fits
  the key type and curve, and is in the issuer's ``algorithms``;
* RSA: ``n`` >= 2048 bits (RFC 7518 §3.3), ``e`` odd and >= 3 (``e = 1`` makes "signatures"
  trivially forgeable), not a ROCA-weak modulus (CVE-2017-15361, detected by its fingerprint);
* EC: ``crv`` P-256/P-384/P-521 matching ES256/ES384/ES512, ``x`` and ``y`` of the exact
  coordinate length (RFC 7518 §6.2.1.2), and a point on the curve (checked by ``cryptography``);
* OKP: ``crv`` Ed25519 with a 32-byte ``x`` (RFC 8037), usable for ``EdDSA`` and ``Ed25519``
  (RFC 9864's fully-specified name).

Duplicate ``kid`` values are kept: :meth:`KeySet.for_kid` returns every key with that ``kid``
and the verifier tries each (IdPs briefly publish duplicates during rotation).

Signature checks (in :class:`SignatureVerifier` subclasses): RSA signatures must have exactly the
modulus length; ECDSA signatures are raw ``R || S`` of exactly 2x the coordinate length (RFC
7518 §3.4) with ``1 <= r, s < n`` checked explicitly (CVE-2022-21449 accepted r = s = 0) before
DER conversion; PSS uses MGF1 with the same hash and a salt of the hash length (RFC 7518 §3.5);
HMAC compares in constant time. ``verify`` never raises: any failure is ``False``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from jwtproxy.accesslog import echo
from jwtproxy.algorithms import ASYMMETRIC_ALGORITHMS, EC_ALGORITHMS, HMAC_ALGORITHMS, OKP_ALGORITHMS, RSA_ALGORITHMS
from jwtproxy.jose import b64url_decode

if TYPE_CHECKING:
    from jwtproxy.config import IssuerConfig

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "KeySet",
    "PRIVATE_MEMBERS",
    "SignatureVerifier",
    "UnfitKey",
    "is_roca_modulus",
    "keyset_from_jwks",
    "keyset_from_secret",
    "merge_sources",
    "verifiers_for_jwk",
]

Log = Callable[[str], None]

MIN_RSA_BITS: Final = 2048
_RSA_FITS: Final = frozenset(RSA_ALGORITHMS)
_OKP_FITS: Final = frozenset(OKP_ALGORITHMS)
_HASHES: Final[dict[str, type[hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_CURVES: Final[dict[str, ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
# alg -> (cryptography curve, coordinate bytes, hash), built from the one algorithm table.
_EC: Final[dict[str, tuple[ec.EllipticCurve, int, type[hashes.HashAlgorithm]]]] = {
    alg: (_CURVES[crv], size, _HASHES[digest]) for alg, (crv, size, digest) in EC_ALGORITHMS.items()
}
_EC_BY_CURVE: Final = {crv: alg for alg, (crv, _, _) in EC_ALGORITHMS.items()}
# Curve orders, for the explicit 1 <= r, s < n check.
_EC_ORDER: Final = {
    "ES256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ES384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
    ),
    "ES512": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
        "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}
PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_MAX_ECHO: Final = 80  # characters of a JWK member quoted in a "key skipped" line


# ------------------------------------------------------------------------------- verifiers


class SignatureVerifier:
    """One key for one algorithm. ``verify`` is a single direct ``cryptography`` (or ``hmac``)
    call with objects built at import time; it returns False on any failure and never raises."""

    __slots__ = ("kid", "alg", "thumb")

    def __init__(self, kid: str | None, alg: str, material: bytes) -> None:
        self.kid = kid
        self.alg = alg
        # Digest of the key material, for KeySet.fingerprint (never the material itself).
        self.thumb = hashlib.sha256(material).hexdigest()

    def verify(self, signing_input: bytes, signature: bytes) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kid={self.kid!r}, alg={self.alg!r})"


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class RSAVerifier(SignatureVerifier):
    """RS256/384/512 (PKCS#1 v1.5) and PS256/384/512 (PSS, MGF1 same hash, salt = hash length)."""

    __slots__ = ("_key", "_padding", "_hash", "_size")

    def __init__(self, kid: str | None, alg: str, key: rsa.RSAPublicKey) -> None:
        super().__init__(kid, alg, _spki(key))
        self._key = key
        hash_cls = _HASHES["sha" + alg[2:]]
        self._hash = hash_cls()
        self._padding: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if alg.startswith("RS")
            else padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=self._hash.digest_size)
        )
        self._size = (key.key_size + 7) // 8

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        if len(signature) != self._size:  # RFC 8017 §8.2.2 step 1
            return False
        try:
            self._key.verify(signature, signing_input, self._padding, self._hash)
        except (InvalidSignature, ValueError):
            return False
        return True


class ECDSAVerifier(SignatureVerifier):
    """ES256/384/512: raw R||S (RFC 7518 §3.4) -> range check -> DER -> OpenSSL."""

    __slots__ = ("_key", "_algo", "_half", "_order")

    def __init__(self, kid: str | None, alg: str, key: ec.EllipticCurvePublicKey) -> None:
        super().__init__(kid, alg, _spki(key))
        _, size, hash_cls = _EC[alg]
        self._key = key
        self._algo = ec.ECDSA(hash_cls())
        self._half = size
        self._order = _EC_ORDER[alg]

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        half = self._half
        if len(signature) != 2 * half:
            return False
        r = int.from_bytes(signature[:half], "big")
        s = int.from_bytes(signature[half:], "big")
        # Explicit, not left to the library: CVE-2022-21449 ("psychic signatures") accepted r=s=0.
        if not (0 < r < self._order and 0 < s < self._order):
            return False
        try:
            self._key.verify(encode_dss_signature(r, s), signing_input, self._algo)
        except (InvalidSignature, ValueError):
            return False
        return True


class Ed25519Verifier(SignatureVerifier):
    """EdDSA / Ed25519 over an Ed25519 key (RFC 8037, RFC 9864)."""

    __slots__ = ("_key",)

    def __init__(self, kid: str | None, alg: str, key: Ed25519PublicKey) -> None:
        super().__init__(kid, alg, _spki(key))
        self._key = key

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._key.verify(signature, signing_input)
        except (InvalidSignature, ValueError):
            return False
        return True


class HMACVerifier(SignatureVerifier):
    """HS256/384/512 with the configured secret; constant-time comparison."""

    __slots__ = ("_secret", "_digest")

    def __init__(self, alg: str, secret: bytes) -> None:
        # The thumbprint is a hash of a hash: the fingerprint must change when the secret does,
        # without the secret's own digest ever being printable from a KeySet.
        super().__init__(None, alg, b"hs:" + hashlib.sha256(secret).digest())
        self._secret = secret
        self._digest = HMAC_ALGORITHMS[alg]

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._secret, signing_input, self._digest), signature)


# --------------------------------------------------------------------------------- key set


class KeySet:
    """The accepted keys of one issuer, indexed for the per-request lookup.

    ``by_kid`` maps each ``kid`` to its verifiers (several for duplicate kids or a key usable
    with several algorithms). ``unkeyed(alg)`` is every verifier for ``alg`` -- the candidates for
    a token without ``kid`` (contract §4: each key that fits ``alg`` is tried). ``fingerprint`` is a
    sha256 over the canonical (kid, alg, key digest) triples: equal fingerprints mean the same
    keys, whatever the JWKS member order or formatting.
    """

    __slots__ = ("verifiers", "by_kid", "fingerprint", "_by_alg", "_by_kid_alg")

    def __init__(self, verifiers: Iterable[SignatureVerifier]) -> None:
        self.verifiers: tuple[SignatureVerifier, ...] = tuple(verifiers)
        self.by_kid: dict[str, list[SignatureVerifier]] = {}
        self._by_alg: dict[str, list[SignatureVerifier]] = {}
        self._by_kid_alg: dict[tuple[str, str], list[SignatureVerifier]] = {}
        for v in self.verifiers:
            self._by_alg.setdefault(v.alg, []).append(v)
            if v.kid is not None:
                self.by_kid.setdefault(v.kid, []).append(v)
                self._by_kid_alg.setdefault((v.kid, v.alg), []).append(v)
        canonical = sorted((v.kid or "", v.alg, v.thumb) for v in self.verifiers)
        self.fingerprint: str = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()

    def unkeyed(self, alg: str) -> list[SignatureVerifier]:
        """Every verifier for ``alg`` (used for tokens without ``kid``)."""
        return self._by_alg.get(alg, [])

    def for_kid(self, kid: str, alg: str) -> list[SignatureVerifier] | None:
        """Verifiers with this ``kid`` for ``alg``; ``[]`` if the kid is known but has no key for
        ``alg``; ``None`` if no key has this kid (the caller may refetch the JWKS)."""
        found = self._by_kid_alg.get((kid, alg))
        if found is not None:
            return found
        return [] if kid in self.by_kid else None

    def __len__(self) -> int:
        return len(self.verifiers)

    def __repr__(self) -> str:
        return f"KeySet({list(self.verifiers)!r})"


# ------------------------------------------------------------------------------ JWK import


class _Skip(Exception):
    """One JWK is unfit; the message says why (logged, never raised to the caller)."""


def _b64(jwk: dict[str, Any], member: str) -> bytes:
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise _Skip(f"'{member}' missing or not a string")
    # RFC 7517 says unpadded; trailing '=' from some IdPs is tolerated here because key documents
    # come from the configured IdP and padding cannot change the decoded key.
    data = b64url_decode(value.rstrip("="))
    if data is None:
        raise _Skip(f"'{member}' is not base64url")
    return data


# Multiplicative-subgroup fingerprint of ROCA (Infineon RSALib, CVE-2017-15361) moduli, after
# Nemec et al. 2017: such n has n mod p in the subgroup generated by 65537 for each small p.
_ROCA_PRIMES: Final = (
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
    101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
)  # fmt: skip


def _subgroup(p: int) -> frozenset[int]:
    out, x = set(), 1
    while x not in out:
        out.add(x)
        x = x * 65537 % p
    return frozenset(out)


_ROCA_SUBGROUPS: Final = tuple((p, _subgroup(p)) for p in _ROCA_PRIMES)


def is_roca_modulus(n: int) -> bool:
    """True if ``n`` carries the ROCA fingerprint (such keys are factorable)."""
    return all(n % p in group for p, group in _ROCA_SUBGROUPS)


def _rsa_key(jwk: dict[str, Any]) -> rsa.RSAPublicKey:
    n = int.from_bytes(_b64(jwk, "n"), "big")
    e = int.from_bytes(_b64(jwk, "e"), "big")
    if n.bit_length() < MIN_RSA_BITS:
        raise _Skip(f"RSA key of {n.bit_length()} bits (minimum {MIN_RSA_BITS})")
    if e < 3 or e % 2 == 0 or e >= n:
        raise _Skip("RSA public exponent must be odd and >= 3")
    if is_roca_modulus(n):
        raise _Skip("RSA modulus has the ROCA fingerprint (CVE-2017-15361)")
    return rsa.RSAPublicNumbers(e, n).public_key()


def _ec_key(jwk: dict[str, Any], alg: str) -> ec.EllipticCurvePublicKey:
    curve, size, _ = _EC[alg]
    x, y = _b64(jwk, "x"), _b64(jwk, "y")
    if len(x) != size or len(y) != size:
        raise _Skip(f"EC coordinates must be {size} bytes for {jwk.get('crv')}")
    try:
        # from_encoded_point checks that the point is on the curve.
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except ValueError:
        raise _Skip("EC point is not on the curve") from None



def _import_jwk(jwk: Any, allowed: frozenset[str]) -> list[SignatureVerifier]:
    """The verifiers for one JWK, or :class:`_Skip` saying why it is unfit."""
    if not isinstance(jwk, dict):
        raise _Skip(f"not a JSON object ({type(jwk).__name__})")
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise _Skip("'kty' missing or not a string")
    if kty == "oct":
        raise _Skip("symmetric (oct) keys are never taken from a JWKS; HMAC keys come from hs_secret")
    if kty not in ("RSA", "EC", "OKP"):
        raise _Skip(f"unsupported kty {echo(kty, _MAX_ECHO)}")
    private = [m for m in PRIVATE_MEMBERS if m in jwk]
    if private:
        raise _Skip(f"holds private key members ({', '.join(private)}); a public JWKS must not")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _Skip("'kid' is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise _Skip(f"'use' is {echo(use, _MAX_ECHO)}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops or not all(isinstance(o, str) for o in ops)):
        raise _Skip("'key_ops' does not include 'verify'")
    pinned = jwk.get("alg")
    if pinned is not None:
        if not isinstance(pinned, str):
            raise _Skip("'alg' is not a string")
        if pinned not in ASYMMETRIC_ALGORITHMS:
            raise _Skip(f"unsupported alg {echo(pinned, _MAX_ECHO)}")
        if pinned not in allowed:
            raise _Skip(f"alg {pinned} is not in the issuer's algorithms")

    if kty == "RSA":
        fits = _RSA_FITS
    elif kty == "EC":
        crv = jwk.get("crv")
        if crv not in _EC_BY_CURVE:
            raise _Skip(f"unsupported EC crv {echo(crv, _MAX_ECHO)}")
        fits = frozenset({_EC_BY_CURVE[crv]})
    else:
        crv = jwk.get("crv")
        if crv != "Ed25519":
            raise _Skip(f"unsupported OKP crv {echo(crv, _MAX_ECHO)}")
        fits = _OKP_FITS
    if pinned is not None:
        if pinned not in fits:
            raise _Skip(f"alg {pinned} does not fit a {kty} key{' on ' + str(jwk.get('crv')) if kty != 'RSA' else ''}")
        algs = [pinned]
    else:
        algs = sorted(fits & allowed)
        if not algs:
            raise _Skip(f"none of the issuer's algorithms fits a {kty} key")

    try:
        if kty == "RSA":
            rkey = _rsa_key(jwk)
            return [RSAVerifier(kid, a, rkey) for a in algs]
        if kty == "EC":
            ekey = _ec_key(jwk, algs[0])
            return [ECDSAVerifier(kid, a, ekey) for a in algs]
        x = _b64(jwk, "x")
        if len(x) != 32:
            raise _Skip("Ed25519 'x' must be 32 bytes")
        okey = Ed25519PublicKey.from_public_bytes(x)
        return [Ed25519Verifier(kid, a, okey) for a in algs]
    except (ValueError, TypeError, OverflowError, UnsupportedAlgorithm) as exc:
        raise _Skip(f"invalid key ({type(exc).__name__})") from None


class UnfitKey(ValueError):
    """A single JWK failed the rules of the module docstring; the message says which."""


def verifiers_for_jwk(jwk: Any, algorithms: frozenset[str]) -> list[SignatureVerifier]:
    """The verifiers for one JWK under exactly the rules a JWKS key meets, for ``algorithms``.

    Used for keys that do not come from a JWKS (a DPoP proof's ``jwk`` header). Raises
    :class:`UnfitKey` saying why the key is unfit; never returns an empty list.
    """
    try:
        return _import_jwk(jwk, algorithms & ASYMMETRIC_ALGORITHMS)
    except _Skip as exc:
        raise UnfitKey(str(exc)) from None


def _load_document(document: bytes | str | dict[str, Any]) -> list[Any]:
    if isinstance(document, (bytes, bytearray, str)):
        try:
            document = json.loads(document)
        except RecursionError:
            raise ValueError("JWKS is not valid JSON: nesting too deep") from None
        except ValueError as exc:
            raise ValueError(f"JWKS is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"JWKS is a JSON {type(document).__name__}, not an object")
    if "keys" not in document:
        raise ValueError('JWKS object has no "keys" member')
    keys = document["keys"]
    if not isinstance(keys, list):
        raise ValueError(f'JWKS "keys" is a {type(keys).__name__}, not an array')
    return keys


def keyset_from_jwks(document: bytes | str | dict[str, Any], issuer: IssuerConfig, log: Log) -> KeySet:
    """Import a JWK Set (RFC 7517 §5) for ``issuer``.

    Raises ``ValueError`` with a precise message if ``document`` is not a ``{"keys": [...]}``
    object. Unfit keys (see the module docstring) are skipped with one ``log`` line each; the
    result may be empty. Only algorithms in ``issuer.algorithms`` get verifiers.
    """
    keys = _load_document(document)
    allowed = frozenset(issuer.algorithms) & ASYMMETRIC_ALGORITHMS
    verifiers: list[SignatureVerifier] = []
    for index, jwk in enumerate(keys):
        try:
            verifiers.extend(_import_jwk(jwk, allowed))
        except _Skip as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            label = f"key {index}" + (f" (kid {echo(kid, _MAX_ECHO)})" if kid is not None else "")
            log(f"jwks: issuer {issuer.name}: {label} skipped: {exc}")
    return KeySet(verifiers)


def keyset_from_secret(issuer: IssuerConfig, log: Log | None = None) -> KeySet | None:
    """HMAC verifiers from ``issuer.hs_secret`` for the HS algorithms in ``issuer.algorithms``.

    None when there is no secret or no HS algorithm. An algorithm whose hash is longer than the
    secret is left out (RFC 7518 §3.2: the key MUST be at least the hash output size), with a
    ``log`` line when ``log`` is given.
    """
    secret = issuer.hs_secret
    if not secret:
        return None
    verifiers: list[SignatureVerifier] = []
    for alg in issuer.algorithms:
        digest = HMAC_ALGORITHMS.get(alg)
        if digest is None:
            continue
        if len(secret) < hashlib.new(digest).digest_size:
            if log is not None:
                log(f"jwks: issuer {issuer.name}: {alg} disabled: hs_secret is shorter than the {digest} output")
            continue
        verifiers.append(HMACVerifier(alg, secret))
    return KeySet(verifiers) if verifiers else None


def merge_sources(keysets: Sequence[KeySet]) -> tuple[KeySet, list[str]]:
    """One issuer's keys from several JWKS sources (``jwks_uri`` as a list), and the refused kids.

    The union of every source's verifiers, each distinct key once (a key published by two
    sources is not tried twice). A ``kid`` that two sources publish with *different* keys is
    refused: none of its keys is kept, because which source is right cannot be told, and a token
    naming that kid then fails with "no key" rather than being checked against a key chosen by
    accident of ordering. Returns the merged set and the refused kids (sorted) for a log line.
    """
    key_sets_by_kid: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for keyset in keysets:
        for kid, verifiers in keyset.by_kid.items():
            key_sets_by_kid.setdefault(kid, set()).add(frozenset((v.alg, v.thumb) for v in verifiers))
    refused = sorted(kid for kid, variants in key_sets_by_kid.items() if len(variants) > 1)
    refused_set = frozenset(refused)
    seen: set[tuple[str, str, str]] = set()
    merged: list[SignatureVerifier] = []
    for keyset in keysets:
        for v in keyset.verifiers:
            identity = (v.kid or "", v.alg, v.thumb)
            if v.kid in refused_set or identity in seen:
                continue
            seen.add(identity)
            merged.append(v)
    return KeySet(merged), refused
