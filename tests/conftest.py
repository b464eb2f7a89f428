"""Fixtures shared by the protocol tests. Every protocol test runs against both codecs."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Backend, RunningGateway, SigningKey, base_config, write_jwks  # noqa: E402

from jwtproxy import compiled  # noqa: E402

CODECS = ["httptools", "h11"]

# The request path's modules as this run imports them: compiled (mypyc) or pure Python
# (JWTPROXY_PURE_PYTHON=1, or an install built without a compiler). .ci/run runs the suite both ways.
COMPILED = compiled.compiled_modules()


def pytest_report_header() -> str:
    return f"jwtproxy request path: {compiled.describe()}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that replaces a method of one of the request path's classes (monkeypatch, to inject a
    # fault) can only do so where that class is a Python class; compiled classes are fixed. Such
    # tests run in the pure-Python run of the suite and are skipped, with this reason, in the other.
    if not COMPILED:
        return
    skip = pytest.mark.skip(reason="replaces a method of a compiled class: runs with JWTPROXY_PURE_PYTHON=1 "
                                   "(.ci/run's pure-Python leg)")
    for item in items:
        if item.get_closest_marker("pure_python") is not None:
            item.add_marker(skip)


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
