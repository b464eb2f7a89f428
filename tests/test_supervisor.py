"""Supervisor tests: real processes, real sockets, a fake worker target.

Each test runs the supervisor in a subprocess (``python tests/test_supervisor.py CONFIG``):
it forks, installs signal handlers and calls ``os._exit`` in its children, none of which
belongs in the pytest process. The fake worker serves a constant HTTP response naming its
PID and config tag on the inherited sockets; the test learns readiness from a real
NOTIFY_SOCKET, exactly as systemd would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jwtproxy.config import (  # noqa: E402
    AdminConfig, Config, ConfigError, IssuerConfig, ListenAddr, RevocationConfig, ServerConfig,
)
from jwtproxy.supervisor import bind_listener  # noqa: E402
from jwtproxy.workerlink import WorkerControl, WorkerInheritance  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Harness (runs in the subprocess)


def load_test_config(path: str) -> Config:
    data = json.loads(Path(path).read_text())
    if data.get("bad"):
        raise ConfigError([f"{path}: server.workers: must be an integer >= 1",
                           f"{path}: route[0].upstream: unknown upstream 'pay'"])
    return Config(
        path=data["tag"],   # the fake worker echoes it: tells the generations apart
        server=ServerConfig(listen=tuple(ListenAddr("127.0.0.1", p) for p in data["ports"]),
                            workers=data["workers"], shutdown_timeout=data.get("shutdown", 3.0)),
        admin=AdminConfig(listen=ListenAddr("127.0.0.1", data["admin_port"]), token=""),
        issuers=(IssuerConfig(name="corp", issuer="https://idp.example"),),
        revocation=RevocationConfig(sqlite_path=data["db"]),
    )


def _inherited(inheritance: WorkerInheritance) -> dict[str, Any]:
    """What this worker got besides config and sockets, as the fake worker shows it."""
    keys_dir = inheritance.last_good_keys_dir
    return {
        "keys_dir_private": keys_dir is not None and os.path.isdir(keys_dir)
        and os.stat(keys_dir).st_mode & 0o777 == 0o700,
        "revocations": inheritance.revocations,
    }


async def fake_worker(config: Config, sockets: list[socket.socket], inheritance: WorkerInheritance) -> None:
    control = inheritance.control
    inherited = _inherited(inheritance)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    inflight: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        inflight.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            # Block the loop briefly so that the next queued connection goes to another
            # worker: makes "requests spread over PIDs" deterministic enough.
            time.sleep(0.003)
            if os.environ.get("FAKE_SLOW"):
                await asyncio.sleep(float(os.environ["FAKE_SLOW"]))
            body = json.dumps({"pid": os.getpid(), "tag": config.path, **inherited}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(body) + body)
            await writer.drain()
        finally:
            writer.close()
            inflight.discard(task)  # type: ignore[arg-type]

    if os.environ.get("FAKE_CRASH") or config.path == "crash":
        raise RuntimeError("worker failed to start")
    servers = [await asyncio.start_server(handle, sock=s) for s in sockets]
    control.report({"issuers": {i.name: {"loaded": True} for i in config.issuers}})
    control.ready()
    if os.environ.get("FAKE_HANG"):
        await asyncio.sleep(0.1)
        time.sleep(3600)   # event loop stuck: heartbeats stop
    await stop.wait()
    for server in servers:
        server.close()
    if inflight:
        await asyncio.wait(set(inflight), timeout=config.server.shutdown_timeout)
    control.close()


def _harness_main(path: str) -> int:
    from jwtproxy.revocation.memory import MemoryRevocationStore
    from jwtproxy.supervisor import Supervisor

    sup = Supervisor(lambda: load_test_config(path), worker_target=fake_worker,
                     ready_timeout=5.0, heartbeat_interval=0.2, stop_margin=1.0,
                     hang_timeout=float(os.environ.get("HANG_TIMEOUT", "30")),
                     open_store=lambda cfg, log: MemoryRevocationStore(log))
    return sup.run()


# ---------------------------------------------------------------------------------------------
# Test side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        return json.loads(r.read())


class Daemon:
    def __init__(self, tmp: Path, workers: int = 2, env: dict[str, str] | None = None,
                 **config: Any) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.cfg = tmp / "cfg.json"
        self.write_config(tag="v1", workers=workers, **config)
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages: list[str] = []
        self.stderr = open(tmp / "stderr.log", "w+b")
        full_env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                        PYTHONPATH=str(ROOT), **(env or {}))
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.cfg)], env=full_env,
            stdout=subprocess.DEVNULL, stderr=self.stderr)

    def write_config(self, **overrides: Any) -> None:
        data = {"tag": "v1", "ports": [self.port], "workers": 2, "admin_port": self.admin_port,
                "db": str(self.tmp / "rev.db"), "shutdown": 3.0}
        if self.cfg.exists():
            data.update(json.loads(self.cfg.read_text()))
        data.update(overrides)
        self.cfg.write_text(json.dumps(data))

    def wait_message(self, wanted: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(msg)
            if msg.startswith(wanted):
                return msg
        raise AssertionError(f"no {wanted!r} from the supervisor; got {self.messages}\n"
                             + self.log())

    def log(self) -> str:
        return (self.tmp / "stderr.log").read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == name:
                out.append(rec)
        return out

    def admin(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                        timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return {int(x) for x in out.split()}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def close(self) -> None:
        """Kill whatever is left (after a failed test) and release the test's handles."""
        pids = self.worker_pids() if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.notify.close()
        self.stderr.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        d.wait_message("READY=1")
        yield d
    finally:
        d.close()


