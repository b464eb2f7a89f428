"""``jwtproxy demo``: runs from any directory on the config shipped in the package, writes
nothing into the current directory, starts the gateway only once its issuer serves keys, and
names a port it cannot have.

Each demo runs in a subprocess whose working directory is an empty folder of its own; its
stdout and stderr go to files *outside* that folder, so "the folder is still empty afterwards"
is exactly "the demo wrote nothing there".
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from daemon_harness import http, subprocess_env, wait_status
from helpers import free_port

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parent.parent / "jwtproxy" / "demo.toml"
DEFAULT_PORTS = (8080, 8081, 8082, 9901)
BANNER = re.compile(r"curl -s (http://127\.0\.0\.1:(\d+))/hello -H 'Authorization: Bearer ([\w.-]+)'")


class Demo:
    """``python -m jwtproxy demo [-c FILE]`` with ``cwd`` as its working directory."""

    def __init__(self, cwd: Path, logs: Path, config: Path | None = None) -> None:
        self.cwd, self.logs = cwd, logs
        args = [sys.executable, "-m", "jwtproxy", "demo"] + (["-c", str(config)] if config else [])
        with open(logs / "demo.stdout", "wb") as out, open(logs / "demo.stderr", "wb") as err:
            self.proc = subprocess.Popen(args, cwd=cwd, env=subprocess_env(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def stdout(self) -> str:
        return (self.logs / "demo.stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.logs / "demo.stderr").read_text(errors="replace")

    async def banner(self, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = BANNER.search(self.stdout())
            if match:
                return match
            assert self.proc.poll() is None, self.stdout() + self.stderr()
            assert time.monotonic() < deadline, self.stdout() + self.stderr()
            await asyncio.sleep(0.1)

    async def wait_exit(self, timeout: float = 20.0) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the demo's whole session (it was started in its own): supervisor, workers and
        the issuer/backend child, and nothing else."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cwd, logs = tmp_path / "cwd", tmp_path / "logs"
    cwd.mkdir()
    logs.mkdir()
    yield cwd, logs


def demo_config(tmp: Path, parser: str = "httptools") -> tuple[Path, dict[int, int]]:
    """The shipped demo config on free ports (written outside the demo's working directory)."""
    ports: dict[int, int] = {}
    while len(set(ports.values())) < len(DEFAULT_PORTS):
        ports = {old: free_port() for old in DEFAULT_PORTS}
    text = SHIPPED.read_text()
    for old, new in ports.items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    text = text.replace("workers = 1\n", f'workers = 1\nhttp_parser = "{parser}"\n', 1)
    path = tmp / "demo-on-free-ports.toml"
    path.write_text(text)
    return path, ports


def ports_free(ports: tuple[int, ...]) -> bool:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


async def exercise(demo: Demo, gateway_port: int, admin_port: int) -> None:
    """The printed curl commands work, the status page is up, Ctrl-C ends it cleanly."""
    match = await demo.banner()
    base, port, token = match.group(1), int(match.group(2)), match.group(3)
    assert port == gateway_port
    # The banner comes after READY: the first request already succeeds, no retry loop.
    reply = await http("GET", base + "/hello", token=token)
    assert reply.status == 200, (reply, demo.stderr()[-3000:])
    assert {k.lower(): v for k, v in reply.json()["headers"].items()}["x-user-id"] == "demo-user"
    assert (await http("GET", base + "/hello")).status == 401
    assert (await http("GET", base + "/public/x")).status == 200
    page = await wait_status(f"http://127.0.0.1:{admin_port}/", 200, timeout=5)
    assert page is not None and b"jwtproxy status" in page.body
    state_dir = re.search(r"state in (\S+)", demo.stdout())
    assert state_dir is not None and Path(state_dir.group(1)).is_dir()
    assert (Path(state_dir.group(1)) / "revocations.db").exists()
    # The gateway was started after its issuer served keys: no failed first fetch.
    assert "jwks_load_failed" not in demo.stderr()
    assert '"event":"jwks_keys_changed"' in demo.stderr()
    demo.proc.send_signal(signal.SIGINT)
    assert await demo.wait_exit() == 0, demo.stderr()[-3000:]
    assert not Path(state_dir.group(1)).exists()        # the temporary state is gone too


async def test_demo_from_an_empty_directory_on_the_shipped_config(dirs: tuple[Path, Path]) -> None:
    cwd, logs = dirs
    if not ports_free(DEFAULT_PORTS):
        # Something else has one of the demo's fixed ports: the demo must say which, and go.
        demo = Demo(cwd, logs)
        try:
            assert await demo.wait_exit() == 1
            assert re.search(r"demo: port (8080|8081|8082|9901) \(", demo.stderr()), demo.stderr()
        finally:
            demo.kill()
    else:
        demo = Demo(cwd, logs)
        try:
            await exercise(demo, 8080, 9901)
        finally:
            demo.kill()
    assert os.listdir(cwd) == []


async def test_demo_runs_and_leaves_the_directory_empty(dirs: tuple[Path, Path], parser: str) -> None:
    cwd, logs = dirs
    config, ports = demo_config(logs, parser)
    demo = Demo(cwd, logs, config)
    try:
        await exercise(demo, ports[8080], ports[9901])
    finally:
        demo.kill()
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("which, what", [(8080, "gateway listener"), (8081, "demo issuer"),
                                         (8082, "echo backend"), (9901, "admin listener")])
async def test_a_taken_port_is_named_and_nothing_starts(dirs: tuple[Path, Path], which: int, what: str) -> None:
    cwd, logs = dirs
    config, ports = demo_config(logs)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", ports[which]))
        squatter.listen()
        demo = Demo(cwd, logs, config)
        try:
            assert await demo.wait_exit() == 1
        finally:
            demo.kill()
    err = demo.stderr()
    assert f"demo: port {ports[which]} ({what}, 127.0.0.1:{ports[which]}) is not available" in err, err
    assert "Traceback" not in err
    assert "starting" not in err and demo.stdout() == ""   # no gateway, no banner
    assert os.listdir(cwd) == []
