"""Scenarios and one wrk measurement.

A scenario is a path, a token source and the status every response must have. wrk runs the
shared Lua script (lua/bench.lua), whose ``done`` prints one ``BENCHJSON`` line; every response
with another status, and every socket error, is counted as an error and reported beside the
figures (a fast row full of errors is not a result).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any


@dataclass(frozen=True)
class Scenario:
    """One load shape. `tokens`: "none", "one-rs256", "rs256", "es256", "bad-rs256", or
    "dpop-es256" / "dpop-eddsa" (one DPoP-bound token, a fresh single-use proof per request)."""

    key: str
    title: str
    path: str
    tokens: str
    expect: int
    peers: tuple[str, ...]   # peer keys that take part, in table order

    @property
    def rotating(self) -> bool:
        return self.tokens in ("rs256", "es256", "bad-rs256") or self.dpop

    @property
    def dpop(self) -> bool:
        return self.tokens.startswith("dpop-")


_AUTH_PEERS = ("nginx", "envoy", "node", "jwtproxy-httptools", "jwtproxy-h11")
SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    # nginx-authz: forward-auth, nginx auth_request asking jwtproxy's [authz] listener (contract §5.1).
    Scenario("a", "one valid RS256 token reused (cache-hit path)", "/", "one-rs256", 200,
             (*_AUTH_PEERS, "nginx-authz")),
    Scenario("b", "distinct valid RS256 tokens in rotation (every request verified)", "/", "rs256", 200,
             _AUTH_PEERS),
    Scenario("c", "distinct valid ES256 tokens in rotation (every request verified)", "/", "es256", 200,
             _AUTH_PEERS),
    Scenario("d", "invalid signatures only (the reject path: attack traffic)", "/", "bad-rs256", 401,
             _AUTH_PEERS[1:]),
    Scenario("e", 'auth = "off" route, no token (pure proxy cost)', "/open", "none", 200,
             ("nginx", "envoy-nojwt", "envoy", "node", "jwtproxy-httptools", "jwtproxy-h11")),
    Scenario("f", "64 KiB responses, one valid RS256 token", "/big", "one-rs256", 200, _AUTH_PEERS),
    # DPoP (RFC 9449): the token's verdict is cached, the proof is single-use and checked every time.
    # Only jwtproxy checks DPoP proofs; compare with (a), the same token path without a proof.
    Scenario("g", "DPoP-bound token (cached), a fresh ES256 proof per request", "/", "dpop-es256", 200,
             ("jwtproxy-httptools", "jwtproxy-h11")),
    Scenario("h", "DPoP-bound token (cached), a fresh EdDSA proof per request", "/", "dpop-eddsa", 200,
             ("jwtproxy-httptools", "jwtproxy-h11")),
    Scenario("i", "one valid RS256 token reused, signed assertions on vs off (cache-hit path)", "/",
             "one-rs256", 200, ("jwtproxy-httptools", "jwtproxy-assertion")),
    # Limits (contract §5.5): (a) again on a route with a rate limit keyed by `sub` that the load
    # never reaches, so every request pays the shared-table decision and is admitted. Compare with (a).
    Scenario("j", "as (a), on a rate-limited route (limit never reached)", "/limited", "one-rs256", 200,
             ("jwtproxy-httptools", "jwtproxy-h11")),
)}


@dataclass
class Sample:
    """One measured wrk run against one peer."""

    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: dict[str, int]
    rss_mib: float | None = None
    cache_hit_ratio: float | None = None  # share of token-cache lookups that hit, if the peer says


@dataclass
class Row:
    """All repetitions of one (scenario, peer)."""

    peer: str
    label: str
    samples: list[Sample] = field(default_factory=list)
    failure: str = ""   # why the peer was not measured (sanity check, start failure)

    @property
    def ok(self) -> bool:
        return not self.failure and bool(self.samples)

    def med(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        return median(values) if values else None

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.samples)


class WrkError(RuntimeError):
    """wrk failed or printed no BENCHJSON line."""


def wrk_command(script: Path, port: int, scenario: Scenario, token_arg: str, duration: float,
                threads: int, connections: int, offset: int, count_statuses: bool) -> list[str]:
    """The wrk command line for one run (pinning is added by the caller)."""
    return [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
        "-s", str(script), f"http://127.0.0.1:{port}",
        "--", token_arg, scenario.path, "1" if count_statuses else "0", str(offset),
    ]


def run_wrk(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run wrk, return the parsed BENCHJSON object."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {timeout:.0f}s") from exc
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            parsed: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            return parsed
    raise WrkError(f"wrk exit {out.returncode}, no result line:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def to_sample(result: dict[str, Any], expect: int) -> Sample:
    """Turn a BENCHJSON result into a Sample, counting every unexpected response as an error."""
    requests = int(result["requests"])
    seconds = result["duration_us"] / 1e6
    errs = result["errors"]
    detail = {k: int(v) for k, v in errs.items() if k != "status" and v}
    statuses = {int(k): int(v) for k, v in result.get("statuses", {}).items()}
    if expect == 200:
        # wrk's own "non-2xx or 3xx" counter: no per-response Lua callback needed.
        unexpected = int(errs["status"])
        if unexpected:
            detail["non-2xx"] = unexpected
    else:
        if not statuses:
            raise WrkError("status counting was not enabled for a non-200 scenario")
        unexpected = requests - statuses.get(expect, 0)
        for status, n in statuses.items():
            if status != expect:
                detail[str(status)] = n
    socket_errors = sum(v for k, v in errs.items() if k != "status")
    return Sample(
        rps=requests / seconds if seconds > 0 else 0.0,
        requests=requests,
        p50_ms=result["latency_us"]["p50"] / 1000,
        p99_ms=result["latency_us"]["p99"] / 1000,
        errors=unexpected + socket_errors,
        error_detail=detail,
    )
