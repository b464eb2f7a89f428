"""Class 2 -- JOSE header tricks: embedded keys, key URLs, hostile kid, crit, b64, JWE, nested
tokens, duplicate members (RFC 7515 §4, RFC 8725 §3.10-3.11, jwt_tool -X i/s/k)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os

import pytest
from advhelpers import (
    ROUTES,
    SigningKey,
    assert_rejected,
    b64std,
    b64url,
    claims,
    get,
    hs_token,
    raw_signed,
    seg,
    signed,
    status_of,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID


@pytest.fixture
async def gw(make_gateway):
    return await make_gateway(routes=ROUTES)


@pytest.fixture
async def idp_gw(idp, make_idp_gateway, rsa_key, ec_key):
    idp.document = {"keys": [rsa_key.jwk(), ec_key.jwk()]}
    gateway = await make_idp_gateway(idp, issuer={"jwks_cooldown": 0.01})
    assert await status_of(gateway, get("/x", rsa_key.token())) == 200
    return gateway


def seg_text(payload: dict) -> str:
    return json.dumps(payload)


def _self_signed(key: SigningKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.private.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key.private, hashes.SHA256()))


# ------------------------------------------------------------------- embedded jwk (CVE-2018-0114)


@pytest.mark.parametrize("kid", ["attacker", "rsa-1", "ec-1", None])
@pytest.mark.parametrize("kty", ["RSA", "EC"])
async def test_embedded_jwk_is_never_trusted_cve_2018_0114(gw, backend, kid, kty):
    """Cisco node-jose (CVE-2018-0114) verified with the ``jwk`` the token carried itself."""
    attacker = SigningKey.rsa(kid or "attacker", "RS256") if kty == "RSA" else SigningKey.ec(kid or "attacker", "ES256")
    header = {"alg": attacker.alg, "typ": "JWT", "jwk": attacker.jwk()}
    if kid is not None:
        header["kid"] = kid
    await assert_rejected(gw, backend, signed(attacker, header, claims(sub="admin", role="admin")))


async def test_embedded_x5c_is_never_trusted(gw, backend):
    attacker = SigningKey.rsa("rsa-1", "RS256")
    cert = _self_signed(attacker)
    x5c = [b64std(cert.public_bytes(serialization.Encoding.DER))]
    for header in ({"alg": "RS256", "x5c": x5c}, {"alg": "RS256", "kid": "rsa-1", "x5c": x5c},
                   {"alg": "RS256", "x5t": b64url(cert.fingerprint(hashes.SHA1())), "x5c": x5c},
                   {"alg": "RS256", "x5t#S256": b64url(cert.fingerprint(hashes.SHA256())), "x5c": x5c}):
        await assert_rejected(gw, backend, signed(attacker, header, claims(sub="admin")))


# ----------------------------------------------------------------- jku / x5u: never fetched (RFC 8725 §3.10)


@pytest.mark.parametrize("member", ["jku", "x5u"])
@pytest.mark.parametrize("kid", ["rsa-1", "attacker-kid", None])
async def test_jku_x5u_never_fetched(idp_gw, idp, backend, counting_listener, member, kid):
    """The token points at an attacker URL holding the attacker's key; no outbound connection may
    be made to it (a counting listener proves it), and the token is refused. Variants: plain,
    ``localhost`` spelling, and a userinfo URL that starts with the trusted IdP's address."""
    attacker = SigningKey.rsa(kid or "attacker", "RS256")
    counting_listener.body = json.dumps({"keys": [attacker.jwk()]}).encode()
    urls = [counting_listener.url + "/jwks.json",
            f"http://localhost:{counting_listener.port}/jwks.json",
            f"http://127.0.0.1:{idp.port}@127.0.0.1:{counting_listener.port}/jwks.json"]
    for url in urls:
        header = {"alg": "RS256", member: url}
        if kid is not None:
            header["kid"] = kid
        await assert_rejected(idp_gw, backend, signed(attacker, header, claims(sub="admin")))
    await asyncio.sleep(0.1)
    assert counting_listener.connections == 0


async def test_jku_to_the_real_idp_with_attacker_key(idp_gw, backend, idp, counting_listener):
    """``jku`` naming the *trusted* IdP's URL does not make an attacker key trusted either."""
    attacker = SigningKey.rsa("attacker", "RS256")
    token = signed(attacker, {"alg": "RS256", "kid": "attacker", "jku": idp.jwks_uri}, claims())
    await assert_rejected(idp_gw, backend, token)


# ------------------------------------------------------------------------- hostile kid values

