"""OpenTelemetry tracing (``[tracing]``): a span per request, exported over OTLP/HTTP.

Theory of operation
-------------------
* Off costs nothing. With ``otlp_endpoint = ""`` (the default) this module is never imported: the
  gateway's ``tracer`` is None and the connection's only per-request work is that None check.
  The OpenTelemetry SDK is the optional extra ``jwtproxy[tracing]``; the config loader refuses a
  non-empty ``otlp_endpoint`` when it is missing, so tracing never silently fails to start.
* One :class:`Tracing` per worker process, built after the fork (the SDK's batch exporter runs a
  thread, and threads do not survive ``fork()``): a ``TracerProvider`` with the resource
  ``service.name``, a parent-based ratio sampler (``sample_ratio`` for new traces; a sampled or
  unsampled incoming ``traceparent`` is followed, as W3C Trace Context asks), and a batch
  processor exporting to ``otlp_endpoint`` (the full traces URL, protobuf over HTTP).
* A request is one SERVER span (:class:`RequestTrace`), parented on the incoming W3C
  ``traceparent``/``tracestate`` when valid. Its children: ``jwtproxy.verify`` (the call into the
  verification stage), ``jwks fetch`` and ``introspection`` when a request made one happen, and
  the upstream exchange (a CLIENT span from choosing a connection to the end of the response).
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
* An unsampled request (sample_ratio < 1) records nothing: no child spans are made, only its
  trace context is passed upstream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # imported for real in Tracing.__init__, only when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from jwtproxy.config import TracingConfig

__all__ = [
    "TRACE_HEADERS", "Operation", "OperationTracer", "RequestTrace", "Tracing",
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
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from jwtproxy import __version__

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=5)
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
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
    ) -> RequestTrace:
        """Start the SERVER span of a request whose head arrived ``age`` seconds ago.

        ``path`` is the normalised path (never the query); ``host`` the Host header's value.
        """
        carrier: dict[str, str] = {}
        user_agent = None
        for name, value in headers:
            if name in TRACE_HEADERS:
                carrier[name.decode()] = value.decode("latin-1")
            elif name == b"user-agent":
                user_agent = value.decode("latin-1")
        parent = self.propagator.extract(carrier) if carrier else None
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
            attributes["user_agent.original"] = user_agent
        attributes["jwtproxy.request_id"] = request_id.decode("latin-1")
        start = time.time_ns() - int(age * 1e9)
        method_name = attributes["http.request.method"]
        span = self.tracer.start_span(str(method_name) if method_name != "_OTHER" else "HTTP", context=parent,
                                      kind=self.server_kind, attributes=attributes, start_time=start)
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

    def routed(self, method: bytes, route: str, upstream: str) -> None:
        """The request matched a route: the span is named ``METHOD route`` (low cardinality)."""
        if self.recording:
            name = method.decode("latin-1")
            self.span.update_name(f"{name if name in _KNOWN_METHODS else 'HTTP'} {route}")
            self.span.set_attribute("http.route", route)
            self.span.set_attribute("jwtproxy.upstream", upstream)

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
            span.set_attribute("server.address", host)
            span.set_attribute("server.port", port)
            span.set_attribute("url.full", f"{scheme}://{shown}:{port}{path}")
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
            span.set_attribute("http.response.status_code", status)
            span.set_attribute("jwtproxy.auth.result", auth)
            if status >= 500:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        span.end()
