"""Machinery for tests/test_daemon.py: the real daemon (``python -m jwtproxy serve``) in a
subprocess, its JSON event log, free loopback ports and a small async HTTP client.

The daemon's workers are real gateway workers (``jwtproxy.gateway.serve_worker``), so the
echo backend (tests/helpers.py ``Backend``) runs on the test's own event loop: every wait in
these helpers is ``await asyncio.sleep`` so that loop keeps serving while a test waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def toml_config(
    *,
    listen_port: int,
    admin_port: int | None,
    backend_port: int,
    jwks_file: str,
    tmp: Path,
    issuer: str,
    audience: str,
    workers: int = 1,
    parser: str = "httptools",
    shutdown_timeout: float = 3.0,
    admin_token: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    access_log: bool = False,
    extra_routes: str = "",
) -> str:
    """A complete ``jwtproxy.toml``: one jwks_file issuer, routes ``/`` (auth) and ``/open``."""
    admin = f"127.0.0.1:{admin_port}" if admin_port else ""
    return f"""
[server]
listen = ["127.0.0.1:{listen_port}"]
workers = {workers}
http_parser = "{parser}"
shutdown_timeout = {shutdown_timeout}
access_log = {str(access_log).lower()}
tls_cert = "{tls_cert}"
tls_key = "{tls_key}"

[admin]
listen = "{admin}"
token = "{admin_token}"

[[issuer]]
name = "test"
issuer = "{issuer}"
jwks_file = "{jwks_file}"
audiences = ["{audience}"]

[[route]]
path_prefix = "/"
upstream = "backend"

[[route]]
path_prefix = "/open"
upstream = "backend"
auth = "off"
{extra_routes}
[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]
connect_timeout = 2
response_timeout = 10

[revocation]
backend = "sqlite"
sqlite_path = "{tmp / 'revocations.db'}"
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would change the daemon's behaviour."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                 "JWTPROXY_CONFIG", "JWTPROXY_LAST_GOOD_KEYS_DIR"):
        env.pop(name, None)
    env.update(extra)
    return env


class Daemon:
    """``python -m jwtproxy <command> -c FILE`` in a subprocess; stderr goes to a file.

    ``events()`` parses the JSON event lines the supervisor and workers write on stderr.
    Always ``kill()`` in a ``finally``: it SIGKILLs the supervisor and every worker it
    started (by the PIDs its event log names), never anything else.
    """

    def __init__(self, tmp: Path, config_text: str | None = None, *, config_path: Path | None = None,
                 command: str = "serve", env: dict[str, str] | None = None, name: str = "daemon") -> None:
        self.tmp = tmp
        if config_path is None:
            config_path = tmp / f"{name}.toml"
            assert config_text is not None
            config_path.write_text(config_text)
        self.config_path = config_path
        self.stderr_path = tmp / f"{name}.stderr"
        self.stdout_path = tmp / f"{name}.stdout"
        with open(self.stderr_path, "wb") as stderr, open(self.stdout_path, "wb") as stdout:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jwtproxy", command, "-c", str(config_path)],
                cwd=tmp, env=subprocess_env(**(env or {})), stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL,
            )

    # -- logs -------------------------------------------------------------------------------

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (name is None or record.get("event") == name):
                out.append(record)
        return out

    async def wait_event(self, name: str, count: int = 1, timeout: float = 15.0,
                         where: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events ``name`` (matching ``where``) are logged."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if where(e)]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {count} x {name!r} event (exit={self.proc.poll()}); log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the supervisor announced READY (every first-generation worker serving)."""
        await self.wait_event("ready", timeout=timeout)

    def started_pids(self) -> set[int]:
        return {e["pid"] for e in self.events("worker_started")}

    def live_worker_pids(self) -> set[int]:
        """Workers started and not yet reported as exited."""
        gone = {e["pid"] for e in self.events() if e.get("event") in ("worker_died", "worker_stopped")}
        return self.started_pids() - gone

    # -- signals / lifetime ---------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL whatever is left of this daemon: its workers (by logged PID), then itself."""
        if self.proc.poll() is None:
            for pid in self.started_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http(method: str, url: str, *, token: str | None = None, headers: dict[str, str] | None = None,
               session: aiohttp.ClientSession | None = None, ssl_context: ssl.SSLContext | None = None,
               timeout: float = 10.0) -> Reply:
    """One request; without ``session`` on a fresh connection (so the kernel picks a worker)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    own = session is None
    if session is None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, ssl=ssl_context or False))
    try:
        async with session.request(method, url, headers=sent, timeout=aiohttp.ClientTimeout(total=timeout),
                                   ssl=ssl_context if ssl_context is not None else False) as resp:
            body = await resp.read()
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
    finally:
        if own:
            await session.close()


async def wait_status(url: str, wanted: int, timeout: float = 10.0, **kwargs: Any) -> Reply | None:
    """Poll ``url`` until it answers ``wanted``; the last reply (None if never reachable)."""
    deadline = time.monotonic() + timeout
    last: Reply | None = None
    while True:
        try:
            last = await http("GET", url, timeout=2.0, **kwargs)
            if last.status == wanted:
                return last
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.1)


def worker_of(reply: Reply) -> str:
    """The worker that answered: X-Request-Id is ``<random per-worker-start prefix>-<counter>``."""
    request_id = reply.headers.get("x-request-id", "")
    prefix, sep, _counter = request_id.rpartition("-")
    if not sep:
        raise AssertionError(f"unexpected X-Request-Id {request_id!r}")
    return prefix
