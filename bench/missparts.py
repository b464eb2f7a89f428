#!/usr/bin/env python3
"""Where a verified (cache-miss) request's work goes: each part of the path, measured alone.

    python bench/missparts.py                 # CPU µs per call, best of 5 rounds
    python bench/missparts.py --callgrind     # instructions per call (one valgrind run)

Each row runs one part of the miss path over the same distinct bench tokens (``tokens.py``),
with the bench config (``inproc.config_data``): hashing the token for the cache, the strict JOSE
parse, the signature alone, the claim checks, the whole verifier, the identity headers, the
scopes, and the auth stage's whole miss (verify, render, cache the verdict, evict one). The
difference between the last row and the sum of its parts is the glue. Under ``--callgrind`` each
part runs inside its own ``functools.reduce`` and callgrind dumps a profile as each one ends
(``--dump-after=functools_reduce``), so one valgrind run counts them all. Instructions in OpenSSL
are valgrind's code path, not the native one (valgrind hides SHA-NI and AVX-512 from it): read
the signature rows in µs.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import inproc  # noqa: E402
import tokens  # noqa: E402


def parts(count: int, alg: str) -> list[tuple[str, Callable[[Any, int], Any]]]:
    from jwtproxy.auth import Allow, AuthStage, CachedToken, RouteRules
    from jwtproxy.config import parse_config
    from jwtproxy.identity import render_identity_headers
    from jwtproxy.jose import parse_compact
    from jwtproxy.keys import keyset_from_jwks
    from jwtproxy.revocation.memory import MemoryRevocationStore
    from jwtproxy.tokencache import TokenCache, cache_key
    from jwtproxy.verifier import TokenVerifier

    keys = tokens.ensure_keys(inproc.WORK)
    toks = tokens.token_file(inproc.WORK, keys, alg, max(4000, count)).read_text().split()[:count]
    config = parse_config(inproc.config_data(keys.jwks, "httptools", 10_000, 3), "missparts.toml")
    keyset = keyset_from_jwks(keys.jwks.read_bytes(), config.issuers[0], lambda _m: None)
    verifier = TokenVerifier(config.issuers, config.token.max_bytes)
    verifier.set_keyset("bench", keyset)
    issuer = verifier._by_name["bench"]  # noqa: SLF001 - a bench looks inside
    parsed = [parse_compact(t, 8192) for t in toks]
    key = keyset.for_kid(parsed[0].header["kid"], alg)[0]  # type: ignore[index]
    now = time.time()
    mapping = config.claims_to_headers
    cache: TokenCache[CachedToken] = TokenCache(10_000)
    stage = AuthStage(config, verifier, cache, MemoryRevocationStore().is_revoked, lambda _i: None)  # type: ignore[arg-type,return-value]
    rules = RouteRules(config.routes[0], tuple(config.issuers))
    # A full cache (every miss also evicts one), padded with copies of a real verdict.
    spare = tokens.token_file(inproc.WORK, keys, "RS256", 1000).read_text().split()[-1]
    if not isinstance(stage.authorize(rules, spare, now), Allow):
        raise SystemExit("the spare bench token was refused")
    pad = cache.get(cache_key(spare), now)
    assert pad is not None
    for i in range(10_000):
        cache.put(i.to_bytes(32, "big"), pad)
    from jwtproxy.auth import token_scopes

    return [
        ("cache key (sha256 of the token)", lambda _a, i: cache_key(toks[i])),
        ("jose.parse_compact (base64url, JSON, header)", lambda _a, i: parse_compact(toks[i], 8192)),
        ("signature alone (cryptography)", lambda _a, i: key.verify(parsed[i].signing_input, parsed[i].signature)),
        ("claim checks", lambda _a, i: issuer.check_claims(parsed[i].payload, now, audiences=issuer.audiences)),
        ("IssuerVerifier.verify (alg, key, signature, claims)", lambda _a, i: issuer.verify(parsed[i], now)),
        ("TokenVerifier.verify (all of the above)", lambda _a, i: verifier.verify(toks[i], now)),
        ("identity headers", lambda _a, i: render_identity_headers(parsed[i].payload, mapping)),
        ("scopes", lambda _a, i: token_scopes(parsed[i].payload)),
        ("AuthStage.authorize, a miss (verify, render, cache, evict)", lambda _a, i: stage.authorize(rules, toks[i], now)),
    ]


def run_inner(count: int, alg: str, rounds: int) -> None:
    rows = parts(count, alg)
    for name, fn in rows:
        functools.reduce(fn, range(min(50, count)), None)  # warm-up: memos, first calls
    if os.environ.get("MISSPARTS_CALLGRIND"):
        for name, fn in rows:
            functools.reduce(fn, range(count), None)
            print("PART " + name, flush=True)
        return
    for name, fn in rows:
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            functools.reduce(fn, range(count), None)
            best = min(best, time.process_time() - start)
            if name.startswith("AuthStage"):
                break  # the tokens are cached now: only the first round is a miss
        print(f"{best / count * 1e6:8.2f} µs  {name}", flush=True)


def run_callgrind(count: int, alg: str) -> None:
    out = inproc.WORK / "inproc" / "callgrind" / f"missparts.{alg}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(out.name + "*"):
        old.unlink()
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
           "--toggle-collect=functools_reduce", "--dump-after=functools_reduce",
           sys.executable, str(Path(__file__).resolve()), "--inner", "--count", str(count), "--alg", alg]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONHASHSEED="0", MISSPARTS_CALLGRIND="1"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit("valgrind run failed")
    names = [line[5:] for line in proc.stdout.splitlines() if line.startswith("PART ")]
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(re.sub(r".*\.", "", p.name)))
    # The warm-up loops dump too (one per part), then one per measured part.
    measured = dumps[-len(names):]
    for name, path in zip(names, measured):
        totals = inproc.callgrind_totals(path)
        by_obj = inproc.cost_by_object(path)
        crypto = sum(v for k, v in by_obj.items() if k.startswith(inproc.CRYPTO_OBJECTS))
        print(f"{totals.get('Ir', 0) / count:>10,.0f} Ir {(totals.get('Ir', 0) - crypto) / count:>9,.0f} "
              f"without crypto  {name}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callgrind", action="store_true", help="instructions per call under valgrind")
    ap.add_argument("--count", type=int, default=1000, help="distinct tokens (default 1000)")
    ap.add_argument("--alg", choices=("RS256", "ES256"), default="RS256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.callgrind and not args.inner:
        run_callgrind(args.count, args.alg)
    else:
        run_inner(args.count, args.alg, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
