"""``jwtproxy demo``: the shipped demo config, a demo issuer and an echo backend, ready to curl.

Theory of operation
-------------------
* The config is ``jwtproxy/demo.toml`` inside the installed package (``-c FILE`` picks another),
  so the demo runs from any directory after a plain ``pip install``. Its state -- the sqlite
  revocation file -- goes to a fresh temporary directory that is removed on exit; the metrics
  and last-good-keys directories are the supervisor's own temporary ones. Nothing is written
  into the current directory.
* Before anything starts, every port the demo needs (gateway listeners, admin listener, issuer,
  backend) is tried; one that is taken ends the demo with exit status 1 and a message naming it.
* The demo issuer and the echo backend run in a child process (aiohttp) on the addresses the
  config names: the issuer on the ``jwks_uri``'s port (``.../jwks.json`` and a token minting
  endpoint ``.../token``), the backend on ``[upstream.demo]``'s target. The gateway is started
  only once the issuer answers its JWKS with keys, so its first fetch succeeds (no
  ``jwks_load_failed`` at start), and the curl commands are printed once the supervisor reports
  every worker ready. The gateway runs exactly as ``jwtproxy serve`` would, in the foreground;
  Ctrl-C stops everything.

This is a demo: its issuer signs whatever it is asked to, so it must never face a network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import resources
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from jwtproxy.config import Config, ConfigError, ListenAddr, load_config

DEMO_KID = "demo-rs256"
#: Seconds the demo waits for its own issuer to serve keys.
ISSUER_WAIT = 15.0


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


def _serve_demo_services(issuer: DemoIssuer, issuer_port: int, issuer_path: str, backend_port: int,
                         report: Connection) -> None:
    """Child process: the demo issuer and the echo backend.

    Sends ``("ok",)`` on ``report`` once both listen, or ``("error", port, what, reason)``.
    """
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
        for app, port, what in ((issuer_app, issuer_port, "demo issuer"), (backend_app, backend_port, "echo backend")):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, "127.0.0.1", port).start()
            except OSError as exc:
                report.send(("error", port, what, exc.strerror or str(exc)))
                for r in runners:
                    await r.cleanup()
                return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C ends us with SIGTERM
        report.send(("ok",))
        await stop.wait()
        for runner in runners:
            await runner.cleanup()

    asyncio.run(main())


def _demo_parts(config: Config) -> tuple[str, str, int, str, int]:
    """(issuer, audience, issuer port, issuer path, backend port) from the demo config."""
    issuer = next((i for i in config.issuers if i.name == "demo"), None)
    if issuer is None or not issuer.jwks_uri:
        raise ValueError("the config has no [[issuer]] named 'demo' with a jwks_uri (is this a demo config?)")
    jwks = urlparse(issuer.jwks_uri[0])
    backend = config.upstreams.get("demo")
    if backend is None:
        raise ValueError("the config has no [upstream.demo]")
    path = jwks.path.rsplit("/", 1)[0]
    return issuer.issuer, issuer.audiences[0], jwks.port or 80, path, backend.targets[0].port


@contextlib.contextmanager
def _config_file(path: str | None) -> Iterator[str]:
    """``path``, or the demo config shipped in the package as a real file."""
    if path is not None:
        yield path
        return
    with resources.as_file(resources.files("jwtproxy").joinpath("demo.toml")) as shipped:
        yield str(shipped)


def _with_state_dir(config: Config, state_dir: str) -> Config:
    """The config with its state files moved into ``state_dir``."""
    if config.revocation.backend != "sqlite":
        return config
    revocation = dataclasses.replace(config.revocation, sqlite_path=os.path.join(state_dir, "revocations.db"))
    return dataclasses.replace(config, revocation=revocation)


def taken_ports(needed: list[tuple[ListenAddr, str]]) -> list[tuple[ListenAddr, str, str]]:
    """Which of ``(address, what)`` cannot be bound now, with the reason."""
    from jwtproxy.supervisor import bind_listener

    taken = []
    for addr, what in needed:
        try:
            bind_listener(addr, backlog=1).close()
        except OSError as exc:
            taken.append((addr, what, exc.strerror or str(exc)))
    return taken


def _wait_for_keys(url: str, timeout: float) -> str | None:
    """Poll the demo issuer's JWKS until it serves a key; None when it does, else the last error."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if json.load(response).get("keys"):
                    return None
                problem = "the JWKS holds no key"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = str(exc)
        time.sleep(0.05)
    return problem


