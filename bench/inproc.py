#!/usr/bin/env python3
"""Cost of one request inside the worker, without sockets: instructions (callgrind) or CPU µs.

    python bench/inproc.py                          # every scenario, CPU µs per request
    python bench/inproc.py --callgrind              # instructions per request (repeatable under load)
    python bench/inproc.py --callgrind --only a,b --codec h11
    python bench/inproc.py --callgrind --routes 1000 --only r     # growth: 1,000 routes
    python bench/inproc.py --callgrind --keys 100 --only b        # growth: a JWKS of 100 keys
    python bench/inproc.py --callgrind --objects --only b         # where the instructions go
    python bench/inproc.py --cprofile b                           # cProfile of one scenario

Theory of operation
-------------------
A worker is wired by ``jwtproxy.worker.build_worker`` from the bench's own config shape
(``templates/jwtproxy.toml``: the same issuer, routes, claim headers and a 10,000-entry token
cache), with the bench's keys and tokens (``tokens.py``, generated once into ``bench/work/``).
One real :class:`~jwtproxy.connection.ClientConnection` (codec, router, auth stage, header policy,
exchange state machine) and one real pooled :class:`~jwtproxy.upstream.UpstreamConnection`
(llhttp response parser) sit on fake transports that only remember the last write. One request
is: the bytes wrk sends into ``client.data_received``; the upstream head comes out on the
upstream transport; an nginx-shaped response goes into ``upstream.data_received``; the response
comes out on the client transport, and its status is checked. What is left out is the kernel and
the event loop's socket work (per request ~20 µs on the bench machine, the same for every path).

Scenarios mirror ``bench/run.py`` (a-f, j), plus ``a0`` (one token with the cache off: verified on
every request, the issue's "cache off") and ``r`` (a cached token on ``/svc0005/orders/42``, for
``--routes``). Rotating scenarios (b, c, d) send tokens never seen before, into a token cache that
is full (padded with dummy verdicts), so every accepted token also evicts one, as under wrk with
100,000 tokens.

Instruction counts: ``--callgrind`` reruns this script under ``valgrind --tool=callgrind`` with
collection switched on only inside ``functools.reduce`` (``--toggle-collect``), which drives the
measured loop, so start-up, imports, key loading and warm-up are not counted. Instruction counts
do not depend on what else the machine runs, which makes them the measure of choice on a busy
machine; they do not see cache misses or the kernel (see ``--cache-sim``, and ``--pollute``,
which sweeps the caches between timed requests). OpenSSL's counts under valgrind are not its
native ones (valgrind hides SHA-NI and AVX-512 from it), so every figure is also printed
without the crypto libraries.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import tokens  # noqa: E402

WORK = BENCH / "work"
CACHE_SIZE = 10_000  # the bench's token cache (templates/jwtproxy.toml: the default)
RESPONSE_OK = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)
BIG_BODY = 65_536
RESPONSE_BIG = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\nLast-Modified: Tue, 01 Dec 2026 20:00:00 GMT\r\n"
    b"Connection: keep-alive\r\nETag: \"6929f0c0-10000\"\r\nAccept-Ranges: bytes\r\n\r\n" % BIG_BODY
) + b"x" * BIG_BODY

# key: (title, path, tokens, expected status). tokens: none | one-rs256 | rs256 | es256 | bad-rs256
SCENARIOS: dict[str, tuple[str, str, str, bytes]] = {
    "a": ("one RS256 token, cached (cache-hit path)", "/", "one-rs256", b"200"),
    "a0": ("one RS256 token, cache off (verified every request)", "/", "one-rs256", b"200"),
    "b": ("distinct RS256 tokens (verified, cached, one evicted)", "/", "rs256", b"200"),
    "c": ("distinct ES256 tokens (verified, cached, one evicted)", "/", "es256", b"200"),
    "d": ("distinct bad RS256 signatures (401)", "/", "bad-rs256", b"401"),
    "e": ("auth off, no token", "/open", "none", b"200"),
    "f": ("64 KiB response, one cached RS256 token", "/big", "one-rs256", b"200"),
    "j": ("as a, on a rate-limited route (limit never reached)", "/limited", "one-rs256", b"200"),
    "r": ("one cached RS256 token on /svc0005/orders/42 (for --routes)", "/svc0005/orders/42", "one-rs256", b"200"),
}
ROTATING = ("rs256", "es256", "bad-rs256")
# Objects whose instruction counts under valgrind are not the native ones: valgrind hides CPU
# extensions (SHA-NI, AVX-512) from OpenSSL, which then takes other code paths. Reported apart.
CRYPTO_OBJECTS = ("libcrypto", "_rust.abi3", "_hashlib")


# ------------------------------------------------------------------------------- material


def extra_jwks(count: int) -> list[dict[str, Any]]:
    """``count`` further RSA public keys (distinct kids) for the JWKS-size growth run; generated
    once into bench/work/inproc/ (RSA key generation is slow)."""
    if count <= 0:
        return []
    path = WORK / "inproc" / f"extra-rsa-{count}.json"
    if path.exists():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = []
    for i in range(count):
        pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        keys.append({"kty": "RSA", "kid": f"other-{i:03d}", "use": "sig", "alg": "RS256",
                     "n": tokens.b64url(n), "e": "AQAB"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keys))
    return keys


def jwks_document(keys: tokens.KeyMaterial, total_keys: int) -> Path:
    """The bench JWKS, padded to ``total_keys`` keys with unrelated RSA keys (listed first, so a
    scan would pay for them; the bench key is found by its kid)."""
    base = json.loads(keys.jwks.read_text())
    if total_keys <= len(base["keys"]):
        return keys.jwks
    doc = {"keys": extra_jwks(total_keys - len(base["keys"])) + base["keys"]}
    path = WORK / "inproc" / f"jwks-{keys.fingerprint}-{total_keys}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def config_data(jwks: Path, parser: str, cache_size: int, routes: int, limited: bool = False) -> dict[str, Any]:
    """The bench config (templates/jwtproxy.toml) as a dict, with ``routes`` routes in all, and
    with ``limited`` its rate-limited route ``/limited`` too (scenario j)."""
    route_list: list[dict[str, Any]] = [
        {"path_prefix": "/", "upstream": "origin"},
        {"path_prefix": "/open", "upstream": "origin", "auth": "off"},
        {"path_prefix": "/big", "upstream": "origin"},
    ]
    route_list += [{"path_prefix": f"/svc{i:04d}", "upstream": "origin"} for i in range(max(0, routes - 3))]
    if limited:
        route_list.append({"path_prefix": "/limited", "upstream": "origin", "rate_limit": {
            "requests": 1_000_000_000, "per": 1, "burst": 1_000_000, "key": "sub"}})
    return {
        "server": {"listen": ["127.0.0.1:0"], "workers": 1, "http_parser": parser, "access_log": False,
                   "keepalive_timeout": 300},
        "admin": {"listen": ""},
        "token": {"cache_size": cache_size},
        "issuer": [{"name": "bench", "issuer": tokens.ISSUER, "jwks_file": str(jwks),
                    "audiences": [tokens.AUDIENCE], "algorithms": ["RS256", "ES256"]}],
        "route": route_list,
        "upstream": {"origin": {"targets": ["http://127.0.0.1:9"], "max_idle": 128}},
        "claims_to_headers": {"x-user-id": "sub", "x-user-role": "role", "x-scope": "scope"},
    }


def request_bytes(path: str, token: str | None) -> bytes:
    """What wrk sends (``wrk.format``): request line, Host, the Authorization header."""
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:18781\r\n{auth}\r\n".encode("latin-1")


# ---------------------------------------------------------------------------- fake sockets


class FakeTransport:
    """Enough of ``asyncio.Transport`` for the gateway's protocols: writes are counted, the
    last one kept."""

    def __init__(self, peer: tuple[str, int] | None = None) -> None:
        self.writes = 0
        self.last = b""
        self.closing = False
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Harness:
    """One worker, one client connection and one pooled upstream connection, all in process."""

    def __init__(self, scenario: str, parser: str, routes: int, total_keys: int, warmup: int, requests: int) -> None:
        from jwtproxy.auth import Allow
        from jwtproxy.config import parse_config
        from jwtproxy.connection import ClientConnection
        from jwtproxy.keys import keyset_from_jwks
        from jwtproxy.revocation.memory import MemoryRevocationStore
        from jwtproxy.tokencache import cache_key
        from jwtproxy.upstream import UpstreamConnection
        from jwtproxy.worker import build_worker

        title, self.path, kind, self.expect = SCENARIOS[scenario]
        keys = tokens.ensure_keys(WORK)
        jwks = jwks_document(keys, total_keys)
        cache_size = 0 if scenario == "a0" else CACHE_SIZE
        config = parse_config(config_data(jwks, parser, cache_size, routes, limited=scenario == "j"), "inproc.toml")
        self.worker = build_worker(config, store=MemoryRevocationStore(), key_log=lambda _m: None)
        gw = self.gateway = self.worker.gateway
        # The loop is driven by hand here, without turns: every verification at once (jwtproxy.turns).
        gw.auth.turns = None
        keyset = keyset_from_jwks(jwks.read_bytes(), config.issuers[0], lambda _m: None)
        gw.verifier.set_keyset("bench", keyset)

        self.requests = self._requests(keys, kind, warmup + requests)
        self.warmup = warmup
        self.response = RESPONSE_BIG if scenario == "f" else RESPONSE_OK
        self.upstream_step = self.expect == b"200"
        # A full cache, so that every verified token also evicts the least recently used one: padded
        # with copies of a real verdict (a token the measured loop never sends).
        self._pad = None
        if gw.cache.size:
            spare = tokens.token_file(WORK, keys, "RS256", 1000).read_text().split()[-1]
            rules = gw.routes[id(config.routes[0])].rules
            if not isinstance(gw.auth.authorize(rules, spare, time.time()), Allow):
                raise SystemExit("the spare bench token was refused")
            self._pad = gw.cache.get(cache_key(spare), time.time())
        self.pad_cache()

        self.client_transport = FakeTransport(("127.0.0.1", 40000))
        self.client = ClientConnection(gw)
        self.client.connection_made(self.client_transport)  # type: ignore[arg-type]
        self.upstream_transport = FakeTransport()
        pool = gw.pools["origin"]
        self.upstream = UpstreamConnection(pool, 0)
        self.upstream.connection_made(self.upstream_transport)  # type: ignore[arg-type]
        pool.release(self.upstream)
        self.statuses: Counter[bytes] = Counter()

    def _requests(self, keys: tokens.KeyMaterial, kind: str, count: int) -> list[bytes]:
        if kind == "none":
            return [request_bytes(self.path, None)]
        if kind == "one-rs256":
            return [request_bytes(self.path, tokens.first_token(tokens.token_file(WORK, keys, "RS256", 1000)))]
        size = max(4000, count)
        if kind == "bad-rs256":
            path = tokens.bad_token_file(WORK, keys, size)
        else:
            path = tokens.token_file(WORK, keys, kind.upper(), size)
        lines = path.read_text().split()
        if len(lines) < count:
            raise SystemExit(f"{path} holds {len(lines)} tokens, {count} needed")
        return [request_bytes(self.path, t) for t in lines[:count]]

    def pad_cache(self) -> None:
        cache = self.gateway.cache
        if cache.size and self._pad is not None:
            cache.clear()
            for i in range(cache.size):
                cache.put(i.to_bytes(32, "big"), self._pad)

    def one(self, index: int) -> None:
        """One request (and, when it is forwarded, its response)."""
        reqs = self.requests
        outbox = self.gateway.outbox
        self.client.data_received(reqs[index % len(reqs)])
        outbox.flush()  # the end of the loop turn (jwtproxy.outbox): each request is a turn here
        if self.upstream_step:
            self.upstream.data_received(self.response)
            outbox.flush()
        self.statuses[self.client_transport.last[9:12]] += 1

    def check(self, expected_count: int) -> None:
        got = self.statuses.get(self.expect, 0)
        if got != expected_count or self.client.closing:
            raise SystemExit(f"unexpected responses: {dict(self.statuses)} (wanted {expected_count} x "
                             f"{self.expect.decode()}); last: {self.client_transport.last[:300]!r}")


def loop_of(h: Harness, start: int, count: int) -> Callable[[], None]:
    """The measured loop: ``functools.reduce`` drives it so that callgrind can switch collection
    on and off at exactly its entry and exit (``--toggle-collect=functools_reduce``)."""
    one = h.one

    def step(_acc: None, index: int) -> None:
        one(index)

    def run() -> None:
        functools.reduce(step, range(start, start + count), None)

    return run


# --------------------------------------------------------------------------------- running


def run_inner(args: argparse.Namespace) -> None:
    """In this process (possibly under valgrind): build, warm up, run the measured loop once or
    time it; prints one JSON line."""
    import uvloop

    scenario = args.only
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> dict[str, Any]:
        h = Harness(scenario, args.codec, args.routes, args.keys, args.warmup, args.requests)
        loop_of(h, 0, args.warmup)()  # warm-up: memos, lru caches, the header-segment memo
        h.check(args.warmup)
        h.statuses.clear()
        if SCENARIOS[scenario][2] in ROTATING:
            h.pad_cache()
        result: dict[str, Any] = {"scenario": scenario, "requests": args.requests}
        measured = loop_of(h, args.warmup, args.requests)
        if args.mode == "once":
            measured()
        elif args.mode == "cprofile":
            prof = cProfile.Profile()
            prof.enable()
            measured()
            prof.disable()
            stats = pstats.Stats(prof, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(args.top)
        else:
            # Each request timed on its own: the median shrugs off preemption on a busy machine
            # (the mean, which includes garbage collection, is printed beside it).
            one, clock, pollute = h.one, time.perf_counter_ns, args.pollute * 1024
            buffer = bytearray(pollute)
            medians, means = [], []
            for _ in range(args.rounds):
                h.statuses.clear()
                if SCENARIOS[scenario][2] in ROTATING:
                    h.pad_cache()
                    gc.collect()
                times = []
                for index in range(args.warmup, args.warmup + args.requests):
                    if pollute:
                        # Evict the caches between requests, as the kernel's socket work does under
                        # load: read every line, write one byte per page.
                        buffer.find(b"\x01")
                        buffer[::4096] = bytes(len(range(0, pollute, 4096)))
                    start = clock()
                    one(index)
                    times.append(clock() - start)
                times.sort()
                medians.append(times[len(times) // 2] / 1000)
                means.append(sum(times) / len(times) / 1000)
            result["us_per_request"] = min(medians)
            result["us_mean"] = min(means)
        h.check(args.requests)
        return result

    print("INPROC " + json.dumps(loop.run_until_complete(main())), flush=True)


def _valgrind_cmd(args: argparse.Namespace, scenario: str, out: Path) -> list[str]:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
           "--toggle-collect=functools_reduce"]
    if args.cache_sim:
        cmd.append("--cache-sim=yes")
    inner = [sys.executable, str(Path(__file__).resolve()), "--inner", "--mode", "once", "--only", scenario,
             "--codec", args.codec, "--routes", str(args.routes), "--keys", str(args.keys),
             "--warmup", str(args.warmup), "--requests", str(args.requests)]
    return cmd + inner


def callgrind_totals(path: Path) -> dict[str, int]:
    """The ``summary``/``totals`` line of a callgrind output file, by event name."""
    events: list[str] = []
    totals: list[int] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            totals = [int(x) for x in line.split()[1:]]
    return dict(zip(events, totals))


_NAMED = re.compile(r"^(c?ob|c?fn|f[lie])=\((\d+)\)(?: (.*))?$")


def cost_by_object(path: Path) -> dict[str, int]:
    """Self instructions per ELF object (libpython, the cryptography extension, llhttp, ...)."""
    names: dict[tuple[str, str], str] = {}
    by_obj: Counter[str] = Counter()
    obj = "?"
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        m = _NAMED.match(line)
        if m:
            kind, ident, name = m.groups()
            base = kind.lstrip("c")
            if name is not None:
                names[base, ident] = name
            if kind == "ob":
                obj = names.get(("ob", ident), ident)
            continue
        if line.startswith("calls="):
            skip_next = True
            continue
        if line and (line[0].isdigit() or line[0] in "+-*"):
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2:
                by_obj[os.path.basename(obj)] += int(parts[1])
    return dict(by_obj)


def run_callgrind(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    outdir = WORK / "inproc" / "callgrind"
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / f"callgrind.{scenario}.{args.codec}.r{args.routes}.k{args.keys}.out"
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(_valgrind_cmd(args, scenario, out), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"callgrind run of {scenario} failed ({proc.returncode})")
    totals = callgrind_totals(out)
    result: dict[str, Any] = {"scenario": scenario, "requests": args.requests,
                              "ir_per_request": totals.get("Ir", 0) / args.requests, "file": str(out)}
    if args.cache_sim:
        for ev in ("D1mr", "D1mw", "DLmr", "DLmw", "I1mr", "ILmr"):
            if ev in totals:
                result[ev + "_per_request"] = totals[ev] / args.requests
    by_object = cost_by_object(out)
    crypto = sum(v for k, v in by_object.items() if k.startswith(CRYPTO_OBJECTS))
    result["ir_python_per_request"] = (totals.get("Ir", 0) - crypto) / args.requests
    if args.objects:
        result["by_object"] = {k: v / args.requests for k, v in
                               sorted(by_object.items(), key=lambda kv: -kv[1]) if v}
    return result


def run_timed(args: argparse.Namespace, scenario: str, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", "--mode", mode, "--only", scenario,
           "--codec", args.codec, "--routes", str(args.routes), "--keys", str(args.keys),
           "--warmup", str(args.warmup), "--requests", str(args.requests), "--rounds", str(args.rounds),
           "--top", str(args.top), "--pollute", str(args.pollute)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if mode == "cprofile":
        sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"run of {scenario} failed ({proc.returncode})")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("INPROC "))
    return json.loads(line[len("INPROC "):])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="a,a0,b,c,d,e,f", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    ap.add_argument("--codec", choices=("httptools", "h11"), default="httptools")
    ap.add_argument("--routes", type=int, default=3, help="routes in the config (default 3, as the bench)")
    ap.add_argument("--keys", type=int, default=2, help="keys in the JWKS (default 2, as the bench)")
    ap.add_argument("--requests", type=int, help="measured requests (default 1000; timed: 5000)")
    ap.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="timed mode: best of this many rounds")
    ap.add_argument("--pollute", type=int, default=0, metavar="KIB",
                    help="timed mode: sweep a buffer of this size between requests (cold caches)")
    ap.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    ap.add_argument("--cache-sim", action="store_true", help="with --callgrind: simulated cache misses too")
    ap.add_argument("--objects", action="store_true", help="with --callgrind: instructions per ELF object")
    ap.add_argument("--cprofile", metavar="SCENARIO", help="print a cProfile of one scenario's measured loop")
    ap.add_argument("--top", type=int, default=30, help="cProfile rows (default 30)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="timed", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 1000 if (args.callgrind or args.inner or args.cprofile) else 5000
    if args.inner:
        run_inner(args)
        return 0
    if args.cprofile:
        run_timed(args, args.cprofile, "cprofile")
        return 0
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    results = []
    for s in scenarios:
        r = run_callgrind(args, s) if args.callgrind else run_timed(args, s, "timed")
        r["title"] = SCENARIOS[s][0]
        results.append(r)
        if not args.json:
            if args.callgrind:
                figure = f"{r['ir_per_request']:>11,.0f} Ir {r['ir_python_per_request']:>9,.0f} without crypto"
            else:
                figure = f"{r['us_per_request']:7.1f} µs (mean {r['us_mean']:6.1f})"
            print(f"{s:<3} {figure}  {r['title']}  [{args.codec}, {args.routes} routes, {args.keys} keys]",
                  flush=True)
            for ev in ("D1mr", "D1mw", "DLmr", "DLmw", "I1mr", "ILmr"):
                if ev + "_per_request" in r:
                    print(f"      {ev}: {r[ev + '_per_request']:,.0f}", end="")
            if args.cache_sim:
                print()
            for obj, ir in list(r.get("by_object", {}).items())[:8]:
                print(f"      {ir:>11,.0f}  {obj}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
