"""Class 4 -- hostile or unfit keys in a *remote* JWKS (RFC 7517 §4, RFC 7518 §3.3/§6, RFC 8725 §3.5),
fetched by the real KeyManager from a fake IdP on loopback.

Each case publishes the legitimate key plus one unfit key; a token signed with the unfit key's
private half (or forged against it) must be refused, and the legitimate key must keep working
(one bad key never takes the issuer down).
"""

from __future__ import annotations

import hashlib
import time

import pytest
from advhelpers import (
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
from cryptography.hazmat.primitives.asymmetric import rsa

SHA256_DIGESTINFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _int_b64(value: int, length: int | None = None) -> str:
    return b64url(value.to_bytes(length or (value.bit_length() + 7) // 8, "big"))


def _pkcs1_em(signing_input: bytes, size: int = 256) -> bytes:
    t = SHA256_DIGESTINFO + hashlib.sha256(signing_input).digest()
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def _icbrt(n: int) -> int:
    x = 1 << ((n.bit_length() + 2) // 3)
    while True:
        y = (2 * x + n // (x * x)) // 3
        if y >= x:
            break
        x = y
    while x ** 3 > n:
        x -= 1
    while (x + 1) ** 3 <= n:
        x += 1
    return x


def _bleichenbacher_e3(signing_input: bytes, size: int = 256) -> bytes:
    """Bleichenbacher'06 / BERserk-style e=3 forgery: a cube whose top bytes look like PKCS#1
    v1.5 with the hash, followed by garbage a lax verifier would ignore."""
    prefix = b"\x00\x01\xff\x00" + SHA256_DIGESTINFO + hashlib.sha256(signing_input).digest()
    target = int.from_bytes(prefix + b"\xff" * (size - len(prefix)), "big")
    root = _icbrt(target)
    assert (root ** 3).to_bytes(size, "big").startswith(prefix)
    return root.to_bytes(size, "big")


async def _gateway(idp, make_idp_gateway, legit: SigningKey, bad_jwks: list[dict], **issuer):
    idp.document = {"keys": [legit.jwk(), *bad_jwks]}
    return await make_idp_gateway(idp, issuer=issuer or None)


# --------------------------------------------------------------------------------- the cases


def _rsa_jwk(key: SigningKey, **changes) -> dict:
    jwk = key.jwk()
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_1024() -> SigningKey:
    return SigningKey.rsa("rsa-1024", "RS256", bits=1024)


@pytest.fixture(scope="module")
def rsa_e3() -> SigningKey:
    return SigningKey("rsa-e3", "RS256", rsa.generate_private_key(public_exponent=3, key_size=2048))


@pytest.fixture(scope="module")
def bad_rsa() -> SigningKey:
    return SigningKey.rsa("bad", "RS256")


@pytest.fixture(scope="module")
def bad_ec() -> SigningKey:
    return SigningKey.ec("bad-ec", "ES256")


UNFIT = [
    "use-enc", "use-SIG-uppercase", "use-empty", "key_ops-sign", "key_ops-string", "key_ops-encrypt",
    "alg-RS384-pinned", "alg-ES256-on-RSA", "alg-HS256-on-RSA", "alg-none", "alg-not-allowed-PS512",
    "kty-EC-on-RSA-members", "kty-lowercase", "kty-missing", "private-d", "private-pq",
    "rsa-1024", "e=1", "e=2-even", "e-missing", "n-not-base64url",
    "ec-crv-P-384-with-P-256-point", "ec-crv-secp256k1", "ec-point-off-curve", "ec-point-zero", "ec-x-33-bytes",
    "ec-alg-ES384", "ec-private-d", "okp-with-P-256", "non-object-entry",
]


def _case(name: str, legit: SigningKey, bad: SigningKey, bad_ec: SigningKey, rsa_1024: SigningKey):
    """(published JWKs, a token a lax gateway would accept)."""
    def rs_token(kid: str, alg: str = "RS256") -> str:
        return signed(bad, {"alg": alg, "kid": kid}, claims(sub="admin"))

    if name == "use-enc":
        return [_rsa_jwk(bad, use="enc")], rs_token("bad")
    if name == "use-SIG-uppercase":
        return [_rsa_jwk(bad, use="SIG")], rs_token("bad")
    if name == "use-empty":
        return [_rsa_jwk(bad, use="")], rs_token("bad")
    if name == "key_ops-sign":
        return [_rsa_jwk(bad, key_ops=["sign"])], rs_token("bad")
    if name == "key_ops-string":
        return [_rsa_jwk(bad, key_ops="verify")], rs_token("bad")
    if name == "key_ops-encrypt":
        return [_rsa_jwk(bad, key_ops=["encrypt", "wrapKey"])], rs_token("bad")
    if name == "alg-RS384-pinned":
        return [_rsa_jwk(bad, alg="RS384")], rs_token("bad")
    if name == "alg-ES256-on-RSA":
        return [_rsa_jwk(bad, alg="ES256")], rs_token("bad")
    if name == "alg-HS256-on-RSA":
        n = bad.private.public_key().public_numbers().n.to_bytes(256, "big")
        return [_rsa_jwk(bad, alg="HS256")], hs_token(n, {"alg": "HS256", "kid": "bad"}, claims(sub="admin"))
    if name == "alg-none":
        return [_rsa_jwk(bad, alg="none")], seg({"alg": "none", "kid": "bad"}) + "." + seg(claims()) + "."
    if name == "alg-not-allowed-PS512":
        return [_rsa_jwk(bad, alg="PS512")], rs_token("bad", "PS512")
    if name == "kty-EC-on-RSA-members":
        return [_rsa_jwk(bad, kty="EC")], rs_token("bad")
    if name == "kty-lowercase":
        return [_rsa_jwk(bad, kty="rsa")], rs_token("bad")
    if name == "kty-missing":
        return [_rsa_jwk(bad, kty=None)], rs_token("bad")
    if name == "private-d":
        d = bad.private.private_numbers().d
        return [_rsa_jwk(bad, d=_int_b64(d))], rs_token("bad")
    if name == "private-pq":
        pn = bad.private.private_numbers()
        return [_rsa_jwk(bad, p=_int_b64(pn.p), q=_int_b64(pn.q))], rs_token("bad")
    if name == "rsa-1024":
        return [rsa_1024.jwk()], rsa_1024.token(sub="admin")
    if name == "e=1":
        si = (seg({"alg": "RS256", "kid": "e1"}) + "." + seg(claims(sub="admin"))).encode()
        jwk = _rsa_jwk(bad, kid="e1", e=_int_b64(1))
        # With e = 1 the "signature" is the padded digest itself: anyone can forge.
        return [jwk], si.decode() + "." + b64url(_pkcs1_em(si))
    if name == "e=2-even":
        return [_rsa_jwk(bad, e=_int_b64(2))], rs_token("bad")
    if name == "e-missing":
        return [_rsa_jwk(bad, e=None)], rs_token("bad")
    if name == "n-not-base64url":
        return [_rsa_jwk(bad, n="!!!" + bad.jwk()["n"])], rs_token("bad")
    ec_jwk = bad_ec.jwk()

    def es_token(kid: str = "bad-ec", alg: str = "ES256") -> str:
        return signed(bad_ec, {"alg": alg, "kid": kid}, claims(sub="admin"))

    if name == "ec-crv-P-384-with-P-256-point":
        return [{**ec_jwk, "crv": "P-384", "alg": "ES384"}], es_token(alg="ES384")
    if name == "ec-crv-secp256k1":
        return [{**ec_jwk, "crv": "secp256k1", "alg": "ES256K"}], es_token()
    if name == "ec-point-off-curve":
        y = int.from_bytes(bad_ec.private.public_key().public_numbers().y.to_bytes(32, "big"), "big")
        return [{**ec_jwk, "y": _int_b64((y + 1) % (1 << 256), 32)}], es_token()
    if name == "ec-point-zero":
        return [{**ec_jwk, "x": b64url(b"\x00" * 32), "y": b64url(b"\x00" * 32)}], \
            seg({"alg": "ES256", "kid": "bad-ec"}) + "." + seg(claims()) + "." + b64url(b"\x00" * 64)
    if name == "ec-x-33-bytes":
        x = b"\x00" + bad_ec.private.public_key().public_numbers().x.to_bytes(32, "big")
        return [{**ec_jwk, "x": b64url(x)}], es_token()
    if name == "ec-alg-ES384":
        return [{**ec_jwk, "alg": "ES384"}], es_token()
    if name == "ec-private-d":
        return [{**ec_jwk, "d": _int_b64(bad_ec.private.private_numbers().private_value, 32)}], es_token()
    if name == "okp-with-P-256":
        return [{**ec_jwk, "kty": "OKP"}], es_token()
    if name == "non-object-entry":
        return ["bad", 1, None, [ec_jwk]], es_token()
    raise AssertionError(name)


@pytest.mark.parametrize("name", UNFIT)
async def test_unfit_jwks_entries_are_skipped(idp, make_idp_gateway, backend, rsa_key, bad_rsa, bad_ec,
                                              rsa_1024, name):
    published, token = _case(name, rsa_key, bad_rsa, bad_ec, rsa_1024)
    gw = await _gateway(idp, make_idp_gateway, rsa_key, published)
    await assert_rejected(gw, backend, token)
    assert await status_of(gw, get("/x", rsa_key.token())) == 200


async def test_e3_key_bleichenbacher_forgery_cve_2006_4339(idp, make_idp_gateway, backend, rsa_key, rsa_e3):
    """An e = 3 key is legal (and its real signatures pass); a Bleichenbacher'06 cube-root forgery
    (garbage after the digest) must not."""
    gw = await _gateway(idp, make_idp_gateway, rsa_key, [rsa_e3.jwk()])
    assert await status_of(gw, get("/x", rsa_e3.token())) == 200
    si = (seg({"alg": "RS256", "kid": "rsa-e3"}) + "." + seg(claims(sub="admin"))).encode()
    await assert_rejected(gw, backend, si.decode() + "." + b64url(_bleichenbacher_e3(si)))


@pytest.mark.parametrize("issuer_algs", ["default", "with-hs"])
async def test_oct_key_in_remote_jwks(idp, make_idp_gateway, backend, rsa_key, issuer_algs):
    """A symmetric key published in a JWKS is a key anyone can read: never an HMAC key."""
    secret = b"k" * 48
    oct_jwks = [{"kty": "oct", "kid": "hmac", "k": b64url(secret)},
                {"kty": "oct", "kid": "hmac2", "k": b64url(secret), "alg": "HS256", "use": "sig"}]
    extra = {} if issuer_algs == "default" else {"algorithms": ["RS256", "HS256"], "hs_secret": "z" * 40}
    gw = await _gateway(idp, make_idp_gateway, rsa_key, oct_jwks, **extra)
    for kid in ("hmac", "hmac2", None):
        header = {"alg": "HS256"} if kid is None else {"alg": "HS256", "kid": kid}
        await assert_rejected(gw, backend, hs_token(secret, header, claims(sub="admin")))
    assert await status_of(gw, get("/x", rsa_key.token())) == 200


async def test_duplicate_kid(idp, make_idp_gateway, backend, rsa_key, bad_rsa, bad_ec):
    """Duplicate kids: each genuine key under the kid works; an unfit twin (use: enc) and an
    attacker key claiming the kid do not."""
    dup_a = SigningKey.rsa("dup", "RS256")
    dup_b = SigningKey.ec("dup", "ES256")
    dup_enc = SigningKey.rsa("dup", "RS256")
    published = [dup_a.jwk(), dup_b.jwk(), {**dup_enc.jwk(), "use": "enc"}]
    gw = await _gateway(idp, make_idp_gateway, rsa_key, published)
    assert await status_of(gw, get("/x", dup_a.token())) == 200
    assert await status_of(gw, get("/x", dup_b.token())) == 200
    await assert_rejected(gw, backend, dup_enc.token(sub="admin"))
    await assert_rejected(gw, backend, SigningKey.rsa("dup").token(sub="admin"))
    await assert_rejected(gw, backend, SigningKey.ec("dup").token(sub="admin"))


@pytest.mark.parametrize("document", [
    {"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]},
    {"keys": "not-a-list"}, {"keys": {}}, {"keys": [None]}, {"notkeys": []}, {"keys": []},
], ids=["only-oct", "keys-string", "keys-object", "keys-null-entry", "no-keys-member", "empty"])
async def test_jwks_with_no_usable_key_is_503_never_open(idp, make_idp_gateway, backend, rsa_key, document):
    """A JWKS with nothing usable leaves the issuer unloaded: 503 (fail closed), never 200."""
    idp.document = document
    gw = await make_idp_gateway(idp)
    for token in (rsa_key.token(), hs_token(b"secret" * 6, {"alg": "HS256"}, claims())):
        status = await assert_rejected(gw, backend, token, allowed=(401, 503))
        assert status in (401, 503)


async def test_rotation_to_hostile_jwks_keeps_last_good_keys(idp, make_idp_gateway, backend, rsa_key, bad_rsa):
    """After a good load, a refetch (triggered by an unknown kid) that returns only unfit keys
    must not unload the good key nor install the unfit one."""
    idp.document = {"keys": [rsa_key.jwk()]}
    gw = await make_idp_gateway(idp, issuer={"jwks_cooldown": 0.01})
    assert await status_of(gw, get("/x", rsa_key.token())) == 200
    idp.document = {"keys": [_rsa_jwk(bad_rsa, use="enc"), {"kty": "oct", "kid": "bad", "k": "AAAA"}]}
    await assert_rejected(gw, backend, bad_rsa.token())
    time.sleep(0.02)
    await assert_rejected(gw, backend, bad_rsa.token(jti="again"))
    assert await status_of(gw, get("/x", rsa_key.token(jti="still"))) == 200
