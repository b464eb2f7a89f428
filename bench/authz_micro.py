"""In-process cost of one forward-auth question (contract §5.1) on an ``[authz]`` listener.

    python bench/authz_micro.py [--requests N] [--rounds R]

A worker is built as the daemon builds it (``build_worker``) and one ``ClientConnection`` of its
authz listener runs on a transport that only collects what is written: each request goes through
the codec, the description of the original request, normalisation, routing, the verification
stage and the answer, with no socket and no kernel time. Rows, µs per request on one core (best
of R rounds), for each codec:

* ``allowed, cached token``: nginx's shape (``X-Original-URI``, ``X-Original-Method``,
  ``X-Forwarded-*``) with a valid RS256 token whose verdict is cached: the path scenario (a)'s
  "nginx auth_request + jwtproxy authz" row exercises;
* ``allowed, public route``: the same on an ``auth = "off"`` route, no token;
* ``denied, no token``: the 401 of a protected route.

It also counts, with ``tracemalloc``, the memory blocks still held after a batch of cached-token
answers (none may stay per request: the connection reuses nothing per exchange once answered).
On a shared machine compare rows with each other, not with another day's run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import AUDIENCE, ISSUER, SigningKey  # noqa: E402

from jwtproxy.config import parse_config  # noqa: E402
from jwtproxy.connection import ClientConnection  # noqa: E402
from jwtproxy.keys import keyset_from_jwks  # noqa: E402
from jwtproxy.revocation.memory import MemoryRevocationStore  # noqa: E402
from jwtproxy.worker import build_worker  # noqa: E402


class SinkTransport(asyncio.Transport):
    """Counts the responses written to it; nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.responses = 0
        self.last = b""

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.responses += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection closed: " + self.last[:200].decode("latin-1"))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)


def request(uri: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        "GET /_jwtproxy HTTP/1.1\r\nHost: api.example\r\n"
        f"X-Original-URI: {uri}\r\nX-Original-Method: GET\r\nX-Forwarded-Host: api.example\r\n"
        "X-Forwarded-Proto: https\r\nX-Forwarded-For: 203.0.113.7\r\nUser-Agent: curl/8.5.0\r\n"
        f"Accept: */*\r\n{auth}\r\n"
    ).encode()


async def measure(parser: str, n: int, rounds: int) -> list[tuple[str, float, str]]:
    key = SigningKey.rsa("rsa-1", "RS256")
    data = {
        "server": {"listen": ["127.0.0.1:0"], "http_parser": parser, "access_log": False},
        "admin": {"listen": ""},
        "authz": {"listen": ["127.0.0.1:0"]},
        "issuer": [{"name": "idp", "issuer": ISSUER, "jwks_file": "/unused", "audiences": [AUDIENCE]}],
        "upstream": {"b": {"targets": ["http://127.0.0.1:1"]}},
        "route": [{"path_prefix": "/", "upstream": "b"}, {"path_prefix": "/open", "upstream": "b", "auth": "off"}],
    }
    config = parse_config(data, "bench.toml", {})
    worker = build_worker(config, store=MemoryRevocationStore())
    gateway = worker.gateway
    # The loop is driven by hand here, without turns: every verification at once (jwtproxy.turns).
    gateway.auth.turns = None
    gateway.verifier.set_keyset("idp", keyset_from_jwks({"keys": [key.jwk()]}, config.issuers[0], lambda m: None))
    conn = ClientConnection(gateway, authz=True)
    transport = SinkTransport()
    conn.connection_made(transport)
    token = key.token(sub="user-1", role="member", scope="read")
    cases = [
        ("allowed, cached token", request("/orders/12345?expand=items", token), b"HTTP/1.1 200 "),
        ("allowed, public route", request("/open/page", None), b"HTTP/1.1 200 "),
        ("denied, no token", request("/orders/12345", None), b"HTTP/1.1 401 "),
    ]
    rows = []
    for name, wire, expect in cases:
        conn.data_received(wire)  # warm: verifies and caches the token
        assert transport.last.startswith(expect), transport.last[:200]
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                conn.data_received(wire)
            best = min(best, time.perf_counter() - start)
        assert transport.last.startswith(expect), transport.last[:200]
        rows.append((name, best / n * 1e6, ""))
    # Blocks held after answering: what each request leaves behind (nothing, once answered).
    wire = cases[0][1]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(n):
        conn.data_received(wire)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.count_diff for stat in after.compare_to(before, "lineno") if stat.count_diff > 0)
    rows.append(("blocks held after the batch", float(held), f"for {n} cached-token answers"))
    conn.connection_lost(None)
    await worker.store.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, best kept (default 5)")
    args = parser.parse_args()
    for codec in ("httptools", "h11"):
        rows = asyncio.run(measure(codec, args.requests, args.rounds))
        print(f"{codec}:")
        for name, value, note in rows:
            unit = "" if note else " µs/request"
            print(f"  {name:<30} {value:8.1f}{unit} {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
