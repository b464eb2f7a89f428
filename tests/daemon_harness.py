"""The one harness for tests that run the real daemon (``python -m jwtproxy serve``, ``demo``) in
a subprocess: tests/test_daemon.py and tests/test_daemon_revocation.py.

Theory of operation: the daemon's workers are real gateway workers and its upstream is the echo
``Backend`` of tests/helpers.py (the ``backend`` fixture), which runs on the test's own event
loop. So every wait here is ``await``-ed: no call in this module blocks on the daemon, and the
backend keeps serving while a test waits for a worker, an exit or a response.

* ``toml_config``: the one config writer: one ``jwks_file`` issuer, routes ``/`` (auth) and
  ``/open`` (auth off) to the backend, a revocation section.
* ``Daemon``: one daemon, its config (from ``toml_config`` settings, or a file), stderr kept in a
  file. ``events()`` parses the JSON event lines of the current run; ``stop()`` then ``start()``
  restarts it on the same config and ports. ``admin()`` is a raw admin client (malformed and
  chunked bodies included), ``cli()`` runs ``jwtproxy ARGS -c <its config>``. ``kill()`` ends the
  supervisor and its workers by pid, never anything else: call it in a ``finally``.
* ``http()``: one aiohttp request, on a fresh connection unless given a session (so the kernel
  picks a worker); ``worker_of()`` names the worker from ``X-Request-Id``.
* ``Conn``: a raw keep-alive client connection that learns which worker accepted it (``ss -p``,
  else /proc): how a test proves that *every* worker answered (``conn_per_worker``,
  ``fresh_statuses``, ``until_status``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
from helpers import AUDIENCE, ISSUER, free_port, parse_responses

REPO_ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-secret-for-tests"

__all__ = [
    "ADMIN_TOKEN", "REPO_ROOT", "Conn", "Daemon", "Reply", "child_pids", "conn_per_worker", "free_port",
    "fresh_statuses", "http", "port_is_listening", "redis_section", "sqlite_section", "subprocess_env",
    "toml_config", "until_status", "wait_status", "worker_of",
]


def port_is_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def child_pids(pid: int) -> set[int]:
    """The live child processes of ``pid`` (a supervisor's workers, the demo's helpers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


# -- configuration ------------------------------------------------------------------------------


def redis_section(url: str) -> str:
    return f'backend = "redis"\nredis_url = "{url}"\n'


def sqlite_section(path: Path) -> str:
    return f'backend = "sqlite"\nsqlite_path = "{path}"\n'


def toml_config(
    *,
    listen_port: int,
    admin_port: int | None,
    backend_port: int,
    jwks_file: str,
    tmp: Path,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    workers: int = 1,
    parser: str = "httptools",
    shutdown_timeout: float = 3.0,
    admin_token: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    access_log: bool = False,
    extra_routes: str = "",
    revocation: str | None = None,
    backend_scheme: str = "http",
    upstream_extra: str = "",
    extra_sections: str = "",
) -> str:
    """A complete ``jwtproxy.toml``: one jwks_file issuer, routes ``/`` (auth) and ``/open``;
    ``revocation`` is the ``[revocation]`` section's body (default: sqlite in ``tmp``);
    ``upstream_extra`` more lines of ``[upstream.backend]`` (e.g. ``ca_file``), ``extra_sections``
    whole sections appended (e.g. ``[assertion]``)."""
    admin = f"127.0.0.1:{admin_port}" if admin_port else ""
    if revocation is None:
        revocation = sqlite_section(tmp / "revocations.db")
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
targets = ["{backend_scheme}://127.0.0.1:{backend_port}"]
connect_timeout = 2
response_timeout = 10
{upstream_extra}
[revocation]
{revocation}
{extra_sections}
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would change the daemon's behaviour."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                 "JWTPROXY_CONFIG", "JWTPROXY_LAST_GOOD_KEYS_DIR"):
        env.pop(name, None)
    env.update(extra)
    return env


# -- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """``python -m jwtproxy <command> -c FILE`` in a subprocess; stderr and stdout go to files.

    Built from ``settings`` (the keyword arguments of ``toml_config``; then ``port``,
    ``admin_port``, ``url()`` and ``rewrite()`` work) or from an existing ``config_path``.
    Started at once unless ``start=False``.
    """

    def __init__(self, tmp: Path, settings: dict[str, Any] | None = None, *, config_path: Path | None = None,
                 command: str = "serve", env: dict[str, str] | None = None, name: str = "daemon",
                 start: bool = True, open_files: int | None = None) -> None:
        self.tmp = tmp
        self.name = name
        self.command = command
        self.env = env or {}
        self.settings: dict[str, Any] = dict(settings or {})
        if config_path is None:
            assert settings is not None, "settings or config_path"
            config_path = tmp / f"{name}.toml"
            config_path.write_text(toml_config(**self.settings))
        self.config_path = config_path
        self.port: int = int(self.settings.get("listen_port", 0))
        self.admin_port: int = int(self.settings.get("admin_port") or 0)
        self.admin_token: str = self.settings.get("admin_token", "")
        self.workers: int = int(self.settings.get("workers", 1))
        self.scheme = "https" if self.settings.get("tls_cert") else "http"
        self.stderr_path = tmp / f"{name}.stderr"
        self.stdout_path = tmp / f"{name}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._run_offset = 0  # where this run's lines start in stderr_path
        self.open_files = open_files  # RLIMIT_NOFILE (soft and hard) of the daemon, if given
        if start:
            self.start()

    def start(self) -> Daemon:
        """Start (or, after ``stop()``, restart) the daemon; its stderr is appended to."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running")
        self.runs += 1
        with open(self.stderr_path, "ab") as stderr, open(self.stdout_path, "ab") as stdout:
            self._run_offset = stderr.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jwtproxy", self.command, "-c", str(self.config_path)],
                cwd=self.tmp, env=subprocess_env(**self.env), stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL, preexec_fn=self._limit_open_files if self.open_files else None,
            )
        return self

    def _limit_open_files(self) -> None:
        import resource

        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    @property
    def running(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, f"{self.name} never started"
        return self.proc

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def rewrite(self, **changes: Any) -> None:
        """Write a new config file (same ports) for the next SIGHUP or start."""
        self.settings.update(changes)
        self.config_path.write_text(toml_config(**self.settings))

    # -- logs -------------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the daemon wrote on stderr, every run."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON event lines of the current run (all of them, or those named ``name``)."""
        with open(self.stderr_path, "rb") as f:
            f.seek(self._run_offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
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
            if self.running.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {count} x {name!r} event (exit={self.running.poll()}); "
                    f"log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, timeout: float = 20.0) -> Daemon:
        """Until the supervisor announced READY (every first-generation worker serving) and, with
        an admin listener, ``/readyz`` answers 200."""
        deadline = time.monotonic() + timeout
        await self.wait_event("ready", timeout=timeout)
        while self.admin_port:
            status, body = await self.admin("GET", "/readyz")
            if status == 200:
                break
            if self.running.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: /readyz {status} {body}; log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)
        return self

    def started_pids(self) -> set[int]:
        return {e["pid"] for e in self.events("worker_started")}

    def live_worker_pids(self) -> set[int]:
        """Workers started and not yet reported as exited (from the event log)."""
        gone = {e["pid"] for e in self.events() if e.get("event") in ("worker_died", "worker_stopped")}
        return self.started_pids() - gone

    def worker_pids(self) -> list[int]:
        """The supervisor's live child processes, as the OS sees them (sorted)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return sorted(child_pids(self.proc.pid))

    # -- signals / lifetime -------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.running.send_signal(sig)

    async def wait_exit(self, timeout: float = 15.0) -> int | None:
        """The exit code, or None if still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.running.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.running.poll()

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: the exit code (None if it did not exit)."""
        if self.running.poll() is None:
            self.signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL whatever is left of this daemon: its workers (logged or still its children),
        then itself."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for pid in self.started_pids() | child_pids(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    # -- admin API and command line ---------------------------------------------------------------

    async def admin(self, method: str, path: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None, *, token: str | None = None,
                    chunked: bool = False) -> tuple[int, Any]:
        """One admin request over a raw connection; (status, parsed JSON or raw bytes).

        ``token`` None = the daemon's admin token (if any); "" = no Authorization header.
        Status 0 = no answer (connection refused / reset)."""
        token = self.admin_token if token is None else token
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.admin_port}", "Connection: close"]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        payload = b""
        if body is not None:
            lines.append("Content-Type: application/json")
            if chunked:
                lines.append("Transfer-Encoding: chunked")
                payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            else:
                lines.append(f"Content-Length: {len(body)}")
                payload = body
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.admin_port), 5)
        except (OSError, asyncio.TimeoutError):
            return 0, None
        data = b""
        try:
            writer.write(raw)
            try:
                await writer.drain()
            except OSError:
                pass  # the server may answer (413) and close before reading everything
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
                except (OSError, asyncio.TimeoutError):
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            writer.close()
        if not data:
            return 0, None
        status, _headers, content = parse_responses(data, strict=False)[0]
        try:
            return status, json.loads(content)
        except ValueError:
            return status, content

    async def cli(self, *args: str, config: Path | None = None) -> tuple[int, str, str]:
        """``python -m jwtproxy ARGS -c <this daemon's config>``; (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jwtproxy", *args, "-c", str(config or self.config_path),
            cwd=self.tmp, env=subprocess_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


# -- traffic through aiohttp ----------------------------------------------------------------------


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


# -- traffic on raw connections that know their worker --------------------------------------------


class Conn:
    """A raw keep-alive HTTP/1.1 client connection to a daemon's traffic port."""

    def __init__(self, daemon: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.client_port = int(writer.get_extra_info("sockname")[1])
        self.pid: int | None = None

    @classmethod
    async def open(cls, daemon: Daemon) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        return cls(daemon, reader, writer)

    async def get(self, token: str | None, path: str = "/echo", timeout: float = 5.0) -> int:
        """One request; the response status. Learns the serving worker's pid on first use.

        A 401 that is not ``token revoked`` fails the test at once."""
        head = f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n"
        if token is not None:
            head += f"Authorization: Bearer {token}\r\n"
        self.writer.write((head + "\r\n").encode())
        await self.writer.drain()
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            responses = parse_responses(data, strict=False) if data else []
            if responses:
                status = responses[0][0]
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no response from {self.daemon.name} within {timeout} s")
            chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not chunk:
                raise AssertionError(f"{self.daemon.name} closed the connection")
            data += chunk
        if self.pid is None:
            self.pid = server_pid(self.daemon, self.client_port)
        if status == 401:
            # Only a 401 *for revocation* counts as one: any other 401 (bad key, expired, ...)
            # must not pass a test as "revoked".
            www = responses[0][1].get("www-authenticate", "")
            if 'error_description="token revoked"' not in www:
                raise AssertionError(f"{self.daemon.name} worker {self.pid}: 401 not for revocation: {www}")
        return status

    def close(self) -> None:
        # RST instead of FIN: no TIME_WAIT entry per test connection piling up on the host.
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.writer.close()


def _server_socket_inode(listen_port: int, client_port: int) -> int | None:
    want_local = f":{listen_port:04X}"
    want_remote = f":{client_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(want_local) and fields[2].endswith(want_remote):
                return int(fields[9])
    return None


SS = shutil.which("ss")


def server_pid(daemon: Daemon, client_port: int) -> int | None:
    """Which worker of ``daemon`` owns the accepted end of the client connection on ``client_port``."""
    if SS is not None:
        # Filtered in the kernel (sock_diag): stays fast however many TIME_WAIT sockets the
        # host has, unlike reading all of /proc/net/tcp.
        out = subprocess.run(
            [SS, "-tnpH", "state", "established",
             f"( sport = :{daemon.port} and dport = :{client_port} )"],
            capture_output=True, text=True).stdout
        pids = {int(m) for m in re.findall(r"pid=(\d+)", out)}
        if len(pids) == 1:
            return pids.pop()
    inode = _server_socket_inode(daemon.port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in daemon.worker_pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


async def conn_per_worker(daemon: Daemon, token: str, *, want: int = 200,
                          max_tries: int = 400) -> dict[int, Conn]:
    """One kept-alive connection per worker, each having sent ``token`` once and got ``want``
    (200: the token is now in that worker's cache)."""
    pids = set(daemon.worker_pids())
    found: dict[int, Conn] = {}
    spare: list[Conn] = []
    try:
        for _ in range(max_tries):
            conn = await Conn.open(daemon)
            status = await conn.get(token)
            if status != want:
                conn.close()
                raise AssertionError(f"{daemon.name} worker {conn.pid}: {status}, wanted {want}")
            if conn.pid in pids and conn.pid not in found:
                found[conn.pid] = conn
                if set(found) == pids:
                    return found
            else:
                spare.append(conn)  # kept open so the next accept may go elsewhere
        raise AssertionError(f"{daemon.name}: reached workers {sorted(found)} of {sorted(pids)}")
    finally:
        for conn in spare:
            conn.close()


async def fresh_statuses(daemon: Daemon, token: str | None, per_worker: int = 3,
                         max_tries: int = 400) -> dict[int, list[int]]:
    """Requests over fresh connections until every worker answered ``per_worker`` of them."""
    pids = set(daemon.worker_pids())
    seen: dict[int, list[int]] = {pid: [] for pid in pids}
    open_conns: list[Conn] = []
    try:
        for _ in range(max_tries):
            conn = await Conn.open(daemon)
            status = await conn.get(token)
            if conn.pid in seen:
                seen[conn.pid].append(status)
            open_conns.append(conn)
            if len(open_conns) > 8:  # a few held open spread the accepts over the workers
                open_conns.pop(0).close()
            if all(len(v) >= per_worker for v in seen.values()):
                return seen
        raise AssertionError(f"{daemon.name}: fresh connections reached {seen}")
    finally:
        for conn in open_conns:
            conn.close()


async def until_status(conn: Conn, token: str, want: int, t0: float, timeout: float = 5.0) -> float:
    """Re-send ``token`` on ``conn`` until it answers ``want``; seconds since ``t0`` (perf_counter)."""
    while True:
        status = await conn.get(token)
        now = time.perf_counter()
        if status == want:
            return now - t0
        if now - t0 > timeout:
            raise AssertionError(
                f"{conn.daemon.name} worker {conn.pid}: still {status} after {timeout} s (wanted {want})")
        await asyncio.sleep(0.002)


class DaemonStarter:
    """Starts daemons of the test issuer on fresh ports in front of ``backend_port`` (a test
    fixture yields one and calls :meth:`kill_all` after the test); ``defaults`` are settings of
    every daemon it starts, a call's own settings override them."""

    def __init__(self, tmp: Path, backend_port: int, jwks_path: str, **defaults: Any) -> None:
        self.tmp = tmp
        self.defaults: dict[str, Any] = dict(backend_port=backend_port, jwks_file=jwks_path, tmp=tmp,
                                             issuer=ISSUER, audience=AUDIENCE, **defaults)
        self.started: list[Daemon] = []

    async def __call__(self, *, wait: bool = True, env: dict[str, str] | None = None,
                       open_files: int | None = None, **settings: Any) -> Daemon:
        full: dict[str, Any] = dict(listen_port=free_port(), admin_port=free_port(), **self.defaults)
        full.update(settings)
        daemon = Daemon(self.tmp, full, env=env, name=f"daemon{len(self.started)}", open_files=open_files)
        self.started.append(daemon)
        if wait:
            await daemon.wait_ready()
        return daemon

    def kill_all(self) -> None:
        for daemon in self.started:
            daemon.kill()