def run_demo(config_path: str | None = None) -> int:
    """Run the demo; ``config_path`` None uses the config shipped in the package."""
    state_dir = tempfile.mkdtemp(prefix="jwtproxy-demo-")
    try:
        with _config_file(config_path) as path:
            return _run(path, state_dir)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _run(config_path: str, state_dir: str) -> int:
    def load() -> Config:
        return _with_state_dir(load_config(config_path), state_dir)

    try:
        config = load()
        issuer_url, audience, issuer_port, issuer_path, backend_port = _demo_parts(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1

    needed = [(addr, "gateway listener") for addr in config.server.listen]
    if config.admin.listen is not None:
        needed.append((config.admin.listen, "admin listener"))
    needed += [(ListenAddr("127.0.0.1", issuer_port), "demo issuer"),
               (ListenAddr("127.0.0.1", backend_port), "echo backend")]
    taken = taken_ports(needed)
    if taken:
        for addr, what, reason in taken:
            print(f"demo: port {addr.port} ({what}, {addr}) is not available: {reason}", file=sys.stderr)
        print("demo: stop what uses it, or run `jwtproxy demo -c FILE` with a config naming other ports",
              file=sys.stderr)
        return 1

    issuer = DemoIssuer(issuer_url, audience)
    parent_end, child_end = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=_serve_demo_services, args=(issuer, issuer_port, issuer_path, backend_port, child_end), daemon=True
    )
    child.start()
    child_end.close()
    try:
        message: tuple[Any, ...] = ("error", issuer_port, "demo issuer", "did not start in time")
        if parent_end.poll(ISSUER_WAIT):
            try:
                message = parent_end.recv()
            except EOFError:
                message = ("error", issuer_port, "demo issuer", "its process exited")
        if message[0] != "ok":
            _, port, what, reason = message
            print(f"demo: port {port} ({what}) is not available: {reason}", file=sys.stderr)
            return 1
        jwks_url = f"http://127.0.0.1:{issuer_port}{issuer_path}/jwks.json"
        unserved = _wait_for_keys(jwks_url, ISSUER_WAIT)
        if unserved is not None:
            print(f"demo: the demo issuer at {jwks_url} serves no keys: {unserved}", file=sys.stderr)
            return 1

        listen = config.server.listen[0]
        base = f"http://{listen}"
        member = issuer.mint()
        admin = issuer.mint("demo-admin", "admin", "demo:read demo:write")
        admin_base = f"http://{config.admin.listen}" if config.admin.listen else None

        def announce() -> None:
            lines = [
                "",
                f"jwtproxy demo: gateway on {base}, demo issuer on http://127.0.0.1:{issuer_port}{issuer_path}, "
                f"echo backend on 127.0.0.1:{backend_port}; state in {state_dir}",
                "",
                "  # a valid token: 200, and the backend sees x-user-id / x-user-role / x-scope",
                f"  curl -s {base}/hello -H 'Authorization: Bearer {member}'",
                "",
                "  # no token: 401",
                f"  curl -si {base}/hello",
                "",
                "  # scope demo:write required on /write: 403 for the member token above, 200 for this one",
                f"  curl -s {base}/write -H 'Authorization: Bearer {admin}'",
                "",
                f"  # mint more: curl 'http://127.0.0.1:{issuer_port}{issuer_path}/token?sub=alice&role=admin&scope=demo:write'",
            ]
            if admin_base is not None:
                lines += [f"  # status page: {admin_base}/   metrics: curl {admin_base}/metrics"]
            print("\n".join(lines) + "\n", flush=True)

        from jwtproxy.supervisor import Supervisor

        return Supervisor(load, config=config, on_ready=announce).run()
    finally:
        parent_end.close()
        if child.is_alive():
            child.terminate()
            child.join(5)
