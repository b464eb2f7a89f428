"""The ``[authz]`` listener in the real daemon: the supervisor binds it once and every worker
serves it, it survives a reload, its requests are in /metrics with ``listener="authz"``, and a
config that puts it on a traffic listener never starts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
from daemon_harness import Daemon, free_port, port_is_listening, subprocess_env, toml_config
from helpers import AUDIENCE, ISSUER, Backend, SigningKey, parse_responses, raw_exchange

pytestmark = pytest.mark.slow


def authz_section(port: int) -> str:
    return f'[authz]\nlisten = ["127.0.0.1:{port}"]\n'


@pytest.fixture
async def daemon(tmp_path: Path, backend: Backend, jwks_path: str) -> AsyncIterator[Daemon]:
    authz_port = free_port()
    d = Daemon(tmp_path, dict(
        listen_port=free_port(), admin_port=free_port(), backend_port=backend.port, jwks_file=jwks_path,
        tmp=tmp_path, issuer=ISSUER, audience=AUDIENCE, workers=2, extra_sections=authz_section(authz_port),
    ))
    d.authz_port = authz_port  # type: ignore[attr-defined]
    try:
        await d.wait_ready()
        yield d
    finally:
        d.kill()


async def ask(port: int, uri: str, token: str | None = None) -> tuple[int, dict[str, str]]:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    wire = f"GET /_authz HTTP/1.1\r\nHost: x\r\nX-Original-URI: {uri}\r\n{auth}Connection: close\r\n\r\n"
    status, headers, _ = parse_responses(await raw_exchange(port, wire.encode()))[0]
    return status, headers


async def test_every_worker_serves_the_authz_listener(daemon: Daemon, backend: Backend, rsa_key: SigningKey) -> None:
    port: int = daemon.authz_port  # type: ignore[attr-defined]
    token = rsa_key.token(sub="alice")
    workers: set[str] = set()
    for _ in range(200):
        status, headers = await ask(port, "/orders", token)
        assert status == 200 and headers["x-user-id"] == "alice"
        workers.add(headers["x-request-id"].split("-")[0])
        if len(workers) == 2:
            break
    assert len(workers) == 2, "both workers should answer on the inherited authz socket"
    assert (await ask(port, "/orders"))[0] == 401
    assert (await ask(port, "/open/x"))[0] == 200
    assert backend.seen == []

    # Counted with the route and listener="authz"; the traffic listener's with "traffic".
    await raw_exchange(daemon.port, b"GET /open/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # (multiprocess rendering sorts the labels)
    expected = [
        'jwtproxy_requests_total{listener="authz",route="/",status="401"} 1.0',
        'jwtproxy_requests_total{listener="authz",route="/open",status="200"} 1.0',
        'jwtproxy_requests_total{listener="traffic",route="/open",status="200"} 1.0',
    ]
    text = ""
    for _ in range(60):
        # Each worker flushes its counts about once a second, on its own: wait for every line,
        # not for some (the requests above may have gone to either worker).
        _, body = await daemon.admin("GET", "/metrics")
        text = body.decode()
        if all(line in text for line in expected):
            break
        await asyncio.sleep(0.1)
    for line in expected:
        assert line in text


async def test_a_reload_keeps_the_authz_listener(daemon: Daemon, rsa_key: SigningKey) -> None:
    port: int = daemon.authz_port  # type: ignore[attr-defined]
    token = rsa_key.token(sub="bob")
    daemon.signal(signal.SIGHUP)
    for _ in range(20):  # asked all through the reload: never refused
        status, headers = await ask(port, "/orders", token)
        assert status == 200 and headers["x-user-id"] == "bob"
        await asyncio.sleep(0.05)
    await daemon.wait_event("reload_done")
    status, _ = await ask(port, "/orders", token)
    assert status == 200


def test_an_authz_listener_on_a_traffic_port_never_starts(tmp_path: Path, jwks_path: str) -> None:
    traffic = free_port()
    config = tmp_path / "overlap.toml"
    config.write_text(toml_config(
        listen_port=traffic, admin_port=free_port(), backend_port=9, jwks_file=jwks_path, tmp=tmp_path,
        extra_sections=f'[authz]\nlisten = ["0.0.0.0:{traffic}"]\n',
    ))
    proc = subprocess.run([sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"authz.listen[0]: '0.0.0.0:{traffic}' overlaps server.listen '127.0.0.1:{traffic}'" in proc.stderr
    assert not port_is_listening(traffic)
    check = subprocess.run([sys.executable, "-m", "jwtproxy", "check-config", "-c", str(config)], cwd=tmp_path,
                           env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "overlaps server.listen" in check.stdout

