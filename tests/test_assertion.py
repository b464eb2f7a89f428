"""assertion: keys, the signed assertion (checked by PyJWT and joserfc, not by our own code), reuse."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from jwtproxy.assertion import (
    ASSERTION_TYP,
    AssertionKey,
    AssertionKeyError,
    AssertionSigner,
    KeyRing,
    generate_key,
    key_from_private,
    load_key_file,
    load_key_pem,
)

# Real time, so the verifying libraries check exp and iat against their own clocks.
NOW = float(int(time.time()))
TOKEN_KEY = hashlib.sha256(b"the token").digest()
CLAIMS: dict[str, Any] = {
    "iss": "https://idp.example",
    "aud": "api",
    "sub": "alice",
    "scope": "read write",
    "role": ["admin", "ops"],
    "email": "alice@example.com",
    "jti": "token-1",
    "exp": NOW + 3600,
    "iat": NOW - 10,
}


@pytest.fixture(autouse=True)
def _fresh_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # Assertions live 60 s: "now" is taken when each test starts, not when the module was imported.
    monkeypatch.setattr(sys.modules[__name__], "NOW", float(int(time.time())))


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _parts(value: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = value.decode("ascii").split(".")
    return json.loads(_b64decode(header)), json.loads(_b64decode(payload)), _b64decode(signature)


def _pyjwt_verify(value: bytes, ring: KeyRing, audience: str = "payments", **options: Any) -> dict[str, Any]:
    """Verify as a backend would: PyJWT, the published JWKS, key chosen by kid."""
    jwk_set = pyjwt.PyJWKSet.from_json(ring.jwks_json.decode())
    kid = pyjwt.get_unverified_header(value)["kid"]
    key = jwk_set[kid]
    claims: dict[str, Any] = pyjwt.decode(
        value,
        key=key.key,
        algorithms=["ES256", "EdDSA"],
        audience=audience,
        issuer="jwtproxy",
        options={"require": ["iss", "aud", "iat", "exp"], **options},
    )
    return claims


def _signer(key: AssertionKey, **kwargs: Any) -> AssertionSigner:
    kwargs.setdefault("issuer", "jwtproxy")
    kwargs.setdefault("lifetime", 60)
    kwargs.setdefault("claims", ["sub", "scope", "role"])
    kwargs.setdefault("cache_size", 100)
    return AssertionSigner(key, **kwargs)


@pytest.fixture(params=["ES256", "EdDSA"])
def key(request: pytest.FixtureRequest) -> AssertionKey:
    return generate_key(request.param)


# -- keys ------------------------------------------------------------------------------------------


def _rfc7638(jwk: dict[str, str]) -> str:
    """RFC 7638 §3 computed here by hand: required members, sorted, no whitespace, SHA-256."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def test_kid_is_the_rfc7638_thumbprint(key: AssertionKey) -> None:
    assert key.kid == _rfc7638(dict(key.public_jwk))
    assert key.public_jwk["kid"] == key.kid
    assert key.public_jwk["alg"] == key.algorithm
    assert key.public_jwk["use"] == "sig"


def test_published_jwk_has_no_private_member(key: AssertionKey) -> None:
    ring = KeyRing(key)
    (jwk,) = json.loads(ring.jwks_json)["keys"]
    assert "d" not in jwk
    assert jwk == ring.jwks()["keys"][0]
    assert set(jwk) == ({"kty", "crv", "x", "y"} if key.algorithm == "ES256" else {"kty", "crv", "x"}) | {
        "kid",
        "alg",
        "use",
    }


def test_rfc8037_appendix_a_thumbprint() -> None:
    # RFC 8037 Appendix A.1/A.3: the Ed25519 test key and its RFC 7638 thumbprint.
    d = _b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    key = key_from_private(ed25519.Ed25519PrivateKey.from_private_bytes(d))
    assert key.public_jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert key.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _pem(private_key: Any, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return private_key.private_bytes(serialization.Encoding.PEM, fmt, encryption)  # type: ignore[no-any-return]


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_load_ec_pem_in_both_formats(fmt: serialization.PrivateFormat) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key = load_key_pem(_pem(private, fmt))
    assert key.algorithm == "ES256"
    assert key.kid == key_from_private(private).kid


def test_load_ed25519_pem(tmp_path: Path) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(_pem(private, serialization.PrivateFormat.PKCS8))
    key = load_key_file(str(path))
    assert key.algorithm == "EdDSA"
    assert key.kid == key_from_private(private).kid


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _pem(rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8), "expected a P-256"),
        (lambda: _pem(ec.generate_private_key(ec.SECP384R1()), serialization.PrivateFormat.PKCS8), "secp384r1"),
        (
            lambda: _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8, b"secret"),
            "encrypted",
        ),
        (
            lambda: ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "not a PEM private key",
        ),
        (lambda: b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n", "not a PEM private key"),
        (lambda: b"", "not a PEM private key"),
    ],
    ids=["rsa", "p384", "encrypted", "public-key", "garbage", "empty"],
)
def test_unusable_keys_are_refused_with_the_reason(make: Any, message: str) -> None:
    with pytest.raises(AssertionKeyError, match=message):
        load_key_pem(make())


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(AssertionKeyError, match="cannot read the key file"):
        load_key_file(str(tmp_path / "missing.pem"))


