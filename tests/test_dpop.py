"""Tests for jwtproxy.dpop: every step of the proof pipeline, nonces and htu normalisation.

Each rejection test sends a proof that is correct in every way but one, and asserts the reason
and the description of exactly the check that must catch it: with that check removed, the proof
would pass or be caught later under another description, and the test would fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from joserfc.jwk import ECKey, OctKey, RSAKey
from dpop_client import DPoPClient, ath, b64url, unsigned

from jwtproxy import dpop
from jwtproxy.dpop import (
    DEFAULT_ALGORITHMS,
    AcceptedProof,
    DPoPPolicy,
    NonceIssuer,
    ProofChecker,
    ProofRejected,
    access_token_hash,
    normalise_htu,
    request_htu,
)

NOW = 1_800_000_000.0
URL = "https://api.example.com/orders/7"
HTU = normalise_htu(URL)
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
SECRET = b"s" * 32
POLICY = DPoPPolicy.build(DEFAULT_ALGORITHMS, max_age=60, leeway=30)


@pytest.fixture(scope="module")
def client() -> DPoPClient:
    return DPoPClient("ES256")


@pytest.fixture
def checker() -> ProofChecker:
    return ProofChecker(NonceIssuer(SECRET))


def check(
    checker: ProofChecker,
    proof: str,
    client: DPoPClient,
    *,
    method: str = "GET",
    htu: str | None = HTU,
    token: str = TOKEN,
    jkt: str | None = None,
    now: float = NOW,
    policy: DPoPPolicy = POLICY,
) -> AcceptedProof:
    return checker.check(
        proof, method=method, htu=htu, token=token, jkt=jkt or client.jkt, now=now, policy=policy
    )


def rejected(checker: ProofChecker, proof: str, client: DPoPClient, **kwargs: Any) -> ProofRejected:
    with pytest.raises(ProofRejected) as info:
        check(checker, proof, client, **kwargs)
    return info.value


def good(client: DPoPClient, **kwargs: Any) -> str:
    kwargs.setdefault("iat", NOW)
    return client.proof(kwargs.pop("method", "GET"), kwargs.pop("url", URL), kwargs.pop("token", TOKEN), **kwargs)


# ---------------------------------------------------------------------------------------------
# accepted proofs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256", "RS256"])
def test_valid_proof_is_accepted_with_its_thumbprint(checker: ProofChecker, alg: str) -> None:
    c = DPoPClient(alg)
    accepted = check(checker, good(c, jti="j-1"), c)
    assert accepted.jkt == c.jkt
    assert accepted.replay_until == NOW + 90
    assert accepted.replay_key == dpop.replay_key("j-1")


def test_thumbprint_is_rfc7638(checker: ProofChecker, client: DPoPClient) -> None:
    jwk = client.public_jwk
    canonical = json.dumps({m: jwk[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    expected = b64url(hashlib.sha256(canonical.encode()).digest())
    assert check(checker, good(client), client, jkt=expected).jkt == expected


def test_typ_with_media_type_prefix_is_accepted(checker: ProofChecker, client: DPoPClient) -> None:
    check(checker, good(client, header={"typ": "application/dpop+jwt"}), client)


def test_replay_key_is_the_jti_alone(checker: ProofChecker, client: DPoPClient) -> None:
    a = check(checker, good(client, jti="same"), client)
    b = check(
        checker,
        good(client, jti="same", method="POST", url="https://api.example.com/other"),
        client,
        method="POST",
        htu=normalise_htu("https://api.example.com/other"),
    )
    c = check(checker, good(client, jti="other"), client)
    assert a.replay_key == b.replay_key != c.replay_key
    assert len(a.replay_key) == 16


def test_replay_window_follows_iat(checker: ProofChecker, client: DPoPClient) -> None:
    accepted = check(checker, good(client, iat=NOW - 50), client)
    assert accepted.replay_until == NOW - 50 + 90


def test_ath_matches_rfc9449_example() -> None:
    # RFC 9449 §7.1, the example access token and its ath.
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


# ---------------------------------------------------------------------------------------------
# step 1: shape
# ---------------------------------------------------------------------------------------------


def test_oversized_proof(checker: ProofChecker, client: DPoPClient) -> None:
    proof = good(client, claims={"pad": "x" * dpop.MAX_PROOF_BYTES})
    exc = rejected(checker, proof, client)
    assert (exc.reason, exc.description, exc.error) == ("dpop_malformed", "DPoP proof too large", "invalid_dpop_proof")


@pytest.mark.parametrize("proof", ["", "abc", "a.b", "a.b.c.d.e", "eyJ9.e30.AA", "e30.e30.AA"])
def test_malformed_proof(checker: ProofChecker, client: DPoPClient, proof: str) -> None:
    exc = rejected(checker, proof, client)
    assert exc.reason == "dpop_malformed"


def test_duplicate_header_member_is_malformed(checker: ProofChecker, client: DPoPClient) -> None:
    h = b64url(b'{"typ":"dpop+jwt","typ":"jwt","alg":"ES256"}')
    exc = rejected(checker, f"{h}.e30.AAAA", client)
    assert exc.reason == "dpop_malformed"


# ---------------------------------------------------------------------------------------------
# step 2-4: header
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["jwt", "at+jwt", "dpop", None])
def test_wrong_typ(checker: ProofChecker, client: DPoPClient, typ: str | None) -> None:
    exc = rejected(checker, good(client, header={"typ": typ}), client)
    assert (exc.reason, exc.description) == ("dpop_typ", "DPoP proof typ is not dpop+jwt")


def test_alg_outside_the_issuer_list(checker: ProofChecker) -> None:
    c = DPoPClient("ES384")
    exc = rejected(checker, good(c), c)
    assert (exc.reason, exc.description) == ("dpop_alg", "DPoP proof algorithm not allowed")
    check(checker, good(c), c, policy=DPoPPolicy.build(["ES384"], 60, 30))


def test_alg_none_is_refused_even_if_configured(checker: ProofChecker, client: DPoPClient) -> None:
    # A policy built past DPoPPolicy.build (which drops none/HS*): the checker still refuses.
    policy = DPoPPolicy(frozenset({"none", "ES256"}), 60, 30)
    proof = unsigned(
        {"typ": "dpop+jwt", "alg": "none", "jwk": client.public_jwk},
        {"jti": "x", "htm": "GET", "htu": URL, "iat": NOW, "ath": ath(TOKEN)},
    )
    exc = rejected(checker, proof, client, policy=policy)
    assert (exc.reason, exc.description) == ("dpop_alg", "DPoP proof algorithm not allowed")


def test_hs256_proof_is_refused_even_if_configured(checker: ProofChecker) -> None:
    secret = OctKey.generate_key(256)
    c = DPoPClient("HS256", key=secret)
    c.public_jwk = secret.as_dict(private=True)  # an HMAC "public key" is the secret itself
    policy = DPoPPolicy(frozenset({"HS256", "ES256"}), 60, 30)
    exc = rejected(checker, good(c), c, jkt=secret.thumbprint(), policy=policy)
    assert (exc.reason, exc.description) == ("dpop_alg", "DPoP proof algorithm not allowed")


def test_policy_build_drops_symmetric_and_none() -> None:
    assert DPoPPolicy.build(["ES256", "HS256", "none"], 60, 0).algorithms == frozenset({"ES256"})
    assert DPoPPolicy.build(DEFAULT_ALGORITHMS, 60, 0).algs_text() == "ES256 EdDSA PS256 RS256"


def test_missing_jwk(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, header={"jwk": None}), client)
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk header missing or not an object")


def test_jwk_not_an_object(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, header={"jwk": "key"}), client)
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk header missing or not an object")


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "k"])
def test_private_members_in_jwk(checker: ProofChecker, client: DPoPClient, member: str) -> None:
    if member == "d":
        jwk = client.key.as_dict(private=True)  # the real private key, leaked by a careless client
    else:
        jwk = dict(client.public_jwk, **{member: "AQAB"})
    exc = rejected(checker, good(client, header={"jwk": jwk}), client)
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk holds private key members")


def test_rsa_private_jwk(checker: ProofChecker) -> None:
    c = DPoPClient("PS256")
    exc = rejected(checker, good(c, header={"jwk": c.key.as_dict(private=True)}), c)
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk holds private key members")


def test_small_rsa_key(checker: ProofChecker) -> None:
    c = DPoPClient("RS256", key=RSAKey.generate_key(1024, private=True, auto_kid=False))
    exc = rejected(checker, good(c), c)
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk is not a usable public key for its algorithm")


def test_key_that_does_not_fit_alg(checker: ProofChecker, client: DPoPClient) -> None:
    # An ES384 header over a P-256 key: the signature would not even be checkable.
    other = DPoPClient("ES384")
    proof = good(other, header={"jwk": client.public_jwk})
    exc = rejected(checker, proof, client, policy=DPoPPolicy.build(["ES256", "ES384"], 60, 30))
    assert (exc.reason, exc.description) == ("dpop_jwk", "DPoP proof jwk is not a usable public key for its algorithm")


def test_point_not_on_curve(checker: ProofChecker, client: DPoPClient) -> None:
    jwk = dict(client.public_jwk, y=b64url(b"\x01" * 32))
    exc = rejected(checker, good(client, header={"jwk": jwk}), client)
    assert exc.reason == "dpop_jwk"


# ---------------------------------------------------------------------------------------------
# step 5-6: signature and binding
# ---------------------------------------------------------------------------------------------


def test_bad_signature(checker: ProofChecker, client: DPoPClient) -> None:
    proof = good(client)
    h, _, s = proof.split(".")
    forged = b64url(json.dumps({"jti": "x", "htm": "GET", "htu": URL, "iat": NOW, "ath": ath(TOKEN)}).encode())
    exc = rejected(checker, f"{h}.{forged}.{s}", client)
    assert (exc.reason, exc.description) == ("dpop_signature", "DPoP proof signature verification failed")


def test_signature_by_another_key_under_this_jwk(checker: ProofChecker, client: DPoPClient) -> None:
    thief = DPoPClient("ES256")
    proof = good(thief, header={"jwk": client.public_jwk})  # claims the victim's key, signs with its own
    exc = rejected(checker, proof, client)
    assert exc.reason == "dpop_signature"


def test_thumbprint_mismatch(checker: ProofChecker, client: DPoPClient) -> None:
    thief = DPoPClient("ES256")
    exc = rejected(checker, good(thief), client, jkt=client.jkt)
    assert (exc.reason, exc.description) == ("dpop_key_mismatch", "DPoP proof key does not match the token binding")
    assert exc.error == "invalid_dpop_proof"


# ---------------------------------------------------------------------------------------------
# step 7-12: claims
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jti", [None, "", 7, ["a"]])
def test_missing_or_bad_jti(checker: ProofChecker, client: DPoPClient, jti: Any) -> None:
    proof = good(client, drop=("jti",)) if jti is None else good(client, jti=jti)
    exc = rejected(checker, proof, client)
    assert (exc.reason, exc.description) == ("dpop_jti", "DPoP proof jti missing or not a string")


def test_overlong_jti(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, jti="j" * (dpop.MAX_JTI_CHARS + 1)), client)
    assert (exc.reason, exc.description) == ("dpop_jti", "DPoP proof jti too long")
    check(checker, good(client, jti="j" * dpop.MAX_JTI_CHARS), client)


@pytest.mark.parametrize(("signed", "method"), [("POST", "GET"), ("get", "GET"), ("GET", "HEAD")])
def test_wrong_htm(checker: ProofChecker, client: DPoPClient, signed: str, method: str) -> None:
    exc = rejected(checker, good(client, method=signed), client, method=method)
    assert (exc.reason, exc.description) == ("dpop_htm", "DPoP proof htm does not match the request method")


def test_missing_htm(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, drop=("htm",)), client)
    assert (exc.reason, exc.description) == ("dpop_htm", "DPoP proof htm missing or not a string")


@pytest.mark.parametrize(
    "signed",
    [
        "https://evil.example.com/orders/7",  # another host
        "http://api.example.com/orders/7",  # another scheme
        "https://api.example.com/orders/8",  # another path
        "https://api.example.com:8443/orders/7",  # another port
        "https://api.example.com/orders/7/",  # trailing slash is another path
        "https://api.example.com/orders//7",  # no slash merging in RFC 3986
        "https://user@api.example.com/orders/7",  # userinfo never matches
        "ftp://api.example.com/orders/7",
        "/orders/7",  # not absolute
        "https://api.example.com/orders/%zz",
    ],
)
def test_wrong_htu(checker: ProofChecker, client: DPoPClient, signed: str) -> None:
    exc = rejected(checker, good(client, url=signed), client)
    assert (exc.reason, exc.description) == ("dpop_htu", "DPoP proof htu does not match the request URI")


@pytest.mark.parametrize(
    "signed",
    [
        "https://api.example.com/orders/7?page=2",  # query ignored
        "https://api.example.com/orders/7#frag",  # fragment ignored
        "HTTPS://API.EXAMPLE.COM/orders/7",  # scheme and host case
        "https://api.example.com:443/orders/7",  # default port
        "https://api.example.com/%6Frders/7",  # unreserved escape
        "https://api.example.com/orders/./x/../7",  # dot-segments
    ],
)
def test_equivalent_htu(checker: ProofChecker, client: DPoPClient, signed: str) -> None:
    check(checker, good(client, url=signed), client)


def test_query_of_the_request_is_ignored(checker: ProofChecker, client: DPoPClient) -> None:
    htu = request_htu("https", "api.example.com", "/orders/7")
    check(checker, good(client, url="https://api.example.com/orders/7?a=1"), client, htu=htu)


def test_request_without_usable_uri(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client), client, htu=None)
    assert exc.reason == "dpop_htu"


def test_missing_htu(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, drop=("htu",)), client)
    assert (exc.reason, exc.description) == ("dpop_htu", "DPoP proof htu missing or not a string")


def test_stale_iat(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, iat=NOW - 91), client)
    assert (exc.reason, exc.description) == ("dpop_iat", "DPoP proof too old")
    check(checker, good(client, iat=NOW - 90), client)  # max_age 60 + leeway 30


def test_future_iat(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, iat=NOW + 91), client)
    assert (exc.reason, exc.description) == ("dpop_iat", "DPoP proof issued in the future")
    check(checker, good(client, iat=NOW + 90), client)


@pytest.mark.parametrize("iat", ["1800000000", True, None, 10**400])
def test_iat_not_a_number(checker: ProofChecker, client: DPoPClient, iat: Any) -> None:
    proof = good(client, drop=("iat",)) if iat is None else good(client, claims={"iat": iat})
    exc = rejected(checker, proof, client)
    assert exc.reason == "dpop_iat"


def test_ath_of_another_token(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, token="another.access.token"), client)
    assert (exc.reason, exc.description) == ("dpop_ath", "DPoP proof ath does not match the access token")


def test_missing_ath(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client, drop=("ath",)), client)
    assert (exc.reason, exc.description) == ("dpop_ath", "DPoP proof ath missing or not a string")


# ---------------------------------------------------------------------------------------------
# nonces
# ---------------------------------------------------------------------------------------------

NONCE_POLICY = DPoPPolicy.build(DEFAULT_ALGORITHMS, 60, 30, nonce_required=True)


def test_nonce_missing(checker: ProofChecker, client: DPoPClient) -> None:
    exc = rejected(checker, good(client), client, policy=NONCE_POLICY)
    assert (exc.reason, exc.description, exc.error) == ("dpop_nonce", "DPoP proof nonce required", "use_dpop_nonce")


def test_nonce_current_and_previous_slot(checker: ProofChecker, client: DPoPClient) -> None:
    issuer = NonceIssuer(SECRET)
    check(checker, good(client, nonce=issuer.current(NOW)), client, policy=NONCE_POLICY)
    check(checker, good(client, nonce=issuer.current(NOW - 60)), client, policy=NONCE_POLICY)
    assert issuer.age(issuer.current(NOW - 60), NOW) == 1


@pytest.mark.parametrize(
    "nonce",
    [
        NonceIssuer(SECRET).current(NOW - 120),  # two slots old: stale
        NonceIssuer(SECRET).current(NOW + 60),  # next slot: never issued yet
        NonceIssuer(b"t" * 32).current(NOW),  # another gateway's secret
        "made-up",
    ],
)
def test_nonce_stale_or_unknown(checker: ProofChecker, client: DPoPClient, nonce: str) -> None:
    exc = rejected(checker, good(client, nonce=nonce), client, policy=NONCE_POLICY)
    assert (exc.reason, exc.description, exc.error) == (
        "dpop_nonce",
        "DPoP proof nonce is stale or unknown",
        "use_dpop_nonce",
    )


def test_nonce_not_required_is_not_checked(checker: ProofChecker, client: DPoPClient) -> None:
    check(checker, good(client, nonce="whatever"), client)


def test_nonces_agree_across_workers() -> None:
    # Two workers get the same secret from the supervisor: a nonce from one is good on the other.
    a, b = NonceIssuer(SECRET), NonceIssuer(SECRET)
    assert a.age(b.current(NOW), NOW) == 0
    assert a.current(NOW) != a.current(NOW + 60)
    assert len(a.current(NOW)) == 22


def test_nonce_secret_too_short() -> None:
    with pytest.raises(ValueError):
        NonceIssuer(b"short")


# ---------------------------------------------------------------------------------------------
# the key cache
# ---------------------------------------------------------------------------------------------


def test_proof_key_imported_once_per_header(
    checker: ProofChecker, client: DPoPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = dpop.verifiers_for_jwk
    monkeypatch.setattr(dpop, "verifiers_for_jwk", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        check(checker, good(client), client)
    assert len(calls) == 1


def test_key_cache_is_bounded(client: DPoPClient) -> None:
    small = ProofChecker(NonceIssuer(SECRET), key_cache_size=2)
    clients = [DPoPClient("ES256") for _ in range(3)]
    for c in clients:
        check(small, good(c), c)
    assert len(small._keys) == 2


def test_cached_key_still_checks_the_signature(checker: ProofChecker, client: DPoPClient) -> None:
    check(checker, good(client), client)
    thief = DPoPClient("ES256")
    # Same header segment as the victim's (hence a cache hit), signature by another key.
    victim_header = good(client).split(".")[0]
    forged = good(thief, header={"jwk": client.public_jwk})
    _, p, s = forged.split(".")
    exc = rejected(checker, f"{victim_header}.{p}.{s}", client)
    assert exc.reason == "dpop_signature"


# ---------------------------------------------------------------------------------------------
# htu normalisation (RFC 3986 §6.2.2, §6.2.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("https://api.example.com/a", "https://api.example.com/a"),
        ("HTTPS://Api.Example.COM/A", "https://api.example.com/A"),  # the path keeps its case
        ("https://api.example.com", "https://api.example.com/"),
        ("https://api.example.com:443/", "https://api.example.com/"),
        ("http://api.example.com:80/", "http://api.example.com/"),
        ("http://api.example.com:443/", "http://api.example.com:443/"),
        ("https://api.example.com:80/", "https://api.example.com:80/"),
        ("https://api.example.com:/a", "https://api.example.com/a"),
        ("https://api.example.com:08443/a", "https://api.example.com:8443/a"),
        ("https://api.example.com/a?b#c", "https://api.example.com/a"),
        ("https://api.example.com/%7euser", "https://api.example.com/~user"),
        ("https://api.example.com/a%2fb", "https://api.example.com/a%2Fb"),
        ("https://api.example.com/a b", "https://api.example.com/a%20b"),
        ("https://api.example.com/caf\u00e9", "https://api.example.com/caf%C3%A9"),
        ("https://api.example.com/a/./b/../c", "https://api.example.com/a/c"),
        ("https://api.example.com/a/b/..", "https://api.example.com/a/"),
        ("https://api.example.com/../a", "https://api.example.com/a"),
        ("https://api.example.com/a//b", "https://api.example.com/a//b"),
        ("https://[2001:DB8::1]:443/", "https://[2001:db8::1]/"),
        ("https://%41pi.example.com/", "https://api.example.com/"),
        ("https://user@api.example.com/", None),
        ("https://api.example.com:99999/", None),
        ("https://api.example.com:8x/", None),
        ("https:///a", None),
        ("https://[::1/", None),
        ("ws://api.example.com/", None),
        ("api.example.com/a", None),
        ("https://api.example.com/%", None),
        ("https://api.example.com/%4", None),
    ],
)
def test_normalise_htu(uri: str, normal: str | None) -> None:
    assert normalise_htu(uri) == normal


def test_request_htu() -> None:
    assert request_htu("https", "API.example.com:443", "/a/%7e") == "https://api.example.com/a/~"
    assert request_htu("http", "h:8080", "") == "http://h:8080/"
