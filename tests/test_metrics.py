"""Metrics: local counting, flush, and aggregation across processes (multiprocess mode)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import values

from jwtproxy import metrics
from jwtproxy.metrics import (
    DURATION_BUCKETS, SupervisorMetrics, WorkerMetrics, enable_multiprocess, mark_worker_dead,
    render_metrics,
)


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Multiprocess mode in a fresh dir; restores prometheus_client's value class after."""
    saved = values.ValueClass
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    (tmp_path / "gauge_livemax_999999.db").write_bytes(b"stale")   # from a previous run
    enable_multiprocess(str(tmp_path))
    try:
        yield tmp_path
    finally:
        values.ValueClass = saved
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _worker(route: str, n: int, duration: float) -> None:
    m = WorkerMetrics()
    for _ in range(n):
        m.request(route, 200, duration)
    m.request(route, 401, 0.0002)
    m.auth_failure("expired")
    m.token_cache("hit")
    m.token_cache("miss")
    m.jwks_refresh("corp", "ok")
    m.upstream_error("payments", "connect")
    m.introspection("corp", "active")
    m.flush()
    os._exit(0)


def sample(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text output (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    raise AssertionError(f"{name}{labels} not in output:\n{text}")


def test_aggregates_across_two_processes_and_dead_workers(multiproc_dir: Path) -> None:
    assert not (multiproc_dir / "gauge_livemax_999999.db").exists()   # cleaned at start
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=("/a", 3, 0.003)),
             ctx.Process(target=_worker, args=("/a", 2, 0.2))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
        mark_worker_dead(p.pid)   # counters of dead workers stay in the totals
    text = render_metrics().decode()
    assert sample(text, "jwtproxy_requests_total", route="/a", status="200", listener="traffic") == 5
    assert sample(text, "jwtproxy_requests_total", route="/a", status="401", listener="traffic") == 2
    assert sample(text, "jwtproxy_auth_failures_total", reason="expired") == 2
    assert sample(text, "jwtproxy_token_cache_total", result="hit") == 2
    assert sample(text, "jwtproxy_token_cache_total", result="miss") == 2
    assert sample(text, "jwtproxy_jwks_refresh_total", issuer="corp", result="ok") == 2
    assert sample(text, "jwtproxy_upstream_errors_total", upstream="payments", kind="connect") == 2
    assert sample(text, "jwtproxy_introspection_total", issuer="corp", result="active") == 2
    h = "jwtproxy_request_duration_seconds"
    assert sample(text, h + "_count") == 7
    assert sample(text, h + "_bucket", le="0.0005") == 2          # the two 401s
    assert sample(text, h + "_bucket", le="0.005") == 5           # + three 3 ms requests
    assert sample(text, h + "_bucket", le="0.1") == 5
    assert sample(text, h + "_bucket", le="0.25") == 7
    assert sample(text, h + "_bucket", le="+Inf") == 7
    assert sample(text, h + "_sum") == pytest.approx(3 * 0.003 + 2 * 0.2 + 2 * 0.0002)


def test_supervisor_gauges_and_counters(multiproc_dir: Path) -> None:
    sm = SupervisorMetrics()
    sm.set_workers(ready=3, starting=1, draining=2)
    sm.config_reloads.labels("ok").inc()
    sm.config_reloads.labels("error").inc()
    sm.revocation_backend_up.set(1)
    sm.issuer_keys_loaded.labels("corp").set(1)
    text = render_metrics().decode()
    assert sample(text, "jwtproxy_workers", state="ready") == 3
    assert sample(text, "jwtproxy_workers", state="draining") == 2
    assert sample(text, "jwtproxy_config_reloads_total", result="error") == 1
    assert sample(text, "jwtproxy_revocation_backend_up") == 1
    assert sample(text, "jwtproxy_issuer_keys_loaded", issuer="corp") == 1


def test_hot_path_does_not_touch_prometheus_until_flush(multiproc_dir: Path) -> None:
    m = WorkerMetrics()
    m.request("/x", 200, 0.001)
    assert list(multiproc_dir.glob("*.db")) == []
    assert "jwtproxy_requests_total{" not in render_metrics().decode()
    m.flush()
    assert sample(render_metrics().decode(), "jwtproxy_requests_total", route="/x", status="200", listener="traffic") == 1
    m.flush()   # nothing new: totals unchanged, not doubled
    assert sample(render_metrics().decode(), "jwtproxy_requests_total", route="/x", status="200", listener="traffic") == 1


def test_bucket_boundaries_are_inclusive() -> None:
    m = WorkerMetrics(buckets=(0.1, 1.0))
    m.request("/", 200, 0.1)    # le="0.1" includes 0.1
    m.request("/", 200, 0.1000001)
    m.request("/", 200, 5.0)    # +Inf
    assert m._hist == [1, 1, 1]
    assert DURATION_BUCKETS == tuple(sorted(DURATION_BUCKETS))


def test_flush_periodically_flushes_on_cancel(multiproc_dir: Path) -> None:
    m = WorkerMetrics()

    async def main() -> None:
        task = asyncio.create_task(m.flush_periodically(interval=3600))
        await asyncio.sleep(0)
        m.request("/late", 503, 0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sample(render_metrics().decode(), "jwtproxy_requests_total",
                  route="/late", status="503", listener="traffic") == 1


def test_single_process_mode_renders_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert isinstance(render_metrics(), bytes)
    assert metrics.METRICS_CONTENT_TYPE.startswith("text/plain; version=0.0.4")
