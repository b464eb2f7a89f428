"""Daemon-level operations tests (issue 4): the real ``python -m jwtproxy serve`` with real
gateway workers, a jwks_file issuer whose keys the test mints, and the aiohttp echo backend
of tests/helpers.py running on the test's event loop.

What identifies a worker: every response carries ``X-Request-Id``, whose prefix is random per
worker start (``connection.RequestIds``), so the set of prefixes seen is the set of workers
that answered. Worker PIDs come from the daemon's JSON event log on stderr
(``worker_started`` / ``worker_died`` / ``ready`` / ``reload_done``).

Every daemon is SIGKILLed (with the workers its log names) in a fixture's teardown, so a
failing test never leaves processes behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import trustme

from daemon_harness import (
    REPO_ROOT,
    Daemon,
    DaemonStarter,
    Reply,
    child_pids,
    free_port,
    http,
    port_is_listening,
    subprocess_env,
    toml_config,
    wait_status,
    worker_of,
)
from helpers import AUDIENCE, ISSUER, Backend, SigningKey, header_values, parse_responses, raw_exchange, write_jwks

pytestmark = pytest.mark.slow

NEW_ROUTE = """
[[route]]
path_prefix = "/new"
upstream = "backend"
auth = "off"
"""


@pytest.fixture
async def start_daemon(tmp_path: Path, backend: Backend, jwks_path: str) -> AsyncIterator[Any]:
    starter = DaemonStarter(tmp_path, backend.port, jwks_path)
    yield starter
    starter.kill_all()


async def many(count: int, method: str, url: str, concurrency: int = 16, **kwargs: Any) -> list[Reply]:
    """``count`` requests, each on a fresh connection, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Reply:
        async with gate:
            return await http(method, url, **kwargs)

    return list(await asyncio.gather(*(one() for _ in range(count))))


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------------------------
# Workers


async def test_requests_spread_over_workers(start_daemon: Any, rsa_key: SigningKey) -> None:
    d = await start_daemon(workers=2)
    serving = {e["pid"] for e in await d.wait_event("worker_serving", count=2)}
    assert len(serving) == 2
    token = rsa_key.token()
    seen: set[str] = set()
    # The kernel hands each new connection to one of the workers blocked on the shared accept
    # queue; bursts of concurrent connections reach both.
    for _ in range(10):
        replies = await many(24, "GET", d.url("/spread"), concurrency=24, token=token)
        assert [r.status for r in replies] == [200] * 24
        seen.update(worker_of(r) for r in replies)
        if len(seen) >= 2:
            break
    assert len(seen) == 2, seen


async def test_kill_9_of_a_worker_is_healed(start_daemon: Any, rsa_key: SigningKey) -> None:
    d = await start_daemon(workers=2)
    before = d.live_worker_pids()
    assert len(before) == 2
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    token = rsa_key.token()
    # The surviving worker keeps serving while the victim is replaced.
    replies = await many(10, "GET", d.url("/during"), token=token)
    assert [r.status for r in replies] == [200] * 10
    died = await d.wait_event("worker_died", where=lambda e: e["pid"] == victim)
    assert died[0]["status"] == "signal SIGKILL"
    await d.wait_event("worker_started", count=3)
    replacement = d.started_pids() - before
    assert len(replacement) == 1
    new_pid = replacement.pop()
    await d.wait_event("worker_ready", where=lambda e: e["pid"] == new_pid)
    assert d.live_worker_pids() == (before - {victim}) | {new_pid}
    # Both workers (the replacement included) answer again.
    seen: set[str] = set()
    for _ in range(10):
        replies = await many(24, "GET", d.url("/after"), concurrency=24, token=token)
        assert [r.status for r in replies] == [200] * 24
        seen.update(worker_of(r) for r in replies)
        if len(seen) >= 2:
            break
    assert len(seen) == 2
    assert d.running.poll() is None


