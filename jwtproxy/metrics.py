"""Prometheus metrics, aggregated over all worker processes.

Theory of operation
-------------------
* Hot path: ``WorkerMetrics`` counts into ``defaultdict(int)``s (``d[key] += 1``) and a
  local histogram (a list of bucket counts indexed with ``bisect``). No lock, no
  prometheus_client call, no string formatting per request.
* ``flush()`` (every ~1 s and at exit; ``flush_periodically()``) swaps those dicts for empty
  ones and adds the deltas to prometheus_client metrics. In multiprocess mode each process
  writes its values into its own mmap'd files in ``$PROMETHEUS_MULTIPROC_DIR``; the parent's
  ``render_metrics()`` sums them with ``MultiProcessCollector``. A worker that dies loses at
  most one flush interval of counts; the counts it flushed stay in the totals.
* The supervisor calls ``enable_multiprocess(dir)`` *before* forking. prometheus_client picks
  its value class when it is first imported, which may be before the supervisor ran, so
  ``enable_multiprocess`` switches ``prometheus_client.values.ValueClass`` explicitly. After
  a fork prometheus_client notices the new PID and opens that PID's own files.
* Every labelled counter exists from the start with 0 for its known label values
  (``declare()``, created by the first flush): routes, failure reasons, upstreams and their
  error kinds, issuers and refresh results, cache results. ``rate()`` and alerts then work
  before the first failure; a feature that adds a label value adds it to the tuple that lists
  them (``auth.AUTH_FAILURE_REASONS``, ``upstream.UPSTREAM_ERROR_KINDS``, ``ROUTE_STATUSES``).
* ``mark_worker_dead(pid)`` removes a dead worker's live gauges (counters and histograms are
  kept: they are totals).
* The duration histogram is flushed by adding to the histogram's per-bucket values
  (``Histogram._buckets`` / ``_sum``): calling ``observe()`` once per request would defeat
  the batching. tests/test_metrics.py checks the aggregated output, so a prometheus_client
  change of those internals fails a test rather than the metrics.
"""

from __future__ import annotations

import asyncio
import glob
import os
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric

__all__ = [
    "DURATION_BUCKETS",
    "METRICS_CONTENT_TYPE",
    "WorkerMetrics",
    "SupervisorMetrics",
    "enable_multiprocess",
    "mark_worker_dead",
    "render_metrics",
    "counter_totals",
]

#: Seconds. Fine-grained below 10 ms (a cached-token request is sub-millisecond), coarse up
#: to 30 s (the default upstream response timeout).
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

