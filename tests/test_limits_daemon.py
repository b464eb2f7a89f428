"""Limits through real daemons (contract §5.5): ``python -m jwtproxy serve`` subprocesses.

What is proven here and not in tests/test_limits_gateway.py: a rate limit is exact across the
workers of a host (the shared-memory table the supervisor makes before forking) and across nodes
on one Redis, and survives Redis going away; a burst of 10,000 clients against an upstream that
takes only a few thousand connections is answered in full; a flood of forged tokens from one
address meets the failure budget while valid clients on another address keep being served; a
worker that runs out of file descriptors recovers.

Exactness is judged against GCRA's own bound: a steady sender above the rate, from the first
request at t0 to the last at t1, is admitted ``1 + burst + rate * (t1 - t0)`` times (contract
§5.5: at most requests + burst per window, requests per window when sending steadily). A limit
kept per worker would admit about twice that with two workers.

Run with ``pytest -s`` to see the measured figures (lines starting with ``LIMITS``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from daemon_harness import Daemon, DaemonStarter, free_port, http, redis_section, worker_of
from helpers import AUDIENCE, ISSUER, Backend, SigningKey
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

CODECS = ["httptools", "h11"]
RATE, BURST = 20, 4  # requests per second, burst


def rl_route(key: str = "client_ip", requests: int = RATE, per: int = 1, burst: int = BURST,
             auth: str = "off") -> str:
    return f"""
[[route]]
path_prefix = "/rl"
upstream = "backend"
auth = "{auth}"
rate_limit = {{ requests = {requests}, per = {per}, burst = {burst}, key = "{key}" }}
"""


def report(label: str, **figures: Any) -> None:
    print("LIMITS", label, json.dumps(figures))


@pytest.fixture
async def start_daemon(tmp_path: Path, backend: Backend, jwks_path: str) -> AsyncIterator[Any]:
    starter = DaemonStarter(tmp_path, backend.port, jwks_path)
    yield starter
    starter.kill_all()


async def metric_value(daemon: Daemon, name: str, above: float | None = 0.0, timeout: float = 5.0) -> float:
    """The metric ``name`` summed over its labels, once it is above ``above`` (metrics are flushed
    every second); with ``above=None`` the first value seen."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await daemon.admin("GET", "/metrics")
        assert status == 200
        values = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith((name + " ", name + "{"))]
        total = sum(values)
        if values and (above is None or total > above or time.monotonic() > deadline):
            return total
        if time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.2)


def clean_log(daemon: Daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]
    assert "exception was never retrieved" not in log, log[-4000:]


async def steady_sender(urls: list[str], seconds: float, concurrency: int = 6) -> list[tuple[float, int, str]]:
    """Requests on fresh connections (the kernel spreads them over the workers), round robin over
    ``urls``, for ``seconds``: ``(time sent, status, worker)`` of each."""
    results: list[tuple[float, int, str]] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def loop() -> None:
        while time.monotonic() < deadline:
            url = urls[next(counter) % len(urls)]
            sent = time.monotonic()
            reply = await http("GET", url, timeout=10)
            results.append((sent, reply.status, worker_of(reply)))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return sorted(results)


def judge(results: list[tuple[float, int, str]], rate: float, burst: int) -> tuple[int, float]:
    """The admitted count and GCRA's figure for this sender; only 200 and 429 may appear."""
    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    span = results[-1][0] - results[0][0]
    return statuses[200], 1 + burst + rate * span


# -- exact across workers and nodes --------------------------------------------------------------


@pytest.mark.parametrize("parser", CODECS)
async def test_rate_limit_is_exact_across_two_workers(start_daemon: Any, parser: str) -> None:
    daemon = await start_daemon(workers=2, parser=parser, extra_routes=rl_route())
    results = await steady_sender([daemon.url("/rl/x")], seconds=3.0)
    admitted, expected = judge(results, RATE, BURST)
    workers = {w for _, _, w in results}
    report(f"two-workers[{parser}]", sent=len(results), admitted=admitted, expected=round(expected, 1),
           workers=len(workers))
    assert len(workers) == 2  # both workers decided requests
    assert len(results) > 2 * expected  # the sender really was above the rate
    assert abs(admitted - expected) <= 0.1 * expected
    clean_log(daemon)


