"""A DPoP client for the tests (RFC 9449 §4.2), written with joserfc: keys, proofs, thumbprints.

Every knob a test needs to produce a proof that is wrong in exactly one way is a keyword
argument; by default a proof is correct for the given request and token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

# joserfc validates registered header members; the tests also sign headers that are wrong on
# purpose (a jwk that is not an object, a typ that is a number), so every member is accepted.
_ANYTHING = HeaderParameter("anything", lambda value: None)

_MISSING = object()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ath(token: str) -> str:
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def new_key(alg: str) -> Key:
    if alg == "ES256":
        return ECKey.generate_key("P-256")
    if alg == "ES384":
        return ECKey.generate_key("P-384")
    if alg in ("EdDSA", "Ed25519"):
        return OKPKey.generate_key("Ed25519")
    if alg[:2] in ("RS", "PS"):
        return RSAKey.generate_key(2048)
    raise ValueError(alg)


class DPoPClient:
    """One client key pair and the proofs it signs."""

    def __init__(self, alg: str = "ES256", key: Key | None = None) -> None:
        self.alg = alg
        self.key = key if key is not None else new_key(alg)
        self.public_jwk: dict[str, Any] = self.key.as_dict(private=False)
        for member in ("kid", "alg", "use", "key_ops"):
            self.public_jwk.pop(member, None)

    @property
    def jkt(self) -> str:
        """The RFC 7638 SHA-256 thumbprint, as an AS puts it into ``cnf.jkt``."""
        return self.key.thumbprint()

    def proof(
        self,
        method: str,
        url: str,
        token: str | None = None,
        *,
        iat: float | None = None,
        jti: Any = _MISSING,
        nonce: str | None = None,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
    ) -> str:
        """A signed proof. ``header``/``claims`` override members (a value of None removes it);
        ``drop`` removes claims."""
        protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.public_jwk}
        payload: dict[str, Any] = {
            "jti": uuid.uuid4().hex if jti is _MISSING else jti,
            "htm": method,
            "htu": url,
            "iat": int(time.time()) if iat is None else iat,
        }
        if token is not None:
            payload["ath"] = ath(token)
        if nonce is not None:
            payload["nonce"] = nonce
        for source, target in ((header, protected), (claims, payload)):
            for name, value in (source or {}).items():
                if value is None:
                    target.pop(name, None)
                else:
                    target[name] = value
        for name in drop:
            payload.pop(name, None)
        body = json.dumps(payload, separators=(",", ":")).encode()
        registry = jws.JWSRegistry(
            header_registry={name: _ANYTHING for name in protected},
            algorithms=[protected["alg"]],
            strict_check_header=False,
        )
        return jws.serialize_compact(protected, body, self.key, registry=registry)


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"\x00" * 64) -> str:
    """A compact JWS with an arbitrary header and a made-up signature (alg none, forgeries)."""
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64url(signature)}"