def spread(port: int, n: int = 60) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: get(port), range(n)))


def test_workers_inherit_the_keys_dir_and_the_revocation_mirror(daemon: Daemon) -> None:
    first = get(daemon.port)
    assert first["keys_dir_private"] is True
    assert first["revocations"] is None  # the first generation forks before the store opens
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.admin_port}/revocations", method="POST",
        data=json.dumps({"jti": "j1", "exp": 4102444800}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        assert r.status == 201
    old = daemon.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    answers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            answers = [a for a in spread(daemon.port, 8) if a["pid"] not in old]
        except OSError:
            answers = []
        if answers:
            break
        time.sleep(0.1)
    assert answers, daemon.log()
    # A replacement starts from the supervisor's mirror, whatever its backend says later.
    assert answers[0]["revocations"]["jti"] == [{"jti": "j1", "exp": 4102444800.0}]
    assert answers[0]["keys_dir_private"] is True


def test_workers_share_the_port_and_a_killed_worker_is_replaced(daemon: Daemon) -> None:
    answers = spread(daemon.port)
    pids = {a["pid"] for a in answers}
    assert len(pids) == 2, pids
    assert pids == daemon.worker_pids()
    status, body = daemon.admin("/readyz")
    assert (status, body) == (200, {"ready": True})

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = daemon.worker_pids()
        if victim not in now and len(now) == 2 and daemon.events("worker_ready")[2:]:
            break
        time.sleep(0.05)
    now = daemon.worker_pids()
    assert victim not in now and len(now) == 2
    died = daemon.events("worker_died")
    assert died and died[0]["pid"] == victim and died[0]["status"] == "signal SIGKILL"
    assert {a["pid"] for a in spread(daemon.port)} == now
    # The metrics page aggregates the supervisor's counters.
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
        text = r.read().decode()
    assert "jwtproxy_worker_restarts_total 1.0" in text
    assert daemon.stop() == 0


def test_sighup_with_bad_config_keeps_old_workers(daemon: Daemon) -> None:
    before = daemon.worker_pids()
    daemon.write_config(bad=True)
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.wait_message("RELOADING=1").split("\n")[1].startswith("MONOTONIC_USEC=")
    daemon.wait_message("READY=1")
    problems = [e["problem"] for e in daemon.events("config_problem")]
    assert len(problems) == 2 and "unknown upstream 'pay'" in problems[1]
    assert daemon.events("reload_failed")
    assert daemon.worker_pids() == before
    assert {a["tag"] for a in spread(daemon.port, 10)} == {"v1"}
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
        assert 'jwtproxy_config_reloads_total{result="error"} 1.0' in r.read().decode()

    # A valid config naming an address that cannot be bound: also kept running.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon.write_config(bad=False, tag="v2", ports=[daemon.port, taken.getsockname()[1]])
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_message("RELOADING=1")
        daemon.wait_message("READY=1")
    assert daemon.events("reload_failed")[-1]["reason"].startswith("cannot bind")
    assert daemon.worker_pids() == before
    assert {a["tag"] for a in spread(daemon.port, 10)} == {"v1"}
    assert daemon.stop() == 0


def test_startup_bind_failure_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        d = Daemon(tmp_path, ports=[taken.getsockname()[1]])
        try:
            assert d.proc.wait(timeout=15) == 1
        finally:
            d.close()
        port = taken.getsockname()[1]
    (failed,) = d.events("bind_failed")
    assert failed["address"] == f"127.0.0.1:{port}"      # the log line names the port
    assert "READY=1" not in d.messages


def test_sighup_whose_new_workers_fail_keeps_old_workers(daemon: Daemon) -> None:
    before = daemon.worker_pids()
    daemon.write_config(tag="crash")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_message("RELOADING=1")
    daemon.wait_message("READY=1")
    failed = daemon.events("reload_failed")
    assert failed and failed[0]["reason"] == "new workers did not become ready"
    time.sleep(0.3)
    assert daemon.worker_pids() == before
    assert {a["tag"] for a in spread(daemon.port, 10)} == {"v1"}
    assert not daemon.events("worker_restart")       # failed candidates are not respawned
    assert daemon.stop() == 0


def test_workers_exit_when_the_supervisor_is_killed(daemon: Daemon) -> None:
    workers = daemon.worker_pids()
    daemon.proc.kill()
    daemon.proc.wait()
    deadline = time.monotonic() + 5
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("gone", "Z", "X"):    # exited (a zombie until init reaps it)
                alive.discard(pid)
        time.sleep(0.05)
    assert not alive, "orphaned workers keep serving without a supervisor"


def test_sighup_swaps_workers_without_refusing_a_connection(daemon: Daemon) -> None:
    old = daemon.worker_pids()
    new_port = free_port()
    daemon.write_config(tag="v2", workers=3, ports=[daemon.port, new_port])
    results: list[str] = []
    errors: list[str] = []
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set():
            try:
                results.append(get(daemon.port)["tag"])
            except OSError as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_message("RELOADING=1")
    daemon.wait_message("READY=1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and daemon.worker_pids() & old:
        time.sleep(0.05)
    time.sleep(0.2)
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert "v1" in results and results[-1] == "v2"
    new = daemon.worker_pids()
    assert len(new) == 3 and not new & old
    assert get(new_port)["tag"] == "v2"          # newly listed address bound on reload
    assert daemon.stop() == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=1, env={"FAKE_SLOW": "0.5", "WATCHDOG_USEC": "200000"})
    try:
        d.wait_message("READY=1")
        d.wait_message("WATCHDOG=1", timeout=2)      # pinged every 0.1 s while healthy
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, d.port)
            time.sleep(0.2)            # request is in flight (handler sleeps 0.5 s)
            d.proc.send_signal(signal.SIGTERM)
            assert pending.result(timeout=5)["tag"] == "v1"
        assert d.proc.wait(timeout=10) == 0
        assert "STOPPING=1" in d.messages or d.wait_message("STOPPING=1")
        with pytest.raises(OSError):
            get(d.port, timeout=1)     # listener closed
    finally:
        d.close()


