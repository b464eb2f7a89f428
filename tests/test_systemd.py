"""sd_notify over a real AF_UNIX datagram socket, the watchdog, and the unit file."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest

from jwtproxy import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages(notify_socket: socket.socket) -> None:
    assert systemd.ready()
    assert recv(notify_socket) == "READY=1"
    assert systemd.stopping()
    assert recv(notify_socket) == "STOPPING=1"
    assert systemd.status("serving\nwith 2 workers")
    assert recv(notify_socket) == "STATUS=serving with 2 workers"
    assert systemd.watchdog_ping()
    assert recv(notify_socket) == "WATCHDOG=1"


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(notify_socket).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"jwtproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready()
        assert recv(sock) == "READY=1"


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False         # a vanished manager never raises


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))   # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "x")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert systemd.watchdog_interval() is None


def test_watchdog_loop_pings_only_while_healthy(notify_socket: socket.socket,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")     # ping every 10 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    healthy = [True]

    async def main() -> None:
        task = asyncio.create_task(systemd.watchdog_loop(lambda: healthy[0]))
        await asyncio.sleep(0.035)
        healthy[0] = False
        await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    notify_socket.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(recv(notify_socket))
        except BlockingIOError:
            break
    assert 2 <= len(pings) <= 5 and set(pings) == {"WATCHDOG=1"}


def test_unset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.setenv(name, "1")
    systemd.unset_environment()
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)


def unit_settings(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            assert key not in out, f"duplicate {key}"
            out[key] = value
    return out


def test_unit_file() -> None:
    text = systemd.unit_file("/usr/local/bin/jwtproxy", shutdown_timeout=30)
    s = unit_settings(text)
    expected = {
        "Type": "notify", "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/jwtproxy serve -c /etc/jwtproxy/jwtproxy.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure", "WatchdogSec": "30",
        "DynamicUser": "yes", "StateDirectory": "jwtproxy", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "LimitNOFILE": "65536",
        "KillSignal": "SIGTERM", "KillMode": "mixed",
    }
    for key, value in expected.items():
        assert s.get(key) == value, key
    # Drain (30) + supervisor SIGKILL margin (5) must fit before systemd's own SIGKILL.
    assert int(s["TimeoutStopSec"]) > 30 + systemd.STOP_MARGIN
    assert "/var/lib/jwtproxy/revocations.db" in text           # sqlite path hint
    assert "[Unit]" in text and "[Service]" in text and "[Install]" in text
    # No "Documentation=man:" line: jwtproxy ships no man page, and systemctl status would
    # point at one that does not exist.
    assert "Documentation" not in s


def test_unit_file_paths_and_timeout() -> None:
    s = unit_settings(systemd.unit_file("bin/jwtproxy", "/srv/gw.toml", shutdown_timeout=120.5))
    assert s["ExecStart"] == os.path.abspath("bin/jwtproxy") + " serve -c /srv/gw.toml"
    assert int(s["TimeoutStopSec"]) >= 126