#: Content type of ``render_metrics()`` output (Prometheus text format 0.0.4).
METRICS_CONTENT_TYPE: str = CONTENT_TYPE_PLAIN_0_0_4

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(path: str, *, clean: bool = True) -> None:
    """Put prometheus_client into multiprocess mode writing to ``path`` (created if needed).

    ``clean`` removes the ``*.db`` files of a previous run, so totals restart with the
    daemon (as Prometheus expects of counters after a restart). Call before forking.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    if clean:
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)
    os.environ[_MULTIPROC_ENV] = path
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def mark_worker_dead(pid: int) -> None:
    """Bookkeeping for a dead worker (drops its live gauges); no-op outside multiprocess mode."""
    path = os.environ.get(_MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def render_metrics() -> bytes:
    """Prometheus text exposition of every process's metrics (``METRICS_CONTENT_TYPE``).

    In multiprocess mode this aggregates the files of all workers, dead or alive; otherwise it
    renders this process's default registry.
    """
    path = os.environ.get(_MULTIPROC_ENV)
    if not path:
        return generate_latest(prometheus_client.REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def counter_totals(
    counters: Mapping[str, tuple[str, tuple[str, ...]]],
) -> dict[str, dict[tuple[str, ...], float]]:
    """Current totals of some counters over every process, by label values.

    ``counters`` maps a key of the result to ``(counter name without _total, label names)``,
    e.g. ``{"requests": ("jwtproxy_requests", ("route", "status"))}``; each result maps the
    tuple of label values (in that order) to the total. Reads what ``render_metrics()`` reads,
    without rendering text; a counter nobody incremented yet is an empty mapping.
    """
    path = os.environ.get(_MULTIPROC_ENV)
    families: Iterable[Metric]
    if path:
        collector = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        families = collector.collect()  # type: ignore[no-untyped-call]
    else:
        families = prometheus_client.REGISTRY.collect()
    wanted = {name: (key, labelnames) for key, (name, labelnames) in counters.items()}
    out: dict[str, dict[tuple[str, ...], float]] = {key: {} for key in counters}
    for family in families:
        found = wanted.get(family.name)
        if found is None:
            continue
        key, labelnames = found
        values = out[key]
        for sample in family.samples:
            if sample.name != family.name + "_total":
                continue   # the _created samples of a single-process registry
            labels = tuple(sample.labels.get(n, "") for n in labelnames)
            values[labels] = values.get(labels, 0.0) + sample.value
    return out


class _KnownLabels:
    """Label values to create at 0 (``WorkerMetrics.declare``)."""

    __slots__ = ("requests", "reasons", "upstream_errors", "jwks", "introspection", "rate_limited", "queues")

    def __init__(self, requests: list[tuple[str, str, str]], reasons: list[str],
                 upstream_errors: list[tuple[str, str]], jwks: list[tuple[str, str]],
                 introspection: list[tuple[str, str]], rate_limited: list[str], queues: list[str]) -> None:
        self.requests = requests
        self.reasons = reasons
        self.upstream_errors = upstream_errors
        self.jwks = jwks
        self.introspection = introspection
        self.rate_limited = rate_limited  # routes with a rate limit
        self.queues = queues  # upstreams (their pending queues)


class _PromWorker:
    """The prometheus_client side of WorkerMetrics (created once per process)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.requests = Counter(
            "jwtproxy_requests_total", "Requests answered, by route, status and listener kind.",
            ("route", "status", "listener"), registry=None)
        self.auth_failures = Counter(
            "jwtproxy_auth_failures_total", "Requests rejected by authentication, by reason.",
            ("reason",), registry=None)
        self.duration = Histogram(
            "jwtproxy_request_duration_seconds",
            "Time from the request head to the end of the response.",
            buckets=tuple(buckets), registry=None)
        self.token_cache = Counter(
            "jwtproxy_token_cache_total", "Verified-token cache lookups, by result.",
            ("result",), registry=None)
        self.jwks_refresh = Counter(
            "jwtproxy_jwks_refresh_total", "JWKS fetches, by issuer and result.",
            ("issuer", "result"), registry=None)
        self.upstream_errors = Counter(
            "jwtproxy_upstream_errors_total", "Failures talking to upstreams, by kind.",
            ("upstream", "kind"), registry=None)
        self.introspection = Counter(
            "jwtproxy_introspection_total", "RFC 7662 token introspection outcomes, by issuer and result.",
            ("issuer", "result"), registry=None)
        # Limits (contract §5.5). Gauges are per worker, summed over the live ones.
        self.rate_limited = Counter(
            "jwtproxy_rate_limited_total", "Requests refused 429 by the route's rate limit.",
            ("route",), registry=None)
        self.queue_rejected = Counter(
            "jwtproxy_upstream_queue_rejected_total",
            "Requests answered 503 for want of an upstream connection (queue full or wait too long).",
            ("upstream",), registry=None)
        self.rate_limit_fallbacks = Counter(
            "jwtproxy_rate_limit_fallback_total",
            "Rate-limit decisions made locally because the Redis backend was unreachable.",
            registry=None)
        self.client_rejected = Counter(
            "jwtproxy_client_connections_rejected_total",
            "Client connections answered 503 and closed at once (max_connections).", registry=None)
        self.gauges = {
            GAUGE_QUEUE_DEPTH: Gauge(
                GAUGE_QUEUE_DEPTH, "Requests waiting for an upstream connection.", ("upstream",),
                multiprocess_mode="livesum", registry=None),
            GAUGE_UPSTREAM_CONNECTIONS: Gauge(
                GAUGE_UPSTREAM_CONNECTIONS,
                "Upstream connections open or opening (what upstream_max_connections counts).",
                ("upstream",), multiprocess_mode="livesum", registry=None),
            GAUGE_CLIENT_CONNECTIONS: Gauge(
                GAUGE_CLIENT_CONNECTIONS, "Open client connections.", (),
                multiprocess_mode="livesum", registry=None),
            GAUGE_RATE_LIMIT_BACKEND_UP: Gauge(
                GAUGE_RATE_LIMIT_BACKEND_UP,
                "1 if every worker reaches the Redis rate-limit backend (absent with backend local).",
                (), multiprocess_mode="livemin", registry=None),
        }


