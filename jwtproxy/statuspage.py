"""The admin status page: ``GET /`` (HTML), its script and stylesheet, and ``GET /status`` (JSON).

Theory of operation
-------------------
* One document, two renderings. :func:`build_status` turns what the supervisor knows (the
  config, each worker's latest report, the revocation store's ``status()``, the readiness
  reasons, the traffic window) into one JSON object; ``GET /status`` serves it and the page's
  own script (``static/status.js``) fetches it every few seconds and redraws in place, so the
  page never reloads. Nothing here runs per proxied request: the page costs the gateway
  nothing unless somebody looks at it.
* Sans-I/O. :func:`build_status` and :class:`RateWindow` are pure functions of their
  arguments (the clock is a parameter), tested without a daemon; the supervisor does the
  reading and the timing.
* Per-minute figures come from the Prometheus counters the workers already flush (the totals
  of every worker, dead ones included, so a worker restart does not make a rate jump). The
  supervisor records a snapshot of those totals every ``RateWindow.interval`` seconds into a
  ring buffer; a rate is the newest totals minus the oldest snapshot inside the window. Until
  the daemon has run a full minute the window is what there is, and ``window_seconds`` says
  so.
* Authentication. The data (``/status``) is behind ``[admin] token`` like every other admin
  route. The page shell, its script and its stylesheet are not: they are the same bytes in
  every installation and hold no data, and a browser cannot attach a bearer token to a
  navigation. The script takes the token once from the URL fragment (``/#token=...``, which a
  browser never sends to a server, so it reaches no access log) or from a small form shown on
  a 401, keeps it in ``sessionStorage`` (this tab only, gone when the tab closes), removes the
  fragment from the address bar, and sends ``Authorization: Bearer`` on its fetches.
* Strict Content-Security-Policy (:data:`CONTENT_SECURITY_POLICY`): no inline script or
  style, nothing from another origin, no framing, no form submission. The script builds the
  page with ``textContent`` only, never HTML strings: error texts can carry bytes chosen by a
  remote identity provider.
* Adding to the page: a feature with something to show (rate limits, DPoP replay cache, ...)
  adds a key to the document in :func:`build_status` and a renderer to ``status.js``
  (``SECTIONS``); a new failure reason or label value needs nothing here -- the traffic table
  lists whatever the counters hold.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from jwtproxy import __version__
from jwtproxy.config import Config, IssuerConfig

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "PUBLIC_PATHS",
    "RateWindow",
    "WorkerView",
    "add_status_routes",
    "build_status",
    "redact_source",
]

Json = dict[str, Any]
#: Counter totals by metric, then by label values: ``{"requests": {("/api", "200"): 12.0}}``.
Totals = Mapping[str, Mapping[tuple[str, ...], float]]

#: The page's policy: its own script, stylesheet and ``fetch`` only; a ``data:`` favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: The page shell and its assets: served without the admin token (see module docstring).
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/static/status.js", "/static/status.css"})

_ASSETS: dict[str, tuple[str, str]] = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/static/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/static/status.css": ("status.css", "text/css; charset=utf-8"),
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# ------------------------------------------------------------------------------ traffic window


class RateWindow:
    """A ring buffer of counter snapshots; deltas over the last ``window`` seconds.

    ``due(now)`` says whether a snapshot is due (one per ``interval``), ``add(now, totals)``
    records one, ``deltas(now, totals)`` compares the given current totals with the oldest
    snapshot no older than ``window``. Times are monotonic seconds.
    """

    __slots__ = ("window", "interval", "_samples")

    def __init__(self, window: float = 60.0, interval: float = 5.0) -> None:
        if not (window > 0 and interval > 0):
            raise ValueError("window and interval must be > 0")
        self.window = window
        self.interval = interval
        # One more than a window's worth, so a snapshot exactly ``window`` old is still there.
        self._samples: deque[tuple[float, Totals]] = deque(maxlen=math.ceil(window / interval) + 2)

    def due(self, now: float) -> bool:
        return not self._samples or now - self._samples[-1][0] >= self.interval

    def add(self, now: float, totals: Totals) -> None:
        self._samples.append((now, {name: dict(values) for name, values in totals.items()}))

    def deltas(self, now: float, totals: Totals) -> tuple[float, dict[str, dict[tuple[str, ...], float]]]:
        """``(seconds covered, per metric the increase of each label set)``.

        The baseline is the oldest snapshot at most ``window`` old (the newest one if all are
        older); with no snapshot at all the totals themselves are the increase over 0 seconds.
        A counter that went down (it cannot, short of a restart) counts as 0, never negative.
        """
        base_time: float = now
        base: Totals = {}
        for when, sample in self._samples:
            if now - when <= self.window:
                base_time, base = when, sample
                break
        else:
            if self._samples:
                base_time, base = self._samples[-1]
        out: dict[str, dict[tuple[str, ...], float]] = {}
        for name, values in totals.items():
            before = base.get(name, {})
            out[name] = {labels: max(0.0, value - before.get(labels, 0.0)) for labels, value in values.items()}
        return max(0.0, now - base_time), out


# ------------------------------------------------------------------------------ the document


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the supervisor knows of one worker process."""

    worker_id: int
    pid: int
    generation: int
    state: str                    # "starting" | "ready" | "draining"
    uptime: float                 # seconds
    report: Mapping[str, Any] | None
    report_age: float | None      # seconds since the worker last reported


