"""OpenTelemetry tracing (``[tracing]``): a span per request, exported over OTLP/HTTP.

Theory of operation
-------------------
* Off costs nothing. With ``otlp_endpoint = ""`` (the default) no :class:`Tracing` exists and the
  SDK is never imported: the gateway's ``tracer`` is None and the connection's only per-request
  work is that None check.
  The OpenTelemetry SDK is the optional extra ``jwtproxy[tracing]``; the config loader refuses a
  non-empty ``otlp_endpoint`` when it is missing, so tracing never silently fails to start.
* One :class:`Tracing` per worker process, built after the fork (the SDK's batch exporter runs a
  thread, and threads do not survive ``fork()``): a ``TracerProvider`` with the resource
  ``service.name`` and a batch processor exporting to ``otlp_endpoint`` (the full traces URL,
  protobuf over HTTP).
* A request is one SERVER span (:class:`RequestTrace`), parented on the incoming W3C
  ``traceparent``/``tracestate`` when valid. Its children: ``jwtproxy.verify`` (the call into the
  verification stage), ``jwks fetch`` when the request made one happen (an unknown ``kid``), and
  the upstream exchange (a CLIENT span from choosing a connection to the end of the response).
  ``introspection.Introspector`` takes the tracer too and makes an ``introspection`` span per
  call, which becomes a child the same way once the introspection client is called from the
  request path (it is not yet).
  The upstream receives a ``traceparent`` naming that CLIENT span; a client's own
  ``traceparent``/``tracestate`` are never forwarded as they came.
* Key fetches and introspection calls are shared by concurrent requests and run in tasks; they
  find their parent through OpenTelemetry's context, which :meth:`RequestTrace.verify` makes the
  verification span for the duration of the call (``asyncio`` copies the context into tasks
  created then). A background refresh has no request: it is a trace of its own.
* Attributes follow the HTTP semantic conventions (``http.request.method``, ``url.path``,
  ``url.scheme``, ``server.address``, ``client.address``, ``http.route``,
  ``http.response.status_code``, ``error.type``, ...). Never a token, a header value that could
  carry one, or a query string: ``url.path`` is the normalised path, ``url.full`` of the upstream
  exchange has no query, and the only jwtproxy attributes are the request id, the route's
  upstream and the verification result (``ok`` or the failure reason of
  ``jwtproxy_auth_failures_total``).
* Sampling: a request with a valid incoming ``traceparent`` follows its sampled flag
  (parent-based); a new trace is sampled with probability ``sample_ratio``, decided here before
  the SDK is involved. An unsampled request is an :class:`UnsampledTrace`: no span, no SDK call,
  two random numbers and its ``traceparent`` for the upstream (a new span id under the same trace
  id, the flags as they came).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from random import getrandbits, random
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # imported for real in Tracing.__init__, only when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from jwtproxy.config import TracingConfig

__all__ = [
    "TRACE_HEADERS", "Operation", "OperationTracer", "RequestTrace", "Tracing", "UnsampledTrace",
]

#: Client headers replaced by the gateway's own trace context towards the upstream.
TRACE_HEADERS: frozenset[bytes] = frozenset({b"traceparent", b"tracestate"})

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

R = TypeVar("R")


class Operation(Protocol):
    """One traced piece of work outside a request's own code (a key fetch, an introspection)."""

    def end(self, result: str, error: str | None = None, status_code: int | None = None) -> None: ...


class OperationTracer(Protocol):
    """What the key manager and the introspection client are given to trace their calls."""

    def operation(self, name: str, attributes: Mapping[str, str | int]) -> Operation: ...


class _Operation:
    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def end(self, result: str, error: str | None = None, status_code: int | None = None) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("jwtproxy.result", result)
            if status_code is not None:
                span.set_attribute("http.response.status_code", status_code)
            if error is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
        span.end()


def _method(method: bytes) -> dict[str, str]:
    text = method.decode("latin-1")
    if text in _KNOWN_METHODS:
        return {"http.request.method": text}
    return {"http.request.method": "_OTHER", "http.request.method_original": text}


