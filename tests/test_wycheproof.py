"""Wycheproof JSON Web Signature / JSON Web Key vectors through the signature layer.

The payloads are arbitrary bytes, not JWT claims, so each vector goes through
``jose.parse_jws`` (strict compact parsing) and ``verifier.check_signature`` (alg allowlist, key
selection, signature) -- exactly the code ``TokenVerifier.verify`` runs before the claims checks.

Keys are imported the way the product imports them: asymmetric JWKs through
``keys.keyset_from_jwks`` (from the group's public JWK, or its private JWK, whose private members
make the importer skip it -- so such groups use the public part), symmetric keys through
``keys.keyset_from_secret`` (jwtproxy never takes an ``oct`` key from a JWKS).

Deliberate deviations (the vector says "valid", jwtproxy rejects; asserted so a change is seen):
  * 346, 350 -- a PS384 token under a JWK whose ``alg`` is PS256: a JWK ``alg`` pins the algorithm.
  * 347, 351 -- the JWK says ``alg: ES521``, which is not a JWA name: the key is skipped.
  * 372, 373 -- a ``?`` inside a base64url segment: base64url is decoded strictly.
  * JWK set tcId 2 -- a JWKS of two ``oct`` keys: symmetric keys never come from a JWKS.

Vector-file quirk the other way (the vector says "invalid", jwtproxy accepts; asserted):
  * 367, 370 -- "invalidBase64Padding(InPayload)", but the ``jws`` string in this copy of the file
    is byte-identical to the valid tcId 357 (the padding the comment describes is not there), so
    no verifier can reject them while accepting 357. The test checks the identity.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from jwtproxy.config import IssuerConfig
from jwtproxy.jose import TokenRejected, parse_jws
from jwtproxy.keys import ASYMMETRIC_ALGORITHMS, HMAC_ALGORITHMS, KeySet, keyset_from_jwks, keyset_from_secret
from jwtproxy.verifier import KeysNotLoaded, UnknownKid, check_signature

# The vectors ship with the repo (tests/vectors/wycheproof, Apache-2.0, see its README.md);
# JWTPROXY_WYCHEPROOF_DIR points the tests at another copy (e.g. a newer C2SP/wycheproof checkout's
# testvectors_v1/ folder).
VECTORS = Path(os.environ.get("JWTPROXY_WYCHEPROOF_DIR") or Path(__file__).resolve().parent / "vectors" / "wycheproof")
JWS_FILE = VECTORS / "json_web_signature_test.json"
JWK_FILE = VECTORS / "json_web_key_test.json"

JWS_DEVIATIONS = {
    346: "JWK alg PS256 pins the key; the token says PS384",
    350: "JWK alg PS256 pins the key; the token says PS384",
    347: "JWK alg ES521 is not a JWA algorithm; the key is skipped",
    351: "JWK alg ES521 is not a JWA algorithm; the key is skipped",
    372: "'?' in a base64url segment; strict decoding rejects it",
    373: "'?' in a base64url segment; strict decoding rejects it",
}
# tcId -> the valid tcId whose token string it repeats verbatim.
JWS_IDENTICAL_TO_VALID = {367: 357, 370: 357}
JWK_DEVIATIONS = {2: "a JWKS of oct keys: HMAC keys come only from hs_secret"}

ALL_ALGS = tuple(sorted(ASYMMETRIC_ALGORITHMS | set(HMAC_ALGORITHMS)))


def _b64d(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _cfg(**kw: Any) -> IssuerConfig:
    base: dict[str, Any] = dict(name="wycheproof", issuer="wycheproof", jwks_uri="file:", audiences=("x",),
                                algorithms=ALL_ALGS)  # fmt: skip
    base.update(kw)
    return IssuerConfig(**base)


def _keys_for_jwks(jwks: dict[str, Any]) -> tuple[KeySet | None, KeySet | None, list[str]]:
    """(asymmetric keys, HMAC keys, log lines) for a JWK Set as an operator would configure it."""
    logs: list[str] = []
    asym = keyset_from_jwks(jwks, _cfg(), logs.append)
    secret = None
    octs = [k for k in jwks["keys"] if k.get("kty") == "oct"]
    if len(octs) == 1 and len(jwks["keys"]) == 1:
        # A single symmetric key is what hs_secret expresses; its JWK alg is the allowlist.
        k = octs[0]
        secret = keyset_from_secret(_cfg(algorithms=(k.get("alg", "HS256"),), hs_secret=_b64d(k["k"])), logs.append)
    return asym, secret, logs


def _accepts(token: str, asym: KeySet | None, secret: KeySet | None) -> bool:
    try:
        jws = parse_jws(token, 1 << 16)
        check_signature(jws, asym, secret, ALL_ALGS, "wycheproof")
    except (TokenRejected, UnknownKid, KeysNotLoaded):
        return False
    return True


ABSENT = (
    f"Wycheproof vectors not found in {VECTORS}: restore tests/vectors/wycheproof from the repo, or set "
    "JWTPROXY_WYCHEPROOF_DIR to a folder holding json_web_signature_test.json and json_web_key_test.json "
    "(testvectors_v1/ of https://github.com/C2SP/wycheproof)"
)


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        pytest.skip(ABSENT)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _jws_cases() -> list[Any]:
    if not JWS_FILE.exists():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=ABSENT))]
    data = json.loads(JWS_FILE.read_text())
    out = []
    for group in data["testGroups"]:
        for test in group["tests"]:
            out.append(pytest.param(group, test, id=f"tc{test['tcId']}-{test['comment']}"))
    return out


def _group_keys(group: dict[str, Any]) -> tuple[KeySet | None, KeySet | None]:
    jwk = group.get("public") or group["private"]
    if "public" not in group and jwk.get("kty") != "oct":
        # Public part of a private JWK (the importer refuses private members, by design).
        jwk = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    asym, secret, _ = _keys_for_jwks({"keys": [jwk]})
    return asym, secret


@pytest.mark.parametrize(("group", "test"), _jws_cases())
def test_jws_vector(group: dict[str, Any], test: dict[str, Any]) -> None:
    asym, secret = _group_keys(group)
    accepted = _accepts(test["jws"], asym, secret)
    tc = test["tcId"]
    if tc in JWS_IDENTICAL_TO_VALID:
        same = [t for g in _load(JWS_FILE)["testGroups"] for t in g["tests"] if t["tcId"] == JWS_IDENTICAL_TO_VALID[tc]]
        assert same[0]["result"] == "valid" and same[0]["jws"] == test["jws"], "vector file changed: re-check"
        assert accepted
    elif tc in JWS_DEVIATIONS:
        assert test["result"] == "valid"
        assert not accepted, f"deviation {tc} ({JWS_DEVIATIONS[tc]}) no longer holds"
    elif test["result"] == "valid":
        assert accepted, f"valid vector {tc} rejected: {test['comment']}"
    else:
        assert not accepted, f"invalid vector {tc} accepted: {test['comment']} {test['flags']}"


def test_jws_summary(capsys: pytest.CaptureFixture[str]) -> None:
    data = _load(JWS_FILE)
    counts: Counter[str] = Counter()
    for group in data["testGroups"]:
        asym, secret = _group_keys(group)
        for test in group["tests"]:
            accepted = _accepts(test["jws"], asym, secret)
            counts[f"{test['result']}->{'accepted' if accepted else 'rejected'}"] += 1
    with capsys.disabled():
        print(f"\nwycheproof JWS: {sum(counts.values())} vectors: {dict(sorted(counts.items()))}")
    assert counts["invalid->accepted"] == len(JWS_IDENTICAL_TO_VALID)
    assert counts["valid->rejected"] == len(JWS_DEVIATIONS)


def test_jwk_vectors(capsys: pytest.CaptureFixture[str]) -> None:
    data = _load(JWK_FILE)
    counts: Counter[str] = Counter()
    for group in data["testGroups"]:
        jwks = group.get("public") or group["private"]
        asym, secret, _ = _keys_for_jwks(jwks)
        for test in group["tests"]:
            tc = test["tcId"]
            accepted = _accepts(test["jws"], asym, secret)
            counts[f"{test['result']}->{'accepted' if accepted else 'rejected'}"] += 1
            if tc in JWK_DEVIATIONS:
                assert test["result"] == "valid" and not accepted, JWK_DEVIATIONS[tc]
            elif test["result"] == "valid":
                assert accepted, f"JWK vector {tc} ({test['comment']}) rejected"
            else:
                assert not accepted, f"JWK vector {tc} ({test['comment']}) accepted"
    with capsys.disabled():
        print(f"\nwycheproof JWK: {sum(counts.values())} vectors: {dict(sorted(counts.items()))}")


def test_private_jwks_are_refused_by_the_importer() -> None:
    """Groups that publish a private JWK: importing it as a JWKS skips it (private members)."""
    data = _load(JWS_FILE)
    for group in data["testGroups"]:
        jwk = group["private"]
        if jwk.get("kty") == "oct":
            continue
        logs: list[str] = []
        ks = keyset_from_jwks({"keys": [jwk]}, _cfg(), logs.append)
        assert len(ks) == 0 and logs
