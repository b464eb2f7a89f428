"""Soak test (not collected by pytest): run the real daemon for N minutes under mixed valid and
hostile traffic and print its RSS and open file descriptors over time.

    python tests/adversarial/soak.py --minutes 10 [--parser httptools|h11] [--concurrency 32]

What runs, all on loopback:

* ``jwtproxy serve`` as a subprocess (supervisor + 1 worker), issuer keys from a ``jwks_uri``
  served by this script (refreshed every 5 s, and refetched on unknown kids with a 1 s cooldown);
* an aiohttp echo backend in this process;
* ``--concurrency`` client loops on keep-alive connections sending a weighted mix: valid tokens
  (cached and freshly minted), forged / expired / alg-none / garbage / oversized tokens, unknown
  kids, missing tokens, spoofed identity headers, POST bodies, malformed HTTP, pipelined
  requests, and connections dropped mid-request.

Every ``--sample`` seconds it prints the worker's and supervisor's RSS (kB) and fd count. At the
end it prints the first/last/max figures, the growth after warm-up, the status counts, and
exits 1 if a forged token was accepted, a 5xx was returned for bad input, a valid request
failed, or RSS/fds grew beyond the thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from aiohttp import web  # noqa: E402
from helpers import AUDIENCE, ISSUER, AppServer, SigningKey, b64url  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_figures(pid: int) -> tuple[int, int]:
    """(VmRSS kB, open fds) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


