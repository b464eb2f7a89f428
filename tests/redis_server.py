"""A real, throwaway ``redis-server`` for tests.

``RedisServer`` starts ``redis-server`` on a free 127.0.0.1 port in its own temp directory with
persistence off (``--save "" --appendonly no``), so ``restart()`` brings it back on the same port
*empty* -- exactly a production Redis restarted without persistence. ``stop()`` kills it (SIGKILL:
clients see the connection drop at once, as on a crash).

Use the ``redis_server`` fixture (function scope) or the ``require_redis_server`` skip helper:
tests skip with a clear reason when ``redis-server`` is not on PATH.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server not found on PATH (install the redis-server package to run these tests)"


def require_redis_server() -> str:
    """Path of redis-server, or skip the calling test."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    return REDIS_SERVER


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``url`` stays valid across ``stop()`` / ``restart()``."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="jwtproxy-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> RedisServer:
        """Start (empty) and wait until it accepts connections."""
        if self.proc is not None:
            raise RuntimeError("redis-server already running")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "no",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if self._ping():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (its data is gone: no persistence)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port, empty."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (skips if redis-server is not installed)."""
    server = RedisServer(require_redis_server()).start()
    try:
        yield server
    finally:
        server.cleanup()

