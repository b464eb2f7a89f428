"""``jwtproxy demo``: the shipped config, a demo issuer and an echo backend, ready to curl.

The demo issuer and backend run in a child process (aiohttp) on the addresses the shipped
``jwtproxy.toml`` names: the issuer on 127.0.0.1:8081 (``/demo-issuer/jwks.json`` and a token
minting endpoint ``/demo-issuer/token``), the echo backend on 127.0.0.1:8082. The gateway itself
runs exactly as ``jwtproxy serve`` would, in the foreground; Ctrl-C stops everything.

This is a demo: its issuer signs whatever it is asked to, so it must never face a network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from jwtproxy.config import Config, ConfigError, load_config

DEMO_KID = "demo-rs256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DemoIssuer:
    """An RSA key, its JWKS, and a minting function."""

    def __init__(self, issuer: str, audience: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return {"keys": [{"kty": "RSA", "kid": DEMO_KID, "use": "sig", "alg": "RS256", "n": _b64url(n), "e": _b64url(e)}]}

    def mint(self, sub: str = "demo-user", role: str = "member", scope: str = "demo:read", ttl: int = 3600) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": DEMO_KID}
        claims = {"iss": self.issuer, "aud": self.audience, "sub": sub, "role": role, "scope": scope,
                  "iat": now, "exp": now + ttl, "jti": os.urandom(8).hex()}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}".encode()
        signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64url(signature)}"


def _serve_demo_services(issuer: DemoIssuer, issuer_port: int, issuer_path: str, backend_port: int) -> None:
    """Child process: the demo issuer and the echo backend."""
    from aiohttp import web

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(issuer.jwks(), headers={"Cache-Control": "max-age=300"})

    async def token(request: web.Request) -> web.Response:
        q = request.query
        minted = issuer.mint(q.get("sub", "demo-user"), q.get("role", "member"), q.get("scope", "demo:read"))
        return web.Response(text=minted + "\n")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
             "body_bytes": len(body)}
        )

    async def main() -> None:
        issuer_app = web.Application()
        issuer_app.router.add_get(issuer_path + "/jwks.json", jwks)
        issuer_app.router.add_get(issuer_path + "/token", token)
        backend_app = web.Application()
        backend_app.router.add_route("*", "/{tail:.*}", echo)
        runners = []
        for app, port in ((issuer_app, issuer_port), (backend_app, backend_port)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C ends us with SIGTERM
        await stop.wait()
        for runner in runners:
            await runner.cleanup()

    asyncio.run(main())


def _demo_parts(config: Config) -> tuple[str, str, int, str, int]:
    """(issuer, audience, issuer port, issuer path, backend port) from the shipped config."""
    issuer = next((i for i in config.issuers if i.name == "demo"), None)
    if issuer is None or not issuer.jwks_uri:
        raise ValueError("the config has no [[issuer]] named 'demo' with a jwks_uri (is this the shipped jwtproxy.toml?)")
    jwks = urlparse(issuer.jwks_uri)
    backend = config.upstreams.get("demo")
    if backend is None:
        raise ValueError("the config has no [upstream.demo]")
    path = jwks.path.rsplit("/", 1)[0]
    return issuer.issuer, issuer.audiences[0], jwks.port or 80, path, backend.targets[0].port


def run_demo(config_path: str) -> int:
    try:
        config = load_config(config_path)
        issuer_url, audience, issuer_port, issuer_path, backend_port = _demo_parts(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    issuer = DemoIssuer(issuer_url, audience)
    child = multiprocessing.get_context("fork").Process(
        target=_serve_demo_services, args=(issuer, issuer_port, issuer_path, backend_port), daemon=True
    )
    child.start()
    listen = config.server.listen[0]
    base = f"http://{listen.host}:{listen.port}"
    member = issuer.mint()
    admin = issuer.mint("demo-admin", "admin", "demo:read demo:write")
    print(
        f"""
jwtproxy demo: gateway on {base}, demo issuer on http://127.0.0.1:{issuer_port}{issuer_path}, echo backend on 127.0.0.1:{backend_port}

  # a valid token: 200, and the backend sees x-user-id / x-user-role / x-scope
  curl -s {base}/hello -H 'Authorization: Bearer {member}'

  # no token: 401
  curl -si {base}/hello

  # scope demo:write required on /write: 403 for the member token above, 200 for this one
  curl -s {base}/write -H 'Authorization: Bearer {admin}'

  # mint more: curl 'http://127.0.0.1:{issuer_port}{issuer_path}/token?sub=alice&role=admin&scope=demo:write'
  # metrics: curl http://{config.admin.listen.host if config.admin.listen else '127.0.0.1'}:{config.admin.listen.port if config.admin.listen else 9901}/metrics
""",
        flush=True,
    )
    from jwtproxy.supervisor import Supervisor

    try:
        return Supervisor(lambda: load_config(config_path), config=config).run()
    finally:
        if child.is_alive():
            child.terminate()
            child.join(5)
