"""The connection loop and the upstream pool, through real loopback sockets, with both codecs.

Routes here are ``auth = "off"`` unless a test is about auth: this file is about HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl

import pytest
import trustme
from aiohttp import WSMsgType, web
from helpers import AppServer, Backend, header_values, parse_responses, raw_exchange

OPEN_ROUTES = [{"path_prefix": "/", "upstream": "backend", "auth": "off"}]


async def open_gateway(make_gateway, **kwargs):
    kwargs.setdefault("routes", OPEN_ROUTES)
    return await make_gateway(**kwargs)


def body_json(raw: bytes) -> dict:
    responses = parse_responses(raw)
    assert responses, raw
    return json.loads(responses[-1][2])


async def test_get_forwarded_with_normalised_path_and_query(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    raw = await raw_exchange(gw.port, b"GET /a/./b/../c//d?x=../1 HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = parse_responses(raw)[0]
    assert status == 200
    seen = backend.seen[-1]
    assert seen["path"] == "/a/c/d?x=../1"
    assert header_values(seen, "host") == ["svc"]
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["svc"]
    assert headers["x-request-id"] == header_values(seen, "x-request-id")[0]


@pytest.mark.parametrize("size", [0, 1, 65536 + 7, 3 * 1024 * 1024])
async def test_content_length_body_round_trip(make_gateway, backend, size):
    gw = await open_gateway(make_gateway)
    body = os.urandom(size)
    raw = await raw_exchange(
        gw.port, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + body
    )
    echoed = body_json(raw)
    assert echoed["body_size"] == size
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_values(backend.seen[-1], "content-length") == [str(size)]


async def test_chunked_body_round_trip(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    pieces = [b"hello", os.urandom(70000), b"", b"x"]
    wire = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    raw = await raw_exchange(gw.port, b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    echoed = body_json(raw)
    assert echoed["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


async def test_large_streamed_upload_and_download(make_gateway, backend):
    """64 MiB each way: streamed with backpressure, byte-exact."""
    size = 64 * 1024 * 1024
    big = Backend()
    app = web.Application(client_max_size=size * 2)

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 4096
        for _ in range(size // len(block)):
            await response.write(block)
        return response

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            n += len(chunk)
        return web.json_response({"size": n, "sha256": digest.hexdigest()})

    app.router.add_get("/download", download)
    app.router.add_post("/upload", upload)
    async with AppServer(app) as upstream:
        gw = await open_gateway(make_gateway, backend_port=upstream.port, server={"max_body_bytes": 0})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 20))
            assert chunk
            digest.update(chunk)
            remaining -= len(chunk)
        expected = hashlib.sha256((bytes(range(256)) * 4096) * (size // (256 * 4096))).hexdigest()
        assert digest.hexdigest() == expected
        # Upload on the same kept-alive connection.
        block = os.urandom(1 << 20)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        result = json.loads(await reader.readexactly(length))
        assert result == {"size": size, "sha256": hashlib.sha256(block * (size // len(block))).hexdigest()}
        writer.close()


async def test_keep_alive_reuses_one_upstream_connection(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    for _ in range(5):
        raw = await raw_exchange(gw.port, b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 200
    assert len(backend.seen) == 5
    assert len(backend.peers) == 1


async def test_pipelined_requests_answered_in_order(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    wire = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(10))
    wire += b"POST /p10 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    raw = await raw_exchange(gw.port, wire, responses=11)
    paths = [json.loads(body)["path"] for _, _, body in parse_responses(raw)]
    assert paths == [f"/p{i}" for i in range(11)]


async def test_http10_request_gets_close_delimited_or_framed_response(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    raw = await raw_exchange(gw.port, b"GET /ten HTTP/1.0\r\n\r\n", until_close=True)
    assert raw.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in raw.lower()
    # HTTP/1.0 keep-alive is honoured when asked for.
    raw = await raw_exchange(gw.port, b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2, responses=2)
    assert [s for s, _, _ in parse_responses(raw)] == [200, 200]


async def test_expect_100_continue(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert header_values(backend.seen[-1], "expect") == []
    writer.close()


async def test_head_204_304_have_no_body(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    # The last response is the only one with a body; a body on any of the first three would show
    # up as bytes before its successor's head.
    raw = await asyncio.wait_for(reader.readuntil(b'"path": "/after"'), 5)
    writer.close()
    heads = raw.split(b"\r\n\r\n")
    assert heads[0].startswith(b"HTTP/1.1 200")  # HEAD: head only, next response follows directly
    assert heads[1].startswith(b"HTTP/1.1 204")
    assert heads[2].startswith(b"HTTP/1.1 304")
    assert heads[3].startswith(b"HTTP/1.1 200")
    assert b'"path": "/after"' in heads[4]


# The timers' exact behaviour is tested on a fake transport and clock (test_connection.py); this
# proves the real loop closes the socket, and test_adv_faults' slowloris test the header timeout.
async def test_keepalive_timeout_closes_idle_connection(make_gateway, backend):
    gw = await open_gateway(make_gateway, server={"keepalive_timeout": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    rest = await asyncio.wait_for(reader.read(), 5)  # EOF once the idle timer fires
    assert rest == b""
    writer.close()


async def test_head_too_large_is_431(make_gateway, backend):
    gw = await open_gateway(make_gateway, server={"max_header_bytes": 1024})
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n", until_close=True)
    assert raw.startswith(b"HTTP/1.1 431")
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: b\r\n" * 200 + b"\r\n", until_close=True)
    assert raw.startswith(b"HTTP/1.1 431")
    assert backend.seen == []


@pytest.mark.parametrize(
    "wire",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"a" * 2000 + b"\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_body_too_large_is_413(make_gateway, backend, wire):
    gw = await open_gateway(make_gateway, server={"max_body_bytes": 1000})
    raw = await raw_exchange(gw.port, wire, until_close=True)
    assert raw.startswith(b"HTTP/1.1 413"), raw[:100]


SMUGGLING = {
    "cl-and-te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "duplicate-cl-same": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
    "duplicate-cl-diff": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "signed-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
    "negative-cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\na",
    "te-gzip-chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te-obfuscated": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-twice": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\na\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare-lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two-authorization": b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    "encoded-slash": b"GET /a%2Fb HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded-backslash": b"GET /a%5cb HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded-nul": b"GET /a%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "above-root": b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded-above-root": b"GET /%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_malformed_and_smuggling_requests_are_400(make_gateway, backend, name):
    gw = await open_gateway(make_gateway)
    raw = await raw_exchange(gw.port, SMUGGLING[name], until_close=True, read_timeout=3)
    assert raw.startswith(b"HTTP/1.1 400"), (name, raw[:120])
    assert backend.seen == [], name
    assert b"connection: close" in raw.lower()


async def test_absolute_form_target_routes_by_its_authority(make_gateway, backend):
    gw = await open_gateway(
        make_gateway,
        routes=[
            {"path_prefix": "/", "upstream": "backend", "auth": "off", "host": "svc.test"},
            {"path_prefix": "/", "upstream": "backend", "auth": "required"},
        ],
    )
    raw = await raw_exchange(gw.port, b"GET http://svc.test/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
    assert parse_responses(raw)[0][0] == 200
    assert backend.seen[-1]["path"] == "/x?y"
    assert header_values(backend.seen[-1], "host") == ["svc.test"]


async def test_no_route_is_404(make_gateway, backend):
    gw = await open_gateway(make_gateway, routes=[{"path_prefix": "/api", "upstream": "backend", "auth": "off"}])
    raw = await raw_exchange(gw.port, b"GET /apix HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse_responses(raw)[0]
    assert status == 404
    assert json.loads(body)["error"] == "not_found"
    assert backend.seen == []


async def test_hop_by_hop_and_identity_headers_never_reach_upstream(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    raw = await raw_exchange(
        gw.port,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-User-Id: evil\r\nx_user_id: evil\r\nX-USER-ROLE: admin\r\n"
        b"X.Scope: all\r\nxuserid: evil\r\nConnection: keep-alive, X-Custom\r\nX-Custom: drop\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\nX-Keep: yes\r\n\r\n",
    )
    assert parse_responses(raw)[0][0] == 200
    names = {k for k, _ in backend.seen[-1]["headers"]}
    for dropped in ("x-user-id", "x_user_id", "x-user-role", "x.scope", "xuserid", "x-custom", "keep-alive",
                    "te", "upgrade", "proxy-authorization"):
        assert dropped not in names, dropped
    assert header_values(backend.seen[-1], "x-keep") == ["yes"]


async def test_request_id_kept_when_well_formed_else_generated(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123\r\n\r\n")
    assert parse_responses(raw)[0][1]["x-request-id"] == "abc-123"
    assert header_values(backend.seen[-1], "x-request-id") == ["abc-123"]
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: a b<script>\r\n\r\n")
    generated = parse_responses(raw)[0][1]["x-request-id"]
    assert generated != "a b<script>" and generated
    assert header_values(backend.seen[-1], "x-request-id") == [generated]


async def test_x_forwarded_for_is_appended(make_gateway, backend):
    gw = await open_gateway(make_gateway)
    await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n")
    assert header_values(backend.seen[-1], "x-forwarded-for") == ["10.0.0.1, 127.0.0.1"]


async def test_upstream_refused_is_502_and_timeout_is_504(make_gateway, backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gw = await open_gateway(make_gateway, backend_port=dead_port)
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_responses(raw)[0][0] == 502
    slow = await open_gateway(make_gateway, upstream={"response_timeout": 0.3})
    raw = await raw_exchange(slow.port, b"GET /slow/1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_responses(raw)[0][0] == 504


async def _counting_upstream() -> tuple[asyncio.AbstractServer, int, list[int]]:
    """Keep-alive upstream: ``/fast`` answered at once, ``/hang`` never (until the gateway
    closes); counts connections."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /hang"):
                    await reader.read()  # until the gateway gives up on it and closes
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def test_response_timeout_is_per_exchange_on_a_reused_connection(make_gateway):
    # One timer per upstream connection watches the response head (upstream._arm_head_timer).
    # (1) A head that arrived leaves nothing due: when the timer fires on the idle connection it
    # must not close it (the next request reuses it: still one upstream connection).
    # (2) A later exchange on the same connection is due response_timeout after it started, not
    # when the timer armed by the earlier exchange fires.
    server, port, accepted = await _counting_upstream()
    try:
        gw = await open_gateway(make_gateway, backend_port=port, upstream={"response_timeout": 0.4})
        raw = await raw_exchange(gw.port, b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 200
        await asyncio.sleep(0.6)  # the first exchange's timer fires on the idle connection
        raw = await raw_exchange(gw.port, b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 200
        assert len(accepted) == 1, "the idle connection was closed by a timer with nothing due"
        await asyncio.sleep(0.25)  # the second exchange's timer is due 0.15 s from now
        loop = asyncio.get_running_loop()
        started = loop.time()
        raw = await raw_exchange(gw.port, b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        waited = loop.time() - started
        assert parse_responses(raw)[0][0] == 504
        assert len(accepted) == 1  # the hanging request went out on the same connection
        assert waited >= 0.35, f"504 after {waited:.2f}s: an earlier exchange's deadline was applied"
    finally:
        server.close()


async def test_failed_target_falls_over_to_next(make_gateway, backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gw = await open_gateway(
        make_gateway,
        upstream={"targets": [f"http://127.0.0.1:{dead_port}", f"http://127.0.0.1:{backend.port}"]},
    )
    for _ in range(4):
        raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 200


async def _closing_upstream() -> tuple[asyncio.AbstractServer, int, list[int]]:
    """Answers one request per connection with keep-alive framing, then closes silently."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served


async def test_reused_connection_closed_by_upstream_is_retried_once(make_gateway, backend):
    server, port, served = await _closing_upstream()
    async with server:
        gw = await open_gateway(make_gateway, backend_port=port)
        for _ in range(3):
            raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert parse_responses(raw)[0][0] == 200
            await asyncio.sleep(0.1)  # the upstream closes its side while the connection is idle
        assert len(served) == 3


async def test_websocket_upgrade_is_tunnelled(make_gateway, backend):
    app = web.Application()

    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws

    app.router.add_get("/ws", ws_echo)
    async with AppServer(app) as upstream:
        import aiohttp

        gw = await open_gateway(make_gateway, backend_port=upstream.port)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{gw.port}/ws") as ws:
                await ws.send_str("hi")
                msg = await asyncio.wait_for(ws.receive(), 5)
                assert msg.data == "echo:hi"


async def test_https_upstream_verifies_certificate(make_gateway, backend, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    app = web.Application()
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="tls-ok")

    app.router.add_get("/", hello)
    async with AppServer(app, ssl_context=context) as upstream:
        gw = await open_gateway(make_gateway, upstream={"targets": [upstream.url]})
        # Not trusted yet: the certificate must be refused.
        raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 502
        ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        trusted = ssl.create_default_context(cafile=str(ca_path))
        pool = gw.gateway.pools["backend"]
        pool._ssl_context = trusted
        raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = parse_responses(raw)[0]
        assert (status, body) == (200, b"tls-ok")


async def test_idle_upstream_connections_expire_and_are_capped(make_gateway, backend):
    gw = await open_gateway(make_gateway, upstream={"idle_timeout": 0.2, "max_idle": 2})
    pool = gw.gateway.pools["backend"]
    # Five concurrent requests need five upstream connections; only max_idle = 2 stay pooled.
    replies = await asyncio.gather(
        *(raw_exchange(gw.port, b"GET /slow/0.2 HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(5))
    )
    assert [parse_responses(r)[0][0] for r in replies] == [200] * 5
    assert pool.idle_count() == 2
    await asyncio.sleep(0.6)  # past idle_timeout: the sweep closes them
    assert pool.idle_count() == 0
    raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_responses(raw)[0][0] == 200


async def test_upstream_resetting_mid_response_cuts_the_client_connection(make_gateway, backend):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        gw = await open_gateway(make_gateway, backend_port=server.sockets[0].getsockname()[1])
        raw = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until_close=True)
        # The head and the partial body were already out: the client sees a truncated response and
        # a closed connection, never a second response spliced in.
        assert raw.startswith(b"HTTP/1.1 200")
        assert raw.endswith(b"partial")


async def test_strip_prefix_forwards_the_rest_of_the_normalised_path(make_gateway, backend):
    gw = await open_gateway(
        make_gateway,
        routes=[
            {"path_prefix": "/svc", "upstream": "backend", "auth": "off", "strip_prefix": True},
            {"path_prefix": "/", "upstream": "backend", "auth": "off"},
        ],
    )
    for target, forwarded in ((b"/svc/a/../b?q=1", "/b?q=1"), (b"/svc", "/"), (b"/svc/", "/"), (b"/svcx", "/svcx")):
        raw = await raw_exchange(gw.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert parse_responses(raw)[0][0] == 200
        assert backend.seen[-1]["path"] == forwarded, target