#: Gauges a worker samples at each flush (see :attr:`WorkerMetrics.sample`).
GAUGE_QUEUE_DEPTH = "jwtproxy_upstream_queue_depth"
GAUGE_UPSTREAM_CONNECTIONS = "jwtproxy_upstream_connections"
GAUGE_CLIENT_CONNECTIONS = "jwtproxy_client_connections"
GAUGE_RATE_LIMIT_BACKEND_UP = "jwtproxy_rate_limit_backend_up"
Sample = Iterable[tuple[str, tuple[str, ...], float]]


#: Statuses ``jwtproxy_requests_total`` has from the start, at 0, for every route: success, and
#: every answer the gateway gives on a route itself (authentication, limits, internal error,
#: upstream failures), so rate() and alerts on them work before the first one. Other upstream
#: statuses appear when they first occur (they cannot be listed in advance).
ROUTE_STATUSES: tuple[str, ...] = ("200", "401", "403", "429", "500", "502", "503", "504")
#: ... and under the route label "-" (no route took the request): no route, malformed request.
UNROUTED_STATUSES: tuple[str, ...] = ("400", "404")
#: Results of ``jwtproxy_token_cache_total`` and ``jwtproxy_jwks_refresh_total``.
TOKEN_CACHE_RESULTS: tuple[str, ...] = ("hit", "miss")
JWKS_REFRESH_RESULTS: tuple[str, ...] = ("ok", "unchanged", "error")
INTROSPECTION_RESULTS: tuple[str, ...] = ("active", "inactive", "rejected", "error", "busy", "hit", "shared")


