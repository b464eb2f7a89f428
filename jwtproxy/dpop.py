"""DPoP proofs (RFC 9449): a proof string, the request and the token in, a key thumbprint out.

Theory of operation
-------------------
A DPoP-bound access token carries ``cnf.jkt``, the RFC 7638 thumbprint of a key only its client
holds. On every request the client sends ``Authorization: DPoP <token>`` and a fresh proof in the
``DPoP`` header: a JWT signed with that key, naming the request (``htm``, ``htu``), the moment
(``iat``), a unique id (``jti``) and the token (``ath``). A stolen token without the key is useless,
and a stolen proof is good for one request to one URI within one short window, once.

:meth:`ProofChecker.check` is sans-I/O (the clock is the ``now`` it is given; no sockets, no
logging) and runs a fixed pipeline; the first failed step raises :class:`ProofRejected`, nothing
after it runs, and nothing returns without passing every step (RFC 9449 §4.3, contract §5.2):

====  ==============================================================  ==================
step  check                                                           ``reason``
====  ==============================================================  ==================
1     at most :data:`MAX_PROOF_BYTES`; a compact JWS, strict base64url  dpop_malformed
      and JSON without duplicate members (:mod:`jwtproxy.jose`);
      ``crit``, ``b64`` and nested ``cty`` refused
2     ``typ`` is ``dpop+jwt`` (RFC 9449 §4.2; ``application/`` optional)  dpop_typ
3     ``alg`` is in the issuer's ``dpop_algorithms`` and asymmetric      dpop_alg
      (``none`` and ``HS*`` never, whatever the configuration says)
4     ``jwk`` is a JSON object holding a public key only (no ``d p q    dpop_jwk
      dp dq qi oth k``) that passes every rule a JWKS key meets
      (:func:`jwtproxy.keys.verifiers_for_jwk`: RSA >= 2048 bits, curve
      fits ``alg``, point on the curve, ...)
5     the signature verifies with that key (``cryptography``)           dpop_signature
6     its RFC 7638 SHA-256 thumbprint equals the token's ``cnf.jkt``    dpop_key_mismatch
7     claims are well-typed: ``jti`` a non-empty string of at most       dpop_malformed,
      :data:`MAX_JTI_CHARS`, ``htm``/``htu``/``ath`` strings, ``iat`` a    dpop_jti
      JSON number (never a bool, NaN or 1e400)
8     ``htm`` equals the request method (case-sensitive, RFC 9110 §9.1)  dpop_htm
9     ``htu`` equals the request URI, both normalised (below)            dpop_htu
10    ``|now - iat| <= dpop_max_age + leeway``                          dpop_iat
11    ``ath`` equals base64url(SHA-256(token)) (RFC 9449 §4.2)           dpop_ath
12    with ``dpop_nonce``: ``nonce`` is one this gateway issued for the  dpop_nonce
      current or the previous time slot (error ``use_dpop_nonce``)
====  ==============================================================  ==================

Every rejection is ``error="invalid_dpop_proof"`` except step 12's ``use_dpop_nonce``, which
tells the client to retry with the nonce the shell sends in ``DPoP-Nonce``. Descriptions are
fixed text naming the check, never a piece of the proof.

*Single use.* A passed proof comes back as :class:`AcceptedProof` with a ``replay_key`` derived
from the ``jti`` alone (whatever else the proof says: the same ``jti`` for another URI is still a
replay) and ``replay_until = iat + dpop_max_age + leeway``, the last moment any proof with that
``iat`` could be accepted. The shell must then record the key as used, once per host and, with a
Redis revocation backend, once across nodes (:mod:`jwtproxy.dpopreplay`), and refuse a key it has
seen (``dpop_replay``). Recording happens only after the signature passed, so nobody can burn
another client's ``jti`` with an unsigned proof.

*htu normalisation* (RFC 9449 §4.3 point 9, RFC 3986 §6.2.2 and §6.2.3): :func:`normalise_htu`
brings both the proof's ``htu`` and the request URI (:func:`request_htu`: scheme from the
listener or a trusted ``X-Forwarded-Proto``, authority from ``Host`` or a trusted
``X-Forwarded-Host``, path as the client sent it) into one form: query and fragment dropped;
scheme and host lower case; the scheme's default port removed; percent-escapes of unreserved
characters decoded and the others upper-cased, characters a URI may not hold raw
percent-encoded as UTF-8; dot-segments removed (RFC 3986 §5.2.4); an empty path is ``/``. No
other equivalence is assumed: ``/a//b`` is not ``/a/b``. Userinfo, schemes other than
http(s) and unparsable authorities never match anything.

*Costs.* Per request: one JOSE parse, one signature verification, one SHA-256 of the token and a
few dictionary lookups. The key work is done once per distinct proof header: a client signs
every proof with the same ``typ``/``alg``/``jwk``, so the encoded header segment keys a bounded
LRU (:data:`KEY_CACHE_SIZE`) of the imported verifier and its thumbprint (computed by joserfc,
RFC 7638). A flood of distinct keys only churns that cache. Normalised URIs are memoised the
same way.

*Nonces* (RFC 9449 §8): stateless. A nonce is base64url(HMAC-SHA256(secret, slot))[:22] for the
time slot ``floor(now / NONCE_SLOT_SECONDS)``; the secret is made once by the supervisor before
it forks, so a nonce issued by one worker is good on every worker of the host, and survives
reloads. The current and the previous slot are accepted, so a nonce lives 1-2 slots. Nothing is
stored per client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from jwtproxy.algorithms import DPOP_DEFAULT_ALGORITHMS
from jwtproxy.jose import TokenRejected, parse_compact
from jwtproxy.keys import ASYMMETRIC_ALGORITHMS, PRIVATE_MEMBERS, SignatureVerifier, UnfitKey, verifiers_for_jwk
from jwtproxy.verifier import normalise_typ

__all__ = [
    "DEFAULT_ALGORITHMS",
    "AcceptedProof",
    "DPoPPolicy",
    "NonceIssuer",
    "ProofChecker",
    "ProofRejected",
    "access_token_hash",
    "normalise_htu",
    "request_htu",
]

#: A proof longer than this is refused before any decoding (an RSA-4096 proof is ~2.3 KiB).
MAX_PROOF_BYTES: Final = 8192
#: A ``jti`` longer than this is refused (RFC 9449 asks for 96 bits of randomness, ~16 chars).
MAX_JTI_CHARS: Final = 256
#: Distinct proof headers whose imported key is remembered, per worker.
KEY_CACHE_SIZE: Final = 1024
#: Length of a nonce time slot; a nonce is accepted in its own slot and the next one.
NONCE_SLOT_SECONDS: Final = 60
#: ``[[issuer]] dpop_algorithms`` when absent.
DEFAULT_ALGORITHMS: Final = DPOP_DEFAULT_ALGORITHMS

INVALID_DPOP_PROOF: Final = "invalid_dpop_proof"
USE_DPOP_NONCE: Final = "use_dpop_nonce"


class ProofRejected(Exception):
    """A DPoP proof that must be answered 401 with ``WWW-Authenticate: DPoP error=...``.

    ``reason`` is the metrics label (see the module table), ``error`` the RFC 9449 error code and
    ``description`` fixed text naming the failed check.
    """

    __slots__ = ("reason", "description", "error")

    def __init__(self, reason: str, description: str, error: str = INVALID_DPOP_PROOF) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.error = error


@dataclass(frozen=True, slots=True)
class DPoPPolicy:
    """One issuer's DPoP settings, compiled once per config."""

    algorithms: frozenset[str]
    max_age: float
    leeway: float
    nonce_required: bool = False

    @classmethod
    def build(cls, algorithms: Iterable[str], max_age: float, leeway: float, nonce_required: bool = False) -> DPoPPolicy:
        """A policy whose algorithms are cut down to the asymmetric ones (never ``none``/HS*)."""
        return cls(frozenset(algorithms) & ASYMMETRIC_ALGORITHMS, float(max_age), float(leeway), nonce_required)

    @property
    def window(self) -> float:
        """How far ``iat`` may be from now, either side."""
        return self.max_age + self.leeway

    def algs_text(self) -> str:
        """The ``algs`` parameter of the ``DPoP`` challenge (RFC 9449 §7.1), in a stable order."""
        return " ".join(sorted(self.algorithms))


