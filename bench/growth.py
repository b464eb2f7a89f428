#!/usr/bin/env python3
"""Memory as the work grows: bytes per cached token, per idle client connection (in process and
in a real worker with real sockets).

    python bench/growth.py cache [--tokens 100000]        # bytes per cached verified token
    python bench/growth.py connections [--count 10000]    # bytes per ClientConnection object
    python bench/growth.py idle [--count 10000]           # RSS per idle keep-alive client of a worker

Instruction-count growth (routes, JWKS size) is ``bench/inproc.py --callgrind --routes 1000`` and
``--keys 100``; see bench/README.md.

Theory of operation
-------------------
* ``cache``: a worker's auth stage (``build_worker``, the bench config, a token cache as large as
  the token list) verifies ``--tokens`` distinct RS256 bench tokens (``tokens.py``; the same
  claims wrk sends). ``tracemalloc`` counts the bytes Python allocated for the entries that stay
  (requested sizes: the allocator's rounding is not in it), and the process RSS delta says what
  the machine paid, allocator included. The biggest allocation sites are listed.
* ``connections``: ``--count`` real :class:`~jwtproxy.connection.ClientConnection` objects on the
  fake transports of ``inproc.py``, each having answered one request and now idle in keep-alive:
  what the gateway itself holds per client (codec, parser, timer), without the loop's transport.
* ``idle``: ``python -m jwtproxy serve`` (one worker) and ``--count`` client sockets from this
  process, each sending one request (answered 404 by the gateway, keep-alive) and then idle; the
  worker's RSS before and after, per connection: everything, uvloop's transport and the kernel's
  socket excluded (kernel memory is not in RSS).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import inproc  # noqa: E402
import tokens  # noqa: E402


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def top_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int, per: int) -> None:
    root = str(BENCH.parent)
    for stat in after.compare_to(before, "lineno")[:8]:
        frame = stat.traceback[0]
        where = frame.filename.replace(root + "/", "")
        print(f"    {stat.size_diff / per:8.0f} B  {where}:{frame.lineno}")


# ----------------------------------------------------------------------------------- cache


def measure_cache(count: int) -> None:
    import uvloop

    from jwtproxy.auth import Allow
    from jwtproxy.config import parse_config
    from jwtproxy.keys import keyset_from_jwks
    from jwtproxy.revocation.memory import MemoryRevocationStore
    from jwtproxy.worker import build_worker

    keys = tokens.ensure_keys(inproc.WORK)
    lines = tokens.token_file(inproc.WORK, keys, "RS256", count).read_text().split()
    config = parse_config(inproc.config_data(keys.jwks, "httptools", count, 3), "growth.toml")

    async def main() -> None:
        worker = build_worker(config, store=MemoryRevocationStore(), key_log=lambda _m: None)
        gw = worker.gateway
        # The loop is driven by hand here, without turns: every verification at once (jwtproxy.turns).
        gw.auth.turns = None
        gw.verifier.set_keyset("bench", keyset_from_jwks(keys.jwks.read_bytes(), config.issuers[0], lambda _m: None))
        rules = gw.routes[id(config.routes[0])].rules
        now = time.time()
        # Warm-up outside the measurement: the header memo, lru caches, the first verdicts.
        warm = tokens.token_file(inproc.WORK, keys, "RS256", 1000).read_text().split()
        for t in warm[:50]:
            assert isinstance(gw.auth.authorize(rules, t, now), Allow)
        gw.cache.clear()
        gc.collect()
        rss0 = rss_bytes()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        for t in lines:
            if not isinstance(gw.auth.authorize(rules, t, now), Allow):
                raise SystemExit("a bench token was refused")
        gc.collect()
        after = tracemalloc.take_snapshot()
        traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
        tracemalloc.stop()
        rss1 = rss_bytes()
        if len(gw.cache) != count:
            raise SystemExit(f"cache holds {len(gw.cache)} entries, {count} expected")
        print(f"cached tokens: {count:,}")
        print(f"  tracemalloc: {traced / count:,.0f} bytes per entry (Python allocations, requested sizes)")
        print(f"  RSS delta:   {(rss1 - rss0) / count:,.0f} bytes per entry (with allocator overhead; "
              "measured with tracemalloc running, whose own tables are in it)")
        print("  largest allocation sites per entry:")
        top_sites(before, after, 8, count)

    loop = uvloop.new_event_loop()
    loop.run_until_complete(main())


def measure_cache_rss(count: int) -> None:
    """The RSS delta alone (no tracemalloc running): a second, separate process."""
    code = f"""
