"""Memory of the introspection cache: per entry, and under a flood of distinct random tokens.

    python bench/introspection_memory.py [--tokens 100000] [--entries 10000] [--inflight 256]

A local RFC 7662 endpoint (aiohttp, same process) answers ``{"active": false}`` to every token,
as a real authorization server answers invented ones. The script reports

* the bytes one cached outcome costs (inactive: a digest, an expiry, a shared rejection; active:
  the same plus the verdict the gateway keeps for a typical response -- claims, rendered identity
  headers, scopes), measured with tracemalloc over ``--entries`` entries;
* Python heap (tracemalloc) and RSS after every tenth of a flood of ``--tokens`` distinct random
  tokens sent through ``Introspector.introspect`` with ``--inflight`` concurrent requests, then
  a burst four times wider than ``max_inflight`` (refused at once, no call): the heap must level
  off at the cache bound instead of growing with the number of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import time
import tracemalloc
from typing import Any

from aiohttp import web

from jwtproxy.auth import CachedToken, cached_token
from jwtproxy.config import DEFAULT_CLAIMS_TO_HEADERS, IssuerConfig
from jwtproxy.introspection import (
    INACTIVE,
    IntrospectionEndpoint,
    IntrospectionPolicy,
    Introspector,
    OutcomeCache,
    introspection_verdict,
    token_digest,
)
from jwtproxy.verifier import IssuerVerifier, Verified

ISS = "https://as.example.com"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def per_entry(entries: int) -> tuple[float, float]:
    """Bytes per cached inactive outcome and per cached active outcome."""
    issuer = IssuerConfig(name="as", issuer=ISS, audiences=("api",), required_claims=("exp", "sub"))
    checks = IssuerVerifier(issuer, None)
    now = time.time()
    results = []
    for kind in ("inactive", "active"):
        gc.collect()
        cache: OutcomeCache[CachedToken] = OutcomeCache(entries)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(entries):
            digest = token_digest(f"token-{kind}-{i}")
            if kind == "inactive":
                cache.put(digest, now + 10, INACTIVE)
            else:
                response: dict[str, Any] = {
                    "active": True, "sub": f"user-{i}", "client_id": "web-app", "scope": "read write",
                    "exp": int(now) + 3600, "iat": int(now), "iss": ISS, "aud": "api",
                    "token_type": "Bearer", "username": f"user{i}@example.com",
                }
                verified = introspection_verdict(response, checks, now)
                cache.put(digest, now + 60, cached_token(verified, digest, DEFAULT_CLAIMS_TO_HEADERS))
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        results.append((after - before) / entries)
    return results[0], results[1]


async def flood(tokens: int, entries: int, inflight: int) -> None:
    calls = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        await request.read()
        return web.json_response({"active": False})

    app = web.Application()
    app.router.add_post("/introspect", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    issuer = IssuerConfig(name="as", issuer=ISS, audiences=("api",))
    endpoint = IntrospectionEndpoint(f"http://127.0.0.1:{port}/introspect", "rs", "secret", 60.0)
    intro: Introspector[Verified] = Introspector(
        issuer, endpoint, lambda v, digest: v, policy=IntrospectionPolicy(max_entries=entries, max_inflight=inflight),
        log=lambda line: None,
    )
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    print(f"flood: {tokens} distinct random 43-character tokens, max_entries={entries}, max_inflight={inflight}")
    print(f"{'tokens sent':>12} {'cached':>7} {'in flight':>9} {'heap MiB':>9} {'RSS MiB':>8} {'calls':>7}")
    sent = 0
    step = max(tokens // 10, inflight)
    started = time.monotonic()
    while sent < tokens:
        batch = min(step, tokens - sent)
        for offset in range(0, batch, inflight):
            width = min(inflight, batch - offset)
            await asyncio.gather(*(intro.introspect(os.urandom(32).hex()[:43]) for _ in range(width)))
        sent += batch
        heap = (tracemalloc.get_traced_memory()[0] - base) / 2**20
        print(f"{sent:>12} {len(intro.cache):>7} {intro.in_flight:>9} {heap:>9.2f} {rss_mib():>8.1f} {calls:>7}")
    elapsed = time.monotonic() - started
    burst = inflight * 4
    outcomes = await asyncio.gather(*(intro.introspect(os.urandom(32).hex()[:43]) for _ in range(burst)))
    refused = sum(1 for o in outcomes if o is not INACTIVE)
    heap = (tracemalloc.get_traced_memory()[0] - base) / 2**20
    peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    print(f"burst of {burst} at once: {refused} refused without a call (503), cached {len(intro.cache)}, "
          f"heap {heap:.2f} MiB, peak {peak:.2f} MiB")
    print(f"{tokens / elapsed:.0f} introspections/s through a local endpoint")
    tracemalloc.stop()
    await intro.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--inflight", type=int, default=256)
    args = parser.parse_args()
    inactive, active = per_entry(args.entries)
    print(f"per cached outcome: inactive {inactive:.0f} bytes, active {active:.0f} bytes "
          f"(a 10-member response); {args.entries} entries: {inactive * args.entries / 2**20:.2f} MiB "
          f"inactive, {active * args.entries / 2**20:.2f} MiB active")
    asyncio.run(flood(args.tokens, args.entries, args.inflight))


if __name__ == "__main__":
    main()