class WorkerMetrics:
    """Per-worker counters. Hot-path methods are dict increments; ``flush()`` publishes."""

    __slots__ = (
        "_requests", "_auth_failures", "_token_cache", "_jwks_refresh", "_upstream_errors",
        "_introspection", "_bounds", "_hist", "_hist_sum", "_prom", "_declared", "_rate_limited",
        "_queue_rejected", "_fallbacks", "_client_rejected", "sample",
    )

    def __init__(self, buckets: Iterable[float] = DURATION_BUCKETS) -> None:
        self._bounds: tuple[float, ...] = tuple(buckets)
        # defaultdict(int): ``d[k] += 1`` measured ~20% faster than ``d[k] = d.get(k, 0) + 1``.
        self._requests: defaultdict[tuple[str, int, str], int] = defaultdict(int)
        self._auth_failures: defaultdict[str, int] = defaultdict(int)
        self._token_cache: defaultdict[str, int] = defaultdict(int)
        self._jwks_refresh: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._upstream_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._introspection: defaultdict[tuple[str, str], int] = defaultdict(int)
        # One slot per bound plus +Inf; bisect_left gives the first bound >= duration,
        # matching Prometheus' inclusive "le".
        self._hist: list[int] = [0] * (len(self._bounds) + 1)
        self._hist_sum = 0.0
        self._prom: _PromWorker | None = None   # built on first flush, in the worker process
        self._declared: _KnownLabels | None = None  # created (at 0) by the next flush
        self._rate_limited: defaultdict[str, int] = defaultdict(int)
        self._queue_rejected: defaultdict[str, int] = defaultdict(int)
        self._fallbacks = 0
        self._client_rejected = 0
        #: Called at each flush for the gauges' current values: ``(gauge name, labels, value)``.
        self.sample: Callable[[], Sample] | None = None

    # -- hot path ---------------------------------------------------------------------------

    def request(self, route: str, status: int, duration: float, listener: str = "traffic") -> None:
        """Count one answered request: ``route`` is the route's label ("-" for none), ``listener``
        the kind of listener that answered it, ``"traffic"`` or ``"authz"`` (forward-auth)."""
        self._requests[route, status, listener] += 1
        self._hist[bisect_left(self._bounds, duration)] += 1
        self._hist_sum += duration

    def auth_failure(self, reason: str) -> None:
        """Count one authentication rejection (``TokenRejected.reason``, "missing_token", ...)."""
        self._auth_failures[reason] += 1

    def token_cache(self, result: str) -> None:
        """Count one cache lookup: ``"hit"`` or ``"miss"``."""
        self._token_cache[result] += 1

    def jwks_refresh(self, issuer: str, result: str) -> None:
        """Count one JWKS fetch: ``"ok"``, ``"error"`` or ``"unchanged"``."""
        self._jwks_refresh[issuer, result] += 1

    def introspection(self, issuer: str, result: str) -> None:
        """Count one introspection outcome: ``active``, ``inactive``, ``rejected``, ``error``,
        ``busy`` (refused: too many calls in flight), ``hit`` (cached) or ``shared`` (joined a
        call in flight)."""
        self._introspection[issuer, result] += 1

    def upstream_error(self, upstream: str, kind: str) -> None:
        """Count one upstream failure by kind: ``"connect"``, ``"tls"``, ``"reset"``, ``"timeout"``, ``"protocol"``..."""
        self._upstream_errors[upstream, kind] += 1

    def rate_limited(self, route: str) -> None:
        """Count one request refused 429 by ``route``'s rate limit."""
        self._rate_limited[route] += 1

    def queue_rejected(self, upstream: str) -> None:
        """Count one request answered 503 for want of an upstream connection."""
        self._queue_rejected[upstream] += 1

    def rate_limit_fallbacks(self, count: int) -> None:
        """Count ``count`` rate-limit decisions made locally while Redis was away."""
        self._fallbacks += count

    def client_rejected(self) -> None:
        """Count one client connection refused past ``max_connections``."""
        self._client_rejected += 1

    def declare(
        self,
        *,
        routes: Iterable[str],
        listeners: Iterable[str] = ("traffic",),
        reasons: Iterable[str],
        upstreams: Iterable[str],
        upstream_kinds: Iterable[str],
        issuers: Iterable[str],
        introspecting: Iterable[str] = (),
        rate_limited_routes: Iterable[str] = (),
    ) -> None:
        """Label values every labelled counter has from the start, at 0 (the next ``flush()``
        creates them): ``routes`` with :data:`ROUTE_STATUSES` (plus "-" with
        :data:`UNROUTED_STATUSES`) on each kind of listener, every failure ``reason``, each upstream with each kind, each
        issuer with :data:`JWKS_REFRESH_RESULTS`, each ``introspecting`` issuer with
        :data:`INTROSPECTION_RESULTS`, :data:`TOKEN_CACHE_RESULTS`, and the limits' counters for
        every route with a rate limit and every upstream's queue."""
        kinds = list(listeners)
        routes = list(routes)
        upstreams = list(upstreams)
        self._declared = _KnownLabels(
            requests=[(route, status, kind) for kind in kinds for route in routes for status in ROUTE_STATUSES]
            + [("-", status, kind) for kind in kinds for status in UNROUTED_STATUSES],
            reasons=list(reasons),
            upstream_errors=[(name, kind) for name in upstreams for kind in upstream_kinds],
            jwks=[(issuer, result) for issuer in issuers for result in JWKS_REFRESH_RESULTS],
            introspection=[(issuer, result) for issuer in introspecting for result in INTROSPECTION_RESULTS],
            rate_limited=list(rate_limited_routes),
            queues=upstreams,
        )

    # -- publishing -------------------------------------------------------------------------

    def flush(self) -> None:
        """Move the local counts into prometheus_client (its multiprocess files)."""
        prom = self._prom
        if prom is None:
            prom = self._prom = _PromWorker(self._bounds)
        # Sampled first: the sampler may count (fallback decisions), and those counts belong here.
        gauges = list(self.sample()) if self.sample is not None else []
        # Swap before publishing: whatever the hot path counts meanwhile lands in the new
        # dicts (all on one event loop thread, so this is only about re-entrancy).
        requests, self._requests = self._requests, defaultdict(int)
        auth, self._auth_failures = self._auth_failures, defaultdict(int)
        cache, self._token_cache = self._token_cache, defaultdict(int)
        jwks, self._jwks_refresh = self._jwks_refresh, defaultdict(int)
        upstream, self._upstream_errors = self._upstream_errors, defaultdict(int)
        introspection, self._introspection = self._introspection, defaultdict(int)
        hist, self._hist = self._hist, [0] * len(self._hist)
        hist_sum, self._hist_sum = self._hist_sum, 0.0
        limited, self._rate_limited = self._rate_limited, defaultdict(int)
        rejected, self._queue_rejected = self._queue_rejected, defaultdict(int)
        fallbacks, self._fallbacks = self._fallbacks, 0
        client_rejected, self._client_rejected = self._client_rejected, 0
        declared, self._declared = self._declared, None
        if declared is not None:
            # labels() alone writes the sample, at 0, into this process's multiprocess file.
            for route_label, status_label, listener_label in declared.requests:
                prom.requests.labels(route_label, status_label, listener_label)
            for reason_label in declared.reasons:
                prom.auth_failures.labels(reason_label)
            for upstream_label, kind_label in declared.upstream_errors:
                prom.upstream_errors.labels(upstream_label, kind_label)
            for issuer_label, result_label in declared.jwks:
                prom.jwks_refresh.labels(issuer_label, result_label)
            for issuer_label, result_label in declared.introspection:
                prom.introspection.labels(issuer_label, result_label)
            for cache_label in TOKEN_CACHE_RESULTS:
                prom.token_cache.labels(cache_label)
            for route_label in declared.rate_limited:
                prom.rate_limited.labels(route_label)
            for upstream_label in declared.queues:
                prom.queue_rejected.labels(upstream_label)
            prom.rate_limit_fallbacks.inc(0)
            prom.client_rejected.inc(0)

        for (route, status, listener), n in requests.items():
            prom.requests.labels(route, str(status), listener).inc(n)
        for reason, n in auth.items():
            prom.auth_failures.labels(reason).inc(n)
        for result, n in cache.items():
            prom.token_cache.labels(result).inc(n)
        for (issuer, result), n in jwks.items():
            prom.jwks_refresh.labels(issuer, result).inc(n)
        for (name, kind), n in upstream.items():
            prom.upstream_errors.labels(name, kind).inc(n)
        for (issuer, result), n in introspection.items():
            prom.introspection.labels(issuer, result).inc(n)
        for route, n in limited.items():
            prom.rate_limited.labels(route).inc(n)
        for name, n in rejected.items():
            prom.queue_rejected.labels(name).inc(n)
        if fallbacks:
            prom.rate_limit_fallbacks.inc(fallbacks)
        if client_rejected:
            prom.client_rejected.inc(client_rejected)
        for gauge, labels, value in gauges:
            metric = prom.gauges[gauge]
            (metric.labels(*labels) if labels else metric).set(value)
        if any(hist):
            buckets = prom.duration._buckets   # see module docstring
            for i, n in enumerate(hist):
                if n:
                    buckets[i].inc(n)
            prom.duration._sum.inc(hist_sum)

    async def flush_periodically(self, interval: float = 1.0) -> None:
        """Flush every ``interval`` seconds until cancelled; flushes once more on the way out."""
        try:
            while True:
                await asyncio.sleep(interval)
                self.flush()
        finally:
            self.flush()


class SupervisorMetrics:
    """Metrics owned by the supervisor process (the parent)."""

    def __init__(self) -> None:
        # "livemax": only the supervisor sets these; its files go when the dir is cleaned.
        self.workers = Gauge(
            "jwtproxy_workers", "Worker processes running, by state.", ("state",),
            multiprocess_mode="livemax", registry=None)
        self.config_reloads = Counter(
            "jwtproxy_config_reloads_total", "SIGHUP configuration reloads, by result.",
            ("result",), registry=None)
        self.worker_restarts = Counter(
            "jwtproxy_worker_restarts_total", "Workers that died unexpectedly and were replaced.",
            registry=None)
        self.revocation_backend_up = Gauge(
            "jwtproxy_revocation_backend_up", "1 if the revocation backend answers.",
            multiprocess_mode="livemax", registry=None)
        self.issuer_keys_loaded = Gauge(
            "jwtproxy_issuer_keys_loaded",
            "1 if every current worker reported keys for the issuer.", ("issuer",),
            multiprocess_mode="livemax", registry=None)

    def set_workers(self, ready: int, starting: int, draining: int) -> None:
        self.workers.labels("ready").set(ready)
        self.workers.labels("starting").set(starting)
        self.workers.labels("draining").set(draining)
