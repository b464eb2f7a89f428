"""jwtproxy.tracing in one process: sampling, W3C traceparent handling, what the spans carry.
The end-to-end tests (real daemon, OTLP receiver) are in test_tracing.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra is not installed (pip install -e '.[test]')")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from jwtproxy.config import TracingConfig  # noqa: E402
from jwtproxy.tracing import RequestTrace, Tracing, UnsampledTrace, _parse_traceparent  # noqa: E402

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exported() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()

    def make(ratio: float = 1.0) -> Tracing:
        return Tracing(TracingConfig("http://127.0.0.1:4318/v1/traces", ratio, "unit"), exporter=exporter,
                       schedule_delay=0.01)

    yield make, exporter


def request(tracing: Tracing, *headers: tuple[bytes, bytes]) -> RequestTrace | UnsampledTrace:
    return tracing.request(b"GET", b"1.1", [(b"host", b"api.example:8443"), *headers], path="/orders/1",
                           scheme=b"https", host="api.example:8443", client="10.0.0.9", request_id=b"r-1",
                           age=0.001, route="/orders", upstream="orders")


def finish(trace: RequestTrace | UnsampledTrace, tracing: Tracing) -> list[tuple[bytes, bytes]]:
    trace.verify(lambda: None)
    trace.upstream_start(b"GET")
    headers = trace.upstream_headers("http", "10.1.1.1", 9000, "/orders/1")
    trace.upstream_end(200)
    trace.finish(200, "ok")
    tracing.provider.force_flush()
    return headers


@pytest.mark.parametrize("value", [
    f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-00", f"01-{TRACE}-{PARENT}-03-future", f" 00-{TRACE}-{PARENT}-01",
])
def test_valid_traceparents(value: str) -> None:
    parsed = _parse_traceparent(value.encode())
    assert parsed is not None and parsed[0] == TRACE.encode()


@pytest.mark.parametrize("value", [
    "", "garbage", f"ff-{TRACE}-{PARENT}-01", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE.upper()}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01-extra", f"00-{TRACE[:-1]}-{PARENT}-01",
    f"00-{TRACE}-{PARENT}-1",
])
def test_invalid_traceparents_are_ignored(value: str) -> None:
    assert _parse_traceparent(value.encode()) is None


def test_sampled_request_has_server_verify_and_client_spans(exported: tuple[Any, InMemorySpanExporter]) -> None:
    make, exporter = exported
    tracing = make(1.0)
    trace = request(tracing, (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode()), (b"tracestate", b"a=1"))
    assert isinstance(trace, RequestTrace)
    headers = dict(finish(trace, tracing))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"GET /orders", "jwtproxy.verify", "GET"}
    server, verify, client = spans["GET /orders"], spans["jwtproxy.verify"], spans["GET"]
    assert format(server.context.trace_id, "032x") == TRACE and format(server.parent.span_id, "016x") == PARENT
    assert verify.parent.span_id == server.context.span_id and client.parent.span_id == server.context.span_id
    assert server.attributes["http.route"] == "/orders" and server.attributes["server.port"] == 8443
    assert server.attributes["url.scheme"] == "https" and server.attributes["client.address"] == "10.0.0.9"
    assert client.attributes["url.full"] == "http://10.1.1.1:9000/orders/1"
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", headers[b"traceparent"].decode())
    assert m and m.group(1) == TRACE and m.group(2) == format(client.context.span_id, "016x")
    assert headers[b"tracestate"] == b"a=1"
    tracing.shutdown()


def test_unsampled_incoming_trace_is_passed_on_without_spans(exported: tuple[Any, InMemorySpanExporter]) -> None:
    make, exporter = exported
    tracing = make(1.0)   # the caller's decision wins over the ratio
    trace = request(tracing, (b"traceparent", f"00-{TRACE}-{PARENT}-00".encode()), (b"tracestate", b"a=1"))
    assert isinstance(trace, UnsampledTrace)
    headers = dict(finish(trace, tracing))
    assert exporter.get_finished_spans() == ()
    trace_id, span_id, flags = headers[b"traceparent"].decode().split("-")[1:]
    assert trace_id == TRACE and span_id != PARENT and flags == "00" and headers[b"tracestate"] == b"a=1"
    tracing.shutdown()


def test_new_traces_follow_the_ratio(exported: tuple[Any, InMemorySpanExporter]) -> None:
    make, exporter = exported
    never, always, some = make(0.0), make(1.0), make(0.25)
    assert all(isinstance(request(never), UnsampledTrace) for _ in range(200))
    assert all(isinstance(request(always), RequestTrace) for _ in range(50))
    sampled = sum(isinstance(request(some), RequestTrace) for _ in range(4000))
    assert 800 < sampled < 1200     # 1000 expected; 6 standard deviations either way
    # An invalid traceparent starts a new trace, sampled by the ratio.
    trace = request(never, (b"traceparent", b"00-bogus"))
    assert isinstance(trace, UnsampledTrace) and dict(trace.headers)[b"traceparent"].endswith(b"-00")
    for t in (never, always, some):
        t.shutdown()


def test_failed_upstream_and_client_gone(exported: tuple[Any, InMemorySpanExporter]) -> None:
    make, exporter = exported
    tracing = make(1.0)
    trace = request(tracing)
    trace.upstream_start(b"GET")
    trace.upstream_end(None, "connect")      # refused: a 502 follows
    trace.upstream_start(b"GET")             # (a retry would start another)
    trace.finish(499, "ok")                  # the client left while it was open
    tracing.provider.force_flush()
    spans = exporter.get_finished_spans()
    failed = [s for s in spans if s.name == "GET"]
    assert [s.attributes["error.type"] for s in failed] == ["connect", "client_closed"]
    (server,) = [s for s in spans if s.name == "GET /orders"]
    assert server.attributes["http.response.status_code"] == 499 and "error.type" not in server.attributes
    tracing.shutdown()