# ---------------------------------------------------------------------------------------------
# Reload


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_sighup_under_load_loses_nothing_and_changes_routes(start_daemon: Any, rsa_key: SigningKey,
                                                                  parser: str) -> None:
    d = await start_daemon(workers=2, parser=parser, shutdown_timeout=5)
    token = rsa_key.token()
    assert (await http("GET", d.url("/new/x"))).status == 401   # the "/" route: token missing
    old_workers = d.live_worker_pids()

    statuses: list[int] = []
    answered_by: set[str] = set()
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(path: str, session: aiohttp.ClientSession | None) -> None:
        while not stop.is_set():
            try:
                reply = await http("GET", d.url(path), token=token, timeout=10, session=session)
                statuses.append(reply.status)
                answered_by.add(worker_of(reply))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors.append(f"{path}: {type(exc).__name__}: {exc}")

    # The strict check: a fresh connection per request (aiohttp never retries those), some of
    # them slow so exchanges are in flight while the old workers drain. Plus keep-alive
    # clients: a reused idle connection closed by a draining worker is retried once by aiohttp
    # for a GET, as RFC 9112 §9.3.1 allows, so those check that nothing else goes wrong. Each
    # keep-alive client has a pool of its own holding one connection, so its one retry goes out
    # on a new connection: from a shared pool it could take a second idle connection that the
    # same drain is closing, a race every server that closes idle connections on drain has.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as first, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as second:
        clients = [asyncio.create_task(client("/api/load", None)) for _ in range(4)]
        clients += [asyncio.create_task(client("/slow/0.3", None)) for _ in range(2)]
        clients += [asyncio.create_task(client("/api/keepalive", own)) for own in (first, second)]
        try:
            await asyncio.sleep(0.5)
            before = set(answered_by)
            d.rewrite(extra_routes=NEW_ROUTE)
            d.signal(signal.SIGHUP)
            done = await d.wait_event("reload_done", timeout=20)
            await d.wait_event("worker_stopped", count=2, timeout=20)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert errors == []
    assert len(statuses) > 50
    assert set(statuses) == {200}
    # The load ran across the swap: answered by the old workers, then by the new ones.
    assert before and answered_by - before, (before, answered_by)
    # Behaviour changed: /new is now an auth = "off" route (no token needed).
    replies = await many(10, "GET", d.url("/new/x"))
    assert [r.status for r in replies] == [200] * 10
    new_workers = set(done[0]["workers"])
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert set(done[0]["draining"]) == old_workers


async def test_invalid_config_on_sighup_changes_nothing(start_daemon: Any, rsa_key: SigningKey) -> None:
    d = await start_daemon(workers=1)
    workers = d.live_worker_pids()
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace('upstream = "backend"', 'upstream = "nowhere"', 1)
                                    .replace("workers = 1", "workers = 0") + NEW_ROUTE)
    d.signal(signal.SIGHUP)
    failed = await d.wait_event("reload_failed")
    assert failed[0]["reason"] == "invalid configuration"
    problems = [e["problem"] for e in d.events("config_problem")]
    name = str(d.config_path)
    assert any(p.startswith(name + ": ") and "route[0].upstream" in p and "nowhere" in p for p in problems), problems
    assert any("server.workers" in p for p in problems), problems
    # Same workers, same routes: /new is still behind the "/" route's authentication.
    assert d.live_worker_pids() == workers
    assert len(d.events("worker_started")) == 1
    assert (await http("GET", d.url("/new/x"))).status == 401
    assert (await http("GET", d.url("/x"), token=rsa_key.token())).status == 200
    assert (await http("GET", d.url("/open/x"))).status == 200


# ---------------------------------------------------------------------------------------------
# Stop