@dataclass(frozen=True, slots=True)
class AcceptedProof:
    """A proof that passed every check; its ``jti`` is not yet recorded as used."""

    jkt: str
    replay_key: bytes
    replay_until: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def access_token_hash(token: str) -> str:
    """``ath``: base64url (no padding) of the SHA-256 of the token's ASCII form."""
    return _b64(hashlib.sha256(token.encode("ascii", "surrogateescape")).digest())


def replay_key(jti: str) -> bytes:
    """The single-use key of a proof: a digest of its ``jti`` (bounded size, no raw client text)."""
    return hashlib.sha256(b"jwtproxy-dpop-jti\x00" + jti.encode("utf-8", "surrogatepass")).digest()[:16]


# --------------------------------------------------------------------------------------- nonces


class NonceIssuer:
    """Stateless server nonces (see the module docstring). ``secret`` must be at least 32 bytes."""

    __slots__ = ("_secret", "_slot_seconds", "_memo")

    def __init__(self, secret: bytes, slot_seconds: float = NONCE_SLOT_SECONDS) -> None:
        if len(secret) < 32:
            raise ValueError("the DPoP nonce secret must be at least 32 bytes")
        if slot_seconds <= 0:
            raise ValueError("the nonce slot must be positive")
        self._secret = secret
        self._slot_seconds = float(slot_seconds)
        self._memo: dict[int, str] = {}

    def _for_slot(self, slot: int) -> str:
        nonce = self._memo.get(slot)
        if nonce is None:
            mac = hmac.digest(self._secret, b"jwtproxy-dpop-nonce\x00" + slot.to_bytes(8, "big", signed=True), "sha256")
            nonce = _b64(mac)[:22]  # 132 bits
            if len(self._memo) >= 4:
                self._memo.clear()
            self._memo[slot] = nonce
        return nonce

    def _slot(self, now: float) -> int:
        return math.floor(now / self._slot_seconds)

    def current(self, now: float) -> str:
        """The nonce to hand out at ``now`` (``DPoP-Nonce``)."""
        return self._for_slot(self._slot(now))

    def age(self, nonce: str, now: float) -> int | None:
        """0 if ``nonce`` is the current slot's, 1 if the previous slot's, else None."""
        slot = self._slot(now)
        given = nonce.encode("ascii", "replace")
        for age in (0, 1):
            if hmac.compare_digest(given, self._for_slot(slot - age).encode("ascii")):
                return age
        return None