def redact_source(source: str) -> str:
    """A key source for display: a URL loses its userinfo, query and fragment (they may carry
    credentials); a file path or ``hs_secret`` stays as it is."""
    try:
        parts = urlsplit(source)
    except ValueError:
        return source
    if parts.scheme not in ("http", "https"):
        return source
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _issuer_view(cfg: IssuerConfig, reports: Sequence[Mapping[str, Any]]) -> Json:
    """One issuer as the current workers see it: keys with how many workers hold each, the
    newest refresh, the soonest next refresh, the current and the latest failure."""
    if cfg.jwks_uri:
        kind, source = "jwks_uri", ", ".join(redact_source(url) for url in cfg.jwks_uri)
    elif cfg.discovery:
        kind, source = "discovery", redact_source(cfg.discovery)
    elif cfg.jwks_file:
        kind, source = "jwks_file", cfg.jwks_file
    elif cfg.introspection_endpoint:
        kind, source = "introspection", redact_source(cfg.introspection_endpoint)
    else:
        kind, source = "hs_secret", "hs_secret"
    key_workers: dict[tuple[str, str], int] = {}
    loaded = 0
    last_refresh: float | None = None
    next_refresh: float | None = None
    errors: list[str] = []
    last_failure: Json | None = None
    for report in reports:
        info = report.get("keys", {}).get(cfg.name) if isinstance(report.get("keys"), dict) else None
        if not isinstance(info, dict):
            continue
        if info.get("loaded") is True:
            loaded += 1
        for key in info.get("keys") or ():
            if isinstance(key, dict):
                pair = (str(key.get("kid") or ""), str(key.get("alg") or ""))
                key_workers[pair] = key_workers.get(pair, 0) + 1
        success = _number(info.get("last_success"))
        if success is not None and (last_refresh is None or success > last_refresh):
            last_refresh = success
        upcoming = _number(info.get("next_refresh"))
        if upcoming is not None and (next_refresh is None or upcoming < next_refresh):
            next_refresh = upcoming
        error = info.get("last_error")
        if isinstance(error, str) and error not in errors:
            errors.append(error)
        failure = info.get("last_failure")
        if isinstance(failure, dict):
            at = _number(failure.get("at"))
            if at is not None and (last_failure is None or at > last_failure["at"]):
                last_failure = {"at": at, "reason": str(failure.get("reason", ""))}
    return {
        "name": cfg.name,
        "issuer": cfg.issuer,
        "source": source,
        "source_kind": kind,
        "algorithms": list(cfg.algorithms),  # the allowlist, in config order
        "keys": [
            {"kid": kid or None, "alg": alg, "workers": n}
            for (kid, alg), n in sorted(key_workers.items())
        ],
        "loaded_workers": loaded,
        "workers": len(reports),
        "last_refresh": last_refresh,
        "next_refresh": next_refresh,
        "errors": errors,
        "last_failure": last_failure,
    }


def _revocation_view(status: Mapping[str, Any] | None) -> Json:
    if status is None:
        return {"backend": None, "up": False, "state": "not open"}
    # Only scalars: the stores' status() holds counts, times and a redacted URL, and a nested
    # value would be a store internal that the page has no business showing.
    view: Json = {k: v for k, v in status.items() if v is None or isinstance(v, (str, int, float, bool))}
    up = status.get("up")
    view["state"] = "up" if up is True else "down" if up is False else "unknown"
    return view


