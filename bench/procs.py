"""Processes the bench starts: spawn pinned to a core, wait until they answer, measure their RSS,
and always stop them.

Theory of operation: every process is started in its own session (``start_new_session``), so
its pid is also the id of its process group and of its session; stopping it signals that group
(SIGTERM, then SIGKILL after a grace period), which also ends any workers it forked. The
`Processes` registry remembers each one it started and `stop_all` runs on every exit path
(normal end, exception, Ctrl-C, SIGTERM), so a run never leaves a proxy or an upstream behind.
Nothing here ever signals a process it did not start.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence


def can_pin() -> bool:
    """True when taskset exists and the machine has at least two CPUs to split."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


@dataclass
class Proc:
    """A started process (the leader of its own process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines this start of the process wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        text = text.rsplit("\n=== ", 1)[-1]
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Registry of everything the bench started; see the module docstring."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self.running: list[Proc] = []

    def spawn(self, name: str, argv: Sequence[str], cpu: int | None, *,
              env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Proc:
        """Start argv (pinned to `cpu` with taskset when pinning is on), output to a log file."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log_path = self.logdir / f"{name}.log"
        cmd = list(argv)
        if self.pin and cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        # Appended: a peer is started once per measurement, and every start's log is kept.
        with log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=cwd, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds, reap the leader."""
        if proc in self.running:
            self.running.remove(proc)
        if proc.popen.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=grace)
        # Workers of a supervisor may outlive their leader for a moment: end the group for sure.
        if _group_alive(proc.pid):
            deadline = time.monotonic() + grace
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop everything still running, newest first (proxies before their upstream)."""
        for proc in reversed(list(self.running)):
            try:
                self.stop(proc)
            except (OSError, subprocess.SubprocessError):
                pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_port(proc: Proc, port: int, timeout: float, probe: Callable[[], bool] | None = None) -> None:
    """Wait until 127.0.0.1:port accepts connections (and `probe()` is true, if given).

    Raises RuntimeError with the process log tail if it exits or does not come up in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode}:\n"
                               f"{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            if probe is None or probe():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not answer on port {port} within {timeout:.0f}s:\n"
                               f"{proc.log_tail()}")
        time.sleep(0.05)


def port_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return False
    except OSError:
        return True


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """The pid `root`, every descendant, and every process of its session."""
    children: dict[int, list[int]] = {}
    session: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        ppid, sid = int(fields[1]), int(fields[3])
        children.setdefault(ppid, []).append(int(entry))
        if sid == root:
            session.append(int(entry))
    found: set[int] = set()
    stack = [root, *session]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return sorted(found)


def rss_bytes(root: int) -> int:
    """Resident set size of `root` and its process tree (sum of VmRSS), in bytes.

    taskset execs the real program, so the pinned process keeps the pid we started.
    """
    total = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total