class Tracing:
    """The worker's tracer: provider, sampler and OTLP/HTTP exporter (see the module docstring).

    ``exporter`` replaces the OTLP exporter (tests); ``schedule_delay`` is the batch processor's
    export interval in seconds.
    """

    def __init__(self, config: TracingConfig, *, exporter: SpanExporter | None = None,
                 schedule_delay: float = 1.0) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace as otel_trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from jwtproxy import __version__

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=5)
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(
            resource=resource, sampler=ALWAYS_ON)
        # Sampling is decided in request(), before the SDK is involved: an unsampled request costs
        # two random numbers, not a span, and the SDK only ever sees what is recorded. (Key
        # fetches outside any request -- the background refresh -- are always recorded.)
        self.ratio = config.sample_ratio
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay * 1000))
        self.tracer: Tracer = self.provider.get_tracer("jwtproxy", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.server_kind = otel_trace.SpanKind.SERVER
        self.client_kind = otel_trace.SpanKind.CLIENT
        self.internal_kind = otel_trace.SpanKind.INTERNAL
        self.set_span_in_context = otel_trace.set_span_in_context
        self.attach = otel_context.attach
        self.detach = otel_context.detach

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        method: bytes,
        version: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        path: str,
        scheme: bytes,
        host: str,
        client: str,
        request_id: bytes,
        age: float,
        route: str | None,
        upstream: str | None,
    ) -> RequestTrace | UnsampledTrace:
        """The trace of a request whose head arrived ``age`` seconds ago: a SERVER span when
        sampled, else an :class:`UnsampledTrace` that only carries the trace context on.

        ``path`` is the normalised path (never the query); ``host`` the Host header's value;
        ``route`` the matched route's path prefix (None: no route), ``upstream`` its upstream.
        """
        traceparent = tracestate = user_agent = None
        for header, value in headers:
            if header == b"traceparent":
                traceparent = value
            elif header == b"tracestate":
                tracestate = value
            elif header == b"user-agent":
                user_agent = value
        parent = None
        incoming = _parse_traceparent(traceparent) if traceparent is not None else None
        if incoming is not None:
            trace_id, flags = incoming
            if not flags & 1:  # the caller did not sample it: neither do we (parent-based)
                return UnsampledTrace(b"00-%s-%016x-%02x" % (trace_id, _random_id(64), flags), tracestate)
            carrier = {"traceparent": traceparent.decode("latin-1")} if traceparent else {}
            if tracestate is not None:
                carrier["tracestate"] = tracestate.decode("latin-1")
            parent = self.propagator.extract(carrier)
        elif self.ratio < 1.0 and random() >= self.ratio:
            return UnsampledTrace(b"00-%032x-%016x-00" % (_random_id(128), _random_id(64)), None)
        attributes: dict[str, str | int] = dict(_method(method))
        attributes["url.path"] = path
        attributes["url.scheme"] = scheme.decode()
        attributes["network.protocol.version"] = version.decode("latin-1")
        server, _, port = host.rpartition(":") if host.rfind(":") > host.rfind("]") else (host, "", "")
        if server:
            attributes["server.address"] = server.strip("[]")
            if port.isdigit():
                attributes["server.port"] = int(port)
        if client:
            attributes["client.address"] = client
        if user_agent is not None:
            attributes["user_agent.original"] = user_agent.decode("latin-1")
        attributes["jwtproxy.request_id"] = request_id.decode("latin-1")
        method_name = attributes["http.request.method"]
        name = str(method_name) if method_name != "_OTHER" else "HTTP"
        if route is not None:
            # Low cardinality: the route's prefix, never the path (semantic conventions).
            name = f"{name} {route}"
            attributes["http.route"] = route
        if upstream is not None:
            attributes["jwtproxy.upstream"] = upstream
        span = self.tracer.start_span(name, context=parent, kind=self.server_kind, attributes=attributes,
                                      start_time=time.time_ns() - int(age * 1e9))
        return RequestTrace(self, span)

    # -- operations outside a request's own code ------------------------------------------------

    def operation(self, name: str, attributes: Mapping[str, str | int]) -> Operation:
        """A CLIENT span for one call; parented on the current context (a request's verification,
        see :meth:`RequestTrace.verify`), else a trace of its own."""
        return _Operation(self.tracer.start_span(name, kind=self.client_kind, attributes=attributes))

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter thread (blocks up to the export timeout)."""
        self.provider.shutdown()


class RequestTrace:
    """The spans of one request (see the module docstring). Every method is cheap when the
    request is not sampled: only its trace context is kept, for the upstream."""

    __slots__ = ("tracing", "span", "recording", "upstream_span", "_context")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.recording = span.is_recording()
        self.upstream_span: Span | None = None
        self._context: Context = tracing.set_span_in_context(span)

    def verify(self, authorize: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run one call into the verification stage inside a ``jwtproxy.verify`` span, which is the
        current context meanwhile (so a key fetch or introspection it starts is its child)."""
        if not self.recording:
            return authorize(*args, **kwargs)
        tracing = self.tracing
        span = tracing.tracer.start_span("jwtproxy.verify", context=self._context, kind=tracing.internal_kind)
        token = tracing.attach(tracing.set_span_in_context(span))
        try:
            decision = authorize(*args, **kwargs)
            reason = getattr(decision, "reason", None)
            span.set_attribute("jwtproxy.auth.result",
                               reason if isinstance(reason, str) else type(decision).__name__.lower())
            return decision
        finally:
            tracing.detach(token)
            span.end()

    def upstream_start(self, method: bytes) -> None:
        """Choosing an upstream connection begins (pooled or new; a retry starts a new span)."""
        if self.recording:
            tracing = self.tracing
            attributes = _method(method)
            method_name = attributes["http.request.method"]
            self.upstream_span = tracing.tracer.start_span(
                method_name if method_name != "_OTHER" else "HTTP", context=self._context, kind=tracing.client_kind,
                attributes=attributes)

    def upstream_headers(self, scheme: str, host: str, port: int, path: str) -> list[tuple[bytes, bytes]]:
        """The connection is chosen: its address on the CLIENT span, and the trace headers the
        upstream receives (naming that span, or the request's when not sampled)."""
        span = self.upstream_span
        context = self._context
        if span is not None:
            shown = f"[{host}]" if ":" in host else host
            span.set_attributes({"server.address": host, "server.port": port,
                                 "url.full": f"{scheme}://{shown}:{port}{path}"})
            context = self.tracing.set_span_in_context(span)
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=context)
        return [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]

    def upstream_end(self, status: int | None, error: str | None = None) -> None:
        """The upstream exchange ended: its response status, or the failure kind."""
        span = self.upstream_span
        if span is None:
            return
        self.upstream_span = None
        if status:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 400):
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", error or str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def finish(self, status: int, auth: str) -> None:
        """The response is out (or the client went away: 499): end every open span. ``auth`` is
        the access log's: ``ok``, ``anonymous`` or the failure reason."""
        if self.upstream_span is not None:
            self.upstream_end(None, "client_closed" if status == 499 else "abandoned")
        span = self.span
        if self.recording:
            span.set_attributes({"http.response.status_code": status, "jwtproxy.auth.result": auth})
            if status >= 500:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class UnsampledTrace:
    """A request that is not sampled: nothing recorded, its trace context passed upstream (a new
    span id under the trace id, the flags as they came). Same interface as :class:`RequestTrace`."""

    __slots__ = ("headers",)

    def __init__(self, traceparent: bytes, tracestate: bytes | None) -> None:
        self.headers = [(b"traceparent", traceparent)]
        if tracestate is not None:
            self.headers.append((b"tracestate", tracestate))

    def verify(self, authorize: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        return authorize(*args, **kwargs)

    def upstream_start(self, method: bytes) -> None:
        pass

    def upstream_headers(self, scheme: str, host: str, port: int, path: str) -> list[tuple[bytes, bytes]]:
        return self.headers

    def upstream_end(self, status: int | None, error: str | None = None) -> None:
        pass

    def finish(self, status: int, auth: str) -> None:
        pass


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.S)


def _parse_traceparent(value: bytes) -> tuple[bytes, int] | None:
    """(trace id, flags) of a valid W3C ``traceparent``, else None (then it is ignored and the
    request starts a new trace, as the Trace Context recommendation says)."""
    m = _TRACEPARENT.match(value.strip(b" \t"))
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest) or trace_id == b"0" * 32 or parent_id == b"0" * 16:
        return None
    return trace_id, int(flags, 16)


def _random_id(bits: int) -> int:
    return getrandbits(bits) or 1   # an all-zero id is invalid
