"""Metrics from zero, and what a real request leaves behind (counters and the access log line).

* Every labelled counter exists with 0 for its known label values before anything happened, so
  ``rate()`` and alerts work before the first failure; the lists of known values are complete
  (every reason, upstream error kind and result written in the code is in them).
* End to end, with the real daemon: a rejected request increments
  ``jwtproxy_auth_failures_total{reason}``; a real request's access log line has exactly the
  documented fields and never the token or the query string.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pathlib
import re
import secrets
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from prometheus_client import values

from daemon_harness import Daemon, http
from helpers import AUDIENCE, ISSUER, Backend, SigningKey, free_port, write_jwks
from jwtproxy.auth import AUTH_FAILURE_REASONS
from jwtproxy.metrics import (
    INTROSPECTION_RESULTS,
    JWKS_REFRESH_RESULTS,
    ROUTE_STATUSES,
    TOKEN_CACHE_RESULTS,
    UNROUTED_STATUSES,
    WorkerMetrics,
    enable_multiprocess,
    render_metrics,
)
from jwtproxy.upstream import UPSTREAM_ERROR_KINDS

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jwtproxy"
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of ``name`` in Prometheus text: {frozenset(labels): value}."""
    out: dict[frozenset[tuple[str, str]], float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1) == name:
            out[frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))] = float(m.group(3))
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text, name).get(frozenset(labels.items()))


# ------------------------------------------------------------------------------ in one process


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    saved = values.ValueClass
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    enable_multiprocess(str(tmp_path))
    try:
        yield tmp_path
    finally:
        values.ValueClass = saved
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def test_declared_labels_exist_at_zero_after_the_first_flush(multiproc_dir: Path) -> None:
    m = WorkerMetrics()
    m.declare(routes=["/api", "api.example/v2"], reasons=["expired", "missing_token"],
              upstreams=["payments"], upstream_kinds=["connect", "timeout"], issuers=["corp"],
              introspecting=["opaque"])
    assert "jwtproxy_auth_failures_total" not in render_metrics().decode()   # nothing before the flush
    m.flush()
    text = render_metrics().decode()
    requests = samples(text, "jwtproxy_requests_total")
    assert set(requests) == (
        {frozenset({("route", r), ("status", s), ("listener", "traffic")})
         for r in ("/api", "api.example/v2") for s in ROUTE_STATUSES}
        | {frozenset({("route", "-"), ("status", s), ("listener", "traffic")}) for s in UNROUTED_STATUSES})
    assert set(requests.values()) == {0.0}
    assert samples(text, "jwtproxy_auth_failures_total") == {
        frozenset({("reason", "expired")}): 0.0, frozenset({("reason", "missing_token")}): 0.0}
    assert value(text, "jwtproxy_upstream_errors_total", upstream="payments", kind="timeout") == 0.0
    assert value(text, "jwtproxy_upstream_errors_total", upstream="payments", kind="connect") == 0.0
    for result in JWKS_REFRESH_RESULTS:
        assert value(text, "jwtproxy_jwks_refresh_total", issuer="corp", result=result) == 0.0
    for result in TOKEN_CACHE_RESULTS:
        assert value(text, "jwtproxy_token_cache_total", result=result) == 0.0
    assert samples(text, "jwtproxy_introspection_total") == {
        frozenset({("issuer", "opaque"), ("result", result)}): 0.0 for result in INTROSPECTION_RESULTS}
    # Counting afterwards adds to the same series; flushing again does not re-create or reset.
    m.auth_failure("expired")
    m.request("/api", 401, 0.001)
    m.flush()
    m.flush()
    text = render_metrics().decode()
    assert value(text, "jwtproxy_auth_failures_total", reason="expired") == 1.0
    assert value(text, "jwtproxy_auth_failures_total", reason="missing_token") == 0.0
    assert value(text, "jwtproxy_requests_total", route="/api", status="401", listener="traffic") == 1.0


# ------------------------------------------------------------------------------ the lists are complete