class Traffic:
    """The weighted request mix and the verdict each request must get."""

    def __init__(self, key: SigningKey, attacker: SigningKey) -> None:
        self.key = key
        self.attacker = attacker
        self.cached = [key.token(sub=f"user-{i}", jti=f"c{i}") for i in range(50)]
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.minted = 0

    def pick(self, rnd: random.Random) -> tuple[str, bytes, set[int]]:
        """(kind, wire, acceptable statuses)."""
        roll = rnd.random()
        host = b"Host: soak\r\n"
        spoof = b"X-User-Id: admin\r\nx_user_role: root\r\n"

        def req(path: bytes, token: str | None, extra: bytes = b"", method: bytes = b"GET", body: bytes = b"") -> bytes:
            auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
            length = b"Content-Length: %d\r\n" % len(body) if body or method == b"POST" else b""
            return method + b" " + path + b" HTTP/1.1\r\n" + host + auth + extra + length + b"\r\n" + body

        if roll < 0.35:
            return "valid-cached", req(b"/api/x", rnd.choice(self.cached), spoof), {200}
        if roll < 0.45:
            self.minted += 1
            return "valid-fresh", req(b"/api/y", self.key.token(jti=f"f{self.minted}")), {200}
        if roll < 0.52:
            return "valid-post", req(b"/api/p", rnd.choice(self.cached), method=b"POST", body=os.urandom(rnd.randint(1, 65536))), {200}
        if roll < 0.58:
            return "forged", req(b"/api/x", self.attacker.token(sub="admin")), {401}
        if roll < 0.62:
            t = self.key.token()
            return "tampered", req(b"/api/x", t[:-6] + "AAAAAA"), {401}
        if roll < 0.65:
            return "expired", req(b"/api/x", self.key.token(exp=int(time.time()) - 3600)), {401}
        if roll < 0.68:
            none = b64url(b'{"alg":"none"}') + "." + b64url(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": 2e9}).encode()) + "."
            return "alg-none", req(b"/api/x", none), {401}
        if roll < 0.71:
            return "unknown-kid", req(b"/api/x", self.attacker.token(header={"kid": os.urandom(6).hex()})), {401}
        if roll < 0.74:
            return "garbage-token", req(b"/api/x", b64url(os.urandom(rnd.randint(1, 300)))), {401}
        if roll < 0.76:
            return "huge-token", req(b"/api/x", "a" * 9000), {401, 431}
        if roll < 0.80:
            return "missing-token", req(b"/api/x", None, spoof), {401}
        if roll < 0.86:
            return "open", req(b"/public/x", None, spoof), {200}
        if roll < 0.90:
            bad = rnd.choice([b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                              b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                              b"GET /a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n",
                              b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"])
            return "malformed", bad, {400}
        if roll < 0.95:
            return "pipelined", req(b"/api/1", rnd.choice(self.cached)) + req(b"/api/2", None) + req(b"/public/3", None), {200, 401}
        return "drop-mid-request", b"POST /api/x HTTP/1.1\r\nHost: soak\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, set()


async def client_loop(port: int, traffic: Traffic, stop: float, seed: int) -> None:
    rnd = random.Random(seed)
    reader = writer = None
    while time.monotonic() < stop:
        kind, wire, ok = traffic.pick(rnd)
        try:
            if writer is None or kind in ("malformed", "drop-mid-request", "pipelined") or rnd.random() < 0.05:
                if writer is not None:
                    writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(wire)
            await writer.drain()
            if kind == "drop-mid-request":
                writer.transport.abort()
                writer = None
                traffic.counts[kind] += 1
                continue
            expected = 3 if kind == "pipelined" else 1
            for _ in range(expected):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                status = int(head.split()[1])
                lower = head.lower()
                if b"content-length: " in lower:
                    n = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
                    await asyncio.wait_for(reader.readexactly(n), 10)
                traffic.counts[f"{kind}:{status}"] += 1
                if status >= 500 or (ok and status not in ok and kind != "pipelined"):
                    traffic.failures.append(f"{kind} -> {status}")
                if b"connection: close" in lower:
                    writer.close()
                    writer = None
                    break
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            if kind not in ("malformed",):
                traffic.failures.append(f"{kind} -> {type(exc).__name__}")
            if writer is not None:
                writer.close()
            writer = None


async def main(args: argparse.Namespace) -> int:
    key = SigningKey.rsa("soak-1", "RS256")
    attacker = SigningKey.rsa("soak-1", "RS256")
    jwks = {"keys": [key.jwk()]}

    app = web.Application(client_max_size=1 << 30)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        spoofed = request.headers.getall("X-User-Id", [])
        if "admin" in spoofed:
            return web.Response(status=418, text="spoofed identity reached the backend")
        return web.Response(text=f"{request.method} {request.path} {len(body)}")

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app.router.add_get("/jwks.json", serve_jwks)
    app.router.add_route("*", "/{tail:.*}", echo)
    upstream = await AppServer(app).start()
    backend_port = upstream.port

    tmp = Path(tempfile.mkdtemp(prefix="jwtproxy-soak-"))
    port = free_port()
    config = f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
http_parser = "{args.parser}"
access_log = false
header_timeout = 5
[admin]
listen = ""
[[issuer]]
name = "soak"
issuer = "{ISSUER}"
jwks_uri = "http://127.0.0.1:{backend_port}/jwks.json"
audiences = ["{AUDIENCE}"]
jwks_refresh = 5
jwks_cooldown = 1
[[route]]
path_prefix = "/"
upstream = "backend"
[[route]]
path_prefix = "/public"
upstream = "backend"
auth = "off"
[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]
[revocation]
sqlite_path = "{tmp / 'revocations.db'}"
"""
    (tmp / "jwtproxy.toml").write_text(config)
    daemon = subprocess.Popen([sys.executable, "-m", "jwtproxy", "serve", "-c", str(tmp / "jwtproxy.toml")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "wb"))
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        workers = children(daemon.pid)
        if not workers:
            print("no worker process found", file=sys.stderr)
            return 2
        worker = workers[0]
        traffic = Traffic(key, attacker)
        duration = args.minutes * 60
        started = time.monotonic()
        stop = started + duration
        loops = [asyncio.ensure_future(client_loop(port, traffic, stop, seed)) for seed in range(args.concurrency)]
        samples: list[tuple[float, int, int, int, int, int]] = []
        print(f"{'t(s)':>6} {'worker_rss_kB':>14} {'worker_fds':>10} {'super_rss_kB':>13} {'super_fds':>9} {'requests':>9}")
        while time.monotonic() < stop:
            await asyncio.sleep(min(args.sample, max(0.0, stop - time.monotonic())))
            w_rss, w_fds = proc_figures(worker)
            s_rss, s_fds = proc_figures(daemon.pid)
            total = sum(traffic.counts.values())
            elapsed = time.monotonic() - started
            samples.append((elapsed, w_rss, w_fds, s_rss, s_fds, total))
            print(f"{elapsed:6.0f} {w_rss:14d} {w_fds:10d} {s_rss:13d} {s_fds:9d} {total:9d}", flush=True)
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.sleep(1.0)
        idle_rss, idle_fds = proc_figures(worker)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
        await upstream.stop()

    warm = [s for s in samples if s[0] >= min(60.0, duration / 3)] or samples
    total = sum(traffic.counts.values())
    print()
    print(f"requests: {total} in {duration:.0f} s ({total / duration:.0f}/s), parser {args.parser}, "
          f"concurrency {args.concurrency}")
    print(f"worker RSS kB: first {samples[0][1]}, after warm-up {warm[0][1]}, last {samples[-1][1]}, "
          f"max {max(s[1] for s in samples)}, growth after warm-up {samples[-1][1] - warm[0][1]}")
    print(f"worker fds: first {samples[0][2]}, after warm-up {warm[0][2]}, last {samples[-1][2]}, "
          f"max {max(s[2] for s in samples)}; idle after the load stopped: {idle_fds} fds, {idle_rss} kB")
    print(f"supervisor RSS kB: first {samples[0][3]}, last {samples[-1][3]}; fds first {samples[0][4]}, last {samples[-1][4]}")
    print("status counts:", dict(sorted(traffic.counts.items())))
    forged_ok = sum(v for k, v in traffic.counts.items()
                    if k.split(":")[0] in ("forged", "tampered", "expired", "alg-none", "unknown-kid", "garbage-token",
                                           "missing-token") and k.endswith(":200"))
    five = sum(v for k, v in traffic.counts.items() if k.split(":")[-1].startswith("5"))
    print(f"forged accepted: {forged_ok}; 5xx: {five}; spoofed identity at backend (418): "
          f"{sum(v for k, v in traffic.counts.items() if k.endswith(':418'))}; failures: {len(traffic.failures)}")
    if traffic.failures:
        print("first failures:", collections.Counter(traffic.failures).most_common(10))
    growth_kb = samples[-1][1] - warm[0][1]
    fd_growth = samples[-1][2] - warm[0][2]
    bad = forged_ok or five or traffic.failures or growth_kb > args.max_rss_growth_kb or idle_fds > warm[0][2] + 5
    print("RESULT:", "FAIL" if bad else "PASS", f"(rss growth {growth_kb} kB, fd growth {fd_growth})")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--parser", choices=["httptools", "h11"], default="httptools")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS/fd samples")
    parser.add_argument("--max-rss-growth-kb", type=int, default=20_000)
    sys.exit(asyncio.run(main(parser.parse_args())))