def test_ring_from_key_files_first_signs_all_published() -> None:
    first, second, third = generate_key("ES256"), generate_key("EdDSA"), generate_key("ES256")
    ring = KeyRing.from_keys([first, second, third], "ES256")
    assert ring.signing is first
    assert [k["kid"] for k in ring.jwks()["keys"]] == [first.kid, second.kid, third.kid]


def test_ring_first_key_must_fit_the_algorithm() -> None:
    with pytest.raises(AssertionKeyError, match="EdDSA key, but algorithm is 'ES256'"):
        KeyRing.from_keys([generate_key("EdDSA"), generate_key("ES256")], "ES256")


def test_ring_refuses_a_key_listed_twice() -> None:
    key = generate_key("ES256")
    same = key_from_private(key.private_key)
    with pytest.raises(AssertionKeyError, match="listed twice"):
        KeyRing.from_keys([key, generate_key("ES256"), same], "ES256")


def test_ring_refuses_no_keys() -> None:
    with pytest.raises(AssertionKeyError):
        KeyRing.from_keys([], "ES256")


# -- the assertion -----------------------------------------------------------------------------------


def test_assertion_verifies_with_pyjwt_and_carries_the_contract_claims(key: AssertionKey) -> None:
    ring = KeyRing(key)
    value = _signer(key).assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW)
    claims = _pyjwt_verify(value, ring)
    assert claims == {
        "iss": "jwtproxy",
        "aud": "payments",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "sub": "alice",
        "scope": "read write",
        "role": ["admin", "ops"],
        "jti": "token-1",
    }
    header, _, _ = _parts(value)
    assert header == {"alg": key.algorithm, "kid": key.kid, "typ": ASSERTION_TYP}


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # joserfc prefers RFC 9864 names
def test_assertion_verifies_with_joserfc(key: AssertionKey) -> None:
    ring = KeyRing(key)
    value = _signer(key).assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW)
    token = jose_jwt.decode(value, KeySet.import_key_set(ring.jwks()), algorithms=[key.algorithm])
    assert token.header["kid"] == key.kid
    assert token.claims["aud"] == "payments"
    assert token.claims["sub"] == "alice"


def test_a_tampered_assertion_does_not_verify(key: AssertionKey) -> None:
    ring = KeyRing(key)
    value = _signer(key).assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW)
    header, payload, signature = value.split(b".")
    forged = json.loads(_b64decode(payload.decode()))
    forged["sub"] = "mallory"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=")
    with pytest.raises(pyjwt.InvalidSignatureError):
        _pyjwt_verify(b".".join((header, forged_payload, signature)), ring)


def test_aud_is_the_upstream_name_as_a_string(key: AssertionKey) -> None:
    ring = KeyRing(key)
    value = _signer(key).assertion(TOKEN_KEY, "orders", CLAIMS, None, NOW)
    _, payload, _ = _parts(value)
    assert payload["aud"] == "orders"
    with pytest.raises(pyjwt.InvalidAudienceError):
        _pyjwt_verify(value, ring, audience="payments")


def test_only_listed_claims_the_token_has_are_copied(key: AssertionKey) -> None:
    signer = _signer(key, claims=["sub", "email", "groups", "tenant"])
    claims = {"sub": "bob", "email": "b@example.com", "tenant": None, "role": "admin", "exp": NOW + 100}
    _, payload, _ = _parts(signer.assertion(TOKEN_KEY, "payments", claims, claims["exp"], NOW))
    # role is not listed; groups is absent; a null tenant counts as absent; no jti in the token.
    assert set(payload) == {"iss", "aud", "iat", "exp", "sub", "email"}
    assert payload["email"] == "b@example.com"


def test_non_ascii_and_structured_claims_survive(key: AssertionKey) -> None:
    ring = KeyRing(key)
    claims = {"sub": "zoë", "scope": "a", "role": {"org": "Ünïcode", "levels": [1, 2.5, True]}}
    value = _signer(key).assertion(TOKEN_KEY, "payments", claims, NOW + 100, NOW)
    verified = _pyjwt_verify(value, ring)
    assert verified["sub"] == "zoë" and verified["role"] == claims["role"]


def test_exp_is_capped_by_the_token_exp(key: AssertionKey) -> None:
    signer = _signer(key, lifetime=60)
    _, payload, _ = _parts(signer.assertion(TOKEN_KEY, "payments", CLAIMS, NOW + 20.9, NOW))
    assert payload["iat"] == int(NOW)
    assert payload["exp"] == int(NOW) + 20  # rounded down: never past the token's exp
    _, payload, _ = _parts(signer.assertion(hashlib.sha256(b"x").digest(), "payments", CLAIMS, NOW + 3600, NOW))
    assert payload["exp"] == int(NOW) + 60


def test_fractional_now_and_lifetime_round_down(key: AssertionKey) -> None:
    signer = _signer(key, lifetime=30.5)
    _, payload, _ = _parts(signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW + 0.75))
    assert payload["iat"] == int(NOW)
    assert payload["exp"] == int(NOW) + 30