async def test_sigterm_completes_slow_requests_and_exits_0(start_daemon: Any, rsa_key: SigningKey,
                                                           backend: Backend) -> None:
    d = await start_daemon(workers=2, shutdown_timeout=5)
    token = rsa_key.token()
    inflight = [asyncio.create_task(http("GET", d.url(f"/slow/1.5?n={i}"), token=token)) for i in range(4)]
    # A keep-alive connection with a request in flight: answered, then closed by the gateway.
    keepalive = asyncio.create_task(raw_exchange(
        d.port, f"GET /slow/1.5?n=ka HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
        read_timeout=10, until_close=True))
    deadline = time.monotonic() + 5
    while sum(1 for r in backend.seen if r["path"].startswith("/slow/")) < 5:
        assert time.monotonic() < deadline, "slow requests never reached the backend"
        await asyncio.sleep(0.02)
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    # Stop accepting: new connections are refused while the slow requests are still running.
    while port_is_listening(d.port):
        assert time.monotonic() - sent < 1.0, "still accepting connections after SIGTERM"
        await asyncio.sleep(0.05)
    assert not any(task.done() for task in inflight)
    replies = await asyncio.gather(*inflight)
    assert [r.status for r in replies] == [200] * 4
    raw = await keepalive
    [(status, headers, _body)] = parse_responses(raw)
    assert status == 200 and headers.get("connection") == "close"
    code = await d.wait_exit(timeout=15)
    assert code == 0
    assert time.monotonic() - sent < 5, "drain should not wait for shutdown_timeout"
    assert not port_is_listening(d.port)
    assert d.events("stopped")


async def test_workers_exit_when_the_supervisor_is_killed(start_daemon: Any) -> None:
    d = await start_daemon(workers=2)
    workers = d.live_worker_pids()
    assert len(workers) == 2
    d.running.kill()
    d.running.wait()
    # Orphans notice the closed link at their next heartbeat, drain and exit: nothing keeps
    # serving unsupervised, and the port is released.
    deadline = time.monotonic() + 6
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, [pid for pid in workers if _running(pid)]
        await asyncio.sleep(0.1)
    assert not port_is_listening(d.port)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans are reaped by init later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------
# sd_notify


