"""In-process cost of the limits (contract §5.5): the shared table, a GCRA decision, the keys.

    python bench/limits_micro.py [--calls N] [--processes P]

Prints µs per call, best of five rounds, for the operations a request pays when limits are on:
the shared table's ``get`` / ``insert_if_absent`` / ``update`` (a stripe lock, a hash, a bucket
search), a GCRA decision on it (``LocalLimiter.check``: what a rate-limited request adds), the
failure-budget check (what a request with an uncached token adds when ``failures_per_ip`` is set),
and a rate-limit key by claim. With ``--processes P`` the GCRA decision is also timed with P
processes hammering the same key at once (every call contends for one stripe).

On a shared machine compare the figures with each other, not with another day's run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jwtproxy.ratelimit import FailureBudget, LocalLimiter, Policy  # noqa: E402
from jwtproxy.sharedtable import SharedTable  # noqa: E402


def per_call_us(fn: Callable[[int], object], calls: int, rounds: int = 5) -> float:
    """CPU time per call (``process_time``: time spent preempted by other work on a shared
    machine does not count), best of ``rounds``; ``fn`` gets the call index of its round."""
    best = float("inf")
    for r in range(rounds):
        start = time.process_time()
        for i in range(calls):
            fn(r * calls + i)
        best = min(best, time.process_time() - start)
    return best / calls * 1e6


def _contend(index: int, limiter: LocalLimiter, policy: Policy, key: bytes, calls: int, out: Any) -> None:
    now = time.time()
    start = time.process_time()
    for _ in range(calls):
        limiter.check(policy, key, now)
    out[index] = (time.process_time() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000, help="calls per timing round (default 100000)")
    parser.add_argument("--processes", type=int, default=2, help="processes for the contended run (0: skip)")
    args = parser.parse_args()
    calls = args.calls
    now = time.time()

    table = SharedTable(65536, values=1)
    limiter = LocalLimiter(table)
    # A limit no client reaches: the decision is always "admitted", as on a healthy cached path.
    policy = Policy(requests=10**9, per=1, burst=10**6, key="sub", scope="/api")
    claims = {"sub": "user-0001", "scope": "read write"}
    keys = [policy.key_for("10.0.0.1", {"sub": f"user-{i:04d}"}) for i in range(1000)]
    budget = FailureBudget(SharedTable(65536, values=2), per_second=100)
    # Every insert a new key (the DPoP jti path): five rounds of fresh keys, in a table sized
    # for all of them at a quarter full.
    jtis = [b"jti-%d" % i for i in range(5 * calls)]
    jti_table = SharedTable(20 * calls, values=0)
    rows = [
        ("sharedtable.get", lambda i: table.get(keys[i % 1000], now)),
        ("sharedtable.insert_if_absent (new key)", lambda i: jti_table.insert_if_absent(jtis[i], now + 60, now)),
        ("sharedtable.update (GCRA step)", lambda i: table.update(keys[i % 1000], now, policy.step)),
        ("Policy.key_for (claim)", lambda i: policy.key_for("10.0.0.1", claims)),
        ("rate limit: key + LocalLimiter.check", lambda i: limiter.check(policy, policy.key_for("10.0.0.1", claims), now)),
        ("failure budget: FailureBudget.wait", lambda i: budget.wait("10.0.0.1", now)),
    ]
    print(f"{'operation':<40} {'µs/call':>8}")
    for name, fn in rows:
        print(f"{name:<40} {per_call_us(fn, calls):8.2f}")

    if args.processes > 0:
        fork = multiprocessing.get_context("fork")
        out = fork.Array("d", args.processes)
        procs = [fork.Process(target=_contend, args=(i, limiter, policy, keys[0], calls, out))
                 for i in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        shown = ", ".join(f"{v:.2f}" for v in out)
        print(f"{f'check, {args.processes} processes, one key':<40} {shown} µs/call each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
