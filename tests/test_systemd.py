"""sd_notify over a real AF_UNIX datagram socket, the watchdog, and the unit file."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
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


# ---------------------------------------------------------------------------------------------
# `jwtproxy systemd-unit`: this installation's own executable, and a unit systemd accepts


def cli_unit(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    repo = str(Path(__file__).resolve().parent.parent)
    full_env = dict(os.environ, PYTHONPATH=repo, **(env or {}))
    result = subprocess.run([sys.executable, "-m", "jwtproxy", "systemd-unit", *args], env=full_env, cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_exec_start_is_this_installation_not_the_first_on_path(tmp_path: Path) -> None:
    impostor = tmp_path / "bin" / "jwtproxy"
    impostor.parent.mkdir()
    impostor.write_text("#!/bin/sh\necho impostor\n")
    impostor.chmod(0o755)
    unit = cli_unit(env={"PATH": f"{impostor.parent}:{os.environ['PATH']}"}, cwd=tmp_path)
    exec_start = unit_settings(unit)["ExecStart"]
    assert str(impostor) not in exec_start
    expected = systemd.installed_command()
    assert exec_start == " ".join(expected) + " serve -c /etc/jwtproxy/jwtproxy.toml"
    # Either the console script beside this interpreter or this interpreter itself.
    assert (expected[0].startswith(os.path.dirname(sys.executable)) or expected[0].startswith(
        sysconfig.get_path("scripts"))) or expected == [os.path.abspath(sys.executable), "-m", "jwtproxy"]


def test_installed_command_prefers_the_script_beside_the_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text("")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path / "nowhere"))
    assert systemd.installed_command() == [str(python), "-m", "jwtproxy"]    # no script yet
    script = venv_bin / "jwtproxy"
    script.write_text("#!/bin/sh\n")
    assert systemd.installed_command() == [str(python), "-m", "jwtproxy"]    # not executable
    script.chmod(0o755)
    assert systemd.installed_command() == [str(script)]


def test_exec_start_words_are_quoted_for_systemd() -> None:
    s = unit_settings(systemd.unit_file(["/usr/bin/python3", "-m", "jwtproxy"], "/etc/gw 1/100%$x.toml"))
    assert s["ExecStart"] == '/usr/bin/python3 -m jwtproxy serve -c "/etc/gw 1/100%%$$x.toml"'


def test_warns_when_exec_start_is_hidden_by_protect_home(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from jwtproxy import cli
    monkeypatch.setattr(os.path, "realpath", lambda p: "/usr/bin/python3.11")
    monkeypatch.setattr(systemd, "installed_command", lambda: ["/home/ann/venv/bin/jwtproxy"])
    assert cli.main(["systemd-unit"]) == 0
    out, err = capsys.readouterr()
    assert "ExecStart=/home/ann/venv/bin/jwtproxy serve" in out
    assert "ExecStart /home/ann/venv/bin/jwtproxy is under /home/" in err and "ProtectHome=yes hides" in err
    monkeypatch.setattr(systemd, "installed_command", lambda: ["/opt/jwtproxy/bin/jwtproxy"])
    assert cli.main(["systemd-unit"]) == 0
    assert capsys.readouterr().err == ""
    # A virtualenv under /opt whose python is a symlink to an interpreter under /root (pyenv).
    monkeypatch.setattr(os.path, "realpath", lambda p: "/root/.pyenv/versions/3.11.7/bin/python3.11")
    assert cli.main(["systemd-unit"]) == 0
    assert "its Python /root/.pyenv/versions/3.11.7/bin/python3.11 is under /root/" in capsys.readouterr().err


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
def test_generated_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "jwtproxy.service"
    unit.write_text(cli_unit(cwd=tmp_path))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
def test_verify_reads_a_quoted_exec_start_back(tmp_path: Path) -> None:
    # An executable under a directory with a space and a '%': verify fails ("not executable")
    # unless systemd splits and unescapes the ExecStart line back into this exact path.
    odd = tmp_path / "a dir 100%" / "jwtproxy"
    odd.parent.mkdir()
    odd.write_text("#!/bin/sh\n")
    odd.chmod(0o755)
    unit = tmp_path / "jwtproxy.service"
    unit.write_text(systemd.unit_file([str(odd)], "/etc/jwtproxy/jwtproxy.toml"))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = tmp_path / "jwtproxy-missing.service"
    missing.write_text(systemd.unit_file([str(tmp_path / "nope" / "jwtproxy")]))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", str(missing)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "jwtproxy" in result.stdout + result.stderr   # the check can fail