async def test_notify_socket_receives_exact_messages(start_daemon: Any, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    received: list[str] = []

    async def until(message_prefix: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for m in received if m.startswith(message_prefix)) < count:
            try:
                received.append(sock.recv(4096).decode())
                continue
            except BlockingIOError:
                pass
            assert time.monotonic() < deadline, received
            await asyncio.sleep(0.02)

    try:
        d = await start_daemon(workers=1, wait=False, env={"NOTIFY_SOCKET": str(path)})
        await until("READY=1")
        before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.signal(signal.SIGHUP)
        await until("READY=1", count=2)
        after_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        # An invalid config is announced the same way: reloading, then ready (the old config).
        d.config_path.write_text(d.config_path.read_text().replace("workers = 1", "workers = 0"))
        d.signal(signal.SIGHUP)
        await until("READY=1", count=3)
        await d.wait_event("reload_failed")
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
        await until("STOPPING=1", timeout=2)
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    # STATUS= lines are free text for `systemctl status`; the protocol is the rest.
    protocol = [m for m in received if not m.startswith("STATUS=")]
    assert len(protocol) == 6, received
    assert protocol[0] == "READY=1"
    reloading = protocol[1].split("\n")
    assert reloading[0] == "RELOADING=1" and len(reloading) == 2, protocol[1]
    key, _, usec = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before_reload <= int(usec) <= after_reload
    assert protocol[2] == "READY=1"
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", protocol[3]), protocol[3]
    assert int(protocol[3].rsplit("=", 1)[1]) > int(usec)
    assert protocol[4:] == ["READY=1", "STOPPING=1"]
    assert all(m.startswith("STATUS=") and "\n" not in m for m in received if m not in protocol)


async def test_watchdog_pings_on_abstract_notify_socket(start_daemon: Any) -> None:
    name = f"jwtproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    received: list[tuple[float, str]] = []
    try:
        # WATCHDOG_USEC = 0.4 s: a ping every 0.2 s (half the interval, sd_watchdog_enabled(3)).
        d = await start_daemon(wait=False, env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"})
        deadline = time.monotonic() + 15

        def pings_after_ready() -> int:
            messages = [m for _t, m in received]
            if "READY=1" not in messages:
                return 0
            return messages[messages.index("READY=1"):].count("WATCHDOG=1")

        # Read continuously: a datagram receiver that stops reading makes senders block.
        while pings_after_ready() < 5:
            assert time.monotonic() < deadline, received
            try:
                received.append((time.monotonic(), sock.recv(4096).decode()))
            except BlockingIOError:
                await asyncio.sleep(0.02)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    finally:
        sock.close()
    messages = [m for _t, m in received]
    after_ready = received[messages.index("READY=1"):]
    pings = [t for t, m in after_ready if m == "WATCHDOG=1"]
    # Every 0.2 s on average (receive times, so only roughly: a loaded CI box delays both ends).
    mean_gap = (pings[-1] - pings[0]) / (len(pings) - 1)
    assert 0.12 < mean_gap < 0.4, pings


async def test_a_notify_receiver_that_does_not_read_cannot_wedge_the_supervisor(start_daemon: Any,
                                                                                tmp_path: Path) -> None:
    path = tmp_path / "deaf.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))   # bound, never read (a busy service manager, a leaked NOTIFY_SOCKET)
    try:
        # A watchdog ping every 50 ms fills the receive queue within a second.
        d = await start_daemon(wait=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
        await d.wait_event("worker_serving")   # the worker's line: the supervisor may be stuck
        await asyncio.sleep(1.0)
        health = await wait_status(d.admin_url("/healthz"), 200, timeout=1.5)
        assert health is not None and health.status == 200
        d.signal(signal.SIGTERM)
        assert await d.wait_exit(timeout=5) == 0
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# TLS


def _tls_files(tmp: Path, ca: trustme.CA, tag: str) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp / f"cert-{tag}.pem", tmp / f"key-{tag}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    return str(cert_path), str(key_path)


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def _handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, str | None, bytes]:
    """(ALPN protocol, TLS version, peer certificate DER) of one handshake."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), 5)
    try:
        obj = writer.get_extra_info("ssl_object")
        return obj.selected_alpn_protocol(), obj.version(), obj.getpeercert(binary_form=True)
    finally:
        writer.close()


def _tls11_client(ca: trustme.CA) -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLSVersion.TLSv1/TLSv1_1
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


async def _tls11_control(ca: trustme.CA, client: ssl.SSLContext) -> str | None:
    """Handshake ``client`` with a local server that still allows TLS 1.0+."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1

    async def close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=server_ctx)
    try:
        _alpn, version, _der = await _handshake(server.sockets[0].getsockname()[1], client)
        return version
    finally:
        server.close()


async def test_https_termination_and_certificate_reload(start_daemon: Any, tmp_path: Path,
                                                        rsa_key: SigningKey) -> None:
    ca1, ca2 = trustme.CA(), trustme.CA()
    cert1, key1 = _tls_files(tmp_path, ca1, "one")
    live_cert, live_key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    shutil.copy(cert1, live_cert)
    shutil.copy(key1, live_key)
    d = await start_daemon(workers=1, tls_cert=live_cert, tls_key=live_key)

    ctx1 = _client_context(ca1)
    reply = await http("GET", d.url("/x"), token=rsa_key.token(), ssl_context=ctx1)
    assert reply.status == 200
    echoed = reply.json()
    assert header_values(echoed, "x-forwarded-proto") == ["https"]
    alpn, version, der1 = await _handshake(d.port, ctx1)
    assert alpn == "http/1.1"
    assert version in ("TLSv1.2", "TLSv1.3")

    # A client limited to TLS 1.1 is refused; the control shows this client really speaks
    # TLS 1.1 (its own security level allows it), so the refusal is the gateway's.
    old = _tls11_client(ca1)
    assert await _tls11_control(ca1, old) == "TLSv1.1"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(d.port, old)

    # New certificate from another CA: replace the files, reload, the new one is served.
    cert2, key2 = _tls_files(tmp_path, ca2, "two")
    shutil.copy(cert2, live_cert)
    shutil.copy(key2, live_key)
    d.signal(signal.SIGHUP)
    await d.wait_event("reload_done")
    await d.wait_event("worker_stopped")
    ctx2 = _client_context(ca2)
    _alpn, _version, der2 = await _handshake(d.port, ctx2)
    assert der2 != der1
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(d.port, ctx1)
    assert (await http("GET", d.url("/x"), token=rsa_key.token(), ssl_context=ctx2)).status == 200

    # An unusable certificate on reload: the new workers cannot start, the old ones keep serving.
    Path(live_cert).write_text("not a certificate\n")
    d.signal(signal.SIGHUP)
    # (Refused by validation or by the new workers failing to start: either way nothing changes.)
    await d.wait_event("reload_failed")
    _alpn, _version, der3 = await _handshake(d.port, ctx2)
    assert der3 == der2


# ---------------------------------------------------------------------------------------------
# Admin listener


async def test_admin_probes_metrics_and_token(start_daemon: Any, rsa_key: SigningKey) -> None:
    admin_token = "s3cret-admin-token-for-tests"
    d = await start_daemon(workers=2, admin_token=admin_token)
    auth = {"Authorization": f"Bearer {admin_token}"}
    # The admin token is enforced on every admin path.
    for path in ("/healthz", "/readyz", "/metrics", "/revocations"):
        assert (await http("GET", d.admin_url(path))).status == 401, path
        wrong = await http("GET", d.admin_url(path), headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401, path
    assert (await http("GET", d.admin_url("/healthz"), headers=auth)).status == 200
    ready = await wait_status(d.admin_url("/readyz"), 200, headers=auth)
    assert ready is not None and ready.status == 200, ready

    def total(reply: Reply) -> float:
        return metric_sum(reply.body.decode(), "jwtproxy_requests_total")

    await asyncio.sleep(1.2)   # anything counted before now is flushed
    before = total(await http("GET", d.admin_url("/metrics"), headers=auth))
    token = rsa_key.token()
    seen: set[str] = set()
    sent = 0
    for _ in range(5):
        replies = await many(20, "GET", d.url("/m"), concurrency=20, token=token)
        sent += len(replies)
        assert {r.status for r in replies} == {200}
        seen.update(worker_of(r) for r in replies)
        if len(seen) == 2:
            break
    assert len(seen) == 2, "the requests should reach both workers"
    # Workers flush their counts about once a second.
    total_now, text = await _metric_total(d, auth, before + sent)
    assert total_now == before + sent
    assert 'jwtproxy_requests_total{listener="traffic",route="/",status="200"}' in text
    for name in ("jwtproxy_request_duration_seconds_bucket", "jwtproxy_token_cache_total"):
        assert name in text

    # A reload: the new admin token applies, and the counters of the drained workers stay in
    # the totals (counters must never go down without a restart).
    d.rewrite(admin_token="second-admin-token")
    d.signal(signal.SIGHUP)
    await d.wait_event("reload_done")
    await d.wait_event("worker_stopped", count=2)
    assert (await http("GET", d.admin_url("/healthz"), headers=auth)).status == 401
    auth = {"Authorization": "Bearer second-admin-token"}
    assert (await http("GET", d.admin_url("/healthz"), headers=auth)).status == 200
    replies = await many(10, "GET", d.url("/m"), token=token)
    assert {r.status for r in replies} == {200}
    total_after, _text = await _metric_total(d, auth, before + sent + 10)
    assert total_after == before + sent + 10


async def _metric_total(d: Daemon, auth: dict[str, str], wanted: float) -> tuple[float, str]:
    """jwtproxy_requests_total summed, polled until it equals ``wanted`` (or 5 s passed)."""
    deadline = time.monotonic() + 5
    while True:
        text = (await http("GET", d.admin_url("/metrics"), headers=auth)).body.decode()
        total = metric_sum(text, "jwtproxy_requests_total")
        if total == wanted or time.monotonic() > deadline:
            return total, text
        await asyncio.sleep(0.2)


async def test_readyz_503_until_issuer_keys_load(start_daemon: Any, tmp_path: Path, rsa_key: SigningKey) -> None:
    broken = tmp_path / "broken-jwks.json"
    broken.write_text("{not json")
    d = await start_daemon(workers=1, jwks_file=str(broken), wait=False)
    await d.wait_event("worker_serving")
    reply = await wait_status(d.admin_url("/readyz"), 503)
    assert reply is not None and reply.status == 503
    assert b"no keys" in reply.body
    assert (await http("GET", d.admin_url("/healthz"))).status == 200
    assert (await http("GET", d.url("/x"), token=rsa_key.token())).status == 503
    # Fix the file and reload: the new worker has keys, /readyz turns 200.
    write_jwks(str(broken), rsa_key)
    d.signal(signal.SIGHUP)
    await d.wait_event("reload_done")
    assert (await wait_status(d.admin_url("/readyz"), 200)).status == 200  # type: ignore[union-attr]
    assert (await http("GET", d.url("/x"), token=rsa_key.token())).status == 200


async def test_revoke_command_reaches_every_worker(start_daemon: Any, rsa_key: SigningKey) -> None:
    d = await start_daemon(workers=2, admin_token="admin-token-for-revoke-test")
    token = rsa_key.token(jti="jti-to-revoke")
    other = rsa_key.token(jti="jti-kept")
    assert {r.status for r in await many(10, "GET", d.url("/r"), token=token)} == {200}
    result = await asyncio.to_thread(run_cli, "revoke", "-c", str(d.config_path), "--jti", "jti-to-revoke",
                                     "--exp", str(time.time() + 600), cwd=d.tmp)
    assert result.returncode == 0, result
    # Every worker refuses it within a second (sqlite backend shared by the workers).
    deadline = time.monotonic() + 1.5
    while True:
        replies = await many(20, "GET", d.url("/r"), concurrency=20, token=token)
        if {r.status for r in replies} == {401} or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert {r.status for r in replies} == {401}
    assert 'error_description="token revoked"' in replies[0].headers["www-authenticate"]
    assert {r.status for r in await many(10, "GET", d.url("/r"), token=other)} == {200}
    assert "jti-to-revoke" in (await http("GET", d.admin_url("/revocations"),
                                          headers={"Authorization": "Bearer admin-token-for-revoke-test"})).body.decode()


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jwtproxy", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, input=stdin, timeout=timeout)


def _config(tmp: Path, jwks_path: str, backend_port: int = 9, **changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(listen_port=free_port(), admin_port=free_port(), backend_port=backend_port,
                                    jwks_file=jwks_path, tmp=tmp, issuer=ISSUER, audience=AUDIENCE)
    settings.update(changes)
    return settings


def test_check_config_good_and_bad(tmp_path: Path, jwks_path: str) -> None:
    good = tmp_path / "good.toml"
    good.write_text(toml_config(**_config(tmp_path, jwks_path)))
    result = run_cli("check-config", "-c", str(good), cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result

    bad = tmp_path / "bad.toml"
    bad.write_text(toml_config(**_config(tmp_path, jwks_path)).replace('upstream = "backend"', 'upstream = "pay"', 1)
                   .replace("workers = 1", "workers = 0").replace("[server]", "[server]\nlisten_typo = 1"))
    result = run_cli("check-config", "-c", str(bad), cwd=tmp_path)
    assert result.returncode == 1, result
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 3, lines
    for line in lines:
        assert re.fullmatch(r"\S*bad\.toml: [A-Za-z0-9_.\[\]\-]+: .+", line), line
    text = result.stdout
    assert "route[0].upstream" in text and "'pay'" in text
    assert "server.workers" in text
    assert "server.listen_typo" in text
    assert "ok" not in lines


def test_serve_with_bad_config_exits_1_without_listening(tmp_path: Path, jwks_path: str) -> None:
    settings = _config(tmp_path, jwks_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_config(**settings).replace('upstream = "backend"', 'upstream = "pay"', 1))
    check = run_cli("check-config", "-c", str(bad), cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "jwtproxy", "serve", "-c", str(bad)], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert not port_is_listening(settings["listen_port"])
    assert not port_is_listening(settings["admin_port"])
    # The same messages as check-config.
    assert err.strip().splitlines() == check.stdout.strip().splitlines()


def test_unusable_tls_files_are_a_config_error(tmp_path: Path, jwks_path: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    settings = _config(tmp_path, jwks_path, tls_cert=str(garbage), tls_key=str(tmp_path / "missing-key.pem"))
    bad = tmp_path / "bad-tls.toml"
    bad.write_text(toml_config(**settings))
    check = run_cli("check-config", "-c", str(bad), cwd=tmp_path)
    assert check.returncode == 1, check
    assert "server.tls_" in check.stdout
    proc = subprocess.Popen([sys.executable, "-m", "jwtproxy", "serve", "-c", str(bad)], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "server.tls_" in err
    assert not port_is_listening(settings["listen_port"])


def test_systemd_unit(tmp_path: Path) -> None:
    result = run_cli("systemd-unit", cwd=tmp_path)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert "Type=notify" in lines
    assert any(line.startswith("ExecReload=") and "-HUP" in line for line in lines)
    assert any(line.startswith("ExecStart=/") and " serve -c " in line for line in lines)


def test_verify_valid_and_rejected(tmp_path: Path, jwks_path: str, rsa_key: SigningKey) -> None:
    config = tmp_path / "verify.toml"
    config.write_text(toml_config(**_config(tmp_path, jwks_path)))
    good = run_cli("verify", "-c", str(config), rsa_key.token(sub="alice", role="admin"), cwd=tmp_path)
    assert good.returncode == 0, good
    assert '"valid"' in good.stdout and "alice" in good.stdout
    assert '"x-user-role": "admin"' in good.stdout
    piped = run_cli("verify", "-c", str(config), "-", stdin=rsa_key.token() + "\n", cwd=tmp_path)
    assert piped.returncode == 0, piped

    expired = rsa_key.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    bad = run_cli("verify", "-c", str(config), expired, cwd=tmp_path)
    assert bad.returncode == 1, bad
    assert '"rejected"' in bad.stdout and "expired" in bad.stdout
    stranger = SigningKey.rsa("rsa-1", "RS256")   # same kid, other key: bad signature
    forged = run_cli("verify", "-c", str(config), stranger.token(), cwd=tmp_path)
    assert forged.returncode == 1, forged
    assert '"rejected"' in forged.stdout
    assert stranger.token() not in forged.stdout + forged.stderr


async def test_demo_smoke(tmp_path: Path) -> None:
    ports = {8080: free_port(), 8081: free_port(), 8082: free_port(), 9901: free_port()}
    text = (REPO_ROOT / "jwtproxy.toml").read_text()
    for old, new in ports.items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    config = tmp_path / "jwtproxy.toml"
    config.write_text(text)
    demo = Daemon(tmp_path, config_path=config, command="demo", name="demo")
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 20
        match = None
        while match is None:
            match = re.search(r"curl -s (http://127\.0\.0\.1:(\d+))/hello -H 'Authorization: Bearer ([\w.-]+)'",
                              demo.stdout())
            assert demo.running.poll() is None, demo.stdout() + demo.log()
            assert time.monotonic() < deadline, demo.stdout() + demo.log()
            if match is None:
                await asyncio.sleep(0.1)
        base, port, token = match.group(1), int(match.group(2)), match.group(3)
        assert port == ports[8080]
        children = child_pids(demo.running.pid)
        # The gateway fetches the demo issuer's JWKS over HTTP; the issuer starts concurrently.
        reply = await wait_status(base + "/hello", 200, timeout=15, token=token)
        assert reply is not None and reply.status == 200, (reply, demo.log()[-3000:])
        echoed = {k.lower(): v for k, v in reply.json()["headers"].items()}
        assert echoed.get("x-user-id") == "demo-user"
        assert (await http("GET", base + "/hello")).status == 401
        demo.signal(signal.SIGTERM)
        assert await demo.wait_exit() == 0
    finally:
        children |= child_pids(demo.running.pid) if demo.running.poll() is None else set()
        demo.kill()
        for pid in children:   # the demo's issuer/backend child, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

