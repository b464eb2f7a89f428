"""In-process cost of signed assertions (contract §5.4): one signature, and a reuse hit.

    python bench/assertion_micro.py [--rounds N]

Prints µs per call for ES256 and EdDSA: ``sign`` (what a first request with a token, or a request
whose reused assertion is about to expire, pays) and ``hit`` (what every later request with the
same token to the same upstream pays). The figures are per call on one core, best of five rounds;
on a shared machine compare them with each other, not with another day's run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jwtproxy.assertion import AssertionSigner, generate_key  # noqa: E402

CLAIMS = {
    "iss": "https://idp.example",
    "aud": "api",
    "sub": "user-0001",
    "scope": "read write",
    "role": "member",
    "jti": "9f0c4c0e-5a8e-4c43-9d1a-3f5f3e8b8a11",
    "exp": 4_102_444_800,
    "iat": 1_700_000_000,
}


def per_call_us(fn: object, calls: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="calls per timing round (default 2000)")
    args = parser.parse_args()
    token_key = hashlib.sha256(b"a token").digest()
    now = time.time()
    print(f"{'algorithm':<9} {'sign µs':>8} {'hit µs':>7} {'length':>7}")
    for algorithm in ("ES256", "EdDSA"):
        key = generate_key(algorithm)  # type: ignore[arg-type]
        signer = AssertionSigner(
            key, issuer="jwtproxy", lifetime=60, claims=["sub", "scope", "role"], cache_size=10_000
        )
        sign_us = per_call_us(lambda: signer.sign("payments", CLAIMS, CLAIMS["exp"], now), args.rounds)
        value = signer.assertion(token_key, "payments", CLAIMS, CLAIMS["exp"], now)
        signed = signer.signed
        hit_us = per_call_us(
            lambda: signer.assertion(token_key, "payments", CLAIMS, CLAIMS["exp"], now), args.rounds * 50
        )
        assert signer.signed == signed, "the hit loop signed"
        print(f"{algorithm:<9} {sign_us:8.1f} {hit_us:7.2f} {len(value):7d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
