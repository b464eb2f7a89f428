"""OpenTelemetry tracing against a local OTLP/HTTP receiver, through the real daemon.

The receiver is an aiohttp app on the test's loop that decodes each POSTed
``ExportTraceServiceRequest`` with ``opentelemetry-proto``; the daemon's workers export to it
with the SDK's OTLP/HTTP exporter exactly as they would to a collector. The JWKS comes from a
test issuer over HTTP, so key fetches are traced too; the echo backend records the
``traceparent`` it receives.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from daemon_harness import Daemon, http
from helpers import AUDIENCE, ISSUER, AppServer, Backend, SigningKey, free_port, header_values

pytestmark = pytest.mark.slow

#: Both HTTP codecs, where a test sends traffic through the gateway (as tests/conftest.py has it).
CODECS = ["httptools", "h11"]

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
    import opentelemetry.sdk.trace  # noqa: F401  (the daemon needs the SDK too)
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("the tracing extra is not installed (pip install -e '.[test]')", allow_module_level=True)

SERVER, CLIENT, INTERNAL = PbSpan.SPAN_KIND_SERVER, PbSpan.SPAN_KIND_CLIENT, PbSpan.SPAN_KIND_INTERNAL
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def sampled(flags: str) -> bool:
    return bool(int(flags, 16) & 1)


@dataclass
class ExportedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    service: str
    error: bool


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.posts = 0
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/v1/traces", self._export)
        self.server = AppServer(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1/traces"

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf", request.content_type
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.posts += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ExportedSpan(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(), name=span.name, kind=span.kind,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        service=str(resource.get("service.name")),
                        error=span.status.code == span.status.STATUS_CODE_ERROR,
                    ))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[ExportedSpan]:
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.spans if predicate(s)]
            if found:
                return found
            assert time.monotonic() < deadline, [(s.name, s.attributes) for s in self.spans]
            await asyncio.sleep(0.05)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class JwksIssuer:
    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        self.server = AppServer(app)

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [k.jwk() for k in self.keys]})


def config_text(*, port: int, backend_port: int, jwks_port: int, endpoint: str, ratio: float, parser: str,
                tmp: Path) -> str:
    tracing = f'[tracing]\notlp_endpoint = "{endpoint}"\nsample_ratio = {ratio}\nservice_name = "edge-test"\n'
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
http_parser = "{parser}"
shutdown_timeout = 2
access_log = false

[admin]
listen = ""

[[issuer]]
name = "corp"
issuer = "{ISSUER}"
jwks_uri = "http://127.0.0.1:{jwks_port}/jwks.json"
audiences = ["{AUDIENCE}"]
jwks_cooldown = 0.1

[[route]]
path_prefix = "/api"
upstream = "backend"

[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]

[revocation]
sqlite_path = "{tmp / 'revocations.db'}"

{tracing if endpoint is not None else ""}
"""


@dataclass
class Stack:
    daemon: Daemon
    port: int
    receiver: Receiver
    issuer: JwksIssuer
    backend: Backend
    key: SigningKey

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def start_stack(tmp: Path, *, parser: str = "httptools", ratio: float = 1.0,
                      tracing: bool = True) -> tuple[Stack, list[Any]]:
    receiver = Receiver()
    await receiver.server.start()
    key = SigningKey.rsa("kid-1")
    issuer = JwksIssuer(key)
    await issuer.server.start()
    backend = await Backend().start()
    port = free_port()
    config = tmp / "tracing.toml"
    config.write_text(config_text(port=port, backend_port=backend.port, jwks_port=issuer.server.port,
                                  endpoint=receiver.url if tracing else "", ratio=ratio, parser=parser, tmp=tmp))
    daemon = Daemon(tmp, config_path=config)
    stack = Stack(daemon, port, receiver, issuer, backend, key)
    await daemon.wait_ready()
    return stack, [daemon, receiver.server, issuer.server, backend]


@pytest.fixture
async def stacks(tmp_path: Path) -> AsyncIterator[list[list[Any]]]:
    parts: list[list[Any]] = []
    yield parts
    for group in parts:
        for part in group:
            if isinstance(part, Daemon):
                part.kill()
            else:
                await part.stop()


def child_of(parent: ExportedSpan) -> Any:
    return lambda s: s.parent_id == parent.span_id and s.trace_id == parent.trace_id


