"""The status page's sans-I/O parts (traffic window, the /status document), its admin routes
(auth, CSP, assets) and the counter totals it reads from the metrics files."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import values

from jwtproxy.admin import make_admin_app
from jwtproxy.config import Config, IssuerConfig
from jwtproxy.metrics import WorkerMetrics, counter_totals, enable_multiprocess, mark_worker_dead
from jwtproxy.statuspage import (
    CONTENT_SECURITY_POLICY,
    PUBLIC_PATHS,
    RateWindow,
    WorkerView,
    build_status,
    redact_source,
)

# ------------------------------------------------------------------------------ RateWindow


def test_rate_window_compares_with_the_oldest_snapshot_inside_the_window() -> None:
    w = RateWindow(window=60, interval=5)
    for t in range(0, 100, 5):        # a counter growing 1 per second
        assert w.due(float(t))
        w.add(float(t), {"requests": {("/a", "200"): float(t)}})
        assert not w.due(t + 4.9)
    covered, deltas = w.deltas(100.0, {"requests": {("/a", "200"): 100.0}})
    assert covered == 60.0
    assert deltas == {"requests": {("/a", "200"): 60.0}}


def test_rate_window_before_a_full_window_uses_what_there_is() -> None:
    w = RateWindow(window=60, interval=5)
    covered, deltas = w.deltas(7.0, {"auth_failures": {("expired",): 3.0}})
    assert covered == 0.0 and deltas == {"auth_failures": {("expired",): 3.0}}
    w.add(0.0, {"auth_failures": {}})
    covered, deltas = w.deltas(12.0, {"auth_failures": {("expired",): 3.0, ("malformed",): 1.0}})
    assert covered == 12.0
    assert deltas == {"auth_failures": {("expired",): 3.0, ("malformed",): 1.0}}


def test_rate_window_never_negative_and_falls_back_to_newest_when_all_are_old() -> None:
    w = RateWindow(window=60, interval=5)
    w.add(0.0, {"requests": {("/a", "200"): 10.0}})
    covered, deltas = w.deltas(500.0, {"requests": {("/a", "200"): 4.0}})   # a reset
    assert covered == 500.0 and deltas == {"requests": {("/a", "200"): 0.0}}


def test_rate_window_is_bounded() -> None:
    w = RateWindow(window=60, interval=5)
    for t in range(10_000):
        w.add(float(t * 5), {"requests": {}})
    assert len(w._samples) == 14


def test_rate_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RateWindow(window=0)
    with pytest.raises(ValueError):
        RateWindow(interval=-1)


# ------------------------------------------------------------------------------ the document

ISSUER = IssuerConfig(name="corp", issuer="https://idp.example", jwks_uri=("https://u:p@idp.example/jwks?k=secret",),
                      audiences=("api",), algorithms=("RS256", "ES256"))
FILE_ISSUER = IssuerConfig(name="files", issuer="https://files.example", jwks_file="/etc/jwks.json",
                           audiences=("api",))
CONFIG = Config(path="x.toml", issuers=(ISSUER, FILE_ISSUER))


def keys_report(kids: list[tuple[str, str]], *, loaded: bool = True, last_success: float | None = 100.0,
                next_refresh: float | None = 400.0, last_error: str | None = None,
                failure: tuple[float, str] | None = None) -> dict[str, Any]:
    return {
        "loaded": loaded,
        "kids": sorted({k for k, _ in kids}),
        "keys": [{"kid": k, "alg": a} for k, a in kids],
        "last_success": last_success,
        "last_error": last_error,
        "last_failure": None if failure is None else {"at": failure[0], "reason": failure[1]},
        "next_refresh": next_refresh,
        "source": "ignored: the document names the configured source",
        "kind": "jwks_uri",
    }


def worker(wid: int, generation: int, state: str, keys: dict[str, Any] | None, connections: int = 0) -> WorkerView:
    report = None if keys is None else {"connections": connections, "keys": keys, "issuers": {}}
    return WorkerView(worker_id=wid, pid=1000 + wid + 10 * generation, generation=generation, state=state,
                      uptime=12.34, report=report, report_age=0.5 if report else None)


def document(workers: list[WorkerView], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(config=CONFIG, now=1000.0, started=900.0, generation=2, workers=workers,
                                not_ready=[], revocation={"backend": "sqlite", "up": True, "jti": 3, "sub": 1},
                                traffic=(60.0, {"requests": {}, "auth_failures": {}}))
    args.update(kw)
    return build_status(**args)


def test_issuer_aggregates_current_ready_workers_only() -> None:
    doc = document([
        worker(0, 2, "ready", {"corp": keys_report([("k1", "RS256"), ("k2", "ES256")], last_success=150.0,
                                                   next_refresh=450.0)}),
        worker(1, 2, "ready", {"corp": keys_report([("k1", "RS256")], last_success=120.0, next_refresh=420.0,
                                                   last_error="JWKS: HTTP 503",
                                                   failure=(130.0, "JWKS: HTTP 503"))}),
        # An old worker still draining: its keys (k0) decide nothing any more.
        worker(0, 1, "draining", {"corp": keys_report([("k0", "RS256")], failure=(999.0, "old"))}),
        # A starting worker has not served yet.
        worker(2, 2, "starting", {"corp": keys_report([("k9", "RS256")], loaded=False)}),
    ])
    corp = doc["issuers"][0]
    assert corp["name"] == "corp" and corp["issuer"] == "https://idp.example"
    assert corp["keys"] == [{"kid": "k1", "alg": "RS256", "workers": 2},
                            {"kid": "k2", "alg": "ES256", "workers": 1}]
    assert corp["loaded_workers"] == 2 and corp["workers"] == 2
    assert corp["last_refresh"] == 150.0          # the newest success
    assert corp["next_refresh"] == 420.0          # the soonest next refresh
    assert corp["errors"] == ["JWKS: HTTP 503"]
    assert corp["last_failure"] == {"at": 130.0, "reason": "JWKS: HTTP 503"}
    assert corp["algorithms"] == ["RS256", "ES256"]
    assert corp["source_kind"] == "jwks_uri"
    # An issuer no worker reported is listed with nothing loaded.
    files = doc["issuers"][1]
    assert files["source_kind"] == "jwks_file" and files["source"] == "/etc/jwks.json"
    assert files["keys"] == [] and files["loaded_workers"] == 0 and files["last_refresh"] is None


def test_source_url_loses_credentials_query_and_fragment() -> None:
    doc = document([])
    assert doc["issuers"][0]["source"] == "https://idp.example/jwks"
    assert "secret" not in str(doc) and "u:p" not in str(doc)
    assert redact_source("https://[::1]:8443/a?b#c") == "https://[::1]:8443/a"
    assert redact_source("/etc/jwtproxy/jwks.json") == "/etc/jwtproxy/jwks.json"


def test_several_jwks_urls_and_an_introspection_endpoint_are_shown_redacted() -> None:
    several = IssuerConfig(name="multi", issuer="https://m.example", audiences=("api",),
                           jwks_uri=("https://a.example/jwks?k=secret", "https://u:p@b.example/jwks"))
    opaque = IssuerConfig(name="opaque", issuer="https://as.example", audiences=("api",),
                          introspection_endpoint="https://as.example/introspect?client=secret",
                          introspection_client_id="rs", introspection_client_secret="s3cret")
    doc = document([], config=Config(path="x.toml", issuers=(several, opaque)))
    multi, introspected = doc["issuers"]
    assert (multi["source_kind"], multi["source"]) == ("jwks_uri", "https://a.example/jwks, https://b.example/jwks")
    assert (introspected["source_kind"], introspected["source"]) == ("introspection", "https://as.example/introspect")
    assert "secret" not in str(doc) and "u:p" not in str(doc)


def test_workers_listed_newest_generation_first_with_state_and_uptime() -> None:
    doc = document([worker(1, 2, "ready", {}, connections=4), worker(0, 1, "draining", None),
                    worker(0, 2, "starting", None)])
    assert [(w["generation"], w["id"], w["state"]) for w in doc["workers"]] == [
        (2, 0, "starting"), (2, 1, "ready"), (1, 0, "draining")]
    assert doc["workers"][1]["connections"] == 4 and doc["workers"][1]["uptime"] == 12.3
    assert doc["workers"][0]["connections"] is None and doc["workers"][0]["report_age"] is None
    assert doc["generation"] == 2 and doc["uptime"] == 100.0


def test_readiness_and_revocation_state() -> None:
    doc = document([], not_ready=["issuer 'corp': no keys loaded"],
                   revocation={"backend": "redis", "up": False, "jti": 2, "sub": 0, "url": "redis://h:6379/0",
                               "nested": {"never": "shown"}})
    assert doc["ready"] is False and doc["not_ready"] == ["issuer 'corp': no keys loaded"]
    assert doc["revocation"]["state"] == "down" and doc["revocation"]["jti"] == 2
    assert "nested" not in doc["revocation"]
    assert document([], revocation=None)["revocation"] == {"backend": None, "up": False, "state": "not open"}


def test_traffic_by_status_class_route_and_reason() -> None:
    traffic = (30.0, {
        "requests": {("/a", "200"): 50.0, ("/a", "401"): 10.0, ("/b", "502"): 3.0, ("", "404"): 1.0},
        "auth_failures": {("expired",): 6.0, ("missing_token",): 4.0, ("malformed",): 0.0},
    })
    t = document([], traffic=traffic)["traffic"]
    assert t["window_seconds"] == 30.0
    assert t["requests"] == 64 and t["requests_per_second"] == pytest.approx(64 / 30, abs=1e-3)
    assert t["by_status_class"] == {"2xx": 50, "4xx": 11, "5xx": 3}
    assert t["by_route"] == {"": 1, "/a": 60, "/b": 3}
    assert t["auth_failures"] == 10
    # Most frequent first; reasons that did not happen (every known one exists at 0) left out.
    assert list(t["auth_failures_by_reason"].items()) == [("expired", 6), ("missing_token", 4)]
    empty = document([], traffic=(0.0, {}))["traffic"]
    assert empty["requests"] == 0 and empty["requests_per_second"] is None


# ------------------------------------------------------------------------------ admin routes


class Page:
    def __init__(self) -> None:
        self.token = "s3cret-admin-token"
        self.calls = 0

    def status(self) -> dict[str, Any]:
        self.calls += 1
        return document([])


@pytest.fixture
async def page_client() -> AsyncIterator[tuple[TestClient, Page]]:
    page = Page()
    app = make_admin_app(
        readiness=lambda: [], render_metrics=lambda: b"", metrics_content_type="text/plain",
        store=lambda: None, parse_revocation=lambda b, n: ("jti", "x", 0.0),
        token=lambda: page.token, log=lambda *a, **k: None, status=page.status,
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, page
    finally:
        await client.close()


async def test_status_json_needs_the_admin_token(page_client: tuple[TestClient, Page]) -> None:
    client, page = page_client
    r = await client.get("/status")
    assert r.status == 401 and page.calls == 0
    r = await client.get("/status", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401 and page.calls == 0
    r = await client.get("/status", headers={"Authorization": f"Bearer {page.token}"})
    assert r.status == 200 and page.calls == 1
    assert (await r.json())["issuers"][0]["name"] == "corp"
    assert r.headers["Cache-Control"] == "no-store"
    page.token = ""                        # no admin token configured: open like the rest
    assert (await client.get("/status")).status == 200


@pytest.mark.parametrize("path, content_type, marker", [
    ("/", "text/html", b'<script src="static/status.js"'),
    ("/static/status.js", "text/javascript", b"fetch(\"status\""),
    ("/static/status.css", "text/css", b"prefers-color-scheme"),
])
async def test_shell_and_assets_are_public_with_a_strict_policy(
        page_client: tuple[TestClient, Page], path: str, content_type: str, marker: bytes) -> None:
    client, page = page_client
    r = await client.get(path)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith(content_type)
    assert r.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
    body = await r.read()
    assert marker in body
    assert page.calls == 0                 # the shell carries no data


def test_policy_allows_nothing_inline_or_foreign() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["form-action"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


async def test_only_the_shell_paths_are_public(page_client: tuple[TestClient, Page]) -> None:
    client, _ = page_client
    for path in ("/healthz", "/metrics", "/revocations", "/status", "/static/other.js", "/index.html"):
        assert (await client.get(path)).status == 401, path
    assert (await client.post("/", data=b"x")).status == 401
    assert PUBLIC_PATHS == {"/", "/static/status.js", "/static/status.css"}


async def test_without_a_status_page_the_root_needs_the_token_too() -> None:
    app = make_admin_app(
        readiness=lambda: [], render_metrics=lambda: b"", metrics_content_type="text/plain",
        store=lambda: None, parse_revocation=lambda b, n: ("jti", "x", 0.0),
        token=lambda: "t" * 20, log=lambda *a, **k: None,
    )
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 401
        assert (await client.get("/static/status.js")).status == 401


def test_page_script_never_builds_html_from_strings() -> None:
    from importlib import resources
    script = resources.files("jwtproxy").joinpath("static", "status.js").read_text()
    html = resources.files("jwtproxy").joinpath("static", "status.html").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "<script>" not in html and " style=" not in html and "http://" not in html and "https://" not in html


# ------------------------------------------------------------------------------ counter totals


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


def _count_in_child(reason: str) -> None:
    m = WorkerMetrics()
    m.request("/a", 200, 0.001)
    m.request("/a", 401, 0.001)
    m.auth_failure(reason)
    m.flush()
    os._exit(0)


def test_counter_totals_sum_every_process_by_label_name(multiproc_dir: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for reason in ("expired", "expired", "malformed"):
        p = ctx.Process(target=_count_in_child, args=(reason,))
        p.start()
        p.join(10)
        assert p.exitcode == 0
        mark_worker_dead(p.pid or 0)
    totals = counter_totals({"requests": ("jwtproxy_requests", ("route", "status")),
                             "failures": ("jwtproxy_auth_failures", ("reason",)),
                             "nothing": ("jwtproxy_no_such_counter", ("x",))})
    assert totals["requests"] == {("/a", "200"): 3.0, ("/a", "401"): 3.0}
    assert totals["failures"] == {("expired",): 2.0, ("malformed",): 1.0}
    assert totals["nothing"] == {}
