"""Bench key material and tokens: one RS256 (2048-bit) and one ES256 (P-256) key, their JWKS, and
token lists for the wrk scripts.

Theory of operation: everything is generated once into ``bench/work/`` and reused, because
signing 100,000 RS256 tokens costs ~25 s of CPU. A token file is valid for the key that signed it:
its name carries the key's kid and a fingerprint of the public key, so regenerating the keys
orphans (and never silently reuses) the old files. Tokens are signed with the private key object
directly (header and payload JSON are built with a fixed template, then base64url'd), not through
a JOSE library, and the work is spread over all cores.

Every token is a real access token shape: ``iss``, ``aud``, ``sub``, ``role``, ``scope``, ``jti``,
``iat`` and an ``exp`` far in the future, so that all peers run their full check list.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://issuer.bench.jwtproxy.invalid"
AUDIENCE = "bench-api"
# 2100-01-01: far enough that no run ever sees an expired token.
FAR_EXP = 4102444800
IAT = 1767225600  # 2026-01-01, fixed so that token files are reproducible apart from ES256 nonces
RS_KID = "bench-rs256"
ES_KID = "bench-es256"


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@contextlib.contextmanager
def work_lock(work: Path) -> Iterator[None]:
    """Exclusive lock on the work directory while generating keys and token files."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class KeyMaterial:
    """Paths of the generated key material (all under the work directory)."""

    rs_pem: Path
    es_pem: Path
    jwks: Path
    fingerprint: str  # short hash of both public keys: names the token files


def ensure_keys(work: Path) -> KeyMaterial:
    """Create (once) the RS256 and ES256 private keys and the JWKS holding their public halves."""
    keydir = work / "keys"
    keydir.mkdir(parents=True, exist_ok=True)
    rs_pem, es_pem, jwks_path = keydir / "rs256.pem", keydir / "es256.pem", keydir / "jwks.json"
    if not rs_pem.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(rs_pem, key)
    if not es_pem.exists():
        _write_private(es_pem, ec.generate_private_key(ec.SECP256R1()))
    rs_key = _load_private(rs_pem)
    es_key = _load_private(es_pem)
    if not isinstance(rs_key, rsa.RSAPrivateKey) or not isinstance(es_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"unexpected key types in {keydir}: delete the directory to regenerate")
    rs_pub = rs_key.public_key().public_numbers()
    es_pub = es_key.public_key().public_numbers()
    jwks = {
        "keys": [
            {"kty": "RSA", "kid": RS_KID, "use": "sig", "alg": "RS256",
             "n": _b64url_uint(rs_pub.n), "e": _b64url_uint(rs_pub.e)},
            {"kty": "EC", "kid": ES_KID, "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": b64url(es_pub.x.to_bytes(32, "big")), "y": b64url(es_pub.y.to_bytes(32, "big"))},
        ]
    }
    text = json.dumps(jwks, indent=2) + "\n"
    if not jwks_path.exists() or jwks_path.read_text() != text:
        jwks_path.write_text(text)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:12]
    return KeyMaterial(rs_pem=rs_pem, es_pem=es_pem, jwks=jwks_path, fingerprint=fingerprint)


def _write_private(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _load_private(path: Path):  # type: ignore[no-untyped-def]  # cryptography's union type
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _claims(index: int) -> dict[str, object]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"user-{index:06d}",
        "role": "member" if index % 10 else "admin",
        "scope": "read write",
        "jti": f"bench-{index:06d}",
        "iat": IAT,
        "exp": FAR_EXP,
    }