@pytest.mark.parametrize("parser", CODECS)
async def test_request_span_follows_traceparent_and_names_its_children(
        tmp_path: Path, stacks: list[list[Any]], parser: str) -> None:
    stack, parts = await start_stack(tmp_path, parser=parser)
    stacks.append(parts)
    # The key manager's first fetch, at start, is a trace of its own.
    (startup,) = await stack.receiver.wait_for(lambda s: s.name == "jwks fetch")
    assert startup.parent_id == "" and startup.kind == CLIENT
    assert startup.attributes["jwtproxy.issuer"] == "corp" and startup.attributes["jwtproxy.result"] == "ok"

    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    token = stack.key.token()
    secret_query = "q=" + secrets.token_hex(8)
    reply = await http("GET", stack.url(f"/api/orders/7?{secret_query}"), token=token,
                       headers={"traceparent": f"00-{trace_id}-{client_span}-01", "tracestate": "vendor=1",
                                "User-Agent": "trace-test/1"})
    assert reply.status == 200

    (server,) = await stack.receiver.wait_for(lambda s: s.kind == SERVER)
    assert server.trace_id == trace_id and server.parent_id == client_span    # honoured
    assert server.service == "edge-test" and server.name == "GET /api"
    a = server.attributes
    assert a["http.request.method"] == "GET" and a["url.path"] == "/api/orders/7"
    assert a["url.scheme"] == "http" and a["http.route"] == "/api" and a["http.response.status_code"] == 200
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == stack.port
    assert a["client.address"] == "127.0.0.1" and a["network.protocol.version"] == "1.1"
    assert a["user_agent.original"] == "trace-test/1" and a["jwtproxy.auth.result"] == "ok"
    assert a["jwtproxy.request_id"] == reply.headers["x-request-id"]

    (verify,) = await stack.receiver.wait_for(lambda s: s.name == "jwtproxy.verify")
    assert child_of(server)(verify) and verify.kind == INTERNAL
    (upstream,) = await stack.receiver.wait_for(lambda s: s.kind == CLIENT and s.name == "GET")
    assert child_of(server)(upstream)
    assert upstream.attributes["server.port"] == stack.backend.port
    assert upstream.attributes["url.full"] == f"http://127.0.0.1:{stack.backend.port}/api/orders/7"
    assert upstream.attributes["http.response.status_code"] == 200

    # The upstream got a traceparent naming the upstream span, not the client's own.
    (seen,) = [r for r in stack.backend.seen if r["path"].startswith("/api/orders/7")]
    (sent,) = header_values(seen, "traceparent")
    match = TRACEPARENT.match(sent)
    assert match is not None and match.group(1) == trace_id and match.group(2) == upstream.span_id
    assert sampled(match.group(3))
    assert header_values(seen, "tracestate") == ["vendor=1"]

    # Never the token, never the query string, in any span of the run.
    for span in stack.receiver.spans:
        for value in map(str, span.attributes.values()):
            assert token not in value and token.split(".")[2] not in value
            assert secret_query not in value and "?" not in value


async def test_unknown_kid_refetch_is_a_child_of_the_verification(tmp_path: Path, stacks: list[list[Any]]) -> None:
    stack, parts = await start_stack(tmp_path)
    stacks.append(parts)
    await stack.receiver.wait_for(lambda s: s.name == "jwks fetch")
    rotated = SigningKey.ec("kid-2")
    stack.issuer.keys = [rotated]
    assert (await http("GET", stack.url("/api/x"), token=rotated.token())).status == 200
    (server,) = await stack.receiver.wait_for(lambda s: s.kind == SERVER)
    verifies = await stack.receiver.wait_for(lambda s: s.name == "jwtproxy.verify" and child_of(server)(s))
    # The first call asks for the key set (result: the pending refetch), the second verifies.
    assert len(verifies) == 2
    fetches = await stack.receiver.wait_for(lambda s: s.name == "jwks fetch" and s.trace_id == server.trace_id)
    (fetch,) = fetches
    assert any(child_of(v)(fetch) for v in verifies) and fetch.attributes["jwtproxy.result"] == "ok"


async def test_rejected_request_is_traced_with_its_reason(tmp_path: Path, stacks: list[list[Any]]) -> None:
    stack, parts = await start_stack(tmp_path)
    stacks.append(parts)
    assert (await http("GET", stack.url("/api/x"), token="a.b.c")).status == 401
    (server,) = await stack.receiver.wait_for(lambda s: s.kind == SERVER)
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["jwtproxy.auth.result"] == "malformed"
    assert not server.error                      # a 4xx is not a server error (semantic conventions)
    assert not [s for s in stack.receiver.spans if s.kind == CLIENT and s.trace_id == server.trace_id]
    assert (await http("GET", stack.url("/nowhere"))).status == 404
    (missing,) = await stack.receiver.wait_for(lambda s: s.kind == SERVER and s.attributes.get("url.path") == "/nowhere")
    assert missing.name == "GET" and "http.route" not in missing.attributes


async def test_unsampled_requests_record_nothing_but_still_propagate(tmp_path: Path, stacks: list[list[Any]]) -> None:
    stack, parts = await start_stack(tmp_path, ratio=0.0)
    stacks.append(parts)
    token = stack.key.token()
    assert (await http("GET", stack.url("/api/quiet"), token=token)).status == 200
    # An incoming sampled traceparent decides for itself (parent-based sampling).
    trace_id = secrets.token_hex(16)
    parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    assert (await http("GET", stack.url("/api/loud"), token=token, headers={"traceparent": parent})).status == 200
    (loud,) = await stack.receiver.wait_for(lambda s: s.kind == SERVER)
    assert loud.trace_id == trace_id
    await asyncio.sleep(1.5)   # one more export interval: the quiet request sent nothing
    assert [s.attributes["url.path"] for s in stack.receiver.spans if s.kind == SERVER] == ["/api/loud"]
    (quiet,) = [r for r in stack.backend.seen if r["path"] == "/api/quiet"]
    (sent,) = header_values(quiet, "traceparent")
    match = TRACEPARENT.match(sent)
    assert match is not None and not sampled(match.group(3)), sent   # a new trace, unsampled, passed on


async def test_tracing_off_exports_nothing_and_forwards_the_client_trace_headers(
        tmp_path: Path, stacks: list[list[Any]]) -> None:
    stack, parts = await start_stack(tmp_path, tracing=False)
    stacks.append(parts)
    parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    reply = await http("GET", stack.url("/api/plain"), token=stack.key.token(), headers={"traceparent": parent})
    assert reply.status == 200
    (seen,) = [r for r in stack.backend.seen if r["path"] == "/api/plain"]
    assert header_values(seen, "traceparent") == [parent]   # untouched: the gateway is not in the trace
    await asyncio.sleep(1.5)
    assert stack.receiver.posts == 0 and stack.receiver.spans == []
