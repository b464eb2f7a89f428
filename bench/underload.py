#!/usr/bin/env python3
"""Valid clients' latency when other traffic shares the worker: forged tokens, idle clients.

    python bench/underload.py mix [--reps 3] [--duration 8]      # 50 % forged-token mix
    python bench/underload.py idle [--count 10000]              # beside 10,000 idle keep-alive clients

Theory of operation
-------------------
One jwtproxy worker (``python -m jwtproxy serve``, the bench's issuer, keys and tokens from
``tokens.py``) is pinned to ``--proxy-cpu``; the origin (nginx if installed, else
``bench/upstream.py``) and every wrk to ``--load-cpu``, as in ``bench/run.py``. The *valid*
clients are ``wrk -c16`` sending one cached RS256 token to ``/``; what is reported is their
requests/s and p99 (wrk's ``--latency``), alone and beside the other traffic (``mix``: the two
alternate, repetition by repetition; ``idle``: all alone first, then all beside), and the ratio
of the p99 medians:

* ``mix``: beside another ``wrk -c16`` sending distinct forged tokens (valid tokens with one
  signature character changed, ``tokens.bad_token_file``): half of the connections, and more
  than half of the work, is attack traffic. The forged requests' own rate is reported too.
* ``idle``: beside ``--count`` keep-alive clients that each sent one request (``/open``, answered)
  and then stay idle ([limits] ``max_connections`` is raised above ``--count`` so that the active
  clients are not refused).

The figures depend on the machine; the ratio is the point (the issue's aims: within 3x for the
mix, unchanged beside idle clients).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import tokens  # noqa: E402
from procs import Processes, can_pin, wait_port  # noqa: E402

WORK = BENCH / "work"
NGINX_CONF = """
worker_processes 1;
error_log {work}/nginx-error.log;
pid {work}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
    uwsgi_temp_path {work}; scgi_temp_path {work};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The origin and one jwtproxy worker, started and stopped together (``procs.Processes``:
    pinned with taskset where the machine allows, logs under the stack's work directory)."""

    def __init__(self, args: argparse.Namespace, max_connections: int) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="jwtproxy-underload-"))
        self.origin_port = free_port()
        self.port = free_port()
        self.max_connections = max_connections
        self.procs = Processes(self.work / "logs", pin=can_pin())

    def pinned(self, cpu: int, cmd: list[str]) -> list[str]:
        """``cmd`` on ``cpu`` (wrk), as the stack pins its own processes."""
        return ["taskset", "-c", str(cpu), *cmd] if self.procs.pin else cmd

    def __enter__(self) -> Stack:
        args, work = self.args, self.work
        if shutil.which("nginx"):
            conf = work / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, port=self.origin_port))
            origin = ["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"]
        else:
            origin = [sys.executable, str(BENCH / "upstream.py"), str(self.origin_port)]
        wait_port(self.procs.spawn("origin", origin, args.load_cpu), self.origin_port, 30)
        keys = tokens.ensure_keys(WORK)
        config = work / "jwtproxy.toml"
        config.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
