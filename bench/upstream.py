"""A tiny keep-alive HTTP/1.1 origin for `bench/run.py --quick` on machines without nginx.

It answers like the nginx bench upstream (templates/nginx.conf): ``/whoami`` echoes the
``x-user-id`` request header (so a sanity check can prove the proxy injected it), ``/assertion``
the ``x-jwtproxy-assertion`` header, ``/big``
returns 65,536 bytes, every other path returns ``ok``. Run as
``python bench/upstream.py PORT``; it serves until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import signal
import sys

import httptools

BIG = b"x" * 65536


def _response(body: bytes, keep_alive: bool) -> bytes:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n")
    if not keep_alive:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


class OriginProtocol(asyncio.Protocol):
    """One client connection: httptools parses requests, each is answered as soon as complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.user_id = b""
        self.assertion = b""
        self._field = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.user_id = b""
        self.assertion = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"x-user-id":
            self.user_id = value
        elif name == b"x-jwtproxy-assertion":
            self.assertion = value

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        path = self.url.split(b"?", 1)[0]
        if path == b"/whoami":
            body = self.user_id
        elif path == b"/assertion":
            body = self.assertion
        elif path == b"/big":
            body = BIG
        else:
            body = b"ok"
        keep_alive = self.parser.should_keep_alive()
        self.transport.write(_response(body, keep_alive))
        if not keep_alive:
            self.transport.close()


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(OriginProtocol, "127.0.0.1", port, reuse_address=True,
                                      backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench origin listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18790
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


if __name__ == "__main__":
    main()