def test_crash_loop_backs_off_and_sigterm_still_exits_0(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=1, env={"FAKE_CRASH": "1"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(d.events("worker_restart")) < 4:
            time.sleep(0.05)
        delays = [e["delay"] for e in d.events("worker_restart")]
        assert delays[:4] == [0.0, 0.5, 1.0, 2.0]
        assert "RuntimeError: worker failed to start" in d.log()
        assert "READY=1" not in d.messages
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=10) == 0
        assert not d.worker_pids()
    finally:
        d.close()


def test_hung_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=1, env={"FAKE_HANG": "1", "HANG_TIMEOUT": "0.6"}, shutdown=0.3)
    try:
        d.wait_message("READY=1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not d.events("worker_died"):
            time.sleep(0.05)
        hung = d.events("worker_hung")
        assert hung and d.events("worker_died")[0]["pid"] == hung[0]["pid"]
        assert d.events("worker_died")[0]["status"] == "signal SIGKILL"
        assert d.events("worker_restart")
        # The replacement hangs too: SIGTERM cannot stop it, the SIGKILL deadline does.
        time.sleep(0.3)
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 0.3 + 1.0 + 1.5     # shutdown + stop_margin + slack
        assert d.events("worker_killed")
    finally:
        d.close()


def test_bind_listener_ipv6_is_v6only() -> None:
    try:
        sock = bind_listener(ListenAddr("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getblocking() is False


def test_worker_control_without_link_is_a_noop() -> None:
    control = WorkerControl(3)
    control.ready()
    control.report({"issuers": {}})
    control.close()
    assert control.worker_id == 3 and control.is_ready


def test_worker_control_messages_and_heartbeat() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.settimeout(2)
    control = WorkerControl(1, child, heartbeat_interval=0.01)

    async def main() -> None:
        control.report({"issuers": {"corp": {"loaded": True}}})
        control.ready()
        await asyncio.sleep(0.05)
        control.close()

    asyncio.run(main())
    msgs = []
    parent.setblocking(False)
    while True:
        try:
            msgs.append(json.loads(parent.recv(65536)))
        except BlockingIOError:
            break
    assert msgs[0] == {"t": "report", "status": {"issuers": {"corp": {"loaded": True}}}}
    assert msgs[1] == {"t": "ready"}
    assert {"t": "hb"} in msgs[2:]
    parent.close()
    child.close()


if __name__ == "__main__":
    sys.exit(_harness_main(sys.argv[1]))