# ------------------------------------------------------------------------------- htu normalisation

_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a path may hold raw (RFC 3986 §3.3 pchar and '/'), besides '%' escapes.
_PATH_RAW: Final = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
# Same set as a C-level strip table, for the fast path.
_PATH_RAW_BYTES: Final = bytes(sorted(_PATH_RAW))
_HOST_RAW: Final = _UNRESERVED | frozenset(b"!$&'()*+,;=")
_HEXDIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_URI: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^?#]*)")
_IPV6: Final = re.compile(r"\[[0-9a-f:.]+\]")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HTU_MEMO: dict[str, str | None] = {}
_HTU_MEMO_LIMIT: Final = 4096


def _percent_normalise(raw: bytes, allowed: frozenset[int]) -> str | None:
    """RFC 3986 §6.2.2.1/§6.2.2.2: decode unreserved escapes, upper-case the others, escape the
    bytes that may not appear raw. None for a malformed escape."""
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # '%'
            if i + 2 >= n or raw[i + 1] not in _HEXDIGITS or raw[i + 2] not in _HEXDIGITS:
                return None
            value = int(raw[i + 1 : i + 3], 16)
            out.append(chr(value) if value in _UNRESERVED else "%%%02X" % value)
            i += 3
            continue
        out.append(chr(c) if c in allowed else "%%%02X" % c)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path; ``..`` above the root stays at the root."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    trailing = segments[-1] in (".", "..")
    return "/" + "/".join(kept) + ("/" if trailing and kept else "")


