"""Fixtures of the adversarial suite (helpers live in advhelpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from advhelpers import (
    AUDIENCE,
    ISSUER,
    ROUTES,
    BigBackend,
    CountingListener,
    FakeIdP,
    IdPGateway,
    IdPGatewayFactory,
)
from helpers import Backend, RunningGateway, base_config

from jwtproxy.jwks import FetchPolicy


@pytest.fixture
async def counting_listener() -> AsyncIterator[CountingListener]:
    listener = await CountingListener().start()
    yield listener
    await listener.stop()


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdP]:
    server = await FakeIdP().start()
    yield server
    await server.stop()


@pytest.fixture
async def make_idp_gateway(parser: str, backend: Backend) -> AsyncIterator[IdPGatewayFactory]:
    """``await make_idp_gateway(idp, issuer={...overrides}, policy=FetchPolicy(...), **base_config kwargs)``."""
    started: list[IdPGateway] = []

    async def factory(idp: FakeIdP | None = None, *, issuer: Mapping[str, Any] | None = None,
                      jwks_uri: str | None = None, policy: FetchPolicy | None = None,
                      backend_port: int | None = None, **kwargs: Any) -> IdPGateway:
        uri = jwks_uri or (idp.jwks_uri if idp is not None else "http://127.0.0.1:9/jwks.json")
        issuer_cfg = {"name": "idp", "issuer": ISSUER, "jwks_uri": uri, "audiences": [AUDIENCE],
                      "jwks_cooldown": 30, **(issuer or {})}
        kwargs.setdefault("parser", parser)
        kwargs.setdefault("routes", ROUTES)
        data = base_config(backend_port or backend.port, issuers=[issuer_cfg], **kwargs)
        log: list[str] = []
        gw = RunningGateway(data, key_log=log.append,
                            fetch_policy=policy or FetchPolicy(timeout=1.0, backoff_initial=60.0))
        await gw.start()
        running = IdPGateway(gw, log)
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.stop()


@pytest.fixture
async def big_backend() -> AsyncIterator[BigBackend]:
    server = await BigBackend().start()
    yield server
    await server.stop()
