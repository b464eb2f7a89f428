"""Token revocation: the store every caller is typed against, and the backend factory.

Modules: ``core`` (the mirror, limits, validators), ``request`` (the admin request parser),
``sqlite`` and ``redis`` (the backends), ``memory`` (a store without a backend, for tests and
single-process tools).

Theory of operation
-------------------
Two kinds of revocation exist (contract §4 "Verification", last bullet):

* **by token** -- ``jti`` with the token's ``exp``. The entry is kept until ``exp + EXPIRY_GRACE``
  and then forgotten (pruned from the mirror and from storage). The grace (1 h) exists because the
  verifier accepts a token until ``exp + leeway``: forgetting a revocation exactly at ``exp`` would
  re-admit the token for the length of the issuer's leeway.
* **by subject** -- ``sub`` with a ``before`` time: every token of that subject whose ``iat`` is
  earlier than ``before`` is revoked. A token of a revoked subject that carries **no** ``iat``
  cannot be dated, so it is treated as revoked (fail closed). Subject revocations have no natural
  end (an ``iat``-less token stays revoked for ever), so they are kept until deleted with
  ``unrevoke_sub``; there are few of them.

Recording a revocation again only ever widens it: the stored ``exp`` / ``before`` becomes the larger
of the old and the new value (every backend applies this "max" rule, so replays, write-backs and
races between nodes can never shorten or lift a revocation). Removing one is the explicit
``unrevoke_jti`` / ``unrevoke_sub``.

Every worker holds the whole revocation set in memory, a *mirror*: ``jti -> exp`` and
``sub -> before`` dicts. The hot path (``is_revoked``, also called on token-cache hits) is at most
two dict lookups and never touches I/O. The backend keeps the mirror current in the background:

* ``sqlite`` (:mod:`jwtproxy.revocation.sqlite`): one WAL database file per host, shared by every worker and the
  admin process; a worker notices other processes' commits through ``PRAGMA data_version`` (checked
  every 200 ms) and reloads only then.
* ``redis`` (:mod:`jwtproxy.revocation.redis`): keys under ``jwtproxy:rev:``, changes pushed over one pub/sub
  channel, a full resync on every (re)connect and every 30 s, mirrors written back when Redis comes
  back empty.

A write (``revoke_*`` / ``unrevoke_*``) returns only once the backend has stored it; it updates
the caller's own mirror at once, and the other workers within one second. A backend failure raises
``RevocationBackendError`` (a ``RuntimeError``: the admin API answers 503) and changes nothing, so a
revocation that returned success is never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .core import (
    DEFAULT_JTI_TTL,
    EXPIRY_GRACE,
    MAX_ID_LENGTH,
    MAX_TIME,
    Log,
    RevocationBackendError,
    RevocationMirror,
    RevocationSnapshot,
    check_id,
    check_time,
)
from .request import parse_revocation_request

if TYPE_CHECKING:
    from jwtproxy.config import RevocationConfig

__all__ = [
    "DEFAULT_JTI_TTL",
    "EXPIRY_GRACE",
    "MAX_ID_LENGTH",
    "MAX_TIME",
    "IsRevoked",
    "Log",
    "RevocationBackendError",
    "RevocationMirror",
    "RevocationSnapshot",
    "RevocationStore",
    "check_id",
    "check_time",
    "open_store",
    "parse_revocation_request",
]

IsRevoked = Callable[[str | None, str | None, float | None, float], bool]
"""The hot-path check: ``is_revoked(jti, sub, iat, now)`` (see :meth:`RevocationStore.is_revoked`)."""


class RevocationStore(Protocol):
    """What the worker, the supervisor, the admin API and ``jwtproxy verify`` use of a store.

    Implemented by :class:`~jwtproxy.revocation.sqlite.SqliteRevocationStore`,
    :class:`~jwtproxy.revocation.redis.RedisRevocationStore` and
    :class:`~jwtproxy.revocation.memory.MemoryRevocationStore`, all on top of
    :class:`~jwtproxy.revocation.core.RevocationMirror`. Writes raise
    :class:`RevocationBackendError` when the backend cannot store them.
    """

    def is_revoked(self, jti: str | None, sub: str | None, iat: float | None, now: float) -> bool:
        """Hot path: at most two dict lookups, no I/O."""
        ...

    @property
    def up(self) -> bool:
        """Whether the backend answers (``jwtproxy_revocation_backend_up``)."""
        ...

    def status(self) -> dict[str, Any]:
        """Backend health and counts for ``/readyz`` detail (``"up"`` among them)."""
        ...

    def list(self) -> dict[str, Any]:
        """The mirror as ``{"jti": [{"jti", "exp"}], "sub": [{"sub", "before"}]}``, sorted."""
        ...

    def snapshot(self) -> RevocationSnapshot:
        """What :meth:`seed` takes: the mirror, plus what the backend needs to resume."""
        ...

    def seed(self, listing: RevocationSnapshot) -> None:
        """Start from another store's snapshot (only widens the mirror)."""
        ...

    async def start(self) -> None:
        """Load the mirror and start keeping it current."""
        ...

    async def close(self) -> None:
        """Stop background work and release the backend."""
        ...

    async def revoke_jti(self, jti: str, exp: float) -> None:
        """Revoke one token until ``exp`` (+ grace)."""
        ...

    async def revoke_sub(self, sub: str, before: float) -> None:
        """Revoke every token of ``sub`` issued before ``before``."""
        ...

    async def unrevoke_jti(self, jti: str) -> bool:
        """Lift a jti revocation; False if there was none."""
        ...

    async def unrevoke_sub(self, sub: str) -> bool:
        """Lift a subject revocation; False if there was none."""
        ...


def open_store(cfg: RevocationConfig, log: Log) -> RevocationStore:
    """Build (not start) the store for ``cfg.backend``; ``await store.start()`` before use.

    ``log`` is printf-style (``log("msg %s", arg)``); it never receives tokens. The backend
    modules are imported here, on first use, so a sqlite deployment never loads redis-py.
    """
    if cfg.backend == "sqlite":
        from .sqlite import SqliteRevocationStore

        return SqliteRevocationStore(cfg.sqlite_path, log)
    if cfg.backend == "redis":
        from .redis import RedisRevocationStore

        return RedisRevocationStore(cfg.redis_url, log)
    raise ValueError(f"unknown revocation backend {cfg.backend!r}")


if TYPE_CHECKING:
    from .memory import MemoryRevocationStore

    def _memory_store_conforms(store: MemoryRevocationStore) -> RevocationStore:
        # The sqlite and redis stores are checked by open_store's return type; the memory store
        # is only built by tests, so mypy checks it here.
        return store