def _literal_arguments(names: dict[str, int | str]) -> dict[str, set[str]]:
    """String literals passed, anywhere in the package, to the calls named in ``names`` (at that
    positional index, or keyword): {value: {where}}."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name not in names:
                continue
            where = names[name]
            arg: ast.expr | None = None
            if isinstance(where, int):
                arg = node.args[where] if len(node.args) > where else None
            else:
                arg = next((k.value for k in node.keywords if k.arg == where), None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.setdefault(arg.value, set()).add(f"{path.name}:{node.lineno}")
    return found


def test_every_failure_reason_in_the_code_is_declared() -> None:
    literals = _literal_arguments({"TokenRejected": 0, "invalid_token": 0, "_reject": 0, "ProofRejected": 0,
                                   "auth_failure": 0, "Deny": 2})
    literals.update(_literal_arguments({"Deny": "reason"}))
    assert len(literals) > 30                      # the scan does find them
    missing = {reason: where for reason, where in literals.items() if reason not in AUTH_FAILURE_REASONS}
    assert missing == {}, f"add these to auth.AUTH_FAILURE_REASONS: {missing}"
    assert len(set(AUTH_FAILURE_REASONS)) == len(AUTH_FAILURE_REASONS)


def test_every_upstream_error_kind_and_result_is_declared() -> None:
    kinds = _literal_arguments({"UpstreamError": 0})
    # The connect path picks "tls" or "connect" by the exception; both are declared.
    assert set(kinds) <= set(UPSTREAM_ERROR_KINDS), set(kinds) - set(UPSTREAM_ERROR_KINDS)
    assert {"connect", "reset", "timeout"} <= set(kinds)
    results = _literal_arguments({"_count": 1})          # KeyManager._count(st, result)
    assert set(results) <= set(JWKS_REFRESH_RESULTS) and results
    cache = _literal_arguments({"on_cache": 0})
    assert set(cache) == set(TOKEN_CACHE_RESULTS)


# ------------------------------------------------------------------------------ the real daemon


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = await Backend().start()
    yield server
    await server.stop()


def daemon_config(tmp: Path, *, port: int, admin_port: int, backend_port: int, jwks: str, parser: str) -> str:
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 2
http_parser = "{parser}"
shutdown_timeout = 2
access_log = true

[admin]
listen = "127.0.0.1:{admin_port}"

[token]
sources = ["header:authorization", "query:access_token"]

[[issuer]]
name = "corp"
issuer = "{ISSUER}"
jwks_file = "{jwks}"
audiences = ["{AUDIENCE}"]

[[route]]
path_prefix = "/api"
upstream = "backend"

[[route]]
path_prefix = "/open"
upstream = "backend"
auth = "off"

[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]

[upstream.spare]
targets = ["http://127.0.0.1:9"]

[revocation]
sqlite_path = "{tmp / 'revocations.db'}"
"""


@pytest.fixture
async def daemon(tmp_path: Path, backend: Backend, parser: str) -> AsyncIterator[tuple[Daemon, int, int, SigningKey]]:
    key = SigningKey.rsa("zero-1")
    jwks = write_jwks(str(tmp_path / "jwks.json"), key)
    port, admin_port = free_port(), free_port()
    config = tmp_path / "zero.toml"
    config.write_text(daemon_config(tmp_path, port=port, admin_port=admin_port, backend_port=backend.port,
                                    jwks=jwks, parser=parser))
    d = Daemon(tmp_path, config_path=config)
    try:
        await d.wait_ready()
        yield d, port, admin_port, key
    finally:
        d.kill()


async def metrics_text(admin_port: int) -> str:
    reply = await http("GET", f"http://127.0.0.1:{admin_port}/metrics")
    assert reply.status == 200
    return reply.body.decode()


