"""The admin HTTP API (aiohttp.web), served by the supervisor on ``[admin] listen`` only.

Routes: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``POST /revocations``,
``GET /revocations``, ``DELETE /revocations/{jti}``, ``DELETE /revocations/sub/{sub}``,
``GET /.well-known/jwks.json`` (the signed assertions' public keys, contract §5.4), and
with a ``status`` callable the status page: ``GET /`` with its ``/static/`` script and
stylesheet, and ``GET /status`` (JSON; see ``jwtproxy.statuspage``).

Theory of operation
-------------------
* Never on a traffic port: the supervisor binds it separately, so a routing mistake can
  never expose revocation or metrics endpoints to clients.
* ``make_admin_app`` takes small callables (readiness, metrics, store, token) instead of the
  supervisor, so the app is tested alone with fakes and follows a config reload (a new
  ``admin.token`` applies to the next request).
* Authentication: when the token is non-empty, *every* request (probes included) must carry
  ``Authorization: Bearer <token>``, except the status page's shell and assets
  (``statuspage.PUBLIC_PATHS``: constant bytes, no data; the data at ``/status`` needs the
  token like the rest) and ``GET /.well-known/jwks.json`` (public keys, which backends fetch
  without a secret). The comparison is ``hmac.compare_digest`` on bytes so
  its time does not depend on where the first wrong byte is. Failure: 401 with
  ``WWW-Authenticate``; the presented value is never logged.
* Request bodies are capped (64 KiB by default, 413 beyond) before any parsing.
* Every response closes its connection (see ``no_keepalive``): admin traffic is light, and
  it keeps forked workers from holding the supervisor's client connections open.
* Errors are JSON ``{"error": ..., "error_description": ...}`` like the gateway's.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Awaitable, Callable, Literal, Sequence

from aiohttp import web

from .accesslog import log_event
from .revocation import RevocationStore
from .statuspage import PUBLIC_PATHS, add_status_routes

__all__ = ["make_admin_app", "compute_readiness", "MAX_ADMIN_BODY"]

#: Largest admin request body accepted (a revocation is a few hundred bytes).
MAX_ADMIN_BODY = 64 * 1024
#: Where backends fetch the public keys of the gateway's signed assertions (no admin token).
JWKS_PATH = "/.well-known/jwks.json"
#: Five minutes: the rotation procedure's wait between publishing a key and signing with it.
JWKS_CACHE_CONTROL = "public, max-age=300"

Json = dict[str, Any]


def compute_readiness(
    *,
    listeners_bound: bool,
    shutting_down: bool,
    expected_workers: int,
    workers: Sequence[tuple[int, bool, Json | None]],
    issuers: Sequence[str],
) -> list[str]:
    """Reasons the daemon is not ready; an empty list means ready.

    ``workers`` holds, for each worker of the current generation, ``(worker_id, ready,
    last_report)`` where ``last_report`` is the latest ``WorkerControl.report()`` status
    (``{"issuers": {name: {"loaded": bool, ...}}, ...}``) or None. An issuer counts as having
    keys only if *every* current worker reported it loaded: a worker without keys answers 503.
    """
    reasons: list[str] = []
    if shutting_down:
        reasons.append("shutting down")
    if not listeners_bound:
        reasons.append("listeners not bound")
    ready_workers = [w for w in workers if w[1]]
    if len(ready_workers) < expected_workers:
        reasons.append(f"{len(ready_workers)} of {expected_workers} workers ready")
    for name in issuers:
        missing = 0
        for _wid, _ready, report in ready_workers:
            info = (report or {}).get("issuers", {}).get(name) if isinstance(report, dict) else None
            if not (isinstance(info, dict) and info.get("loaded") is True):
                missing += 1
        if missing or not ready_workers:
            reasons.append(f"issuer {name!r}: no keys loaded"
                           + (f" in {missing} worker(s)" if missing else ""))
    return reasons


def _error(status: int, error: str, description: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description},
                             status=status, headers=headers or None)


def make_admin_app(
    *,
    readiness: Callable[[], list[str]],
    render_metrics: Callable[[], bytes],
    metrics_content_type: str,
    store: Callable[[], RevocationStore | None],
    parse_revocation: Callable[[bytes, float], tuple[str, str, float]],
    token: Callable[[], str] = lambda: "",
    jwks: Callable[[], bytes | None] = lambda: None,
    now: Callable[[], float] = time.time,
    log: Callable[..., None] = log_event,
    max_body: int = MAX_ADMIN_BODY,
    status: Callable[[], Json] | None = None,
) -> web.Application:
    """Build the admin application.

    readiness: returns the reasons the daemon is not ready (``compute_readiness``).
    render_metrics / metrics_content_type: the Prometheus exposition and its content type.
    store: returns the revocation store (None while it is not open: 503).
    parse_revocation: ``jwtproxy.revocation.parse_revocation_request`` -- body bytes and
        ``now`` to ``("jti", jti, exp)`` or ``("sub", sub, before)``; ValueError -> 400.
    token: returns the current admin token ("" = no authentication).
    status: returns the ``GET /status`` document; None leaves the status page out.
    jwks: returns the signed assertions' public JWKS document, or None when there is none
        (``GET /.well-known/jwks.json`` then answers 404). Served without the admin token.
    """

    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        expected = token()
        public = request.method in ("GET", "HEAD") and (
            request.path == JWKS_PATH or (status is not None and request.path in PUBLIC_PATHS))
        if expected and not public:
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            presented = presented.strip(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))
            if not ok:
                log("admin_unauthorized", level="warning", method=request.method,
                    path=request.path, client=request.remote or "")
                return _error(401, "unauthorized", "admin token required",
                              **{"WWW-Authenticate": 'Bearer realm="jwtproxy-admin"'})
        length = request.content_length
        if length is not None and length > max_body:
            return _error(413, "payload_too_large", f"body larger than {max_body} bytes")
        return await handler(request)

    @web.middleware
    async def no_keepalive(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        # One request per connection: the supervisor forks workers at any time, and a worker
        # inheriting an idle keep-alive admin connection would keep it open after the
        # supervisor closed its copy (no FIN), so the scraper's next request would hang.
        response = await handler(request)
        response.force_close()
        return response

    async def jwks_document(request: web.Request) -> web.Response:
        body = jwks()
        if body is None:
            return _error(404, "not_found", "signed assertions are not enabled")
        # Backends cache it (PyJWKClient, jose's createRemoteJWKSet) and refetch on an unknown kid;
        # the rotation procedure waits this long between publishing a key and signing with it.
        return web.Response(body=body, headers={
            "Content-Type": "application/jwk-set+json",
            "Cache-Control": JWKS_CACHE_CONTROL,
        })

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = readiness()
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render_metrics(),
                            headers={"Content-Type": metrics_content_type})

    def current_store() -> RevocationStore | web.Response:
        s = store()
        if s is None:
            return _error(503, "unavailable", "revocation store not open")
        return s

    async def store_call(what: str, call: Callable[[], Awaitable[Any]]) -> Any | web.Response:
        try:
            return await call()
        except (OSError, ConnectionError, RuntimeError) as exc:
            # Backend down (redis unreachable, sqlite locked/full): report, never crash.
            log("revocation_backend_error", level="error", operation=what,
                error=type(exc).__name__, detail=str(exc))
            return _error(503, "unavailable", "revocation backend error")

    async def create(request: web.Request) -> web.Response:
        s = current_store()
        if isinstance(s, web.Response):
            return s
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "payload_too_large", f"body larger than {max_body} bytes")
        try:
            kind, subject, when = parse_revocation(body, now())
        except ValueError as exc:
            return _error(400, "invalid_request", str(exc))
        if kind == "jti":
            result = await store_call("revoke_jti", lambda: s.revoke_jti(subject, when))
            item: Json = {"jti": subject, "exp": when}
        else:
            result = await store_call("revoke_sub", lambda: s.revoke_sub(subject, when))
            item = {"sub": subject, "before": when}
        if isinstance(result, web.Response):
            return result
        log("revocation_added", kind=kind, **{("jti" if kind == "jti" else "sub"): subject})
        return web.json_response({"revoked": item}, status=201)

    async def listing(request: web.Request) -> web.Response:
        s = current_store()
        if isinstance(s, web.Response):
            return s
        return web.json_response(s.list())

    def unrevoker(kind: Literal["jti", "sub"]) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The DELETE handler for one kind of revocation."""

        async def delete(request: web.Request) -> web.Response:
            s = current_store()
            if isinstance(s, web.Response):
                return s
            ident = request.match_info[kind]
            unrevoke = s.unrevoke_jti if kind == "jti" else s.unrevoke_sub
            result = await store_call(f"unrevoke_{kind}", lambda: unrevoke(ident))
            if isinstance(result, web.Response):
                return result
            if not result:
                return _error(404, "not_found", f"no revocation for this {kind}")
            log("revocation_removed", kind=kind, **{kind: ident})
            return web.json_response({"deleted": {kind: ident}})

        return delete

    app = web.Application(middlewares=[no_keepalive, guard], client_max_size=max_body)
    app.router.add_get(JWKS_PATH, jwks_document)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/revocations", create)
    app.router.add_get("/revocations", listing)
    # Registered before /revocations/{jti} so that "sub/<sub>" never reads as a jti.
    app.router.add_delete("/revocations/sub/{sub}", unrevoker("sub"))
    app.router.add_delete("/revocations/{jti}", unrevoker("jti"))
    if status is not None:
        add_status_routes(app, status)
    return app

