"""The README's "Backends that verify the gateway" examples, run as written against a real daemon.

The code blocks are read from README.md (only the JWKS address is pointed at the test daemon's
admin listener), so the README cannot drift from what works. Python (PyJWT) always runs; Node
(`jose`) runs when ``node`` is installed and ``tests/assertion_node`` has its modules
(``npm ci`` there; CI does it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from daemon_harness import REPO_ROOT, Daemon, free_port, http
from helpers import AUDIENCE, ISSUER, Backend, SigningKey
from jwtproxy.headerpolicy import header_key

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
NODE_DIR = Path(__file__).resolve().parent / "assertion_node"
EXAMPLE_JWKS = "http://127.0.0.1:9901/.well-known/jwks.json"


def readme_block(language: str) -> str:
    """The ``language`` code block of the README's "Backends that verify the gateway" section."""
    text = README.read_text()
    section = text.split("## Backends that verify the gateway", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block in the README section"
    block = match.group(1)
    assert EXAMPLE_JWKS in block, "the example must fetch the JWKS from the admin listener"
    return block


@pytest.fixture
async def daemon(tmp_path: Path, backend: Backend, jwks_path: str) -> AsyncIterator[Daemon]:
    d = Daemon(tmp_path, dict(listen_port=free_port(), admin_port=free_port(), backend_port=backend.port,
                              jwks_file=jwks_path, tmp=tmp_path, issuer=ISSUER, audience=AUDIENCE,
                              admin_token="admin-secret", extra_sections="[assertion]\nenabled = true\n"))
    try:
        await d.wait_ready()
        yield d
    finally:
        d.kill()


async def _assertion(d: Daemon, token: str) -> str:
    reply = await http("GET", d.url("/orders"), token=token, headers={"x-jwtproxy-assertion": "forged"})
    assert reply.status == 200
    key = header_key(b"x-jwtproxy-assertion")
    (value,) = [v for k, v in reply.json()["headers"] if header_key(k.encode()) == key]
    return str(value)


def _tampered(assertion: str) -> str:
    header, payload, signature = assertion.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join((header, forged, signature))


async def test_python_example(daemon: Daemon, rsa_key: SigningKey) -> None:
    namespace: dict[str, Any] = {}
    exec(readme_block("python").replace(EXAMPLE_JWKS, daemon.admin_url("/.well-known/jwks.json")), namespace)
    gateway_identity = namespace["gateway_identity"]
    assertion = await _assertion(daemon, rsa_key.token(sub="alice", role="admin"))

    claims = await asyncio.to_thread(gateway_identity, assertion, "backend")
    assert claims["sub"] == "alice" and claims["role"] == "admin" and claims["aud"] == "backend"
    with pytest.raises(pyjwt.InvalidAudienceError):
        await asyncio.to_thread(gateway_identity, assertion)  # the example's default upstream
    with pytest.raises(pyjwt.InvalidSignatureError):
        await asyncio.to_thread(gateway_identity, _tampered(assertion), "backend")
    with pytest.raises(pyjwt.PyJWTError):
        await asyncio.to_thread(gateway_identity, "forged", "backend")
    with pytest.raises(pyjwt.PyJWTError):
        await asyncio.to_thread(gateway_identity, None, "backend")  # no header at all


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
@pytest.mark.skipif(not (NODE_DIR / "node_modules" / "jose").exists(),
                    reason="tests/assertion_node/node_modules missing: run `npm ci` in tests/assertion_node")
async def test_node_example(daemon: Daemon, rsa_key: SigningKey) -> None:
    # Next to verify.mjs, so that its `import ... from "jose"` finds this folder's node_modules.
    example = NODE_DIR / f"example-{uuid.uuid4().hex}.mjs"
    example.write_text(readme_block("js").replace(EXAMPLE_JWKS, daemon.admin_url("/.well-known/jwks.json")))
    try:
        assertion = await _assertion(daemon, rsa_key.token(sub="bob", scope="read"))

        def run(upstream: str, *values: str) -> list[dict[str, Any]]:
            done = subprocess.run(["node", "verify.mjs", str(example), upstream, *values], cwd=NODE_DIR,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return [json.loads(line) for line in done.stdout.splitlines()]

        ok, tampered, garbage = await asyncio.to_thread(run, "backend", assertion, _tampered(assertion), "forged")
        assert ok["ok"]["sub"] == "bob" and ok["ok"]["scope"] == "read" and ok["ok"]["aud"] == "backend"
        assert tampered == {"error": "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"}
        assert garbage == {"error": "ERR_JWS_INVALID"}
        (other,) = await asyncio.to_thread(run, "payments", assertion)
        assert other == {"error": "ERR_JWT_CLAIM_VALIDATION_FAILED"}
    finally:
        example.unlink(missing_ok=True)