workers = 1
http_parser = "{args.codec}"
access_log = false
keepalive_timeout = 600
[admin]
listen = ""
[limits]
max_connections = {self.max_connections}
[[issuer]]
name = "bench"
issuer = "{tokens.ISSUER}"
jwks_file = "{keys.jwks.resolve()}"
audiences = ["{tokens.AUDIENCE}"]
[[route]]
path_prefix = "/"
upstream = "origin"
[[route]]
path_prefix = "/open"
upstream = "origin"
auth = "off"
[upstream.origin]
targets = ["http://127.0.0.1:{self.origin_port}"]
max_idle = 128
[revocation]
sqlite_path = "{work}/rev.db"
""")
        path = os.pathsep.join(p for p in (str(BENCH.parent), os.environ.get("PYTHONPATH", "")) if p)
        proxy = self.procs.spawn("jwtproxy", [sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)],
                                 args.proxy_cpu, env={"PYTHONPATH": path})
        wait_port(proxy, self.port, 30)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.work, ignore_errors=True)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def p99_ms(out: str) -> float:
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not m:
        raise SystemExit(f"no p99 in wrk output:\n{out}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def rps(out: str) -> float:
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise SystemExit(f"no Requests/sec in wrk output:\n{out}")
    return float(m.group(1))


def valid_run(args: argparse.Namespace, stack: Stack, token: str) -> tuple[float, float]:
    out = subprocess.run(stack.pinned(args.load_cpu, [
        "wrk", "-t1", "-c16", f"-d{args.duration}s", "--latency", "-H", f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{stack.port}/"]), capture_output=True, text=True, check=True).stdout
    return rps(out), p99_ms(out)


def report(alone: list[tuple[float, float]], beside: list[tuple[float, float]], what: str) -> None:
    a_p99 = statistics.median(p for _, p in alone)
    b_p99 = statistics.median(p for _, p in beside)
    print(f"valid clients alone:       {statistics.median(r for r, _ in alone):>9,.0f} req/s  p99 {a_p99:.2f} ms"
          f"  (runs: {', '.join(f'{p:.2f}' for _, p in alone)})")
    print(f"valid clients beside {what}: {statistics.median(r for r, _ in beside):>9,.0f} req/s  p99 {b_p99:.2f} ms"
          f"  (runs: {', '.join(f'{p:.2f}' for _, p in beside)})")
    print(f"p99 ratio (medians): {b_p99 / a_p99:.2f}x")


def measure_mix(args: argparse.Namespace) -> None:
    keys = tokens.ensure_keys(WORK)
    token = tokens.first_token(tokens.token_file(WORK, keys, "RS256", 1000))
    forged_file = tokens.bad_token_file(WORK, keys, 100_000)
    alone: list[tuple[float, float]] = []
    beside: list[tuple[float, float]] = []
    forged_rates: list[float] = []
    with Stack(args, 10_000) as stack:
        valid_run(argparse.Namespace(**{**vars(args), "duration": 2}), stack, token)  # warm-up: the cache
        for rep in range(args.reps):
            alone.append(valid_run(args, stack, token))
            forged = subprocess.Popen(stack.pinned(args.load_cpu, [
                "wrk", "-t1", "-c16", f"-d{args.duration + 2}s", "-s", str(BENCH / "lua" / "bench.lua"),
                f"http://127.0.0.1:{stack.port}/", "--", f"@{forged_file}", "/", "0", str(rep * 20_000)]),
                stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)
            beside.append(valid_run(args, stack, token))
            out, _ = forged.communicate(timeout=args.duration + 60)
            forged_rates.append(rps(out))
    print(f"jwtproxy ({args.codec}), one worker; 16 valid clients (one cached token), {args.reps} x {args.duration} s")
    report(alone, beside, "16 forged")
    print(f"forged requests answered 401: {statistics.median(forged_rates):,.0f} req/s (median)")


async def _open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /open HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writers.append(writer)

    for start in range(0, count, 200):  # in batches: the listen backlog is finite
        await asyncio.gather(*(one() for _ in range(start, min(count, start + 200))))
    return writers


def measure_idle(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.count + 100:
        raise SystemExit(f"the open-file hard limit ({hard}) is below {args.count + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    keys = tokens.ensure_keys(WORK)
    token = tokens.first_token(tokens.token_file(WORK, keys, "RS256", 1000))
    with Stack(args, args.count + 1000) as stack:
        valid_run(argparse.Namespace(**{**vars(args), "duration": 2}), stack, token)
        alone = [valid_run(args, stack, token) for _ in range(args.reps)]
        loop = asyncio.new_event_loop()
        try:
            writers = loop.run_until_complete(_open_idle(stack.port, args.count))
            beside = [valid_run(args, stack, token) for _ in range(args.reps)]
            for writer in writers:
                writer.close()
        finally:
            loop.close()
    print(f"jwtproxy ({args.codec}), one worker; 16 valid clients (one cached token), {args.reps} x {args.duration} s")
    report(alone, beside, f"{len(writers):,} idle")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("mix", "idle"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
    ap.add_argument("--count", type=int, default=10_000, help="idle clients (default 10000)")
    ap.add_argument("--codec", choices=("httptools", "h11"), default="httptools")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    if args.what == "mix":
        measure_mix(args)
    else:
        measure_idle(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
