"""A revocation store without a backend: the mirror alone, in this process.

Not a ``[revocation] backend`` choice (nothing survives the process, nothing reaches other
workers). It is the store for tests and for in-process gateways that need the
:class:`~jwtproxy.revocation.RevocationStore` protocol without a file or a server; writes
validate their input exactly as the real backends do and never fail otherwise.
"""

from __future__ import annotations

from typing import Any

from .core import EXPIRY_GRACE, Log, RevocationMirror, check_id, check_time

__all__ = ["MemoryRevocationStore"]


def _silent(message: str, *args: Any) -> None:
    return None


class MemoryRevocationStore(RevocationMirror):
    """The mirror, always ``up``; ``start`` and ``close`` have nothing to do."""

    def __init__(self, log: Log = _silent, grace: float = EXPIRY_GRACE) -> None:
        super().__init__(log, grace)
        self._up = True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        """``{"backend": "memory", "up": True, "jti", "sub"}``."""
        return {"backend": "memory", "up": self._up, "jti": len(self._jti), "sub": len(self._sub)}

    async def revoke_jti(self, jti: str, exp: float) -> None:
        self._mirror_jti(check_id("jti", jti), check_time("exp", exp))

    async def revoke_sub(self, sub: str, before: float) -> None:
        self._mirror_sub(check_id("sub", sub), check_time("before", before))

    async def unrevoke_jti(self, jti: str) -> bool:
        return self._jti.pop(jti, None) is not None

    async def unrevoke_sub(self, sub: str) -> bool:
        return self._sub.pop(sub, None) is not None
