"""Machinery for tests that drive real ``python -m jwtproxy serve`` daemons (used only by
tests/test_daemon_revocation.py).

* ``ThreadBackend``: the aiohttp echo ``Backend`` of tests/helpers.py on its own thread and event
  loop, so a test may block (``subprocess.run``, ``proc.wait``) without starving the upstream.
* ``Node``: one daemon (supervisor + workers + admin listener) on free loopback ports, its config
  written into a temp dir, stderr kept in a file for failure messages. ``kill()`` ends the
  supervisor and its workers by pid.
* ``Conn``: a raw HTTP/1.1 keep-alive client connection. ``server_pid()`` tells which worker
  accepted it: the server-side socket's inode is looked up in /proc/net/tcp, then among the
  workers' file descriptors. That is how a test proves that *every* worker answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from helpers import Backend, parse_responses

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "admin-secret-for-tests"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadBackend:
    """``helpers.Backend`` served from a private thread + event loop."""

    def __init__(self) -> None:
        self.backend = Backend()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="echo-backend", daemon=True)

    @property
    def port(self) -> int:
        return self.backend.port

    def start(self) -> ThreadBackend:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.backend.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.backend.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def node_config(tmp: Path, *, listen_port: int, admin_port: int, backend_port: int, jwks_file: str,
                revocation: str, admin_token: str = "", workers: int = 2) -> str:
    """A daemon config: one jwks_file issuer, one route ``/`` to the echo backend."""
    return f"""
[server]
listen = ["127.0.0.1:{listen_port}"]
workers = {workers}
access_log = false
shutdown_timeout = 1
keepalive_timeout = 60

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{admin_token}"

[[issuer]]
name = "test"
issuer = "https://idp.test"
jwks_file = "{jwks_file}"
audiences = ["api"]

[[route]]
path_prefix = "/"
upstream = "backend"

[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]

[revocation]
{revocation}
"""


def redis_section(url: str) -> str:
    return f'backend = "redis"\nredis_url = "{url}"\n'


def sqlite_section(path: Path) -> str:
    return f'backend = "sqlite"\nsqlite_path = "{path}"\n'


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("PROMETHEUS_MULTIPROC_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "JWTPROXY_CONFIG"):
        env.pop(name, None)
    return env


class Node:
    """One ``python -m jwtproxy serve -c FILE`` daemon."""

    def __init__(self, tmp: Path, name: str, *, backend_port: int, jwks_file: str, revocation: str,
                 admin_token: str = "", workers: int = 2) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.listen_port = free_port()
        self.admin_port = free_port()
        self.admin_token = admin_token
        self.workers = workers
        self.config_path = self.dir / "jwtproxy.toml"
        self.config_path.write_text(node_config(
            self.dir, listen_port=self.listen_port, admin_port=self.admin_port,
            backend_port=backend_port, jwks_file=jwks_file, revocation=revocation,
            admin_token=admin_token, workers=workers))
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Node:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running")
        self.runs += 1
        with open(self.log_path, "ab") as stderr:
            stderr.write(f"---- run {self.runs} ----\n".encode())
            stderr.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jwtproxy", "serve", "-c", str(self.config_path)],
                cwd=self.dir, env=_child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr)
        return self

    async def wait_ready(self, timeout: float = 20.0) -> Node:
        """Until /readyz says 200 and every worker is forked."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited at start:\n{self.log()}")
            status, _ = await self.admin("GET", "/readyz")
            if status == 200 and len(self.worker_pids()) == self.workers:
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return sorted(int(pid) for pid in out.split())

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; the exit code (None if it did not exit)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """The daemon and its workers, by pid (after a failed test)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # -- admin API --------------------------------------------------------------------------

    async def admin(self, method: str, path: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None, *, token: str | None = None,
                    chunked: bool = False) -> tuple[int, Any]:
        """One admin request over a raw connection; (status, parsed JSON or raw bytes).

        ``token`` None = the node's admin token (if any); "" = no Authorization header.
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
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.admin_port), 5)
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
        """``python -m jwtproxy ARGS -c <this node's config>``; (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jwtproxy", *args, "-c", str(config or self.config_path),
            cwd=self.dir, env=_child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


# -- traffic ----------------------------------------------------------------------------------


class Conn:
    """A raw keep-alive HTTP/1.1 client connection to a node's traffic port."""

    def __init__(self, node: Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.node = node
        self.reader = reader
        self.writer = writer
        self.client_port = int(writer.get_extra_info("sockname")[1])
        self.pid: int | None = None

    @classmethod
    async def open(cls, node: Node) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.listen_port)
        return cls(node, reader, writer)

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
                raise AssertionError(f"no response from {self.node.name} within {timeout} s")
            chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not chunk:
                raise AssertionError(f"{self.node.name} closed the connection")
            data += chunk
        if self.pid is None:
            self.pid = server_pid(self.node, self.client_port)
        if status == 401:
            # Only a 401 *for revocation* counts as one: any other 401 (bad key, expired, ...)
            # must not pass a test as "revoked".
            www = responses[0][1].get("www-authenticate", "")
            if 'error_description="token revoked"' not in www:
                raise AssertionError(f"{self.node.name} worker {self.pid}: 401 not for revocation: {www}")
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


