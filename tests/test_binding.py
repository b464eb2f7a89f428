"""Tests for jwtproxy.binding inside the verification stage (sans-I/O): sender-constrained tokens.

The stage is built as a worker builds it (real verifier, keys, cache); requests are
:class:`Presentation` objects, so every row of the binding table is exercised without sockets.
Each rejection test asserts the exact reason, error and challenge of the check that must catch it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from dpop_client import DPoPClient
from helpers import AUDIENCE, ISSUER, SigningKey

from jwtproxy.auth import (
    Allow,
    AuthStage,
    CheckReplay,
    Deny,
    MalformedAuthorization,
    RouteRules,
    authorization_credential,
    extract_token,
    uses_dpop_scheme,
)
from jwtproxy.binding import UNBOUND, Confirmation, Presentation, read_confirmation
from jwtproxy.config import TokenSource, parse_config
from jwtproxy.dpop import normalise_htu
from jwtproxy.dpopreplay import HostReplayGuard
from jwtproxy.jose import TokenRejected
from jwtproxy.keys import keyset_from_jwks
from jwtproxy.sharedtable import SharedTable, SharedTableBusy
from jwtproxy.tokencache import TokenCache
from jwtproxy.verifier import TokenVerifier

URL = "https://api.test/orders"
HTU = normalise_htu(URL)
CERT = "c" * 43
OTHER_CERT = "d" * 43


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.ec("ec-1", "ES256")


@pytest.fixture(scope="module")
def client() -> DPoPClient:
    return DPoPClient("ES256")


def build(key: SigningKey, *, issuer: dict[str, Any] | None = None, routes: list[dict[str, Any]] | None = None,
          remote_replay: bool = False, host_replay: HostReplayGuard | None = None) -> tuple[AuthStage, dict[str, RouteRules]]:
    data = {
        "issuer": [{"name": "test", "issuer": ISSUER, "jwks_file": "/unused", "audiences": [AUDIENCE],
                    **(issuer or {})}],
        "upstream": {"b": {"targets": ["http://127.0.0.1:1"]}},
        "route": routes or [{"path_prefix": "/", "upstream": "b"}],
    }
    config = parse_config(data, "t.toml", {})
    verifier = TokenVerifier(config.issuers, config.token.max_bytes)
    verifier.set_keyset("test", keyset_from_jwks({"keys": [key.jwk()]}, config.issuers[0], lambda m: None))

    def never(issuer: str) -> asyncio.Future[bool]:
        raise AssertionError("no refetch expected")

    stage = AuthStage(
        config, verifier, TokenCache(100), lambda *a: False, never,
        host_replay=host_replay or HostReplayGuard(SharedTable(4096, values=0)), remote_replay=remote_replay,
    )  # fmt: skip
    rules = {r.path_prefix: RouteRules(r, config.issuers) for r in config.routes}
    return stage, rules


def dpop(client: DPoPClient, token: str, *, method: str = "GET", **kwargs: Any) -> Presentation:
    proof = client.proof(method, URL, token, **kwargs)
    return Presentation(dpop_scheme=True, proofs=(proof,), method=method, htu=HTU)


def denied(decision: object, reason: str, error: str) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.reason, decision.error) == (401, reason, error)
    return decision


# ---------------------------------------------------------------------------------------------
# cnf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({}, UNBOUND),
        ({"cnf": {"jkt": "abc"}}, Confirmation("abc", None)),
        ({"cnf": {"x5t#S256": "xyz"}}, Confirmation(None, "xyz")),
        ({"cnf": {"jkt": "abc", "x5t#S256": "xyz", "kid": "ignored"}}, Confirmation("abc", "xyz")),
    ],
)
def test_read_confirmation(claims: dict[str, Any], expected: Confirmation) -> None:
    assert read_confirmation(claims) == expected


@pytest.mark.parametrize(
    ("cnf", "reason", "description"),
    [
        ("jkt", "bad_claim", "cnf claim is not an object"),
        (None, "bad_claim", "cnf claim is not an object"),
        ({"jkt": ""}, "bad_claim", "cnf jkt is not a non-empty string"),
        ({"jkt": 5}, "bad_claim", "cnf jkt is not a non-empty string"),
        ({"x5t#S256": ["a"]}, "bad_claim", "cnf x5t#S256 is not a non-empty string"),
        ({"jwk": {"kty": "EC"}}, "unsupported_binding", "token is bound by an unsupported confirmation method"),
        ({}, "unsupported_binding", "token is bound by an unsupported confirmation method"),
    ],
)
def test_unusable_cnf(cnf: Any, reason: str, description: str) -> None:
    with pytest.raises(TokenRejected) as info:
        read_confirmation({"cnf": cnf})
    assert (info.value.reason, info.value.description) == (reason, description)


def test_unusable_cnf_rejects_the_token(key: SigningKey) -> None:
    stage, rules = build(key)
    decision = stage.authorize(rules["/"], key.token(cnf={"kid": "k"}), time.time())
    denied(decision, "unsupported_binding", "invalid_token")


# ---------------------------------------------------------------------------------------------
# DPoP-bound tokens
# ---------------------------------------------------------------------------------------------


def test_dpop_bound_token_with_its_proof_passes(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    decision = stage.authorize(rules["/"], token, time.time(), presented=dpop(client, token))
    assert isinstance(decision, Allow) and decision.sub == "user-1"


def test_dpop_bound_token_as_bearer_is_a_downgrade(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    deny = denied(stage.authorize(rules["/"], token, time.time()), "binding_dpop_scheme", "invalid_token")
    assert deny.www_authenticate == (
        b'DPoP algs="ES256 EdDSA PS256 RS256", error="invalid_token", '
        b'error_description="DPoP-bound token must be sent with the DPoP scheme"'
    )


def test_dpop_bound_token_as_bearer_with_a_proof_is_still_a_downgrade(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    bearer = Presentation(dpop_scheme=False, proofs=(client.proof("GET", URL, token),), method="GET", htu=HTU)
    denied(stage.authorize(rules["/"], token, time.time(), presented=bearer), "binding_dpop_scheme", "invalid_token")


def test_dpop_scheme_without_proof(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    presented = Presentation(dpop_scheme=True, proofs=(), method="GET", htu=HTU)
    deny = denied(stage.authorize(rules["/"], token, time.time(), presented=presented), "binding_dpop_missing",
                  "invalid_token")
    assert deny.www_authenticate.startswith(b'DPoP algs="ES256 EdDSA PS256 RS256", error="invalid_token"')


def test_two_dpop_headers(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    proofs = (client.proof("GET", URL, token), client.proof("GET", URL, token))
    presented = Presentation(dpop_scheme=True, proofs=proofs, method="GET", htu=HTU)
    deny = denied(stage.authorize(rules["/"], token, time.time(), presented=presented), "dpop_multiple",
                  "invalid_dpop_proof")
    assert deny.www_authenticate == (
        b'DPoP algs="ES256 EdDSA PS256 RS256", error="invalid_dpop_proof", '
        b'error_description="more than one DPoP header"'
    )


def test_proof_failure_is_invalid_dpop_proof(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    signed_for_post = Presentation(
        dpop_scheme=True, proofs=(client.proof("POST", URL, token),), method="GET", htu=HTU
    )
    deny = denied(stage.authorize(rules["/"], token, time.time(), presented=signed_for_post),
                  "dpop_htm", "invalid_dpop_proof")
    assert b'error_description="DPoP proof htm does not match the request method"' in deny.www_authenticate


def test_thumbprint_mismatch_through_the_stage(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    thief = DPoPClient("ES256")
    denied(stage.authorize(rules["/"], token, time.time(), presented=dpop(thief, token)), "dpop_key_mismatch",
           "invalid_dpop_proof")


def test_dpop_algs_follow_the_issuer(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, issuer={"dpop_algorithms": ["ES256"]})
    token = key.token(cnf={"jkt": client.jkt})
    deny = denied(stage.authorize(rules["/"], token, time.time()), "binding_dpop_scheme", "invalid_token")
    assert deny.www_authenticate.startswith(b'DPoP algs="ES256", ')
    eddsa = DPoPClient("EdDSA")
    token = key.token(cnf={"jkt": eddsa.jkt})
    denied(stage.authorize(rules["/"], token, time.time(), presented=dpop(eddsa, token)), "dpop_alg",
           "invalid_dpop_proof")


def test_unbound_token_with_dpop_scheme(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token()
    denied(stage.authorize(rules["/"], token, time.time(), presented=dpop(client, token)), "binding_not_dpop",
           "invalid_token")


def test_proof_checked_on_every_request_of_a_cached_token(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    now = time.time()
    assert isinstance(stage.authorize(rules["/"], token, now, presented=dpop(client, token)), Allow)
    assert len(stage.cache) == 1
    # Cache hits: the binding and a fresh proof are still demanded.
    denied(stage.authorize(rules["/"], token, now), "binding_dpop_scheme", "invalid_token")
    denied(stage.authorize(rules["/"], token, now, presented=dpop(client, token, iat=now - 3600)), "dpop_iat",
           "invalid_dpop_proof")
    assert isinstance(stage.authorize(rules["/"], token, now, presented=dpop(client, token)), Allow)


def test_replayed_proof(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt})
    presented = dpop(client, token)
    now = time.time()
    assert isinstance(stage.authorize(rules["/"], token, now, presented=presented), Allow)
    deny = denied(stage.authorize(rules["/"], token, now, presented=presented), "dpop_replay", "invalid_dpop_proof")
    assert b'error_description="DPoP proof already used"' in deny.www_authenticate


def test_replay_key_shared_by_stages_of_one_host(key: SigningKey, client: DPoPClient) -> None:
    # Two workers: two stages over one shared table.
    table = HostReplayGuard(SharedTable(4096, values=0))
    first, rules = build(key, host_replay=table)
    second, _ = build(key, host_replay=table)
    token = key.token(cnf={"jkt": client.jkt})
    presented = dpop(client, token)
    assert isinstance(first.authorize(rules["/"], token, time.time(), presented=presented), Allow)
    denied(second.authorize(rules["/"], token, time.time(), presented=presented), "dpop_replay", "invalid_dpop_proof")


def test_rejected_request_does_not_spend_the_proof(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, routes=[{"path_prefix": "/", "upstream": "b", "require_scopes": ["admin"]}])
    token = key.token(cnf={"jkt": client.jkt})
    presented = dpop(client, token)
    assert isinstance(stage.authorize(rules["/"], token, time.time(), presented=presented), Deny)  # 403
    stage_ok, rules_ok = build(key, host_replay=stage.host_replay)
    assert isinstance(stage_ok.authorize(rules_ok["/"], token, time.time(), presented=presented), Allow)


def test_binding_failure_comes_before_scope(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, routes=[{"path_prefix": "/", "upstream": "b", "require_scopes": ["admin"]}])
    token = key.token(cnf={"jkt": client.jkt})
    denied(stage.authorize(rules["/"], token, time.time()), "binding_dpop_scheme", "invalid_token")


def test_remote_replay_is_left_to_the_shell(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, remote_replay=True)
    token = key.token(cnf={"jkt": client.jkt})
    decision = stage.authorize(rules["/"], token, time.time(), presented=dpop(client, token, jti="only-once"))
    assert isinstance(decision, CheckReplay)
    assert decision.allow.sub == "user-1"
    assert decision.proof.jkt == client.jkt
    # ...after the host-wide record: a second worker on this host refuses it already.
    denied(stage.authorize(rules["/"], token, time.time(), presented=dpop(client, token, jti="only-once")),
           "dpop_replay", "invalid_dpop_proof")


def test_replay_table_busy_fails_closed(key: SigningKey, client: DPoPClient) -> None:
    class Busy:
        evictions = 0

        def insert_if_absent(self, key: bytes, expires: float, now: float) -> bool:
            raise SharedTableBusy("stripe 3 locked for more than 1.0 s")

    stage, rules = build(key, host_replay=HostReplayGuard(Busy()))
    token = key.token(cnf={"jkt": client.jkt})
    decision = stage.authorize(rules["/"], token, time.time(), presented=dpop(client, token))
    assert isinstance(decision, Deny)
    assert (decision.status, decision.reason, decision.retry_after) == (503, "dpop_replay_unavailable", 1)


def test_nonce_required(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, issuer={"dpop_nonce": True})
    token = key.token(cnf={"jkt": client.jkt})
    now = time.time()
    deny = denied(stage.authorize(rules["/"], token, now, presented=dpop(client, token)), "dpop_nonce",
                  "use_dpop_nonce")
    nonce = stage.proofs.nonces.current(now)
    assert deny.dpop_nonce == nonce
    assert deny.www_authenticate == (
        b'DPoP algs="ES256 EdDSA PS256 RS256", error="use_dpop_nonce", error_description="DPoP proof nonce required"'
    )
    assert isinstance(stage.authorize(rules["/"], token, now, presented=dpop(client, token, nonce=nonce)), Allow)
    stale = stage.proofs.nonces.current(now - 180)
    deny = denied(stage.authorize(rules["/"], token, now, presented=dpop(client, token, nonce=stale)), "dpop_nonce",
                  "use_dpop_nonce")
    assert deny.dpop_nonce == nonce


# ---------------------------------------------------------------------------------------------
# certificate-bound tokens
# ---------------------------------------------------------------------------------------------


def test_certificate_bound_token_with_its_certificate(key: SigningKey) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"x5t#S256": CERT})
    assert isinstance(stage.authorize(rules["/"], token, time.time(), presented=Presentation(cert=CERT)), Allow)


def test_certificate_bound_token_without_a_certificate(key: SigningKey) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"x5t#S256": CERT})
    deny = denied(stage.authorize(rules["/"], token, time.time()), "binding_cert_missing", "invalid_token")
    assert deny.www_authenticate == (
        b'Bearer realm="jwtproxy", error="invalid_token", '
        b'error_description="client certificate required by the token binding"'
    )


def test_certificate_bound_token_with_another_certificate(key: SigningKey) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"x5t#S256": CERT})
    denied(stage.authorize(rules["/"], token, time.time(), presented=Presentation(cert=OTHER_CERT)),
           "binding_cert_mismatch", "invalid_token")


def test_bound_both_ways_needs_both(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key)
    token = key.token(cnf={"jkt": client.jkt, "x5t#S256": CERT})
    proof = client.proof("GET", URL, token)
    without_cert = Presentation(dpop_scheme=True, proofs=(proof,), method="GET", htu=HTU)
    denied(stage.authorize(rules["/"], token, time.time(), presented=without_cert), "binding_cert_missing",
           "invalid_token")
    both = Presentation(dpop_scheme=True, proofs=(client.proof("GET", URL, token),), method="GET", htu=HTU,
                        cert=CERT)
    assert isinstance(stage.authorize(rules["/"], token, time.time(), presented=both), Allow)


# ---------------------------------------------------------------------------------------------
# token_binding = "require"
# ---------------------------------------------------------------------------------------------


def test_issuer_require_rejects_unbound(key: SigningKey) -> None:
    stage, rules = build(key, issuer={"token_binding": "require"})
    deny = denied(stage.authorize(rules["/"], key.token(), time.time()), "binding_required", "invalid_token")
    assert deny.www_authenticate == (
        b'Bearer realm="jwtproxy", error="invalid_token", error_description="token is not sender-constrained"'
    )
    assert isinstance(
        stage.authorize(rules["/"], key.token(cnf={"x5t#S256": CERT}), time.time(), presented=Presentation(cert=CERT)),
        Allow,
    )


def test_route_require_overrides_issuer_allow(key: SigningKey) -> None:
    stage, rules = build(key, routes=[{"path_prefix": "/", "upstream": "b"},
                                      {"path_prefix": "/strict", "upstream": "b", "token_binding": "require"}])
    token = key.token()
    assert isinstance(stage.authorize(rules["/"], token, time.time()), Allow)
    denied(stage.authorize(rules["/strict"], token, time.time()), "binding_required", "invalid_token")


def test_route_allow_overrides_issuer_require(key: SigningKey) -> None:
    stage, rules = build(key, issuer={"token_binding": "require"},
                         routes=[{"path_prefix": "/", "upstream": "b"},
                                 {"path_prefix": "/legacy", "upstream": "b", "token_binding": "allow"}])
    token = key.token()
    denied(stage.authorize(rules["/"], token, time.time()), "binding_required", "invalid_token")
    assert isinstance(stage.authorize(rules["/legacy"], token, time.time()), Allow)


def test_require_still_enforces_the_binding_it_finds(key: SigningKey, client: DPoPClient) -> None:
    stage, rules = build(key, issuer={"token_binding": "require"})
    token = key.token(cnf={"jkt": client.jkt})
    denied(stage.authorize(rules["/"], token, time.time()), "binding_dpop_scheme", "invalid_token")


# ---------------------------------------------------------------------------------------------
# the DPoP authorization scheme
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token", "dpop_scheme"),
    [
        (b"Bearer abc", "abc", False),
        (b"DPoP abc", "abc", True),
        (b"dpop   abc", "abc", True),
        (b"DPOP abc ", "abc", True),
        (b"DPoPx abc", None, False),
        (b"Basic abc", None, False),
    ],
)
def test_authorization_schemes(value: bytes, token: str | None, dpop_scheme: bool) -> None:
    assert authorization_credential(value) == token
    assert uses_dpop_scheme(value) is dpop_scheme
    found, _ = extract_token((TokenSource("header", "authorization"),), [(b"authorization", value)], value, "")
    assert found == token


@pytest.mark.parametrize("value", [b"DPoP", b"DPoP ", b"DPoP a b"])
def test_malformed_dpop_authorization(value: bytes) -> None:
    with pytest.raises(MalformedAuthorization):
        authorization_credential(value)


def test_failure_reasons_name_every_reason_the_code_gives() -> None:
    import re
    from pathlib import Path

    from jwtproxy import auth, binding, dpop

    given: set[str] = set()
    for module in (auth, binding, dpop):
        # The source, also where the module runs compiled (its __file__ is then the extension).
        text = (Path(auth.__file__ or "").parent / (module.__name__.rpartition(".")[2] + ".py")).read_text()
        # The list itself is not evidence: only the places that give a reason count.
        text = re.sub(r"FAILURE_REASONS: Final = \(.*?\)", "", text, flags=re.S)
        given |= set(re.findall(r'"((?:dpop|binding)_[a-z_]+|unsupported_binding)"', text))
    assert given == set(binding.FAILURE_REASONS)