HOSTILE_KIDS = {
    "path-traversal": "../../../../../../dev/null",
    "absolute-dev-null": "/dev/null",
    "etc-passwd": "../../../../etc/passwd",
    "proc-self": "/proc/self/environ",
    "url-encoded-traversal": "..%2F..%2F..%2Fdev%2Fnull",
    "sql-or": "' OR '1'='1",
    "sql-union": "x' UNION SELECT 'c2VjcmV0' --",
    "sql-comment": "rsa-1'--",
    "shell-subst": "$(touch {canary})",
    "shell-backtick": "`touch {canary}`",
    "shell-pipe": "| touch {canary}",
    "shell-semicolon": "rsa-1; touch {canary}",
    "empty": "",
    "space": " ",
    "nul": "rsa-1\u0000",
    "crlf": "rsa-1\r\nx-injected: 1",
    "unicode": "rsa\u20111",
    "huge-4k": "k" * 4000,
    "huge-100k": "k" * 100000,
    "prefix-of-real": "rsa-",
    "real-with-space": "rsa-1 ",
    "real-upper": "RSA-1",
    "proto-pollution": "__proto__",
    "constructor": "constructor",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_KIDS))
@pytest.mark.parametrize("signer", ["hs-empty", "hs-dev-null", "rsa-attacker", "rsa-real"])
async def test_hostile_kid_values(idp_gw, backend, idp, tmp_path, rsa_key, name, signer):
    """jwt_tool's kid injections: path traversal to a known file (sign with its contents), SQL,
    shell, empty, control characters, huge. Nothing is executed, nothing is accepted; even a
    real signature under a kid that is not the key's is refused. Huge kids: 401 or 431."""
    canary = tmp_path / "pwned"
    kid = HOSTILE_KIDS[name].format(canary=canary)
    if signer == "hs-empty":
        token = hs_token(b"", {"alg": "HS256", "kid": kid}, claims(sub="admin"))
    elif signer == "hs-dev-null":
        token = hs_token(b"\x00", {"alg": "HS256", "kid": kid}, claims(sub="admin"))
    elif signer == "rsa-attacker":
        token = signed(SigningKey.rsa("x"), {"alg": "RS256", "kid": kid}, claims(sub="admin"))
    else:
        token = signed(rsa_key, {"alg": "RS256", "kid": kid}, claims(sub="admin"))
    allowed = (401, 431) if len(kid) > 3000 else (401,)
    await assert_rejected(idp_gw, backend, token, allowed=allowed)
    assert not canary.exists()


@pytest.mark.parametrize("kid", [123, 0, True, ["rsa-1"], {"kid": "rsa-1"}, 1.5], ids=repr)
async def test_non_string_kid(gw, backend, rsa_key, kid):
    """RFC 7515 §4.1.4: kid is a string. A real signature under a non-string kid is refused."""
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": kid}, claims()))


async def test_kid_null_means_no_kid(gw, backend, rsa_key):
    """``kid: null`` is treated as no kid (every RS256 key tried): the real key's signature passes,
    an attacker's does not."""
    assert await status_of(gw, get("/x", signed(rsa_key, '{"alg":"RS256","kid":null}', claims()))) in (200, 401)
    await assert_rejected(gw, backend, signed(SigningKey.rsa("x"), '{"alg":"RS256","kid":null}', claims()))


# ------------------------------------------------------------- crit, b64, JWE, cty: JWT (RFC 7515/7797/7519)