def _sign_range(args: tuple[str, str, int, int]) -> list[str]:
    """Worker: sign tokens [start, stop) with the key at pem_path (alg RS256 or ES256)."""
    pem_path, alg, start, stop = args
    key = _load_private(Path(pem_path))
    kid = RS_KID if alg == "RS256" else ES_KID
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid},
                               separators=(",", ":")).encode())
    out: list[str] = []
    if alg == "RS256":
        pad, sha = padding.PKCS1v15(), hashes.SHA256()
        for i in range(start, stop):
            signing_input = f"{header}.{b64url(json.dumps(_claims(i), separators=(',', ':')).encode())}"
            sig = key.sign(signing_input.encode(), pad, sha)
            out.append(f"{signing_input}.{b64url(sig)}")
    else:
        ecdsa = ec.ECDSA(hashes.SHA256())
        for i in range(start, stop):
            signing_input = f"{header}.{b64url(json.dumps(_claims(i), separators=(',', ':')).encode())}"
            r, s = decode_dss_signature(key.sign(signing_input.encode(), ecdsa))
            # JWS wants raw R||S of the curve's length (RFC 7518 §3.4), not DER.
            out.append(f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    return out


def sign_tokens(keys: KeyMaterial, alg: str, count: int, start: int = 0) -> list[str]:
    """Sign `count` distinct tokens (sub/jti numbered from `start`), in parallel over all cores."""
    pem = keys.rs_pem if alg == "RS256" else keys.es_pem
    workers = max(1, min(os.cpu_count() or 1, 8))
    if count < 2000 or workers == 1:
        return _sign_range((str(pem), alg, start, start + count))
    step = (count + workers * 4 - 1) // (workers * 4)
    chunks = [(str(pem), alg, lo, min(lo + step, start + count))
              for lo in range(start, start + count, step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [tok for part in pool.map(_sign_range, chunks) for tok in part]


def token_file(work: Path, keys: KeyMaterial, alg: str, count: int,
               log: Callable[[str], None] = print) -> Path:
    """Path of a file with `count` distinct valid tokens, one per line; generated once, cached."""
    path = work / "tokens" / f"{alg.lower()}-{keys.fingerprint}-{count}.txt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"signing {count} {alg} tokens into {path.relative_to(work.parent)} (once, cached)")
    tokens = sign_tokens(keys, alg, count)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(tokens) + "\n")
    tmp.replace(path)
    return path


def corrupt_signature(token: str) -> str:
    """The same token with a wrong but well-formed signature (same length, valid base64url).

    Flipping the first signature character changes the top bits of the signature value, so the
    token passes every syntactic check and fails only at signature verification: the reject path
    an attacker exercises.
    """
    head, _, sig = token.rpartition(".")
    first = "B" if sig[0] != "B" else "C"
    return f"{head}.{first}{sig[1:]}"


def bad_token_file(work: Path, keys: KeyMaterial, count: int,
                   log: Callable[[str], None] = print) -> Path:
    """`count` distinct RS256 tokens whose signatures do not verify (derived from valid ones)."""
    path = work / "tokens" / f"bad-rs256-{keys.fingerprint}-{count}.txt"
    if path.exists():
        return path
    source = token_file(work, keys, "RS256", count, log)
    bad = [corrupt_signature(line) for line in source.read_text().split()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(bad) + "\n")
    tmp.replace(path)
    return path


def first_token(path: Path) -> str:
    """The first token of a token file."""
    with path.open() as fh:
        return fh.readline().strip()


# --- DPoP (contract §5.2): a bound token and single-use proofs -------------------------------------

DPOP_HOST = "bench.test"  # the Host the DPoP scenarios send, so one proof file fits every port
DPOP_URL = f"http://{DPOP_HOST}/"


def _dpop_sign_range(args: tuple[str, str, str, str, int, int]) -> list[str]:
    """Worker: proofs [start, stop) for GET DPOP_URL, signed with the client key at pem_path."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem_path, alg, header, ath, start, stop = args
    key = _load_private(Path(pem_path))
    iat = int(__import__("time").time())
    out: list[str] = []
    ecdsa = ec.ECDSA(hashes.SHA256())
    for i in range(start, stop):
        claims = {"jti": f"bench-proof-{i:08d}-{os.getpid()}", "htm": "GET", "htu": DPOP_URL, "iat": iat, "ath": ath}
        signing_input = f"{header}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        if isinstance(key, Ed25519PrivateKey):
            sig = key.sign(signing_input.encode())
        else:
            r, s = decode_dss_signature(key.sign(signing_input.encode(), ecdsa))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        out.append(f"{signing_input}.{b64url(sig)}")
    return out


def dpop_file(work: Path, keys: KeyMaterial, alg: str, count: int, log: Callable[[str], None] = print) -> Path:
    """A file for the DPoP scenarios: line 1 a DPoP-bound RS256 access token (``cnf.jkt`` = the
    RFC 7638 thumbprint of a client key made here), then ``count`` proofs for ``GET /`` on
    :data:`DPOP_HOST`, each with its own ``jti``, signed with that key (``ES256`` or ``EdDSA``).

    Made fresh for every run (a proof is valid for a limited time and once: the bench config sets
    ``dpop_max_age`` to a day, so a run of any length stays inside the window)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from joserfc.jwk import ECKey, OKPKey

    path = work / "tokens" / f"dpop-{alg.lower()}-{count}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"signing {count} {alg} DPoP proofs into {path.relative_to(work.parent)}")
    client: ec.EllipticCurvePrivateKey | Ed25519PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else Ed25519PrivateKey.generate()
    )
    pem = work / "keys" / f"dpop-client-{alg.lower()}.pem"
    _write_private(pem, client)
    jwk = (ECKey if alg == "ES256" else OKPKey).import_key(pem.read_bytes())  # type: ignore[attr-defined]
    public = jwk.as_dict(private=False)
    public.pop("kid", None)
    thumbprint = jwk.thumbprint()
    claims = dict(_claims(0), sub="dpop-client", jti="bench-dpop-token", cnf={"jkt": thumbprint})
    rs_key = _load_private(keys.rs_pem)
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": RS_KID}, separators=(",", ":")).encode())
    signing_input = f"{head}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
    token = f"{signing_input}.{b64url(rs_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"
    ath = b64url(hashlib.sha256(token.encode()).digest())
    header = b64url(json.dumps({"typ": "dpop+jwt", "alg": alg, "jwk": public}, separators=(",", ":")).encode())
    workers = max(1, min(os.cpu_count() or 1, 8))
    step = max(1, (count + workers * 4 - 1) // (workers * 4))
    chunks = [(str(pem), alg, header, ath, lo, min(lo + step, count)) for lo in range(0, count, step)]
    if workers == 1 or count < 2000:
        proofs = [p for chunk in chunks for p in _dpop_sign_range(chunk)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            proofs = [p for part in pool.map(_dpop_sign_range, chunks) for p in part]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(token + "\n" + "\n".join(proofs) + "\n")
    tmp.replace(path)
    return path