import sys, gc, time
sys.path.insert(0, {str(BENCH)!r}); sys.path.insert(0, {str(BENCH.parent)!r})
import growth
growth._cache_rss_only({count})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _cache_rss_only(count: int) -> None:
    import uvloop

    from jwtproxy.config import parse_config
    from jwtproxy.keys import keyset_from_jwks
    from jwtproxy.revocation.memory import MemoryRevocationStore
    from jwtproxy.worker import build_worker

    keys = tokens.ensure_keys(inproc.WORK)
    lines = tokens.token_file(inproc.WORK, keys, "RS256", count).read_text().split()
    config = parse_config(inproc.config_data(keys.jwks, "httptools", count, 3), "growth.toml")

    async def main() -> None:
        worker = build_worker(config, store=MemoryRevocationStore(), key_log=lambda _m: None)
        gw = worker.gateway
        # The loop is driven by hand here, without turns: every verification at once (jwtproxy.turns).
        gw.auth.turns = None
        gw.verifier.set_keyset("bench", keyset_from_jwks(keys.jwks.read_bytes(), config.issuers[0], lambda _m: None))
        rules = gw.routes[id(config.routes[0])].rules
        now = time.time()
        requests = [t for t in lines]
        for t in requests[:50]:
            gw.auth.authorize(rules, t, now)
        gw.cache.clear()
        gc.collect()
        rss0 = rss_bytes()
        for t in requests:
            gw.auth.authorize(rules, t, now)
        gc.collect()
        print(f"  RSS delta without tracemalloc: {(rss_bytes() - rss0) / count:,.0f} bytes per entry")

    uvloop.new_event_loop().run_until_complete(main())


# ----------------------------------------------------------------------------- connections


def measure_connections(count: int, parser: str) -> None:
    import uvloop

    from jwtproxy.config import parse_config
    from jwtproxy.connection import ClientConnection
    from jwtproxy.revocation.memory import MemoryRevocationStore
    from jwtproxy.worker import build_worker

    keys = tokens.ensure_keys(inproc.WORK)
    config = parse_config(inproc.config_data(keys.jwks, parser, 10_000, 3), "growth.toml")
    request = b"GET /nowhere-but-routed-to-404 HTTP/1.1\r\nHost: x\r\n\r\n"

    async def main() -> None:
        worker = build_worker(config, store=MemoryRevocationStore(), key_log=lambda _m: None)
        gw = worker.gateway
        # The loop is driven by hand here, without turns: every verification at once (jwtproxy.turns).
        gw.auth.turns = None
        gw.router = type(gw.router)([])  # no route: the gateway answers 404 itself, keep-alive

        def one(i: int) -> ClientConnection:
            conn = ClientConnection(gw)
            transport = inproc.FakeTransport(("10.0.%d.%d" % (i >> 8 & 255, i & 255), 40000 + i % 20000))
            conn.connection_made(transport)  # type: ignore[arg-type]
            conn.data_received(request)
            if transport.last[9:12] != b"404" or conn.closing:
                raise SystemExit(f"unexpected answer {transport.last[:60]!r}")
            return conn

        keep = [one(i) for i in range(20)]  # warm-up: memos, first-call allocations
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        keep = [one(i) for i in range(count)]
        gc.collect()
        after = tracemalloc.take_snapshot()
        traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
        tracemalloc.stop()
        print(f"idle ClientConnection objects ({parser}): {len(keep):,}")
        print(f"  tracemalloc: {traced / count:,.0f} bytes per connection (timer handles and transports excluded)")
        top_sites(before, after, 8, count)

    uvloop.new_event_loop().run_until_complete(main())


# ------------------------------------------------------------------------------------ idle


def _worker_pid(supervisor: int) -> int | None:
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def measure_idle(count: int, parser: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 100:
        raise SystemExit(f"the open-file hard limit ({hard}) is below {count + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="jwtproxy-growth-"))
    keys = tokens.ensure_keys(inproc.WORK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = work / "idle.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
http_parser = "{parser}"
access_log = false
keepalive_timeout = 600
[admin]
listen = ""
[[issuer]]
name = "bench"
issuer = "{tokens.ISSUER}"
jwks_file = "{keys.jwks.resolve()}"
audiences = ["{tokens.AUDIENCE}"]
[[route]]
path_prefix = "/api"
upstream = "origin"
[upstream.origin]
targets = ["http://127.0.0.1:9"]
[revocation]
sqlite_path = "{work}/rev.db"
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(BENCH.parent), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("jwtproxy did not start") from None
                time.sleep(0.2)
        time.sleep(1.0)
        worker = _worker_pid(proc.pid)
        if worker is None:
            raise SystemExit("no worker process found")
        rss0 = rss_bytes(worker)
        rounds = asyncio.run(_open_idle(port, count))
        time.sleep(1.0)
        rss1 = rss_bytes(worker)
        print(f"idle keep-alive clients of a real worker ({parser}): {count:,} (each answered once, then idle)")
        print(f"  worker RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB: {(rss1 - rss0) / count:,.0f} bytes per "
              f"connection; {rounds} answers seen")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


async def _open_idle(port: int, count: int) -> int:
    request = b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n"
    writers = []
    answered = 0

    async def one() -> None:
        nonlocal answered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 404"):
            answered += 1
        writers.append((reader, writer))

    for start in range(0, count, 200):  # in batches: the listen backlog is finite
        await asyncio.gather(*(one() for _ in range(start, min(count, start + 200))))
    await asyncio.sleep(1.0)
    for _, writer in writers:
        writer.close()
    return answered


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("cache", "connections", "idle", "all"))
    ap.add_argument("--tokens", type=int, default=100_000, help="cached tokens (default 100000)")
    ap.add_argument("--count", type=int, default=10_000, help="connections (default 10000)")
    ap.add_argument("--codec", choices=("httptools", "h11"), default="httptools")
    args = ap.parse_args(argv)
    if args.what in ("cache", "all"):
        measure_cache(args.tokens)
        measure_cache_rss(args.tokens)
    if args.what in ("connections", "all"):
        measure_connections(args.count, args.codec)
    if args.what in ("idle", "all"):
        measure_idle(args.count, args.codec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
