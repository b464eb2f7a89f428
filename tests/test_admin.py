"""Admin API: auth, readiness logic, metrics, revocation endpoints (fake store)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from jwtproxy.admin import MAX_ADMIN_BODY, compute_readiness, make_admin_app
from jwtproxy.revocation.memory import MemoryRevocationStore

NOW = 1_700_000_000.0


class FakeStore(MemoryRevocationStore):
    """The in-memory store, with a switch that makes jti writes fail like a backend outage."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    @property
    def jti(self) -> dict[str, float]:
        return self._jti

    @property
    def sub(self) -> dict[str, float]:
        return self._sub

    async def revoke_jti(self, jti: str, exp: float) -> None:
        if self.fail:
            raise ConnectionError("redis down")
        await super().revoke_jti(jti, exp)


def fake_parse(body: bytes, now: float) -> tuple[str, str, float]:
    """Stand-in with the contract of revocation.parse_revocation_request."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    if "jti" in data:
        if not isinstance(data["jti"], str) or not data["jti"]:
            raise ValueError("jti must be a non-empty string")
        return ("jti", data["jti"], float(data.get("exp", now + 86400)))
    if "sub" in data:
        return ("sub", data["sub"], float(data.get("before", now)))
    raise ValueError("need jti or sub")


class State:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.token = ""
        self.store: FakeStore | None = FakeStore()
        self.logged: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
async def admin() -> AsyncIterator[tuple[TestClient, State]]:
    state = State()
    app = make_admin_app(
        readiness=lambda: state.reasons,
        render_metrics=lambda: b"# HELP x y\nx 1.0\n",
        metrics_content_type="text/plain; version=0.0.4; charset=utf-8",
        store=lambda: state.store,
        parse_revocation=fake_parse,
        token=lambda: state.token,
        now=lambda: NOW,
        log=lambda event, **f: state.logged.append((event, f)),
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, state
    finally:
        await client.close()


async def test_healthz(admin: tuple[TestClient, State]) -> None:
    client, _ = admin
    r = await client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}


async def test_readyz(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    r = await client.get("/readyz")
    assert r.status == 200 and await r.json() == {"ready": True}
    state.reasons = ["1 of 2 workers ready"]
    r = await client.get("/readyz")
    assert r.status == 503
    assert await r.json() == {"ready": False, "reasons": ["1 of 2 workers ready"]}


async def test_metrics(admin: tuple[TestClient, State]) -> None:
    client, _ = admin
    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert await r.text() == "# HELP x y\nx 1.0\n"


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c2VjcmV0", "bearer",
                                    "Bearer s3cret-admin-token-x", "s3cret-admin-token"])
async def test_token_required_on_every_route(admin: tuple[TestClient, State],
                                             header: str | None) -> None:
    client, state = admin
    state.token = "s3cret-admin-token"
    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
                         ("GET", "/revocations"), ("POST", "/revocations"),
                         ("DELETE", "/revocations/a")]:
        r = await client.request(method, path, headers=headers, data=b'{"jti":"x"}')
        assert r.status == 401, (method, path)
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="jwtproxy-admin"'
        assert (await r.json())["error"] == "unauthorized"
    assert state.store is not None and state.store.jti == {}
    assert all("s3cret" not in json.dumps(f) for _, f in state.logged)


async def test_token_accepted(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    state.token = "s3cret-admin-token"
    for header in ("Bearer s3cret-admin-token", "bearer  s3cret-admin-token"):
        r = await client.get("/healthz", headers={"Authorization": header})
        assert r.status == 200
    state.token = ""          # token removed by a reload: open again
    assert (await client.get("/healthz")).status == 200


async def test_revoke_jti_and_list_and_delete(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    r = await client.post("/revocations", json={"jti": "abc", "exp": NOW + 60})
    assert r.status == 201
    assert await r.json() == {"revoked": {"jti": "abc", "exp": NOW + 60}}
    r = await client.post("/revocations", json={"sub": "user-1", "before": NOW})
    assert r.status == 201 and await r.json() == {"revoked": {"sub": "user-1", "before": NOW}}
    r = await client.get("/revocations")
    assert await r.json() == {"jti": [{"jti": "abc", "exp": NOW + 60}],
                              "sub": [{"sub": "user-1", "before": NOW}]}
    r = await client.delete("/revocations/abc")
    assert r.status == 200 and await r.json() == {"deleted": {"jti": "abc"}}
    r = await client.delete("/revocations/abc")
    assert r.status == 404
    r = await client.delete("/revocations/sub/user-1")
    assert r.status == 200 and await r.json() == {"deleted": {"sub": "user-1"}}
    assert state.store is not None and state.store.sub == {}


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"jti": 5}', b'{"jti": ""}',
                                  b'{"other": 1}'])
async def test_revoke_validation(admin: tuple[TestClient, State], body: bytes) -> None:
    client, state = admin
    r = await client.post("/revocations", data=body,
                          headers={"Content-Type": "application/json"})
    assert r.status == 400
    payload = await r.json()
    assert payload["error"] == "invalid_request" and payload["error_description"]
    assert state.store is not None and state.store.jti == {} and state.store.sub == {}


async def test_body_cap(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    big = b'{"jti": "' + b"a" * MAX_ADMIN_BODY + b'"}'
    r = await client.post("/revocations", data=big)
    assert r.status == 413
    assert state.store is not None and state.store.jti == {}


async def test_store_unavailable(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    assert state.store is not None
    state.store.fail = True
    r = await client.post("/revocations", json={"jti": "abc"})
    assert r.status == 503 and (await r.json())["error"] == "unavailable"
    state.store = None
    assert (await client.get("/revocations")).status == 503
    assert (await client.post("/revocations", json={"jti": "abc"})).status == 503


async def test_unknown_path_404(admin: tuple[TestClient, State]) -> None:
    client, _ = admin
    assert (await client.get("/admin")).status == 404


def _w(wid: int, ready: bool, loaded: dict[str, bool] | None) -> tuple[int, bool, Any]:
    report = None if loaded is None else {"issuers": {k: {"loaded": v} for k, v in loaded.items()}}
    return (wid, ready, report)


def test_compute_readiness() -> None:
    ok = dict(listeners_bound=True, shutting_down=False, expected_workers=2, issuers=["corp"])
    assert compute_readiness(workers=[_w(0, True, {"corp": True}), _w(1, True, {"corp": True})],
                             **ok) == []
    # a worker not ready
    r = compute_readiness(workers=[_w(0, True, {"corp": True}), _w(1, False, None)], **ok)
    assert r == ["1 of 2 workers ready"]
    # one ready worker without keys for the issuer
    r = compute_readiness(workers=[_w(0, True, {"corp": True}), _w(1, True, {"corp": False})],
                          **ok)
    assert r == ["issuer 'corp': no keys loaded in 1 worker(s)"]
    # no report at all counts as no keys
    r = compute_readiness(workers=[_w(0, True, None), _w(1, True, {})], **ok)
    assert r == ["issuer 'corp': no keys loaded in 2 worker(s)"]
    # no worker at all
    r = compute_readiness(workers=[], **ok)
    assert "0 of 2 workers ready" in r and "issuer 'corp': no keys loaded" in r
    # listeners and shutdown
    r = compute_readiness(workers=[_w(0, True, {"corp": True})] * 2,
                          **dict(ok, listeners_bound=False, shutting_down=True))
    assert r == ["shutting down", "listeners not bound"]
    # no issuers configured (auth off everywhere): workers suffice
    assert compute_readiness(workers=[_w(0, True, None)] * 2, **dict(ok, issuers=[])) == []


async def test_with_real_parse_revocation_request() -> None:
    revocation = pytest.importorskip("jwtproxy.revocation")
    store = FakeStore()
    app = make_admin_app(readiness=lambda: [], render_metrics=lambda: b"",
                         metrics_content_type="text/plain", store=lambda: store,
                         parse_revocation=revocation.parse_revocation_request)
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/revocations", data=b"nope")).status == 400
        r = await client.post("/revocations", json={"jti": "j1", "exp": 4102444800})
        assert r.status == 201 and store.jti == {"j1": 4102444800}


async def test_body_cap_without_content_length(admin: tuple[TestClient, State]) -> None:
    client, state = admin

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"jti": "'
        for _ in range(20):
            yield b"a" * 8192
        yield b'"}'

    r = await client.post("/revocations", data=chunks())
    assert r.status == 413
    assert state.store is not None and state.store.jti == {}


async def test_connections_are_not_kept_alive(admin: tuple[TestClient, State]) -> None:
    client, state = admin
    r = await client.get("/healthz")
    assert r.headers.get("Connection", "").lower() == "close"
    state.token = "t" * 32
    r = await client.get("/healthz")
    assert r.status == 401 and r.headers.get("Connection", "").lower() == "close"