def _normalise_path(path: str) -> str | None:
    if not path:
        return "/"  # RFC 3986 §6.2.3: an empty path with an authority is "/"
    raw = path.encode("utf-8", "surrogatepass")
    if b"%" in raw or raw.strip(_PATH_RAW_BYTES):
        normal = _percent_normalise(raw, _PATH_RAW)
        if normal is None:
            return None
    else:
        normal = path
    if "/." in normal:
        normal = _remove_dot_segments(normal)
    return normal


def _normalise_authority(scheme: str, authority: str) -> str | None:
    if "@" in authority or not authority:
        return None  # userinfo has no place in a target URI (RFC 9110 §4.2.4)
    lowered = authority.lower()
    if lowered.startswith("["):
        end = lowered.find("]")
        if end < 0:
            return None
        host, port_text = lowered[: end + 1], lowered[end + 1 :]
        if not _IPV6.fullmatch(host) or (port_text and not port_text.startswith(":")):
            return None
        port_text = port_text[1:]
    else:
        host, _, port_text = lowered.partition(":")
        normal_host = _percent_normalise(host.encode("utf-8", "surrogatepass"), _HOST_RAW)
        if not normal_host:
            return None
        # Decoded escapes ("%41" -> "A") are lower-cased too; the remaining escapes keep their
        # upper-case hex digits (RFC 3986 §6.2.2.1).
        first, *escaped = normal_host.split("%")
        host = "%".join([first.lower(), *(part[:2] + part[2:].lower() for part in escaped)])
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            return None
        port = int(port_text)
        if port > 65535:
            return None
        if port != _DEFAULT_PORTS[scheme]:
            return f"{host}:{port}"
    return host


def normalise_htu(uri: str) -> str | None:
    """``uri`` in the comparison form of the module docstring, or None if it can never match."""
    normal = _HTU_MEMO.get(uri, "")
    if normal != "":
        return normal
    match = _URI.match(uri)
    result: str | None = None
    if match is not None:
        scheme = match.group(1).lower()
        if scheme in _DEFAULT_PORTS:
            authority = _normalise_authority(scheme, match.group(2))
            path = _normalise_path(match.group(3))
            if authority is not None and path is not None:
                result = f"{scheme}://{authority}{path}"
    if len(_HTU_MEMO) >= _HTU_MEMO_LIMIT:
        _HTU_MEMO.clear()
    _HTU_MEMO[uri] = result
    return result


def request_htu(scheme: str, authority: str, target_path: str) -> str | None:
    """The normalised URI of a request: ``scheme`` (``http``/``https``), ``authority`` (the
    ``host[:port]`` the client addressed) and the path of the request target as sent (no query)."""
    return normalise_htu(f"{scheme}://{authority}{target_path}")


# ------------------------------------------------------------------------------------ the checker


@dataclass(frozen=True, slots=True)
class _ProofKey:
    """What one distinct proof header yields once imported: its verifier and thumbprint."""

    verifier: SignatureVerifier
    jkt: str


def _number(value: Any) -> float | None:
    kind = type(value)  # exact: a bool is an int subclass and is not a time
    if kind is int or kind is float:
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def _reject(reason: str, description: str) -> ProofRejected:
    return ProofRejected(reason, description)


