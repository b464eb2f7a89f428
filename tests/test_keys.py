"""keys.py: JWK import rules (each skip has a test) and the signature verifiers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from jwtproxy.config import IssuerConfig
from jwtproxy.keys import (
    ECDSAVerifier,
    Ed25519Verifier,
    HMACVerifier,
    KeySet,
    RSAVerifier,
    is_roca_modulus,
    keyset_from_jwks,
    keyset_from_secret,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64int(i: int, size: int | None = None) -> str:
    return b64(i.to_bytes(size or (i.bit_length() + 7) // 8, "big"))


def issuer(**kw: Any) -> IssuerConfig:
    base: dict[str, Any] = dict(name="corp", issuer="https://idp", jwks_uri="https://idp/jwks", audiences=("api",))
    base.update(kw)
    return IssuerConfig(**base)


RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEYS = {crv: ec.generate_private_key(curve) for crv, curve in
           (("P-256", ec.SECP256R1()), ("P-384", ec.SECP384R1()), ("P-521", ec.SECP521R1()))}  # fmt: skip
ED_KEY = ed25519.Ed25519PrivateKey.generate()
COORD = {"P-256": 32, "P-384": 48, "P-521": 66}


def rsa_jwk(key: rsa.RSAPrivateKey = RSA_KEY, **kw: Any) -> dict[str, Any]:
    pn = key.public_key().public_numbers()
    return {"kty": "RSA", "n": b64int(pn.n), "e": b64int(pn.e), **kw}


def ec_jwk(crv: str = "P-256", **kw: Any) -> dict[str, Any]:
    pn = EC_KEYS[crv].public_key().public_numbers()
    return {"kty": "EC", "crv": crv, "x": b64int(pn.x, COORD[crv]), "y": b64int(pn.y, COORD[crv]), **kw}


def ed_jwk(**kw: Any) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    raw = ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), **kw}


class Logs(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


def load(keys: list[Any], **kw: Any) -> tuple[KeySet, Logs]:
    logs = Logs()
    return keyset_from_jwks({"keys": keys}, issuer(**kw), logs), logs


def algs(ks: KeySet) -> list[tuple[str | None, str]]:
    return sorted((v.kid, v.alg) for v in ks.verifiers)


# ----------------------------------------------------------------------------- import rules


def test_rsa_key_without_alg_serves_every_allowed_rsa_algorithm() -> None:
    ks, logs = load([rsa_jwk(kid="r")])
    assert algs(ks) == [("r", a) for a in ("PS256", "PS384", "PS512", "RS256", "RS384", "RS512")]
    assert logs == []


def test_issuer_allowlist_filters_algorithms() -> None:
    ks, _ = load([rsa_jwk(kid="r"), ec_jwk(kid="e")], algorithms=("RS256",))
    assert algs(ks) == [("r", "RS256")]


def test_jwk_alg_pins_the_algorithm() -> None:
    ks, _ = load([rsa_jwk(kid="r", alg="PS256")])
    assert algs(ks) == [("r", "PS256")]
    assert ks.for_kid("r", "PS384") == []  # kid known, no key for that alg
    assert ks.for_kid("r", "RS256") == []
    assert ks.for_kid("other", "PS256") is None


def test_pinned_alg_outside_allowlist_is_skipped() -> None:
    ks, logs = load([rsa_jwk(kid="r", alg="PS256")], algorithms=("RS256",))
    assert len(ks) == 0
    assert "not in the issuer's algorithms" in logs[0]


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        (rsa_jwk(kid="r", alg="ES521"), "unsupported alg"),
        (rsa_jwk(kid="r", alg="none"), "unsupported alg"),
        (rsa_jwk(kid="r", alg="HS256"), "unsupported alg"),
        (rsa_jwk(kid="r", alg=256), "'alg' is not a string"),
        (rsa_jwk(kid="r", alg="ES256"), "does not fit"),
        (ec_jwk(kid="e", alg="ES384"), "does not fit"),
        (ec_jwk(kid="e", alg="RS256"), "does not fit"),
        (ed_jwk(kid="o", alg="ES256"), "does not fit"),
        (rsa_jwk(rsa.generate_private_key(65537, 1024), kid="small"), "1024 bits"),
        (rsa_jwk(rsa.generate_private_key(65537, 2047), kid="small"), "2047 bits"),
        ({**rsa_jwk(kid="e1"), "e": "AQ"}, "exponent"),
        ({**rsa_jwk(kid="e2"), "e": b64int(65536)}, "exponent"),
        ({**rsa_jwk(kid="nn"), "n": 5}, "'n' missing"),
        ({**rsa_jwk(kid="nn"), "n": "***"}, "not base64url"),
        ({"kty": "RSA", "e": "AQAB", "kid": "x"}, "'n' missing"),
        ({**ec_jwk(kid="e"), "crv": "P-192"}, "unsupported EC crv"),
        ({**ec_jwk(kid="e"), "crv": "secp256k1"}, "unsupported EC crv"),
        ({**ec_jwk("P-256", kid="e"), "crv": "P-384"}, "coordinates must be 48 bytes"),
        ({**ec_jwk(kid="e"), "x": b64(b"\x00" + base64.urlsafe_b64decode(ec_jwk()["x"] + "="))}, "32 bytes"),
        ({**ec_jwk(kid="e"), "y": b64int(12345, 32)}, "not on the curve"),
        ({**ed_jwk(kid="o"), "crv": "X25519"}, "unsupported OKP crv"),
        ({**ed_jwk(kid="o"), "crv": "Ed448"}, "unsupported OKP crv"),
        ({**ed_jwk(kid="o"), "x": b64(b"\x01" * 31)}, "32 bytes"),
        ({"kty": "oct", "k": b64(b"k" * 32), "kid": "h", "alg": "HS256"}, "never taken from a JWKS"),
        ({"kty": "EC2", "kid": "x"}, "unsupported kty"),
        ({"kid": "x", "n": "AQAB"}, "'kty' missing"),
        ("a string", "not a JSON object"),
        (rsa_jwk(kid="r", use="enc"), "'use'"),
        (rsa_jwk(kid="r", use=["sig"]), "'use'"),
        (rsa_jwk(kid="r", key_ops=["encrypt"]), "key_ops"),
        (rsa_jwk(kid="r", key_ops="verify"), "key_ops"),
        (rsa_jwk(kid="r", key_ops=["verify", 1]), "key_ops"),
        (rsa_jwk(kid=7), "'kid' is not a string"),
        ({**rsa_jwk(kid="r"), "d": "AQAB"}, "private"),
        ({**rsa_jwk(kid="r"), "p": "AQAB", "q": "AQAB"}, "private"),
        ({**ec_jwk(kid="e"), "d": "AQAB"}, "private"),
        ({**ed_jwk(kid="o"), "d": "AQAB"}, "private"),
    ],
)
def test_unfit_keys_are_skipped_with_a_log_line(jwk: Any, message: str) -> None:
    ks, logs = load([jwk, ec_jwk(kid="good")])
    assert [v.kid for v in ks.verifiers] == ["good"], "the unfit key must not be used"
    assert len(logs) == 1 and message in logs[0], logs
    assert logs[0].startswith("jwks: issuer corp: key 0")


def test_use_sig_and_key_ops_verify_are_accepted() -> None:
    ks, logs = load([rsa_jwk(kid="r", use="sig", key_ops=["verify"], alg="RS256")])
    assert algs(ks) == [("r", "RS256")] and logs == []


def test_roca_modulus_is_skipped() -> None:
    # The Wycheproof "jws_rsa_roca_key" modulus (2049 bits, Infineon RSALib fingerprint).
    n = (
        "AanFpofbj7KjD4Lf-N2hVMKR7yewSyXhhbirIMTGpfYEhZ_lnt5UoK98DnKIgArXGTu3MaW_HhFw16HGaTDUHqPrId7fe4r11CqRw09yBFuW"
        "79V8sYIwHdzCaWflUI6auImYbVfoN9_nD5n8N8SY9DwXw7mwZM9wREPXoDPgOoIWl6q_MPsp7n0zs3Z5ZaiQWOOzl1S9OhwAfSiiOwz6efnX"
        "EaxuTEtPd7BjSx7NaFka8Dx9U7YqXy2RFj1O9PjyaDGuRh7YXsX3iMUSP_wSyHQg_c_qHRtKUsNSGCT7OZg0hzm2KphtjnayKJvC64vAbRO"
        "BR4Ubg6Bxg9IQVZ-QYyE"
    )
    assert is_roca_modulus(int.from_bytes(base64.urlsafe_b64decode(n + "==="), "big"))
    assert not is_roca_modulus(RSA_KEY.public_key().public_numbers().n)
    ks, logs = load([{"kty": "RSA", "n": n, "e": "AQAB", "kid": "roca"}])
    assert len(ks) == 0 and "ROCA" in logs[0]


def test_ec_curves_map_to_their_algorithm() -> None:
    ks, logs = load([ec_jwk("P-256", kid="a"), ec_jwk("P-384", kid="b"), ec_jwk("P-521", kid="c")])
    assert algs(ks) == [("a", "ES256"), ("b", "ES384"), ("c", "ES512")] and logs == []


def test_ed25519_serves_eddsa_and_fully_specified_name() -> None:
    ks, _ = load([ed_jwk(kid="o")])
    assert algs(ks) == [("o", "Ed25519"), ("o", "EdDSA")]
    ks, _ = load([ed_jwk(kid="o", alg="Ed25519")])
    assert algs(ks) == [("o", "Ed25519")]


def test_duplicate_kids_are_all_kept() -> None:
    other = rsa.generate_private_key(65537, 2048)
    ks, logs = load([rsa_jwk(kid="dup", alg="RS256"), rsa_jwk(other, kid="dup", alg="RS256")])
    assert len(ks.for_kid("dup", "RS256") or []) == 2 and logs == []


def test_unkeyed_lists_every_key_for_the_alg() -> None:
    ks, _ = load([rsa_jwk(alg="RS256"), rsa_jwk(kid="r", alg="RS256"), ec_jwk(kid="e")])
    assert len(ks.unkeyed("RS256")) == 2
    assert [v.kid for v in ks.unkeyed("ES256")] == ["e"]
    assert ks.unkeyed("PS256") == []
    assert sorted(ks.by_kid) == ["e", "r"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"not json", "JWKS is not valid JSON"),
        ("[1]", "JWKS is a JSON list, not an object"),
        ([1], "JWKS is a JSON list, not an object"),
        ({"foo": 1}, 'JWKS object has no "keys" member'),
        ({"keys": "nope"}, 'JWKS "keys" is a str, not an array'),
        ({"keys": {"kty": "RSA"}}, 'JWKS "keys" is a dict, not an array'),
    ],
)
def test_document_that_is_not_a_jwks_raises(document: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        keyset_from_jwks(document, issuer(), Logs())
    assert str(info.value) == message or str(info.value).startswith(message + ": ")


def test_document_as_bytes_and_padded_members() -> None:
    jwk = rsa_jwk(kid="r", alg="RS256")
    jwk["n"] += "=" * (-len(jwk["n"]) % 4)
    ks = keyset_from_jwks(json.dumps({"keys": [jwk]}).encode(), issuer(), Logs())
    assert algs(ks) == [("r", "RS256")]


def test_empty_key_list_gives_empty_keyset() -> None:
    ks, logs = load([])
    assert len(ks) == 0 and ks.by_kid == {} and logs == []


def test_fingerprint_is_canonical_and_tracks_changes() -> None:
    a, _ = load([rsa_jwk(kid="r"), ec_jwk(kid="e")])
    b = keyset_from_jwks(
        json.dumps({"keys": [ec_jwk(kid="e", extra="x"), rsa_jwk(kid="r")]}, indent=2).encode(), issuer(), Logs()
    )
    assert a.fingerprint == b.fingerprint
    c, _ = load([rsa_jwk(kid="r"), ec_jwk("P-384", kid="e")])
    d, _ = load([rsa_jwk(kid="r2"), ec_jwk(kid="e")])
    e, _ = load([rsa_jwk(kid="r", alg="RS256"), ec_jwk(kid="e")])
    assert len({a.fingerprint, c.fingerprint, d.fingerprint, e.fingerprint}) == 4


# ------------------------------------------------------------------------------ HMAC secret


def test_keyset_from_secret() -> None:
    assert keyset_from_secret(issuer()) is None
    assert keyset_from_secret(issuer(algorithms=("HS256",))) is None  # no secret
    ks = keyset_from_secret(issuer(algorithms=("RS256", "HS256", "HS512"), hs_secret=b"s" * 64))
    assert ks is not None and algs(ks) == [(None, "HS256"), (None, "HS512")]
    assert keyset_from_secret(issuer(algorithms=("RS256",), hs_secret=b"s" * 64)) is None


def test_secret_shorter_than_hash_disables_that_algorithm() -> None:
    logs = Logs()
    ks = keyset_from_secret(issuer(algorithms=("HS256", "HS384", "HS512"), hs_secret=b"s" * 32), logs)
    assert ks is not None and algs(ks) == [(None, "HS256")]
    assert len(logs) == 2 and "HS384 disabled" in logs[0]


def test_secret_fingerprint_changes_with_secret_but_does_not_contain_it() -> None:
    a = keyset_from_secret(issuer(algorithms=("HS256",), hs_secret=b"a" * 32))
    b = keyset_from_secret(issuer(algorithms=("HS256",), hs_secret=b"b" * 32))
    assert a is not None and b is not None and a.fingerprint != b.fingerprint
    import hashlib

    assert hashlib.sha256(b"a" * 32).hexdigest() not in repr(a.verifiers[0].thumb)


# ------------------------------------------------------------------------------- verifiers

DATA = b"header.payload"


class AcceptAll:
    """A stand-in public key that accepts every signature: shows which checks are ours."""

    def verify(self, *args: object) -> None:
        return None


def test_rsa_verifiers() -> None:
    pub = RSA_KEY.public_key()
    rs = RSAVerifier("k", "RS256", pub)
    sig = RSA_KEY.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    assert rs.verify(DATA, sig)
    assert not rs.verify(DATA + b"x", sig)
    assert not rs.verify(DATA, sig[:-1])
    assert not rs.verify(DATA, b"\x00" + sig)  # a leading zero byte: wrong length
    assert not RSAVerifier("k", "RS384", pub).verify(DATA, sig)
    assert not RSAVerifier("k", "PS256", pub).verify(DATA, sig)
    stub = RSAVerifier("k", "RS256", pub)
    stub._key = AcceptAll()  # type: ignore[assignment]
    assert stub.verify(DATA, sig)
    assert not stub.verify(DATA, sig[:-1]) and not stub.verify(DATA, sig + b"\x00")  # length is ours
    pss = RSA_KEY.sign(DATA, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert RSAVerifier("k", "PS256", pub).verify(DATA, pss)
    # RFC 7518 §3.5: salt length equals the hash length; another salt length is invalid.
    pss0 = RSA_KEY.sign(DATA, padding.PSS(padding.MGF1(hashes.SHA256()), 0), hashes.SHA256())
    assert not RSAVerifier("k", "PS256", pub).verify(DATA, pss0)


@pytest.mark.parametrize("crv,alg", [("P-256", "ES256"), ("P-384", "ES384"), ("P-521", "ES512")])
def test_ecdsa_verifier(crv: str, alg: str) -> None:
    key = EC_KEYS[crv]
    hasher: hashes.HashAlgorithm = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}[alg]
    v = ECDSAVerifier("k", alg, key.public_key())
    der = key.sign(DATA, ec.ECDSA(hasher))
    r, s = decode_dss_signature(der)
    size = COORD[crv]
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    assert v.verify(DATA, raw)
    assert not v.verify(DATA + b"x", raw)
    assert not v.verify(DATA, der)  # DER is not the JWS encoding
    assert not v.verify(DATA, raw[:-1])
    assert not v.verify(DATA, b"\x00" + raw)


def test_ecdsa_range_checks_are_explicit() -> None:
    """CVE-2022-21449: r = 0 or s = 0 (or >= n) is refused before the library is asked."""
    v = ECDSAVerifier("k", "ES256", EC_KEYS["P-256"].public_key())
    v._key = AcceptAll()  # type: ignore[assignment]
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    one = (1).to_bytes(32, "big")
    zero = bytes(32)
    assert v.verify(DATA, one + one)  # the stand-in accepts anything in range
    for sig in (zero + zero, zero + one, one + zero, n.to_bytes(32, "big") + one, one + n.to_bytes(32, "big")):
        assert not v.verify(DATA, sig)
    assert not v.verify(DATA, one + one + b"\x00")  # length is ours too


def test_ecdsa_zero_signature_with_real_key() -> None:
    v = ECDSAVerifier("k", "ES256", EC_KEYS["P-256"].public_key())
    assert not v.verify(DATA, bytes(64))


def test_ed25519_verifier() -> None:
    v = Ed25519Verifier("k", "EdDSA", ED_KEY.public_key())
    sig = ED_KEY.sign(DATA)
    assert v.verify(DATA, sig)
    assert not v.verify(DATA + b"x", sig)
    assert not v.verify(DATA, sig[:-1])
    v._key = AcceptAll()  # type: ignore[assignment]
    assert not v.verify(DATA, sig + b"\x00")


def test_hmac_verifier() -> None:
    import hmac as _hmac

    v = HMACVerifier("HS256", b"k" * 32)
    sig = _hmac.digest(b"k" * 32, DATA, "sha256")
    assert v.verify(DATA, sig)
    assert not v.verify(DATA, sig[:-1])
    assert not v.verify(DATA + b"x", sig)
    assert not HMACVerifier("HS512", b"k" * 64).verify(DATA, sig)