def _traffic_view(covered: float, deltas: Mapping[str, Mapping[tuple[str, ...], float]]) -> Json:
    requests = deltas.get("requests", {})
    failures = deltas.get("auth_failures", {})
    by_class: dict[str, float] = {}
    by_route: dict[str, float] = {}
    for labels, n in requests.items():
        route = labels[0] if labels else ""
        status = labels[1] if len(labels) > 1 else ""
        klass = f"{status[:1]}xx" if status[:1].isdigit() else "other"
        by_class[klass] = by_class.get(klass, 0.0) + n
        by_route[route] = by_route.get(route, 0.0) + n
    by_reason: dict[str, float] = {}
    for labels, n in failures.items():
        reason = labels[0] if labels else ""
        by_reason[reason] = by_reason.get(reason, 0.0) + n
    total = sum(by_class.values())
    failed = sum(by_reason.values())

    def per_second(n: float) -> float | None:
        return round(n / covered, 3) if covered > 0 else None

    return {
        "window_seconds": round(covered, 1),
        "requests": int(total),
        "requests_per_second": per_second(total),
        "by_status_class": {k: int(v) for k, v in sorted(by_class.items())},
        "by_route": {k: int(v) for k, v in sorted(by_route.items())},
        "auth_failures": int(failed),
        "auth_failures_per_second": per_second(failed),
        # Only reasons that happened: every known reason exists at 0 (metrics from zero).
        "auth_failures_by_reason": {
            k: int(v) for k, v in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0
        },
    }


def build_status(
    *,
    config: Config,
    now: float,
    started: float,
    generation: int,
    workers: Iterable[WorkerView],
    not_ready: Sequence[str],
    revocation: Mapping[str, Any] | None,
    traffic: tuple[float, Mapping[str, Mapping[tuple[str, ...], float]]],
) -> Json:
    """The ``GET /status`` document (see docs/operations.md for every field).

    ``now``/``started`` are wall-clock seconds; ``workers`` every worker the supervisor runs
    (the current generation and any still draining); ``traffic`` is ``RateWindow.deltas()``.
    Issuer figures come from the *ready workers of the current generation* only: a draining
    worker's keys no longer decide anything.
    """
    views = list(workers)
    current_reports = [
        w.report for w in views
        if w.generation == generation and w.state == "ready" and isinstance(w.report, Mapping)
    ]
    return {
        "service": "jwtproxy",
        "version": __version__,
        "time": now,
        "uptime": max(0.0, now - started),
        "generation": generation,
        "ready": not not_ready,
        "not_ready": list(not_ready),
        "issuers": [_issuer_view(cfg, current_reports) for cfg in config.issuers],
        "workers": [
            {
                "id": w.worker_id,
                "pid": w.pid,
                "generation": w.generation,
                "state": w.state,
                "uptime": round(w.uptime, 1),
                "connections": (w.report or {}).get("connections"),
                "report_age": None if w.report_age is None else round(w.report_age, 1),
            }
            for w in sorted(views, key=lambda w: (-w.generation, w.worker_id))
        ],
        "revocation": _revocation_view(revocation),
        "traffic": _traffic_view(*traffic),
    }


# ------------------------------------------------------------------------------ HTTP routes


def _asset(name: str) -> bytes:
    return resources.files("jwtproxy").joinpath("static", name).read_bytes()


def add_status_routes(app: web.Application, status: Callable[[], Json]) -> None:
    """``GET /`` (page), ``GET /static/status.{js,css}`` and ``GET /status`` (JSON).

    The assets are read from the package once, when the routes are added. ``status`` is called
    per request; its result is served with ``Cache-Control: no-store``.
    """
    for path, (name, content_type) in _ASSETS.items():
        body = _asset(name)

        async def serve_asset(request: web.Request, body: bytes = body,
                              content_type: str = content_type) -> web.Response:
            return web.Response(body=body, headers={
                "Content-Type": content_type, "Cache-Control": "no-cache", **_SECURITY_HEADERS})

        app.router.add_get(path, serve_asset)

    async def serve_status(request: web.Request) -> web.Response:
        response = web.json_response(status())
        response.headers.update({"Cache-Control": "no-store", **_SECURITY_HEADERS})
        return response

    app.router.add_get("/status", serve_status)
