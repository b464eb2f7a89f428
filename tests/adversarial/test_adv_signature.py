"""Class 1 -- signature and algorithm attacks (RFC 8725 §2.1-2.2, §3.1-3.2; jwt_tool -X a/n/k/s).

Every forged token goes through the running gateway on loopback, with both codecs, and must be
answered 401 without anything reaching the backend.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from advhelpers import (
    ROUTES,
    SigningKey,
    assert_rejected,
    b64url,
    claims,
    get,
    hs_token,
    seg,
    signed,
    status_of,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
HS_SECRET = "s" * 40


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


@pytest.fixture
async def gw_hs(make_gateway, jwks_path):
    """An issuer that allows HS256 with its own secret *and* RS256/ES256 from a JWKS: the
    configuration where algorithm confusion is most tempting."""
    from helpers import AUDIENCE, ISSUER

    return await make_gateway(routes=ROUTES, issuers=[{
        "name": "test", "issuer": ISSUER, "jwks_file": jwks_path, "audiences": [AUDIENCE],
        "algorithms": ["RS256", "ES256", "HS256", "HS384", "HS512"], "hs_secret": HS_SECRET,
    }])


async def test_baseline_valid_tokens_accepted(gw, gw_hs, backend, rsa_key, ec_key):
    """Control: the forgeries below fail for the right reason, not because nothing works."""
    for g in (gw, gw_hs):
        assert await status_of(g, get("/x", rsa_key.token())) == 200
        assert await status_of(g, get("/x", ec_key.token())) == 200
    assert await status_of(gw_hs, get("/x", hs_token(HS_SECRET.encode(), {"alg": "HS256", "typ": "JWT"}, claims()))) == 200


# ------------------------------------------------------------------------- alg: none (CVE-2015-9235)

NONE_SPELLINGS = ["none", "None", "NONE", "nOnE", "NoNe", "none ", " none", "none\u0000", "n\u006fne"]


@pytest.mark.parametrize("alg", NONE_SPELLINGS)
@pytest.mark.parametrize("tail", ["dot", "no-dot", "garbage-sig", "real-sig"])
async def test_alg_none_every_casing_rfc8725_3_1(gw, gw_hs, backend, rsa_key, alg, tail):
    """``alg: none`` (RFC 7518 §3.6; CVE-2015-9235 and kin) in every casing, with/without the dot."""
    base = seg({"alg": alg, "typ": "JWT"}) + "." + seg(claims(sub="admin", role="admin"))
    token = {
        "dot": base + ".",
        "no-dot": base,
        "garbage-sig": base + "." + b64url(b"\x00" * 32),
        "real-sig": base + "." + b64url(rsa_key.sign(base.encode())),
    }[tail]
    for g in (gw, gw_hs):
        await assert_rejected(g, backend, token)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
async def test_empty_signature_rejected(gw_hs, backend, rsa_key, alg):
    token = seg({"alg": alg, "kid": rsa_key.kid}) + "." + seg(claims()) + "."
    await assert_rejected(gw_hs, backend, token)


@pytest.mark.parametrize("alg", ["", None, ["RS256"], {"RS256": 1}, 256, True, "rs256", "RS256 ", "RS 256",
                                 "HS256\u0000", "ES256K", "EdDSA", "PS256", "RSA-OAEP", "dir", "A256GCM"])
async def test_odd_alg_values_with_real_rsa_signature(gw, backend, rsa_key, alg):
    """A genuine RS256 signature under a header whose ``alg`` is wrong, mistyped or not allowed."""
    header = {"typ": "JWT", "kid": rsa_key.kid}
    if alg is not None:
        header["alg"] = alg
    await assert_rejected(gw, backend, signed(rsa_key, header, claims()))


# ----------------------------------------------------- RS256 -> HS256 key confusion (CVE-2015-9235 ...)


def _public_forms(key: SigningKey) -> dict[str, bytes]:
    public = key.private.public_key()
    forms = {
        "spki-pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "spki-der": public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "openssh": public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "jwk-json": json.dumps(key.jwk()).encode(),
        "jwk-json-compact": json.dumps(key.jwk(), separators=(",", ":"), sort_keys=True).encode(),
    }
    forms["spki-pem-no-newline"] = forms["spki-pem"].rstrip(b"\n")
    forms["spki-pem-body-only"] = b"".join(forms["spki-pem"].splitlines()[1:-1])
    jwk = key.jwk()
    if jwk["kty"] == "RSA":
        forms["pkcs1-pem"] = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        forms["pkcs1-der"] = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        forms["raw-n"] = public.public_numbers().n.to_bytes(256, "big")
        forms["n-b64url-text"] = jwk["n"].encode()
    else:
        forms["raw-point"] = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        forms["compressed-point"] = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        forms["x-b64url-text"] = jwk["x"].encode()
    return forms


@pytest.mark.parametrize("which", ["rsa", "ec"])
@pytest.mark.parametrize("hs", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("with_kid", [True, False])
async def test_public_key_as_hmac_secret_cve_2015_9235_2022_29217_2024_33663_2024_37568(
        gw, gw_hs, backend, rsa_key, ec_key, which, hs, with_kid):
    """Sign HS* with the published public key in PEM, DER, OpenSSH, JWK and raw forms: the key
    confusion of CVE-2015-9235 (node-jsonwebtoken), CVE-2022-29217 (PyJWT, OpenSSH keys),
    CVE-2024-33663 (python-jose, OpenSSH ECDSA keys), CVE-2024-37568 (Authlib, keys without a
    PEM banner). Tried against an RS/ES-only issuer and one that also allows HS with a secret."""
    key = rsa_key if which == "rsa" else ec_key
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[hs]
    header = {"alg": hs, "typ": "JWT"}
    if with_kid:
        header["kid"] = key.kid
    for name, secret in _public_forms(key).items():
        token = hs_token(secret, header, claims(sub="admin-" + name), digest)
        for g in (gw, gw_hs):
            await assert_rejected(g, backend, token)


# ---------------------------------------------------------------- ECDSA (CVE-2022-21449 and friends)


def _es256_parts(ec_key: SigningKey, payload: dict) -> tuple[str, bytes]:
    signing_input = seg({"alg": "ES256", "typ": "JWT", "kid": ec_key.kid}) + "." + seg(payload)
    return signing_input, ec_key.sign(signing_input.encode())


def _rs(r: int, s: int, size: int = 32) -> bytes:
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


ECDSA_MUTATIONS = {
    # CVE-2022-21449 "psychic signatures": Java accepted r = s = 0.
    "r=s=0": lambda sig, si, key: _rs(0, 0),
    "r=0": lambda sig, si, key: _rs(0, int.from_bytes(sig[32:], "big")),
    "s=0": lambda sig, si, key: _rs(int.from_bytes(sig[:32], "big"), 0),
    "r=s=n": lambda sig, si, key: _rs(P256_N, P256_N),
    "r=n,s=real": lambda sig, si, key: _rs(P256_N, int.from_bytes(sig[32:], "big")),
    "r=real+n-overflow": lambda sig, si, key: _rs((int.from_bytes(sig[:32], "big") + P256_N) % (1 << 256),
                                                  int.from_bytes(sig[32:], "big")),
    "r=s=2^256-1": lambda sig, si, key: b"\xff" * 64,
    "r=s=1": lambda sig, si, key: _rs(1, 1),
    "r=1,s=n-1": lambda sig, si, key: _rs(1, P256_N - 1),
    "der-encoded-valid": lambda sig, si, key: key.private.sign(si, ec.ECDSA(hashes.SHA256())),
    "truncated-63": lambda sig, si, key: sig[:63],
    "extended-65": lambda sig, si, key: sig + b"\x00",
    "leading-zero-65": lambda sig, si, key: b"\x00" + sig,
    "doubled-128": lambda sig, si, key: sig + sig,
    "es512-length-132": lambda sig, si, key: b"\x00" * 34 + sig[:32] + b"\x00" * 34 + sig[32:],
    "swapped-r-s": lambda sig, si, key: sig[32:] + sig[:32],
    "empty": lambda sig, si, key: b"",
    "one-bit-flip": lambda sig, si, key: sig[:-1] + bytes([sig[-1] ^ 1]),
}


@pytest.mark.parametrize("name", sorted(ECDSA_MUTATIONS))
async def test_ecdsa_signature_mutations_cve_2022_21449(gw, backend, ec_key, name):
    signing_input, sig = _es256_parts(ec_key, claims(sub="admin"))
    forged = ECDSA_MUTATIONS[name](sig, signing_input.encode(), ec_key)
    await assert_rejected(gw, backend, signing_input + "." + b64url(forged))


async def test_ecdsa_signature_under_es384_and_es512_headers(gw, backend, ec_key):
    """A valid P-256 signature relabelled ES384/ES512 (wrong curve for the alg)."""
    for alg in ("ES384", "ES512"):
        signing_input = seg({"alg": alg, "kid": ec_key.kid}) + "." + seg(claims())
        await assert_rejected(gw, backend, signing_input + "." + b64url(ec_key.sign(signing_input.encode())))


# --------------------------------------------------------------------------- RSA PKCS#1 v1.5 and PSS


def _rs256_parts(rsa_key: SigningKey, alg: str = "RS256") -> str:
    return seg({"alg": alg, "typ": "JWT", "kid": rsa_key.kid}) + "." + seg(claims(sub="admin"))


def _pss(key: SigningKey, data: bytes, hash_alg: hashes.HashAlgorithm, salt: int,
         mgf_hash: hashes.HashAlgorithm | None = None) -> bytes:
    return key.private.sign(data, padding.PSS(mgf=padding.MGF1(mgf_hash or hash_alg), salt_length=salt), hash_alg)


RSA_MUTATIONS = {
    "one-bit-flip": lambda si, k: (lambda s: s[:-1] + bytes([s[-1] ^ 1]))(k.sign(si)),
    "first-bit-flip": lambda si, k: (lambda s: bytes([s[0] ^ 0x80]) + s[1:])(k.sign(si)),
    "truncated-255": lambda si, k: k.sign(si)[1:],
    "leading-zero-257": lambda si, k: b"\x00" + k.sign(si),
    "trailing-zero-257": lambda si, k: k.sign(si) + b"\x00",
    "zero": lambda si, k: b"\x00" * 256,
    "one": lambda si, k: (1).to_bytes(256, "big"),
    "n-minus-1": lambda si, k: (k.private.public_key().public_numbers().n - 1).to_bytes(256, "big"),
    "n": lambda si, k: k.private.public_key().public_numbers().n.to_bytes(256, "big"),
    "sig-plus-n": lambda si, k: (int.from_bytes(k.sign(si), "big") + k.private.public_key().public_numbers().n)
    .to_bytes(257, "big"),
    "all-ff": lambda si, k: b"\xff" * 256,
    "sha384-digest-under-rs256": lambda si, k: k.private.sign(si, padding.PKCS1v15(), hashes.SHA384()),
    "sha1-digest-under-rs256": lambda si, k: k.private.sign(si, padding.PKCS1v15(), hashes.SHA1()),
    "pss-under-rs256": lambda si, k: _pss(k, si, hashes.SHA256(), 32),
    "other-message": lambda si, k: k.sign(si + b"x"),
}


@pytest.mark.parametrize("name", sorted(RSA_MUTATIONS))
async def test_rsa_pkcs1v15_mutations(gw, backend, rsa_key, name):
    signing_input = _rs256_parts(rsa_key)
    forged = RSA_MUTATIONS[name](signing_input.encode(), rsa_key)
    await assert_rejected(gw, backend, signing_input + "." + b64url(forged))


PSS_MUTATIONS = {
    "pkcs1-under-ps256": lambda si, k: k.private.sign(si, padding.PKCS1v15(), hashes.SHA256()),
    "mgf1-sha1": lambda si, k: _pss(k, si, hashes.SHA256(), 32, hashes.SHA1()),
    "sha384-under-ps256": lambda si, k: _pss(k, si, hashes.SHA384(), 48),
    "bit-flip": lambda si, k: (lambda s: s[:-1] + bytes([s[-1] ^ 1]))(_pss(k, si, hashes.SHA256(), 32)),
    "truncated": lambda si, k: _pss(k, si, hashes.SHA256(), 32)[1:],
    "zero": lambda si, k: b"\x00" * 256,
}


@pytest.mark.parametrize("name", sorted(PSS_MUTATIONS))
async def test_rsa_pss_mutations_rfc7518_3_5(gw, backend, rsa_key, name):
    """PS256 tokens: the key has ``alg: RS256`` in the JWKS, so any PS256 token must fail, and
    so must every mutated PSS signature."""
    signing_input = _rs256_parts(rsa_key, "PS256")
    forged = PSS_MUTATIONS[name](signing_input.encode(), rsa_key)
    await assert_rejected(gw, backend, signing_input + "." + b64url(forged))


@pytest.fixture
async def gw_pss(make_gateway, tmp_path):
    """An issuer whose RSA key has no JWK ``alg`` (so PS256 is usable) -- PSS mutations proper."""
    from helpers import write_jwks

    key = SigningKey.rsa("pss-1", "PS256")
    jwk = key.jwk()
    del jwk["alg"]
    path = tmp_path / "pss.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    gw = await make_gateway(routes=ROUTES, jwks_file=str(path))
    gw.pss_key = key
    return gw


@pytest.mark.parametrize("name", ["salt-0", "salt-max", "salt-20", "mgf1-sha512", "sha256-under-ps384",
                                  "pkcs1-under-ps256", "bit-flip", "zero", "valid"])
async def test_pss_salt_and_mgf_variants(gw_pss, backend, name):
    """RFC 7518 §3.5: salt length = hash length, MGF1 with the same hash. ``valid`` is the control."""
    key = gw_pss.pss_key
    alg = "PS384" if name == "sha256-under-ps384" else "PS256"
    signing_input = (seg({"alg": alg, "kid": key.kid}) + "." + seg(claims())).encode()
    sha = hashes.SHA256()
    sig = {
        "salt-0": lambda: _pss(key, signing_input, sha, 0),
        "salt-max": lambda: _pss(key, signing_input, sha, padding.PSS.MAX_LENGTH),
        "salt-20": lambda: _pss(key, signing_input, sha, 20),
        "mgf1-sha512": lambda: _pss(key, signing_input, sha, 32, hashes.SHA512()),
        "sha256-under-ps384": lambda: _pss(key, signing_input, sha, 32),
        "pkcs1-under-ps256": lambda: key.private.sign(signing_input, padding.PKCS1v15(), sha),
        "bit-flip": lambda: (lambda s: s[:-1] + bytes([s[-1] ^ 1]))(_pss(key, signing_input, sha, 32)),
        "zero": lambda: b"\x00" * 256,
        "valid": lambda: _pss(key, signing_input, sha, 32),
    }[name]()
    token = signing_input.decode() + "." + b64url(sig)
    if name == "valid":
        assert await status_of(gw_pss, get("/x", token)) == 200
    else:
        await assert_rejected(gw_pss, backend, token)


# ------------------------------------------------------------------------- key and kid substitution


async def test_signature_by_attacker_key_with_published_kid(gw, backend, rsa_key, ec_key):
    """Attacker keys reusing the published ``kid`` values, and cross-key kid/alg pairs."""
    for kid, alg in (("rsa-1", "RS256"), ("ec-1", "ES256"), ("rsa-1", "ES256"), ("ec-1", "RS256")):
        attacker = SigningKey.rsa(kid, alg) if alg.startswith("RS") else SigningKey.ec(kid, alg)
        await assert_rejected(gw, backend, attacker.token(sub="admin"))
    # The real RSA key's signature, but the header names the EC key (and vice versa).
    await assert_rejected(gw, backend, rsa_key.token(header={"kid": ec_key.kid}))
    await assert_rejected(gw, backend, ec_key.token(header={"kid": rsa_key.kid}))
    # No kid at all: every key that fits alg is tried, an attacker's signature still fails.
    await assert_rejected(gw, backend, SigningKey.ec("x", "ES256").token(header={"kid": None}))


async def test_signature_transplanted_between_tokens(gw, backend, rsa_key):
    """A valid signature glued onto another header/payload (payload swap, header swap)."""
    a = rsa_key.token(sub="alice")
    b = rsa_key.token(sub="admin", role="admin")
    ha, pa, sa = a.split(".")
    hb, pb, sb = b.split(".")
    for forged in (f"{ha}.{pb}.{sa}", f"{hb}.{pa}.{sb}", f"{ha}.{pa}.{sb}"):
        await assert_rejected(gw, backend, forged)


async def test_hmac_key_length_and_hash_mismatch(gw_hs, backend):
    """HS256 MAC under an HS384/HS512 header, a truncated MAC, and the empty/short secrets of
    jwt_tool's crack list."""
    secret = HS_SECRET.encode()
    good = hs_token(secret, {"alg": "HS256"}, claims())
    h, p, s = good.split(".")
    await assert_rejected(gw_hs, backend, seg({"alg": "HS384"}) + "." + p + "." + s)
    await assert_rejected(gw_hs, backend, f"{h}.{p}.{s[:20]}")
    for weak in (b"", b"secret", b"\x00", b"none", b"null", HS_SECRET[:-1].encode()):
        await assert_rejected(gw_hs, backend, hs_token(weak, {"alg": "HS256"}, claims()))


