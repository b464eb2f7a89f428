"""Token revocation: the per-worker mirror, the admin request parser and the backend factory.

Theory of operation
-------------------
Two kinds of revocation exist (SPEC §4 "Verification", last bullet):

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

* ``sqlite`` (``revocation_sqlite``): one WAL database file per host, shared by every worker and the
  admin process; a worker notices other processes' commits through ``PRAGMA data_version`` (checked
  every 200 ms) and reloads only then.
* ``redis`` (``revocation_redis``): keys under ``jwtproxy:rev:``, changes pushed over one pub/sub
  channel, a full resync on every (re)connect and every 30 s, mirrors written back when Redis comes
  back empty.

A write (``revoke_*`` / ``unrevoke_*``) returns only once the backend has stored it; it updates
the caller's own mirror at once, and the other workers within one second. A backend failure raises
``RevocationBackendError`` (a ``RuntimeError``: the admin API answers 503) and changes nothing, so a
revocation that returned success is never lost.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from .config import RevocationConfig

__all__ = [
    "RevocationStore",
    "RevocationBackendError",
    "open_store",
    "parse_revocation_request",
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


class RevocationBackendError(RuntimeError):
    """The backend could not store or remove a revocation; nothing was changed."""


class RevocationStore:
    """Per-worker revocation set: a synchronous in-memory mirror kept current by a backend.

    Subclasses (``SqliteRevocationStore``, ``RedisRevocationStore``) implement the I/O; this
    class holds the mirror and the hot-path check. Use ``open_store`` to get one.
    """

    def __init__(self, log: Log, grace: float = EXPIRY_GRACE) -> None:
        # The mirror. Readers only ever see a whole dict: a reload builds new dicts and swaps
        # the attributes, incremental updates are single dict operations.
        self._jti: dict[str, float] = {}
        self._sub: dict[str, float] = {}
        self._log = log
        self._grace = grace

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

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`seed` takes: the mirror (a backend may add what it needs to resume)."""
        return self.list()

    def seed(self, listing: dict[str, Any]) -> None:
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

    def status(self) -> dict[str, Any]:  # pragma: no cover - overridden
        """Backend health for /readyz detail and the backend-up metric (key ``up``)."""
        raise NotImplementedError

    async def start(self) -> None:  # pragma: no cover - overridden
        """Load the mirror and start keeping it current."""
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        """Stop background work and release the backend."""
        raise NotImplementedError

    async def revoke_jti(self, jti: str, exp: float) -> None:  # pragma: no cover - overridden
        """Revoke one token until ``exp`` (+ grace). Raises RevocationBackendError."""
        raise NotImplementedError

    async def revoke_sub(self, sub: str, before: float) -> None:  # pragma: no cover - overridden
        """Revoke every token of ``sub`` issued before ``before``. Raises RevocationBackendError."""
        raise NotImplementedError

    async def unrevoke_jti(self, jti: str) -> bool:  # pragma: no cover - overridden
        """Lift a jti revocation; False if there was none. Raises RevocationBackendError."""
        raise NotImplementedError

    async def unrevoke_sub(self, sub: str) -> bool:  # pragma: no cover - overridden
        """Lift a subject revocation; False if there was none. Raises RevocationBackendError."""
        raise NotImplementedError

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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_revocation_request(
    body: bytes, now: float
) -> tuple[Literal["jti", "sub"], str, float]:
    """Validate a ``POST /revocations`` body.

    Returns ``("jti", jti, exp)`` or ``("sub", sub, before)``; raises ValueError whose message
    says precisely what is wrong (the admin API returns it as a 400 ``error_description``).

    Rules: a UTF-8 JSON object without duplicate members holding exactly one of ``jti`` / ``sub``
    and nothing but its time member (``exp`` / ``before``); ids are non-empty strings of at most
    512 characters; times are finite numbers in [0, 253402300799]. A missing ``exp`` defaults to
    ``now + 7 days`` (``DEFAULT_JTI_TTL``); a missing ``before`` defaults to ``now`` (every
    token issued so far). An ``exp`` in the past is accepted: the verifier still admits a token
    until ``exp + leeway``, and refusing would make scripted revocation racy.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ValueError("body is not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    has_jti = "jti" in data
    has_sub = "sub" in data
    if has_jti and has_sub:
        raise ValueError("give either jti or sub, not both")
    if not has_jti and not has_sub:
        raise ValueError("missing jti or sub")
    kind: Literal["jti", "sub"] = "jti" if has_jti else "sub"
    time_key = "exp" if has_jti else "before"
    unknown = sorted(k for k in data if k not in (kind, time_key))
    if unknown:
        raise ValueError(f"unknown member(s) for a {kind} revocation: {', '.join(map(repr, unknown))}")
    ident = check_id(kind, data[kind])
    if time_key in data:
        when = check_time(time_key, data[time_key])
    else:
        when = min(now + DEFAULT_JTI_TTL, MAX_TIME) if has_jti else now
    return kind, ident, when


def open_store(cfg: RevocationConfig, log: Log) -> RevocationStore:
    """Build (not start) the store for ``cfg.backend``; ``await store.start()`` before use.

    ``log`` is printf-style (``log("msg %s", arg)``); it never receives tokens.
    """
    if cfg.backend == "sqlite":
        from .revocation_sqlite import SqliteRevocationStore

        return SqliteRevocationStore(cfg.sqlite_path, log)
    if cfg.backend == "redis":
        from .revocation_redis import RedisRevocationStore

        return RedisRevocationStore(cfg.redis_url, log)
    raise ValueError(f"unknown revocation backend {cfg.backend!r}")