def server_pid(node: Node, client_port: int) -> int | None:
    """Which worker of ``node`` owns the accepted end of the client connection on ``client_port``."""
    if SS is not None:
        # Filtered in the kernel (sock_diag): stays fast however many TIME_WAIT sockets the
        # host has, unlike reading all of /proc/net/tcp.
        out = subprocess.run(
            [SS, "-tnpH", "state", "established",
             f"( sport = :{node.listen_port} and dport = :{client_port} )"],
            capture_output=True, text=True).stdout
        pids = {int(m) for m in re.findall(r"pid=(\d+)", out)}
        if len(pids) == 1:
            return pids.pop()
    inode = _server_socket_inode(node.listen_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in node.worker_pids():
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


async def conn_per_worker(node: Node, token: str, *, want: int = 200,
                          max_tries: int = 400) -> dict[int, Conn]:
    """One kept-alive connection per worker, each having sent ``token`` once and got ``want``
    (200: the token is now in that worker's cache)."""
    pids = set(node.worker_pids())
    found: dict[int, Conn] = {}
    spare: list[Conn] = []
    try:
        for _ in range(max_tries):
            conn = await Conn.open(node)
            status = await conn.get(token)
            if status != want:
                conn.close()
                raise AssertionError(f"{node.name} worker {conn.pid}: {status}, wanted {want}")
            if conn.pid in pids and conn.pid not in found:
                found[conn.pid] = conn
                if set(found) == pids:
                    return found
            else:
                spare.append(conn)  # kept open so the next accept may go elsewhere
        raise AssertionError(f"{node.name}: reached workers {sorted(found)} of {sorted(pids)}")
    finally:
        for conn in spare:
            conn.close()


async def fresh_statuses(node: Node, token: str | None, per_worker: int = 3,
                         max_tries: int = 400) -> dict[int, list[int]]:
    """Requests over fresh connections until every worker answered ``per_worker`` of them."""
    pids = set(node.worker_pids())
    seen: dict[int, list[int]] = {pid: [] for pid in pids}
    open_conns: list[Conn] = []
    try:
        for _ in range(max_tries):
            conn = await Conn.open(node)
            status = await conn.get(token)
            if conn.pid in seen:
                seen[conn.pid].append(status)
            open_conns.append(conn)
            if len(open_conns) > 8:  # a few held open spread the accepts over the workers
                open_conns.pop(0).close()
            if all(len(v) >= per_worker for v in seen.values()):
                return seen
        raise AssertionError(f"{node.name}: fresh connections reached {seen}")
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
                f"{conn.node.name} worker {conn.pid}: still {status} after {timeout} s (wanted {want})")
        await asyncio.sleep(0.002)