async def wait_metric(admin_port: int, wanted: float, name: str, **labels: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        text = await metrics_text(admin_port)
        if value(text, name, **labels) == wanted:
            return text
        assert time.monotonic() < deadline, (name, labels, value(text, name, **labels))
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_counters_start_at_zero_and_a_rejection_counts_its_reason(
        daemon: tuple[Daemon, int, int, SigningKey]) -> None:
    d, port, admin_port, key = daemon
    # Before any request: every known series, at 0 (both workers flushed their declarations).
    text = await wait_metric(admin_port, 0.0, "jwtproxy_auth_failures_total", reason="expired")
    failures = samples(text, "jwtproxy_auth_failures_total")
    assert {dict(k)["reason"] for k in failures} == set(AUTH_FAILURE_REASONS)
    assert set(failures.values()) == {0.0}
    for upstream in ("backend", "spare"):
        for kind in UPSTREAM_ERROR_KINDS:
            assert value(text, "jwtproxy_upstream_errors_total", upstream=upstream, kind=kind) == 0.0
    for route in ("/api", "/open"):
        for status in ROUTE_STATUSES:
            assert value(text, "jwtproxy_requests_total", route=route, status=status, listener="traffic") == 0.0
    assert value(text, "jwtproxy_requests_total", route="-", status="404", listener="traffic") == 0.0
    assert value(text, "jwtproxy_jwks_refresh_total", issuer="corp", result="error") == 0.0
    assert value(text, "jwtproxy_token_cache_total", result="hit") == 0.0

    expired = key.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    assert (await http("GET", f"http://127.0.0.1:{port}/api/x", token=expired)).status == 401
    text = await wait_metric(admin_port, 1.0, "jwtproxy_auth_failures_total", reason="expired")
    assert value(text, "jwtproxy_requests_total", route="/api", status="401", listener="traffic") == 1.0
    assert value(text, "jwtproxy_auth_failures_total", reason="bad_signature") == 0.0
    # Removing the count from the reject path would leave "expired" at 0 and fail above.


ACCESS_LOG_FIELDS = {"time", "request_id", "method", "path", "status", "route", "upstream", "duration", "sub",
                     "jti", "auth", "bytes_in", "bytes_out", "client", "listener"}


@pytest.mark.slow
async def test_access_log_lines_of_real_requests(daemon: tuple[Daemon, int, int, SigningKey]) -> None:
    d, port, _, key = daemon
    in_header = key.token(sub="alice", jti="jti-" + secrets.token_hex(4))
    in_query = key.token(sub="bob")
    secret = secrets.token_hex(12)
    base = f"http://127.0.0.1:{port}"
    r1 = await http("POST", f"{base}/api/orders?debug={secret}", token=in_header, headers={"Content-Length": "0"})
    r2 = await http("GET", f"{base}/api/orders/2?access_token={in_query}&x={secret}")
    r3 = await http("GET", f"{base}/api/orders/3?access_token=not.a.token")
    assert (r1.status, r2.status, r3.status) == (200, 200, 401)
    ids = {r.headers["x-request-id"] for r in (r1, r2, r3)}

    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while len(lines) < 3:
        lines = [json.loads(line) for line in d.log().splitlines()
                 if line.startswith("{") and '"request_id"' in line and json.loads(line).get("request_id") in ids]
        assert time.monotonic() < deadline, d.log()[-3000:]
        await asyncio.sleep(0.05)
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {"/api/orders", "/api/orders/2", "/api/orders/3"}    # no query, ever
    for line in lines:
        assert set(line) == ACCESS_LOG_FIELDS, set(line) ^ ACCESS_LOG_FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["route"] == "/api" and line["upstream"] == "backend" and line["client"] == "127.0.0.1"
        assert line["listener"] == "traffic"
        assert isinstance(line["duration"], float) and line["duration"] >= 0
    first, second, third = by_path["/api/orders"], by_path["/api/orders/2"], by_path["/api/orders/3"]
    assert (first["method"], first["status"], first["sub"], first["auth"]) == ("POST", 200, "alice", "ok")
    assert first["jti"].startswith("jti-") and first["bytes_in"] == 0 and first["bytes_out"] > 0
    assert (second["status"], second["sub"], second["auth"]) == (200, "bob", "ok")
    assert (third["status"], third["sub"], third["auth"]) == (401, None, "malformed")
    # Neither token nor the query's secret anywhere on stderr, in any line.
    log = d.log()
    for needle in (in_header, in_query, in_header.split(".")[2], in_query.split(".")[2], secret, "not.a.token"):
        assert needle not in log
