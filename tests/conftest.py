"""Fixtures shared by the protocol tests. Every protocol test runs against both codecs."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Backend, RunningGateway, SigningKey, base_config, write_jwks  # noqa: E402

CODECS = ["httptools", "h11"]


@pytest.fixture(params=CODECS)
def parser(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1", "RS256")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return SigningKey.ec("ec-1", "ES256")


@pytest.fixture
def jwks_path(tmp_path: Path, rsa_key: SigningKey, ec_key: SigningKey) -> str:
    return write_jwks(str(tmp_path / "jwks.json"), rsa_key, ec_key)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = await Backend().start()
    yield server
    await server.stop()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(parser: str, backend: Backend, jwks_path: str) -> AsyncIterator[GatewayFactory]:
    """Start gateways on the test's loop: ``await make_gateway(routes=..., server=...)``."""
    started: list[RunningGateway] = []

    async def factory(**kwargs: Any) -> RunningGateway:
        kwargs.setdefault("parser", parser)
        kwargs.setdefault("jwks_file", jwks_path)
        data = base_config(kwargs.pop("backend_port", backend.port), **kwargs)
        gw = await RunningGateway(data).start()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.stop()
