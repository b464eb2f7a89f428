"""The JWS algorithms jwtproxy implements: names and parameters, one table, no cryptography.

The config loader reads it (what ``algorithms`` may list, the default list) and key import
builds its ``cryptography`` objects from it (which key type and curve fits which algorithm, which
hash), so adding or dropping an algorithm is one edit here.

* RSA: RS256/384/512 (PKCS#1 v1.5) and PS256/384/512 (PSS), RFC 7518 §3.3, §3.5.
* ECDSA: ES256/384/512 on P-256/P-384/P-521, RFC 7518 §3.4.
* OKP: EdDSA and its fully-specified name Ed25519 on an Ed25519 key, RFC 8037, RFC 9864.
* HMAC: HS256/384/512, RFC 7518 §3.2 -- keys only from ``hs_secret``, never from a JWKS.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "DPOP_DEFAULT_ALGORITHMS",
    "EC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "KNOWN_ALGORITHMS",
    "OKP_ALGORITHMS",
    "RSA_ALGORITHMS",
]

RSA_ALGORITHMS: Final[tuple[str, ...]] = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
#: alg -> (JWK ``crv``, coordinate length in bytes, hashlib name of the hash).
EC_ALGORITHMS: Final[dict[str, tuple[str, int, str]]] = {
    "ES256": ("P-256", 32, "sha256"),
    "ES384": ("P-384", 48, "sha384"),
    "ES512": ("P-521", 66, "sha512"),
}
OKP_ALGORITHMS: Final[tuple[str, ...]] = ("EdDSA", "Ed25519")
#: alg -> hashlib name of the hash.
HMAC_ALGORITHMS: Final[dict[str, str]] = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}

ASYMMETRIC_ALGORITHMS: Final = frozenset(RSA_ALGORITHMS) | frozenset(EC_ALGORITHMS) | frozenset(OKP_ALGORITHMS)
#: Every algorithm, in the order the config loader lists them in its messages.
KNOWN_ALGORITHMS: Final[tuple[str, ...]] = (*RSA_ALGORITHMS, *EC_ALGORITHMS, *OKP_ALGORITHMS, *HMAC_ALGORITHMS)
#: The default allowlist: every asymmetric algorithm. HS* must be asked for explicitly, because it
#: only works together with ``hs_secret``.
DEFAULT_ALGORITHMS: Final[tuple[str, ...]] = tuple(a for a in KNOWN_ALGORITHMS if a not in HMAC_ALGORITHMS)
#: The default ``dpop_algorithms``: what DPoP clients sign with (RFC 9449 proofs are signed with the
#: client's own key pair, so only asymmetric algorithms can ever be listed).
DPOP_DEFAULT_ALGORITHMS: Final[tuple[str, ...]] = ("ES256", "EdDSA", "PS256", "RS256")