class ProofChecker:
    """Checks DPoP proofs for one worker; holds the nonce issuer and the proof-key cache."""

    __slots__ = ("nonces", "_keys", "_key_cache_size")

    def __init__(self, nonces: NonceIssuer, key_cache_size: int = KEY_CACHE_SIZE) -> None:
        self.nonces = nonces
        self._keys: OrderedDict[str, _ProofKey] = OrderedDict()
        self._key_cache_size = key_cache_size

    def check(
        self,
        proof: str,
        *,
        method: str,
        htu: str | None,
        token: str,
        jkt: str,
        now: float,
        policy: DPoPPolicy,
    ) -> AcceptedProof:
        """Run the pipeline of the module docstring. ``htu`` is the request's normalised URI
        (:func:`request_htu`; None when the request has none that could match), ``jkt`` the
        token's ``cnf.jkt``. Raises :class:`ProofRejected`."""
        if len(proof) > MAX_PROOF_BYTES:
            raise _reject("dpop_malformed", "DPoP proof too large")
        try:
            parsed = parse_compact(proof, MAX_PROOF_BYTES)
        except TokenRejected:
            raise _reject("dpop_malformed", "DPoP proof is not a well-formed JWT") from None
        header = parsed.header
        typ = header.get("typ")
        if typ is None or normalise_typ(typ) != "dpop+jwt":
            raise _reject("dpop_typ", "DPoP proof typ is not dpop+jwt")
        alg = header["alg"]
        if alg not in policy.algorithms or alg not in ASYMMETRIC_ALGORITHMS:
            raise _reject("dpop_alg", "DPoP proof algorithm not allowed")

        key = self._key(proof[: proof.index(".")], header, alg)
        if not key.verifier.verify(parsed.signing_input, parsed.signature):
            raise _reject("dpop_signature", "DPoP proof signature verification failed")
        if not hmac.compare_digest(key.jkt.encode("ascii"), jkt.encode("ascii", "replace")):
            raise _reject("dpop_key_mismatch", "DPoP proof key does not match the token binding")

        claims = parsed.payload
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _reject("dpop_jti", "DPoP proof jti missing or not a string")
        if len(jti) > MAX_JTI_CHARS:
            raise _reject("dpop_jti", "DPoP proof jti too long")
        htm = claims.get("htm")
        if not isinstance(htm, str):
            raise _reject("dpop_htm", "DPoP proof htm missing or not a string")
        if htm != method:
            raise _reject("dpop_htm", "DPoP proof htm does not match the request method")
        proof_htu = claims.get("htu")
        if not isinstance(proof_htu, str):
            raise _reject("dpop_htu", "DPoP proof htu missing or not a string")
        if htu is None or normalise_htu(proof_htu) != htu:
            raise _reject("dpop_htu", "DPoP proof htu does not match the request URI")
        if "iat" not in claims:
            raise _reject("dpop_iat", "DPoP proof iat missing")
        iat = _number(claims["iat"])
        if iat is None:
            raise _reject("dpop_iat", "DPoP proof iat is not a number")
        window = policy.window
        if iat > now + window:
            raise _reject("dpop_iat", "DPoP proof issued in the future")
        if iat < now - window:
            raise _reject("dpop_iat", "DPoP proof too old")
        ath = claims.get("ath")
        if not isinstance(ath, str):
            raise _reject("dpop_ath", "DPoP proof ath missing or not a string")
        if not hmac.compare_digest(ath.encode("ascii", "replace"), access_token_hash(token).encode("ascii")):
            raise _reject("dpop_ath", "DPoP proof ath does not match the access token")

        if policy.nonce_required:
            nonce = claims.get("nonce")
            if not isinstance(nonce, str) or not nonce:
                raise ProofRejected("dpop_nonce", "DPoP proof nonce required", USE_DPOP_NONCE)
            if self.nonces.age(nonce, now) is None:
                raise ProofRejected("dpop_nonce", "DPoP proof nonce is stale or unknown", USE_DPOP_NONCE)
        return AcceptedProof(key.jkt, replay_key(jti), iat + window)

    def _key(self, segment: str, header: dict[str, Any], alg: str) -> _ProofKey:
        """The imported key of this header segment (cached), or :class:`ProofRejected`."""
        keys = self._keys
        cached = keys.get(segment)
        if cached is not None:
            keys.move_to_end(segment)
            return cached
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise _reject("dpop_jwk", "DPoP proof jwk header missing or not an object")
        if any(member in jwk for member in PRIVATE_MEMBERS):
            raise _reject("dpop_jwk", "DPoP proof jwk holds private key members")
        try:
            verifier = verifiers_for_jwk(jwk, frozenset({alg}))[0]
            # RFC 7638 thumbprint over the required members only (joserfc picks them by kty).
            thumbprint = JWKRegistry.import_key(jwk).thumbprint()
        except (UnfitKey, JoseError, ValueError, TypeError):
            raise _reject("dpop_jwk", "DPoP proof jwk is not a usable public key for its algorithm") from None
        key = _ProofKey(verifier, thumbprint)
        keys[segment] = key
        if len(keys) > self._key_cache_size:
            keys.popitem(last=False)
        return key