@pytest.mark.redis
@pytest.mark.parametrize("parser", CODECS)
async def test_rate_limit_is_exact_across_two_daemons_on_redis_and_survives_an_outage(
        start_daemon: Any, redis_server: RedisServer, parser: str) -> None:
    limits = f'[limits]\nbackend = "redis"\nredis_url = "{redis_server.url}"\n'
    nodes = [await start_daemon(workers=1, parser=parser, extra_routes=rl_route(), extra_sections=limits,
                                revocation=redis_section(redis_server.url)) for _ in range(2)]
    results = await steady_sender([n.url("/rl/x") for n in nodes], seconds=3.0)
    admitted, expected = judge(results, RATE, BURST)
    report(f"two-daemons-redis[{parser}]", sent=len(results), admitted=admitted, expected=round(expected, 1))
    assert len(results) > 2 * expected
    assert abs(admitted - expected) <= 0.1 * expected

    # Redis goes away: every request is still answered, by the local limit (no 5xx), and each
    # worker says so once.
    redis_server.stop()
    during = await steady_sender([n.url("/rl/x") for n in nodes], seconds=1.5, concurrency=3)
    assert {status for _, status, _ in during} <= {200, 429}
    assert 200 in {status for _, status, _ in during}
    for node in nodes:
        down = await node.wait_event("rate_limit_backend", where=lambda e: e.get("up") is False)
        assert len(down) == 1
        assert await metric_value(node, "jwtproxy_rate_limit_fallback_total") > 0
        assert await metric_value(node, "jwtproxy_rate_limit_backend_up", above=None) == 0

    redis_server.start()
    await asyncio.sleep(1.2)  # past the retry interval: the next request probes Redis again
    await steady_sender([n.url("/rl/x") for n in nodes], seconds=0.5, concurrency=2)
    for node in nodes:
        await node.wait_event("rate_limit_backend", where=lambda e: e.get("up") is True)
        clean_log(node)


# -- a burst far beyond the upstream's capacity ----------------------------------------------------