def test_a_token_past_exp_within_leeway_gets_an_expired_assertion(key: AssertionKey) -> None:
    ring = KeyRing(key)
    value = _signer(key).assertion(TOKEN_KEY, "payments", CLAIMS, NOW - 5, NOW)
    with pytest.raises(pyjwt.ExpiredSignatureError):
        _pyjwt_verify(value, ring)


def test_es256_signatures_are_raw_fixed_length_r_s() -> None:
    # A DER-to-raw conversion that dropped leading zero bytes would fail for ~1 in 128 signatures.
    key = generate_key("ES256")
    public = key.private_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for n in range(600):
        value = _signer(key, cache_size=0).assertion(TOKEN_KEY, f"u{n}", CLAIMS, None, NOW)
        header, payload, signature = value.rsplit(b".", 2)
        raw = _b64decode(signature.decode())
        assert len(raw) == 64
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public.verify(der, header + b"." + payload, ec.ECDSA(hashes.SHA256()))


# -- reuse -------------------------------------------------------------------------------------------


def test_same_token_and_upstream_reuse_one_signature(key: AssertionKey) -> None:
    signer = _signer(key)
    first = signer.assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW)
    again = signer.assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW + 30)
    assert again is first
    assert signer.signed == 1
    other_upstream = signer.assertion(TOKEN_KEY, "orders", CLAIMS, CLAIMS["exp"], NOW + 30)
    other_token = signer.assertion(hashlib.sha256(b"other").digest(), "payments", CLAIMS, CLAIMS["exp"], NOW + 30)
    assert signer.signed == 3
    assert len({first, other_upstream, other_token}) == 3


def test_an_assertion_near_its_exp_is_signed_again(key: AssertionKey) -> None:
    signer = _signer(key, lifetime=60)
    first = signer.assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW)
    assert signer.assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW + 54.9) is first
    renewed = signer.assertion(TOKEN_KEY, "payments", CLAIMS, CLAIMS["exp"], NOW + 55)  # 5 s left
    assert renewed != first
    assert _parts(renewed)[1]["exp"] == int(NOW) + 115
    assert signer.signed == 2
    assert len(signer) == 1


def test_an_assertion_capped_by_a_token_about_to_expire_is_not_kept(key: AssertionKey) -> None:
    signer = _signer(key)
    a = signer.assertion(TOKEN_KEY, "payments", CLAIMS, NOW + 4, NOW)
    b = signer.assertion(TOKEN_KEY, "payments", CLAIMS, NOW + 4, NOW)
    assert signer.signed == 2 and len(signer) == 0
    assert _parts(a)[1]["exp"] == _parts(b)[1]["exp"] == int(NOW) + 4


def test_short_lifetimes_still_reuse(key: AssertionKey) -> None:
    signer = _signer(key, lifetime=4)  # the margin shrinks to half the lifetime
    first = signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW)
    assert signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW + 1.9) is first
    assert signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW + 2) != first


def test_the_reuse_map_is_bounded_oldest_first(key: AssertionKey) -> None:
    signer = _signer(key, cache_size=3)
    tokens = [hashlib.sha256(bytes([n])).digest() for n in range(4)]
    for t in tokens:
        signer.assertion(t, "payments", CLAIMS, None, NOW)
    assert len(signer) == 3 and signer.signed == 4
    signer.assertion(tokens[0], "payments", CLAIMS, None, NOW)  # evicted: signed again
    assert signer.signed == 5
    signer.assertion(tokens[3], "payments", CLAIMS, None, NOW)  # still kept
    assert signer.signed == 5 and len(signer) == 3


def test_cache_size_zero_signs_every_time(key: AssertionKey) -> None:
    signer = _signer(key, cache_size=0)
    signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW)
    signer.assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW)
    assert signer.signed == 2 and len(signer) == 0


def test_bad_parameters() -> None:
    key = generate_key("ES256")
    with pytest.raises(ValueError):
        _signer(key, lifetime=0)
    with pytest.raises(ValueError):
        _signer(key, cache_size=-1)
    with pytest.raises(AssertionKeyError):
        generate_key("RS256")  # type: ignore[arg-type]


# -- rotation ----------------------------------------------------------------------------------------


def test_rotation_old_assertions_verify_while_the_old_key_is_listed() -> None:
    old, new = generate_key("ES256"), generate_key("ES256")
    before = _signer(KeyRing.from_keys([old, new], "ES256").signing).assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW)
    rotated = KeyRing.from_keys([new, old], "ES256")  # reordered: new signs, old still published
    after = _signer(rotated.signing).assertion(TOKEN_KEY, "payments", CLAIMS, None, NOW)
    assert _parts(before)[0]["kid"] == old.kid and _parts(after)[0]["kid"] == new.kid
    for value in (before, after):
        _pyjwt_verify(value, rotated)
    retired = KeyRing.from_keys([new], "ES256")  # old key dropped: its assertions no longer verify
    with pytest.raises(KeyError):
        _pyjwt_verify(before, retired)
    _pyjwt_verify(after, retired)