async def test_hs_token_against_issuer_without_secret(gw, backend):
    """With no hs_secret, HS* tokens are refused whatever they were signed with (incl. empty key)."""
    for secret in (b"", b"\x00" * 32, hashlib.sha256(b"").digest()):
        await assert_rejected(gw, backend, hs_token(secret, {"alg": "HS256"}, claims()))


# ---------------------------------------------------------------- cross-issuer confusion (RFC 8725 §3.8)


async def test_cross_issuer_key_and_route_confusion(make_gateway, backend, rsa_key, tmp_path):
    """Two issuers with their own keys: a token claiming issuer B signed with A's key (and the
    reverse) fails; a route restricted to issuer A refuses B's valid tokens, also on a cache hit."""
    from helpers import AUDIENCE, ISSUER, write_jwks

    other = SigningKey.rsa("other-1")
    path_a = write_jwks(str(tmp_path / "a.json"), rsa_key)
    path_b = write_jwks(str(tmp_path / "b.json"), other)
    gw = await make_gateway(routes=[
        {"path_prefix": "/", "upstream": "backend"},
        {"path_prefix": "/only-a", "upstream": "backend", "issuers": ["a"]},
    ], issuers=[
        {"name": "a", "issuer": ISSUER, "jwks_file": path_a, "audiences": [AUDIENCE]},
        {"name": "b", "issuer": "https://other.test", "jwks_file": path_b, "audiences": [AUDIENCE]},
    ])
    b_token = other.token(iss="https://other.test")
    assert await status_of(gw, get("/x", b_token)) == 200
    assert await status_of(gw, get("/x", rsa_key.token())) == 200
    await assert_rejected(gw, backend, rsa_key.token(iss="https://other.test"))
    await assert_rejected(gw, backend, other.token(iss=ISSUER))
    await assert_rejected(gw, backend, rsa_key.token(header={"kid": "other-1"}, iss="https://other.test"))
    # b_token is now cached as valid: the route's issuer restriction still applies.
    await assert_rejected(gw, backend, b_token, path="/only-a/x")
    assert await status_of(gw, get("/only-a/x", rsa_key.token())) == 200