UPSTREAM = r"""
import asyncio, resource, sys
import uvloop
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            asyncio.get_running_loop().call_later(0.02, self.answer)
    def answer(self):
        if not self.transport.is_closing():
            self.transport.write(RESPONSE)

async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


async def one_client(port: int, deadline: float) -> tuple[int, float]:
    """One client's request: ``(status, seconds)``; status 0: no answer (closed or timed out)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                                deadline - time.monotonic())
    except (OSError, asyncio.TimeoutError):
        return -1, time.monotonic() - started
    try:
        writer.write(b"GET /open/x HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), deadline - time.monotonic())
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        if status not in (200, 503):
            print("BURST", status, data[-120:])
    except (OSError, asyncio.TimeoutError, ValueError):
        status = 0
    finally:
        writer.close()
    return status, time.monotonic() - started


@pytest.mark.parametrize("parser", CODECS)
async def test_ten_thousand_clients_all_get_200_or_503(start_daemon: Any, tmp_path: Path, parser: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 12000:
        pytest.skip(f"needs 12000 open files for the clients, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, "3000"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        up_port = int(upstream.stdout.readline())  # type: ignore[union-attr]
        daemon = await start_daemon(
            workers=2, parser=parser, backend_port=up_port,
            # The upstream takes up to ~3000 connections; the gateway keeps the host below that.
            extra_sections="[limits]\nupstream_max_connections = 1000\n",
        )
        clients = 10_000
        started = time.monotonic()
        deadline = started + 50
        outcomes = await asyncio.gather(*(one_client(daemon.port, deadline) for _ in range(clients)))
        elapsed = time.monotonic() - started
        statuses = Counter(status for status, _ in outcomes)
        slowest = max(seconds for _, seconds in outcomes)
        report(f"burst[{parser}]", clients=clients, statuses=dict(statuses), seconds=round(elapsed, 1),
               slowest=round(slowest, 1))
        events = [e.get("event") for e in daemon.events()]
        assert set(statuses) <= {200, 503}, (statuses, events[-20:], daemon.log()[-3000:])  # every client answered
        assert statuses[200] > 0
        assert slowest < 50
        assert upstream.poll() is None  # the upstream never went under
        clean_log(daemon)
    finally:
        upstream.kill()
        upstream.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- a forged-token flood next to valid clients ------------------------------------------------------

FLOOD = r"""
import asyncio, json, sys, time, base64, os
port, seconds, template = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
head, body, sig = template.split(".")
counts = {}

async def worker(n):
    reader, writer = None, None
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        if writer is None:
            sock = __import__("socket").socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
        i += 1
        # A distinct, well-formed token with a wrong signature: never cached, always verified.
        forged = f"{head}.{body}.{base64.urlsafe_b64encode(os.urandom(256)).rstrip(b'=').decode()}"
        writer.write(f"GET /x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {forged}\r\n\r\n".encode())
        head_bytes = await reader.readuntil(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        length = int(head_bytes.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        counts[status] = counts.get(status, 0) + 1
        if b"connection: close" in head_bytes.lower():
            writer.close()
            writer = None

async def main():
    await asyncio.gather(*(worker(n) for n in range(8)))
    print(json.dumps(counts))

asyncio.run(main())
"""


async def timed_valid_requests(port: int, token: str, count: int) -> list[float]:
    """``count`` requests from 127.0.0.3 on one keep-alive connection; each one's latency."""
    sock = socket.socket()
    sock.bind(("127.0.0.3", 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(f"GET /x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200 "), head
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)
    finally:
        writer.close()
    return latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.mark.parametrize("parser", CODECS)
async def test_forged_token_flood_meets_the_failure_budget_valid_clients_keep_going(
        start_daemon: Any, rsa_key: SigningKey, parser: str) -> None:
    daemon = await start_daemon(workers=1, parser=parser, extra_sections="[limits]\nfailures_per_ip = 50\n")
    token = rsa_key.token(sub="valid")
    quiet = await timed_valid_requests(daemon.port, token, 300)
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(daemon.port), "4", rsa_key.token(sub="x")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(0.5)  # the flood is under way
        loud = await timed_valid_requests(daemon.port, token, 300)
        out, err = await asyncio.get_running_loop().run_in_executor(None, flood.communicate)
    finally:
        if flood.poll() is None:
            flood.kill()
    counts = {int(k): v for k, v in json.loads(out or "{}").items()}
    report(f"flood[{parser}]", p99_ms_quiet=round(p99(quiet) * 1000, 2), p99_ms_flood=round(p99(loud) * 1000, 2),
           flood=counts)
    assert counts.get(429, 0) > 0, (counts, err)  # the forger met the budget
    assert set(counts) <= {401, 429}, counts
    assert len(loud) == 300  # every valid request succeeded (timed_valid_requests checks 200)
    clean_log(daemon)


# -- running out of file descriptors ------------------------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("parser", CODECS)
async def test_a_worker_out_of_file_descriptors_recovers(start_daemon: Any, parser: str) -> None:
    daemon = await start_daemon(workers=1, parser=parser, open_files=160)
    (worker,) = daemon.live_worker_pids()
    held: list[socket.socket] = []
    try:
        for _ in range(220):  # more than the worker can hold open
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            held.append(s)
        await asyncio.sleep(0.5)
        closed_by_worker = sum(1 for s in held if _closed_by_peer(s))
        assert closed_by_worker > 0  # the worker really ran out: it closed what it could not keep
        # Out of descriptors: a new client is closed at once, not left waiting...
        started = time.monotonic()
        probe = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        probe.settimeout(5)
        probe.sendall(b"GET /open/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        try:
            answer = probe.recv(100)
        except ConnectionResetError:
            answer = b""
        probe.close()
        assert answer == b"" and time.monotonic() - started < 3
        # ...and the worker does not spin while it is out of them.
        before = cpu_seconds(worker)
        await asyncio.sleep(1.0)
        spent = cpu_seconds(worker) - before
        assert spent < 0.3, f"worker used {spent:.2f} s of CPU in 1 s while out of descriptors"
    finally:
        for s in held:
            s.close()
    reply = None
    for _ in range(50):
        try:
            reply = await http("GET", daemon.url("/open/x"), timeout=2)
            break
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            await asyncio.sleep(0.1)
    assert reply is not None and reply.status == 200  # serving again
    assert daemon.live_worker_pids() == {worker}  # the same worker: it survived
    report(f"emfile[{parser}]", cpu_while_out=round(spent, 3), closed_at_once=closed_by_worker, held=len(held))
    clean_log(daemon)
