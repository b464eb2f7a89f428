"""The revocation mirror every backend builds on, and the limits and validators they share.

See :mod:`jwtproxy.revocation` for the theory of operation (kinds of revocation, the "max" rule,
the per-worker mirror and how each backend keeps it current).
"""


from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

__all__ = [
    "RevocationMirror",
    "RevocationBackendError",
    "RevocationSnapshot",
    "EXPIRY_GRACE",
    "DEFAULT_JTI_TTL",
    "MAX_ID_LENGTH",
    "MAX_TIME",
    "check_id",
    "check_time",
]

#: Seconds a jti revocation outlives the token's exp (covers any sane issuer leeway).
EXPIRY_GRACE: Final = 3600.0
#: exp used when an admin request revokes a jti without giving one (the token's exp is unknown,
#: so err long: a revocation that outlives its token costs a few bytes, the reverse re-admits it).
DEFAULT_JTI_TTL: Final = 7 * 24 * 3600.0
#: Longest accepted jti / sub, in characters.
MAX_ID_LENGTH: Final = 512
#: Latest accepted exp / before (9999-12-31T23:59:59Z): keeps every backend's arithmetic exact.
MAX_TIME: Final = 253402300799.0

Log = Callable[..., None]
"""printf-style logger: ``log("message %s", arg)`` (``logging.Logger.info`` fits)."""

RevocationSnapshot = dict[str, Any]
"""A mirror in :meth:`RevocationMirror.list`'s shape, plus whatever a backend adds to resume
(the redis epoch): what the supervisor hands a worker at fork."""


class RevocationBackendError(RuntimeError):
    """The backend could not store or remove a revocation; nothing was changed."""


class RevocationMirror:
    """Per-worker revocation set: a synchronous in-memory mirror kept current by a backend.

    Subclasses (``SqliteRevocationStore``, ``RedisRevocationStore``, ``MemoryRevocationStore``)
    implement the I/O and with it the ``RevocationStore`` protocol; this class holds the mirror,
    the hot-path check and the backend's health flag. Use ``open_store`` to get one.
    """

    def __init__(self, log: Log, grace: float = EXPIRY_GRACE) -> None:
        # The mirror. Readers only ever see a whole dict: a reload builds new dicts and swaps
        # the attributes, incremental updates are single dict operations.
        self._jti: dict[str, float] = {}
        self._sub: dict[str, float] = {}
        self._log = log
        self._grace = grace
        self._up = False

    @property
    def up(self) -> bool:
        """Whether the backend answered last time it was asked."""
        return self._up

    # -- hot path ---------------------------------------------------------------------------

    def is_revoked(self, jti: str | None, sub: str | None, iat: float | None, now: float) -> bool:
        """True if the token (by ``jti``) or its subject (``sub`` revoked before ``iat``) is revoked.

        At most two dict lookups. ``now`` is accepted for the interface; a jti entry that is
        present counts even past its ``exp`` (it is pruned at ``exp + EXPIRY_GRACE``), and a
        revoked subject's token without ``iat`` is revoked (fail closed).
        """
        if jti is not None and jti in self._jti:
            return True
        if sub is not None:
            before = self._sub.get(sub)
            if before is not None and (iat is None or iat < before):
                return True
        return False

    # -- admin ------------------------------------------------------------------------------

    def list(self) -> dict[str, Any]:
        """The mirror as ``{"jti": [{"jti", "exp"}], "sub": [{"sub", "before"}]}``, sorted."""
        jtis = self._jti
        subs = self._sub
        return {
            "jti": [{"jti": k, "exp": jtis[k]} for k in sorted(jtis)],
            "sub": [{"sub": k, "before": subs[k]} for k in sorted(subs)],
        }

    def snapshot(self) -> RevocationSnapshot:
        """What :meth:`seed` takes: the mirror (a backend may add what it needs to resume)."""
        return self.list()

    def seed(self, listing: RevocationSnapshot) -> None:
        """Start from a snapshot in :meth:`list`'s shape (the supervisor's mirror, at fork).

        Only widens the mirror (the larger ``exp`` / ``before`` wins); malformed entries are
        skipped. A backend's first full load replaces the mirror with the stored truth.
        """
        for entry in listing.get("jti", ()):
            try:
                jti, exp = check_id("jti", entry["jti"]), check_time("exp", entry["exp"])
            except (KeyError, TypeError, ValueError):
                continue
            self._jti[jti] = max(exp, self._jti.get(jti, exp))
        for entry in listing.get("sub", ()):
            try:
                sub, before = check_id("sub", entry["sub"]), check_time("before", entry["before"])
            except (KeyError, TypeError, ValueError):
                continue
            self._sub[sub] = max(before, self._sub.get(sub, before))

    # -- helpers for backends -----------------------------------------------------------------

    def _mirror_jti(self, jti: str, exp: float) -> None:
        old = self._jti.get(jti)
        if old is None or old < exp:
            self._jti[jti] = exp

    def _mirror_sub(self, sub: str, before: float) -> None:
        old = self._sub.get(sub)
        if old is None or old < before:
            self._sub[sub] = before

    def _prune_mirror(self, now: float) -> int:
        """Drop jti entries past ``exp + grace``; returns how many."""
        limit = now - self._grace
        dead = [k for k, exp in self._jti.items() if exp < limit]
        for k in dead:
            self._jti.pop(k, None)
        return len(dead)


def check_id(kind: str, value: object) -> str:
    """Validate a jti / sub: non-empty str of at most MAX_ID_LENGTH chars, valid Unicode."""
    if not isinstance(value, str):
        raise ValueError(f"{kind}: must be a string")
    if not value:
        raise ValueError(f"{kind}: must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{kind}: longer than {MAX_ID_LENGTH} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # json.loads lets lone surrogates ("\ud800") through; no backend can store them.
        raise ValueError(f"{kind}: not valid Unicode") from None
    return value


def check_time(kind: str, value: object) -> float:
    """Validate an exp / before: a finite JSON number (not a boolean) in [0, MAX_TIME]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{kind}: must be a number (seconds since the epoch)")
    try:
        t = float(value)
    except OverflowError:
        raise ValueError(f"{kind}: must be a finite number") from None
    if not math.isfinite(t):
        raise ValueError(f"{kind}: must be a finite number")
    if t < 0 or t > MAX_TIME:
        raise ValueError(f"{kind}: out of range (0 .. {MAX_TIME:.0f})")
    return t
