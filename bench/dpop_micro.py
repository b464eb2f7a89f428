"""In-process cost of a DPoP request (contract §5.2) against a plain cached bearer request.

    python bench/dpop_micro.py [--requests N] [--rounds R]

Builds the verification stage as a worker does (verifier, key set, token cache, the host-wide
replay table in shared memory) and times ``AuthStage.authorize`` on one cached token:

* ``bearer``: ``Authorization: Bearer`` with an unbound token (the cached path of scenario (a));
* ``dpop ES256`` / ``dpop EdDSA``: ``Authorization: DPoP`` with a DPoP-bound token and a fresh
  proof per request (the proof is single-use, so it is never cached), including what the
  connection adds for it: the request URI normalised for ``htu`` and the presentation object.

Each DPoP figure is then split into its parts (proof parse and checks, the raw ``cryptography``
signature check, the replay-table insert) so the report says where the time goes. Proofs are
signed beforehand with joserfc (the test client), N per algorithm; figures are µs per request,
best of R rounds, on one core. On a shared machine compare rows with each other, not with another
day's run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dpop_client import DPoPClient  # noqa: E402
from helpers import AUDIENCE, ISSUER, SigningKey  # noqa: E402

from jwtproxy.auth import Allow, AuthStage, RouteRules  # noqa: E402
from jwtproxy.binding import Presentation  # noqa: E402
from jwtproxy.config import parse_config  # noqa: E402
from jwtproxy.dpop import request_htu  # noqa: E402
from jwtproxy.dpopreplay import TABLE_CAPACITY, HostReplayGuard  # noqa: E402
from jwtproxy.jose import parse_compact  # noqa: E402
from jwtproxy.keys import keyset_from_jwks  # noqa: E402
from jwtproxy.sharedtable import SharedTable  # noqa: E402
from jwtproxy.tokencache import TokenCache  # noqa: E402
from jwtproxy.verifier import TokenVerifier  # noqa: E402

URL = "https://api.example.com/orders/12345"


def stage() -> tuple[AuthStage, RouteRules, SharedTable]:
    key = SigningKey.rsa("rsa-1", "RS256")
    data = {
        "issuer": [{"name": "idp", "issuer": ISSUER, "jwks_file": "/unused", "audiences": [AUDIENCE]}],
        "upstream": {"b": {"targets": ["http://127.0.0.1:1"]}},
        "route": [{"path_prefix": "/", "upstream": "b"}],
    }
    config = parse_config(data, "bench.toml", {})
    verifier = TokenVerifier(config.issuers, config.token.max_bytes)
    verifier.set_keyset("idp", keyset_from_jwks({"keys": [key.jwk()]}, config.issuers[0], lambda m: None))

    def never(issuer: str) -> asyncio.Future[bool]:
        raise AssertionError("no refetch")

    table = SharedTable(TABLE_CAPACITY, values=0)
    auth = AuthStage(config, verifier, TokenCache(10_000), lambda *a: False, never, host_replay=HostReplayGuard(table))
    auth._bench_key = key  # type: ignore[attr-defined]
    return auth, RouteRules(config.routes[0], config.issuers), table


def best_us(run: Callable[[int], None], calls: int, rounds: int) -> float:
    best = float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        run(r)
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="proofs per round and algorithm (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, best kept (default 5)")
    args = parser.parse_args()
    n, rounds = args.requests, args.rounds
    auth, rules, _table = stage()
    key: SigningKey = auth._bench_key  # type: ignore[attr-defined]
    now = time.time()

    bearer = key.token(sub="user-1")
    assert isinstance(auth.authorize(rules, bearer, now), Allow)

    def bearer_run(_: int) -> None:
        for _ in range(n):
            auth.authorize(rules, bearer, now)

    rows = [("bearer (cached, unbound)", best_us(bearer_run, n, rounds), None)]

    for alg in ("ES256", "EdDSA"):
        client = DPoPClient(alg)
        token = key.token(sub="user-1", cnf={"jkt": client.jkt})
        print(f"signing {rounds * n + 1} {alg} proofs...", file=sys.stderr)
        proofs = [[client.proof("GET", URL, token, iat=int(now), jti=uuid.uuid4().hex) for _ in range(n)]
                  for _ in range(rounds + 1)]
        warm = Presentation(True, (proofs[-1][0],), "GET", request_htu("https", "api.example.com", "/orders/12345"))
        assert isinstance(auth.authorize(rules, token, now, presented=warm), Allow)

        def dpop_run(r: int, proofs: list[list[str]] = proofs, token: str = token) -> None:
            for proof in proofs[r]:
                presented = Presentation(True, (proof,), "GET", request_htu("https", "api.example.com", "/orders/12345"))
                decision = auth.authorize(rules, token, now, presented=presented)
                if type(decision) is not Allow:
                    raise AssertionError(decision)

        total = best_us(dpop_run, n, rounds)
        # Parts: the raw signature check with the cached verifier, and the JOSE parse.
        parsed = [parse_compact(p, 8192) for p in proofs[0]]
        verifier = next(iter(auth.proofs._keys.values())).verifier

        def verify_run(_: int, parsed: list = parsed, verifier: object = verifier) -> None:  # type: ignore[type-arg]
            for jws in parsed:
                verifier.verify(jws.signing_input, jws.signature)  # type: ignore[attr-defined]

        def parse_run(r: int, proofs: list[list[str]] = proofs) -> None:
            for proof in proofs[r]:
                parse_compact(proof, 8192)

        table = SharedTable(TABLE_CAPACITY, values=0)
        keys = [uuid.uuid4().bytes for _ in range(n * rounds)]

        def replay_run(r: int) -> None:
            for k in keys[r * n : (r + 1) * n]:
                table.insert_if_absent(k, now + 90, now)

        parts = {
            "signature": best_us(verify_run, n, rounds),
            "parse": best_us(parse_run, n, rounds),
            "replay insert": best_us(replay_run, n, rounds),
        }
        rows.append((f"dpop {alg} (cached token, fresh proof)", total, parts))

    base = rows[0][1]
    print(f"{'request':<40} {'µs':>7} {'+µs vs bearer':>14}  parts (µs)")
    for name, us, parts in rows:
        extra = "" if parts is None else "  " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        print(f"{name:<40} {us:7.1f} {us - base:14.1f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
