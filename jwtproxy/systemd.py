"""systemd integration: sd_notify(3) messages, the watchdog, and a hardened unit file.

Theory of operation
-------------------
* ``notify()`` sends one datagram to ``$NOTIFY_SOCKET`` (an AF_UNIX SOCK_DGRAM path, or an
  abstract name written with a leading ``@``). Without ``$NOTIFY_SOCKET`` every helper is a
  no-op, so the daemon runs the same under a terminal, a container or systemd.
* Only the supervisor (the unit's main PID; ``NotifyAccess=main``) talks to systemd. Workers
  get the variables removed from their environment (``unset_environment()``) so that code
  running in a worker can never send ``READY=1`` on the supervisor's behalf.
* The watchdog pings at half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)), only if
  ``$WATCHDOG_PID`` is unset or names this process, and only while the caller says it is
  healthy: a hung supervisor, or one whose workers all fail, stops pinging and systemd
  restarts it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import sysconfig
import time
from typing import Callable, Sequence

__all__ = [
    "notify",
    "ready",
    "reloading",
    "stopping",
    "status",
    "watchdog_ping",
    "watchdog_interval",
    "watchdog_loop",
    "unset_environment",
    "unit_file",
    "installed_command",
]


def notify(message: str) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``. Returns False if unset or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path[0] == "@":
        address = "\0" + path[1:]          # Linux abstract namespace
    elif path[0] == "/":
        address = path
    else:
        return False                        # vsock and other forms: unsupported, ignore
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            # Non-blocking: this runs on the supervisor's event loop, and a receiver whose queue
            # is full (net.unix.max_dgram_qlen) must cost a lost notification, never a hang.
            sock.send(message.encode("utf-8"))
    except OSError:
        # The service manager going away must not take the daemon down with it.
        return False
    return True


def ready() -> bool:
    """``READY=1``: startup (or a reload) finished, the daemon serves."""
    return notify("READY=1")


def reloading() -> bool:
    """``RELOADING=1`` with the CLOCK_MONOTONIC timestamp systemd >= 253 requires."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """``STOPPING=1``: shutdown began."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """``STATUS=<text>`` shown by ``systemctl status`` (one line)."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog_ping() -> bool:
    """``WATCHDOG=1``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None if disabled."""
    raw = os.environ.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


async def watchdog_loop(healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping the watchdog every ``watchdog_interval()`` while ``healthy()``; returns at once
    when the watchdog is disabled. Cancel the task to stop it."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            watchdog_ping()
        await asyncio.sleep(interval)


def unset_environment() -> None:
    """Remove the sd_notify variables (for worker processes; see module docstring)."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)


#: Seconds the supervisor waits past ``shutdown_timeout`` before SIGKILLing workers.
STOP_MARGIN = 5.0


def installed_command() -> list[str]:
    """How to start *this* installation's jwtproxy, for ``ExecStart``.

    The console script pip installed beside this package: in the install scheme's scripts
    directory or next to the running interpreter (a virtualenv's ``bin/``). Never a lookup on
    ``PATH``, which may name another installation (a pyenv shim, an older system copy). Without
    such a script (a source checkout) it is the running interpreter with ``-m jwtproxy``.
    """
    for directory in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        script = os.path.join(directory, "jwtproxy")
        if os.path.isfile(script) and os.access(script, os.X_OK):
            return [os.path.abspath(script)]
    return [os.path.abspath(sys.executable), "-m", "jwtproxy"]


def _exec_word(word: str) -> str:
    """One word of an ``ExecStart`` line, as systemd.service(5) reads it back: ``%`` starts a
    specifier and ``$`` a variable (both doubled), whitespace splits (double-quoted)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_file(
    executable: str | Sequence[str],
    config_path: str = "/etc/jwtproxy/jwtproxy.toml",
    *,
    shutdown_timeout: float = 30.0,
) -> str:
    """A hardened ``Type=notify`` unit running ``<executable> serve -c <config_path>``.

    ``executable`` is a path or a command (``installed_command()``); its first word is made
    absolute (systemd requires it). ``TimeoutStopSec`` covers the drain (``shutdown_timeout``)
    plus the supervisor's SIGKILL margin plus slack, so systemd never kills a process that is
    still draining on schedule.
    """
    words = [executable] if isinstance(executable, str) else list(executable)
    words[0] = os.path.abspath(words[0])
    exe = " ".join(_exec_word(w) for w in words)
    stop = int(shutdown_timeout + STOP_MARGIN + 5 + 0.999)
    return f"""\
# jwtproxy: JWT-validating API gateway.
# Install: save as /etc/systemd/system/jwtproxy.service, then
#   systemctl daemon-reload && systemctl enable --now jwtproxy
# Reload the configuration without dropping a request: systemctl reload jwtproxy
[Unit]
Description=jwtproxy JWT-validating API gateway
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} serve -c {_exec_word(config_path)}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=1
WatchdogSec=30
# SIGTERM goes to the supervisor only; it drains its workers itself. Whatever is left when
# TimeoutStopSec runs out is SIGKILLed by systemd.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop}
# /metrics aggregates the workers' counters through files in this private tmpfs.
Environment=PROMETHEUS_MULTIPROC_DIR=/run/jwtproxy/metrics
RuntimeDirectory=jwtproxy jwtproxy/metrics
RuntimeDirectoryMode=0700

# Identity and state: a transient user; /var/lib/jwtproxy is its only writable place.
# Put the revocation database there:  [revocation] sqlite_path = "/var/lib/jwtproxy/revocations.db"
DynamicUser=yes
StateDirectory=jwtproxy
StateDirectoryMode=0700
UMask=0077

# Binding ports below 1024 is the only privilege kept.
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes

# Sandbox. MemoryDenyWriteExecute is safe: CPython 3.11 has no JIT; uvloop, httptools,
# aiohttp, ssl, sqlite3 and cryptography (RSA/EC/Ed25519 sign+verify) were run under the
# kernel's equivalent (prctl PR_SET_MDWE) and need no writable+executable pages. Only cffi
# ABI-mode ffi.callback() would fail there, and nothing in jwtproxy uses it.
ProtectSystem=strict
# Hides /home, /root and /run/user: ExecStart must not point there (a virtualenv or a
# "pip install --user" in a home directory fails with status=203/EXEC); install under /opt.
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""