@pytest.mark.parametrize("extra", [
    {"crit": ["exp"]}, {"crit": []}, {"crit": ["b64"], "b64": True}, {"crit": ["http://evil"]}, {"crit": "exp"},
    {"crit": None}, {"b64": False}, {"b64": True}, {"b64": False, "crit": ["b64"]},
    {"cty": "JWT"}, {"cty": "jwt"}, {"cty": "application/jwt"}, {"cty": "Application/JWT"}, {"cty": "JwT"},
    {"cty": 1}, {"typ": 1}, {"typ": ["JWT"]}, {"zip": "DEF"}, {"enc": "A256GCM"},
], ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
async def test_unsupported_header_members_rfc7515_4_1_11(gw, backend, rsa_key, extra):
    """Properly signed, but the header asks for something we do not implement: fail closed.
    (``zip`` and ``enc`` are JWE members; RFC 7515 ignores unknown members, so those two may be
    accepted, everything else must be refused.)"""
    token = signed(rsa_key, {"alg": "RS256", "kid": rsa_key.kid, **extra}, claims())
    if set(extra) <= {"zip", "enc"}:
        assert await status_of(gw, get("/x", token)) in (200, 401)
    else:
        await assert_rejected(gw, backend, token)


async def test_b64_false_unencoded_payload_rfc7797(gw, backend, rsa_key):
    """A real RFC 7797 detached/unencoded token: payload bytes signed raw."""
    header = seg({"alg": "RS256", "kid": rsa_key.kid, "b64": False, "crit": ["b64"]})
    payload = '{"iss":"https://idp.test","aud":"api","exp":9999999999,"sub":"admin"}'
    sig = rsa_key.sign((header + "." + payload).encode())
    await assert_rejected(gw, backend, header + "." + payload + "." + b64url(sig))
    await assert_rejected(gw, backend, header + ".." + b64url(sig))


@pytest.mark.parametrize("shape", ["jwe-5", "jwe-5-empty-key", "four", "six", "two", "one", "dots-only", "seven-dots"])
async def test_jwe_and_wrong_segment_counts(gw, backend, rsa_key, shape):
    jwe_header = seg({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": rsa_key.kid, "cty": "JWT"})
    inner = rsa_key.token()
    token = {
        "jwe-5": f"{jwe_header}.{b64url(os.urandom(256))}.{b64url(os.urandom(12))}.{seg(inner)}.{b64url(os.urandom(16))}",
        "jwe-5-empty-key": f"{seg({'alg': 'dir', 'enc': 'A128GCM'})}..{b64url(os.urandom(12))}.{seg(inner)}.{b64url(os.urandom(16))}",
        "four": inner + "." + b64url(b"x"),
        "six": inner + ".a.b.c",
        "two": ".".join(inner.split(".")[:2]),
        "one": inner.split(".")[1],
        "dots-only": "..",
        "seven-dots": ".......",
    }[shape]
    await assert_rejected(gw, backend, token)


async def test_nested_jwt_payload_is_not_unwrapped(gw, backend, rsa_key):
    """The outer token (attacker-signed) wraps a valid inner token; and a valid outer token whose
    payload is a JWT string. Neither is accepted as the inner identity."""
    inner = rsa_key.token(sub="admin")
    attacker = SigningKey.rsa("rsa-1")
    await assert_rejected(gw, backend, signed(attacker, {"alg": "RS256", "kid": "rsa-1", "cty": "JWT"}, inner))
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": "rsa-1"}, inner))
    await assert_rejected(gw, backend, signed(rsa_key, {"alg": "RS256", "kid": "rsa-1", "cty": "JWT"}, inner))


# ------------------------------------------------------- duplicate JSON members (RFC 7515 §4, RFC 8259 §4)

DUPLICATE_HEADERS = {
    "alg-none-then-rs256": '{"alg":"none","alg":"RS256","kid":"rsa-1"}',
    "alg-rs256-then-none": '{"alg":"RS256","alg":"none","kid":"rsa-1"}',
    "alg-rs256-then-hs256": '{"alg":"RS256","kid":"rsa-1","alg":"HS256"}',
    "kid-twice": '{"alg":"RS256","kid":"other","kid":"rsa-1"}',
    "escaped-alg-duplicate": '{"alg":"RS256","\\u0061lg":"none","kid":"rsa-1"}',
    "crit-hidden-by-duplicate": '{"alg":"RS256","kid":"rsa-1","crit":["x"],"crit":[]}',
}
DUPLICATE_PAYLOADS = {
    "sub-twice": '{{"iss":"{iss}","aud":"api","exp":{exp},"sub":"alice","sub":"admin"}}',
    "aud-twice": '{{"iss":"{iss}","aud":"other","aud":"api","exp":{exp}}}',
    "exp-twice": '{{"iss":"{iss}","aud":"api","exp":1,"exp":{exp}}}',
    "iss-twice": '{{"iss":"https://evil","iss":"{iss}","aud":"api","exp":{exp}}}',
    "role-escaped-twice": '{{"iss":"{iss}","aud":"api","exp":{exp},"role":"member","r\\u006fle":"admin"}}',
    "nested-duplicate": '{{"iss":"{iss}","aud":"api","exp":{exp},"x":{{"a":1,"a":2}}}}',
}


@pytest.mark.parametrize("name", sorted(DUPLICATE_HEADERS))
async def test_duplicate_members_in_header(gw, backend, rsa_key, name):
    await assert_rejected(gw, backend, raw_signed(rsa_key, DUPLICATE_HEADERS[name], seg_text(claims())))


@pytest.mark.parametrize("name", sorted(DUPLICATE_PAYLOADS))
async def test_duplicate_members_in_payload(gw, backend, rsa_key, name):
    import time

    from helpers import ISSUER

    payload = DUPLICATE_PAYLOADS[name].format(iss=ISSUER, exp=int(time.time()) + 600)
    await assert_rejected(gw, backend, raw_signed(rsa_key, '{"alg":"RS256","kid":"rsa-1"}', payload))
