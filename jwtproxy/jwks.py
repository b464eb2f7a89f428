"""JWKS key lifecycle: fetch each issuer's keys, keep them fresh, hand them to the verifier.

This is the I/O shell around the sans-I/O ``keys.py``: it reads the network (aiohttp), the disk
(``jwks_file``) and the clock, and never verifies a token itself.

Theory of operation
-------------------
Each configured issuer has one ``_Issuer`` state holding one ``_Source`` state per *source*:

* ``jwks_uri``  -- GET the JWK Set (RFC 7517 §5); written as a list, one source per URL;
* ``discovery`` -- GET the OpenID Connect / RFC 8414 metadata, whose ``issuer`` must equal the
  configured issuer exactly (RFC 8414 §3.3, OIDC Discovery §4.3), then GET its ``jwks_uri``;
* ``jwks_file`` -- read from disk at start, and again when a token names an unknown ``kid``
  (invariant 4 applies); never on a timer. A SIGHUP reload starts new workers, which read it anew;
* no JWKS source (an HMAC-only issuer) -- nothing to fetch: the verifier builds the HMAC keys
  from ``hs_secret`` itself (``keys.keyset_from_secret``), so the issuer counts as loaded. For an
  issuer with ``hs_secret`` *and* a JWKS source, the HMAC keys likewise live in the verifier and
  this module only manages the JWKS part. An issuer with ``introspection_endpoint`` and no key
  source counts as loaded too: its tokens are judged by its endpoint.

Several sources (``jwks_uri`` as a list) are independent: each is fetched, scheduled, backed off
and remembered on its own, and a failing one keeps its last good keys while the others refresh.
What the verifier gets is their union (``keys.merge_sources``): each distinct key once, and a
``kid`` that two sources publish with different keys refused (logged as ``jwks_kid_conflict``).
The invariants below hold per source, and invariant 2 for the merged set.

Fetches of an issuer with ``ca_file`` verify TLS against that bundle only
(``upstream_tls.client_context``).

Invariants:

1. *A failure never removes keys.* Only a successful load that yields at least one usable key
   replaces the key set; every failure (network, status, size, JSON, JWKS shape, discovery issuer
   mismatch, no usable key) keeps the last good keys and is logged with issuer, source and reason.
   An empty key set counts as a failure too -- an IdP answering ``{"keys": []}`` mid-rotation
   must not unload every key -- except for an issuer with ``hs_secret`` that has no JWKS keys
   yet (its HMAC keys make it usable, and its JWKS may legitimately be empty).
2. *The verifier and the token cache only hear about real changes.* A load whose
   ``KeySet.fingerprint`` equals the installed one counts as ``unchanged``; a different fingerprint
   (including the first load) calls ``verifier.set_keyset`` and then ``on_change(issuer_name)``.
3. *At most one fetch per issuer is in flight.* Background refreshes and unknown-``kid`` refetches
   share one task (``_Issuer.inflight``); waiters get ``asyncio.shield`` wrappers of it, so one
   cancelled waiter (a client that went away) never cancels the fetch for the others.
4. *Forged ``kid`` values cannot cause a refetch storm.* ``refetch_unknown_kid`` starts a fetch at
   most once per ``jwks_cooldown`` seconds per issuer (measured on the monotonic clock from the
   start of the previous unknown-kid refetch); inside the cooldown it answers ``False`` at once.
5. *Every remote byte is bounded.* Each GET (redirects and body included) has a total timeout,
   follows at most ``max_redirects`` redirects (never from https to http, never to a non-HTTP
   scheme), must answer 200, and its body is read in chunks and abandoned as soon as it passes
   ``max_bytes`` -- Content-Length is only used to fail early, never trusted to be small. The cap
   applies to the decoded body, so a compressed bomb is cut off too.

Scheduling (one task per fetched issuer, sleeping a computed duration -- no polling):

* after a success: ``Cache-Control: max-age`` of the JWKS response clamped to
  [``min_period``, ``max_period``] (default 30 s .. 24 h; ``no-cache``/``no-store`` count as 0,
  so the lower bound applies), else the issuer's ``jwks_refresh``. The lower bound protects the
  IdP from ``max-age=0``; the upper bound keeps a long max-age from hiding a revoked key for days
  (an unknown ``kid`` still triggers a refetch at any time). ``Age`` is not subtracted.
* after a failure: exponential backoff ``backoff_initial * 2**(failures-1)`` (default 1 s, 2 s,
  4 s, ...) capped at the normal period, and capped at ``backoff_cap_unloaded`` (30 s) while the
  issuer never had keys, because its tokens are answered 503 until then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from yarl import URL

from jwtproxy import __version__
from jwtproxy.accesslog import echo, log_event
from jwtproxy.config import IssuerConfig
from jwtproxy.keys import KeySet, keyset_from_jwks, merge_sources
from jwtproxy.tracing import OperationTracer
from jwtproxy.upstream_tls import client_context

__all__ = ["FetchError", "FetchPolicy", "KeyManager", "KeySink", "cache_max_age"]

Log = Callable[[str], None]
SourceKind = Literal["jwks_uri", "discovery", "jwks_file", "hs_secret", "introspection"]
ParseJwks = Callable[[dict[str, Any], IssuerConfig, Log], KeySet]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# Long enough for any issuer URL, short enough that a hostile "issuer" value cannot flood the log.
_MAX_ECHO = 200


class KeySink(Protocol):
    """The part of ``verifier.TokenVerifier`` this module drives."""

    def set_keyset(self, issuer_name: str, keyset: KeySet) -> bool: ...


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Bounds for every fetch and for the refresh schedule (see the module docstring)."""

    timeout: float = 5.0  # seconds for one GET: connect, redirects, headers and body
    max_bytes: int = 1 << 20  # decoded body cap (also for jwks_file)
    max_redirects: int = 3
    min_period: float = 30.0  # lower bound for Cache-Control max-age
    max_period: float = 86400.0  # upper bound for Cache-Control max-age
    backoff_initial: float = 1.0  # first retry after a failure
    backoff_cap_unloaded: float = 30.0  # longest retry gap while an issuer never had keys


class FetchError(Exception):
    """One failed load; ``str()`` is the precise reason that is logged and shown in ``status()``."""


def cache_max_age(cache_control: str | None) -> float | None:
    """Freshness lifetime in seconds from a Cache-Control header (RFC 9111 §5.2.2), or None.

    ``no-store`` / ``no-cache`` give 0 (the caller's lower bound then applies); a malformed
    ``max-age`` gives None (fall back to the configured period).
    """
    if not cache_control:
        return None
    for directive in cache_control.split(","):
        name, _, arg = directive.partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            arg = arg.strip().strip('"')
            if arg.isascii() and arg.isdigit():
                # Bounded by length, not by value: int() refuses > 4300 digits and float()
                # overflows long before that; anything past 9 digits is "forever" anyway.
                return float(arg) if len(arg) <= 9 else 1e9
            return None
    return None



def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)  # bytes: UTF-8/16/32 detected; bad encoding is a ValueError
    except ValueError as exc:
        raise FetchError(f"{what} is not JSON ({exc})") from None
    except RecursionError:  # a megabyte of "[[[[" is a hostile body, not a bug of ours
        raise FetchError(f"{what} is nested too deeply") from None
    if not isinstance(document, dict):
        raise FetchError(f"{what} is a JSON {type(document).__name__}, not an object")
    return document


def _check_scheme(previous: URL, target: URL, what: str) -> None:
    if target.scheme not in ("http", "https") or not target.host:
        raise FetchError(f"{what} {echo(str(target), _MAX_ECHO)} is not an absolute http(s) URL")
    if previous.scheme == "https" and target.scheme != "https":
        # Keys fetched over plain HTTP could be swapped by anyone on the path.
        raise FetchError(f"{what} {echo(str(target), _MAX_ECHO)} would downgrade https to http")


def _kids(keyset: KeySet) -> list[str]:
    return sorted(keyset.by_kid)


def _key_list(keyset: KeySet) -> list[dict[str, str | None]]:
    """Each (kid, alg) pair once, sorted: what an operator compares with the IdP's JWKS."""
    pairs = sorted({(v.kid or "", v.alg) for v in keyset.verifiers})
    return [{"kid": kid or None, "alg": alg} for kid, alg in pairs]


def _empty_is_failure(keyset: KeySet, src: _Source) -> bool:
    """Invariant 1: an empty key set only replaces "no JWKS keys" of an issuer with hs_secret."""
    if len(keyset):
        return False
    return not src.cfg.hs_secret or (src.keyset is not None and len(src.keyset) > 0)


def _describe(exc: Exception) -> str:
    """The log/status reason for a failed load."""
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


class _Source:
    """Mutable state of one key source; only KeyManager touches it, on the event loop thread."""

    __slots__ = (
        "cfg", "group", "kind", "source", "keyset", "last_success", "last_error", "last_failure",
        "failures", "period", "next_delay", "next_refresh", "inflight", "loop_task",
    )  # fmt: skip

    def __init__(self, group: _Issuer, kind: SourceKind, source: str) -> None:
        self.cfg = group.cfg
        self.group = group
        self.kind: SourceKind = kind
        self.source = source
        self.keyset: KeySet | None = None  # this source's last good keys
        self.last_success: float | None = None  # wall clock, for humans reading /readyz
        self.last_error: str | None = None
        # (wall clock, reason) of the latest failure; unlike last_error it outlives a success,
        # so the status page can still say why tokens failed a while ago.
        self.last_failure: tuple[float, str] | None = None
        self.failures = 0  # consecutive
        self.period: float = self.cfg.jwks_refresh  # current refresh period after a success
        self.next_delay: float = self.cfg.jwks_refresh  # what the refresh task sleeps next
        self.next_refresh: float | None = None  # wall clock the refresh task wakes up at
        self.inflight: asyncio.Task[bool] | None = None
        self.loop_task: asyncio.Task[None] | None = None


class _Issuer:
    """One issuer: its sources, the merged key set handed to the verifier, the refetch state."""

    __slots__ = ("cfg", "kind", "sources", "keyset", "refused", "last_refetch", "refetch", "tls", "last_error")

    def __init__(self, cfg: IssuerConfig) -> None:
        self.cfg = cfg
        self.kind: SourceKind
        self.sources: list[_Source] = []
        if cfg.jwks_uri:
            self.kind = "jwks_uri"
            self.sources = [_Source(self, "jwks_uri", url) for url in cfg.jwks_uri]
        elif cfg.discovery:
            self.kind = "discovery"
            self.sources = [_Source(self, "discovery", cfg.discovery)]
        elif cfg.jwks_file:
            self.kind = "jwks_file"
            self.sources = [_Source(self, "jwks_file", cfg.jwks_file)]
        else:
            self.kind = "introspection" if cfg.introspection_endpoint else "hs_secret"
        self.keyset: KeySet | None = None  # what the verifier has: the sources' keys merged
        self.refused: list[str] = []  # kids two sources publish with different keys
        self.last_refetch: float | None = None  # monotonic start of the last unknown-kid refetch
        self.refetch: asyncio.Task[bool] | None = None
        # None: aiohttp's default verification against the system store.
        self.tls = client_context(cfg.ca_file) if cfg.ca_file else None
        self.last_error: str | None = None
        if self.kind == "hs_secret" and not cfg.hs_secret:
            self.last_error = "no key source: none of jwks_uri, discovery, jwks_file, hs_secret"

    @property
    def loaded(self) -> bool:
        """Whether tokens of this issuer can be verified (else the gateway answers 503)."""
        if self.kind == "hs_secret":
            return bool(self.cfg.hs_secret)  # the verifier holds the HMAC keys itself
        if self.kind == "introspection":
            return True  # tokens go to the endpoint; no key is needed
        return self.keyset is not None

    def status(self) -> dict[str, Any]:
        sources = self.sources
        errors = [(src.source, src.last_error) for src in sources if src.last_error is not None]
        if len(sources) <= 1:
            last_error = errors[0][1] if errors else self.last_error
        else:
            last_error = "; ".join(f"{source}: {error}" for source, error in errors) or None
        successes = [src.last_success for src in sources if src.last_success is not None]
        failures = [src.last_failure for src in sources if src.last_failure is not None]
        latest_failure = max(failures) if failures else None
        refreshes = [src.next_refresh for src in sources if src.loop_task is not None and src.next_refresh is not None]
        status: dict[str, Any] = {
            "loaded": self.loaded,
            "kids": _kids(self.keyset) if self.keyset is not None else [],
            "keys": _key_list(self.keyset) if self.keyset is not None else [],
            "last_success": max(successes) if successes else None,
            "last_error": last_error,
            "last_failure": None if latest_failure is None else {"at": latest_failure[0], "reason": latest_failure[1]},
            "next_refresh": min(refreshes) if refreshes else None,
            "source": ", ".join(src.source for src in sources) if sources else self.kind,
            "kind": self.kind,
        }
        if len(sources) > 1:
            status["sources"] = [
                {"source": src.source, "loaded": src.keyset is not None,
                 "kids": _kids(src.keyset) if src.keyset is not None else [],
                 "last_success": src.last_success, "last_error": src.last_error,
                 "next_refresh": src.next_refresh if src.loop_task is not None else None}
                for src in sources
            ]
        if self.refused:
            status["refused_kids"] = list(self.refused)
        return status


class KeyManager:
    """Owns the key sets of all issuers of one worker and the aiohttp session that fetches them.

    ``on_change(issuer_name)`` runs after a new key set (first load or rotation) was handed to
    ``verifier.set_keyset``; the caller evicts that issuer's cached verdicts. ``on_refresh(issuer,
    result)`` feeds ``jwtproxy_jwks_refresh_total`` with result ``ok`` / ``unchanged`` / ``error``
    for every fetch or file read. ``log`` receives one text line per event (prefixed
    ``jwks: issuer NAME:``); without it, events go to ``accesslog.log_event`` as JSON lines
    (``jwks_keys_changed``, ``jwks_load_failed``, ``jwks_key_skipped``, ``jwks_on_change_failed``).
    Key ids are logged, key material and secrets never.

    ``tracer`` (tracing on) gets a ``jwks fetch`` span per HTTP load.

    ``parse_jwks``, ``clock``, ``wall_clock``, ``sleep`` and ``session`` default to the real
    things and exist so tests can be deterministic; an injected session is not closed by
    ``close()``.
    """

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        verifier: KeySink,
        on_change: Callable[[str], None],
        log: Log | None = None,
        *,
        on_refresh: Callable[[str, str], None] | None = None,
        policy: FetchPolicy = FetchPolicy(),
        parse_jwks: ParseJwks = keyset_from_jwks,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        last_good_dir: str | None = None,
        tracer: OperationTracer | None = None,
    ) -> None:
        self._last_good_dir = last_good_dir
        self._tracer = tracer
        self._issuers: dict[str, _Issuer] = {cfg.name: _Issuer(cfg) for cfg in issuers}
        self._verifier = verifier
        self._on_change = on_change
        self._text_log = log
        self._on_refresh = on_refresh
        self._policy = policy
        self._parse_jwks = parse_jwks
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._running = False

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Load every issuer once, concurrently, then start the background refresh tasks.

        Never raises for a failing issuer: it returns when each issuer has either loaded or failed
        once (a failed issuer keeps retrying with backoff in the background).
        """
        if self._running:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={
                    "User-Agent": f"jwtproxy/{__version__}",
                    "Accept": "application/jwk-set+json, application/json",
                },
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        self._running = True
        fetched = [src for st in self._issuers.values() for src in st.sources]
        await asyncio.gather(*(self._shared_load(src) for src in fetched))
        for src in fetched:
            if src.keyset is None and src.kind != "jwks_file":
                self._restore_last_good(src)
        for src in fetched:
            # jwks_file issuers are not re-read on a timer: a SIGHUP reload replaces the worker.
            if src.kind != "jwks_file":
                src.loop_task = asyncio.get_running_loop().create_task(
                    self._refresh_loop(src), name=f"jwks-refresh-{src.cfg.name}"
                )

    async def close(self) -> None:
        """Cancel the refresh tasks and any fetch in flight; close the session if we made it."""
        self._running = False
        tasks: list[asyncio.Task[Any]] = []
        for st in self._issuers.values():
            for task in (st.refetch, *(t for src in st.sources for t in (src.loop_task, src.inflight))):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
            for src in st.sources:
                src.loop_task = None
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def refetch_unknown_kid(self, issuer_name: str) -> asyncio.Future[bool]:
        """Refetch an issuer's keys because a token named a ``kid`` we do not have.

        Concurrent callers share one fetch (also a background refresh already in flight, which
        does not start the cooldown); at most one such refetch starts per ``jwks_cooldown``
        seconds per issuer, and inside the cooldown (or for an issuer that is not fetched, or
        before ``start()`` / after ``close()``) the returned future is already done with ``False``. Its result is True when the key set
        changed. Cancelling the returned future does not cancel the shared fetch. Raises KeyError
        for an unknown issuer name. An issuer with several sources refetches them all.
        """
        st = self._issuers[issuer_name]
        loop = asyncio.get_running_loop()
        if st.refetch is not None:
            return asyncio.shield(st.refetch)
        if any(src.inflight is not None for src in st.sources):
            # A background refresh is under way: wait for it (it does not start the cooldown).
            return asyncio.shield(self._shared_refetch(st, [src for src in st.sources if src.inflight]))
        now = self._clock()
        in_cooldown = st.last_refetch is not None and now - st.last_refetch < st.cfg.jwks_cooldown
        if not self._running or not st.sources or in_cooldown:
            done: asyncio.Future[bool] = loop.create_future()
            done.set_result(False)
            return done
        st.last_refetch = now
        return asyncio.shield(self._shared_refetch(st, st.sources))

    def _shared_refetch(self, st: _Issuer, sources: list[_Source]) -> asyncio.Task[bool]:
        """One task loading ``sources`` (their in-flight loads joined); True if the issuer's
        merged key set changed. Later unknown-kid callers join it until it ends."""
        loads = [self._shared_load(src) for src in sources]
        if len(loads) == 1:
            task = loads[0]
        else:
            task = asyncio.get_running_loop().create_task(self._any_changed(loads), name=f"jwks-refetch-{st.cfg.name}")
        st.refetch = task

        def _clear(done: asyncio.Task[bool]) -> None:
            if st.refetch is done:
                st.refetch = None

        task.add_done_callback(_clear)
        return task

    @staticmethod
    async def _any_changed(loads: list[asyncio.Task[bool]]) -> bool:
        # shield: a cancelled refetch must not cancel loads the refresh loops share.
        results = await asyncio.gather(*(asyncio.shield(load) for load in loads))
        return any(results)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per issuer, for /readyz and the status page: loaded, kids, keys (each ``{"kid",
        "alg"}``), last_success, last_error (the current failure, None once a load succeeds),
        last_failure (``{"at", "reason"}`` of the latest failure, kept after a success),
        next_refresh (unix time; None when no refresh is scheduled), source, kind; with several
        sources also ``sources`` (each one's own state), and ``refused_kids`` when two sources
        publish a kid with different keys."""
        return {name: st.status() for name, st in self._issuers.items()}

    # ------------------------------------------------------------------ scheduling

    def _shared_load(self, src: _Source) -> asyncio.Task[bool]:
        """The one in-flight load of this issuer, started if there is none (invariant 3)."""
        if src.inflight is None:
            task = asyncio.get_running_loop().create_task(
                self._load(src), name=f"jwks-load-{src.cfg.name}"
            )
            src.inflight = task

            def _clear(done: asyncio.Task[bool]) -> None:
                if src.inflight is done:
                    src.inflight = None

            task.add_done_callback(_clear)
        return src.inflight

    async def _refresh_loop(self, src: _Source) -> None:
        while True:
            src.next_refresh = self._wall_clock() + src.next_delay
            await self._sleep(src.next_delay)
            # shield: the fetch may be shared with unknown-kid waiters, so cancelling this loop
            # must not cancel it for them; close() cancels in-flight fetches itself.
            await asyncio.shield(self._shared_load(src))

    def _backoff(self, src: _Source) -> float:
        cap = src.period if src.keyset is not None else min(src.period, self._policy.backoff_cap_unloaded)
        # The exponent is bounded so a week-long outage cannot overflow the float.
        return min(self._policy.backoff_initial * 2.0 ** min(src.failures - 1, 40), cap)

    def _period(self, src: _Source, max_age: float | None) -> float:
        if max_age is None:
            return src.cfg.jwks_refresh
        return min(max(max_age, self._policy.min_period), self._policy.max_period)

    # ------------------------------------------------------------------ loading

    async def _load(self, src: _Source) -> bool:
        if src.kind == "jwks_file":
            return self._load_file(src)
        op = None
        if self._tracer is not None:
            # A child of the request whose unknown kid started it, else a trace of its own.
            op = self._tracer.operation("jwks fetch", {
                "http.request.method": "GET",
                "url.full": str(URL(src.source).with_user(None).with_query(None).with_fragment(None)),
                "jwtproxy.issuer": src.cfg.name,
            })
        result, error = "error", "cancelled"
        try:
            try:
                if src.kind == "discovery":
                    document, max_age = await self._fetch_discovery(src)
                else:
                    document, max_age = await self._fetch_jwks(src, URL(src.source))
                changed = self._install(src, self._parse(src, document), max_age)
            except Exception as exc:  # any failure keeps the last good keys (invariant 1)
                error = type(exc).__name__
                self._failed(src, _describe(exc))
                return False
            result, error = ("ok" if changed else "unchanged"), ""
            if changed:
                self._remember(src, document)
            return changed
        finally:
            if op is not None:
                op.end(result, error or None)

    # ------------------------------------------------------------------ last good keys
    # A worker started while the IdP is unreachable (a SIGHUP reload, a replaced worker) would
    # otherwise have no keys at all and answer 503 where the worker it replaces still verified
    # tokens. Workers of one supervisor share a private directory holding each issuer's last
    # good JWKS document; a new worker whose first fetch fails starts from it and keeps
    # retrying the real source on the backoff schedule.

    def _last_good_path(self, src: _Source) -> str | None:
        if not self._last_good_dir:
            return None
        digest = hashlib.sha256(f"{src.cfg.name}\0{src.cfg.issuer}\0{src.source}".encode()).hexdigest()[:32]
        return os.path.join(self._last_good_dir, f"{digest}.json")

    def _remember(self, src: _Source, document: dict[str, Any]) -> None:
        path = self._last_good_path(src)
        if path is None:
            return
        try:
            temporary = f"{path}.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(document, f)
            os.replace(temporary, path)
        except (OSError, TypeError, ValueError) as exc:
            self._emit(src, "jwks_last_good_write_failed", "warning", f"cannot keep last good keys: {exc}",
                       reason=str(exc))

    def _restore_last_good(self, src: _Source) -> None:
        path = self._last_good_path(src)
        if path is None or not os.path.exists(path):
            return
        try:
            document = self._read_file(path)
            self._install(src, self._parse(src, document), None)
        except Exception as exc:  # a bad copy is only a missed shortcut; the fetch keeps retrying
            self._emit(src, "jwks_last_good_unusable", "warning", f"last good keys unusable: {_describe(exc)}",
                       reason=_describe(exc))
            return
        # _install scheduled a full period; the source is still failing, so retry on backoff.
        src.failures = max(src.failures, 1)
        src.next_delay = self._backoff(src)
        src.last_error = "source unreachable; serving the last good keys of a previous worker"
        self._emit(src, "jwks_last_good_restored", "warning", "serving the last good keys of a previous worker")

    def _load_file(self, src: _Source) -> bool:
        try:
            return self._install(src, self._parse(src, self._read_file(src.source)), None)
        except Exception as exc:  # any failure keeps the last good keys (invariant 1)
            self._failed(src, _describe(exc))
            return False

    def _read_file(self, path: str) -> dict[str, Any]:
        # A small local file, read rarely (start, unknown kid): a blocking read beats a thread hop.
        try:
            with open(path, "rb") as f:
                body = f.read(self._policy.max_bytes + 1)
        except OSError as exc:
            raise FetchError(f"cannot read file: {exc.strerror or exc}") from None
        if len(body) > self._policy.max_bytes:
            raise FetchError(f"file is larger than {self._policy.max_bytes} bytes")
        return _json_object(body, "file")

    async def _fetch_discovery(self, src: _Source) -> tuple[dict[str, Any], float | None]:
        url = URL(src.source)
        metadata, _ = await self._get_json(src, url, "discovery document")
        issuer = metadata.get("issuer")
        if issuer != src.cfg.issuer:
            raise FetchError(
                f"discovery issuer {echo(issuer, _MAX_ECHO)} does not equal the configured issuer "
                f"{echo(src.cfg.issuer, _MAX_ECHO)} (RFC 8414 §3.3)"
            )
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError("discovery document has no jwks_uri string")
        try:
            target = URL(jwks_uri)
        except ValueError:
            raise FetchError(f"discovery jwks_uri {echo(jwks_uri, _MAX_ECHO)} is not a URL") from None
        _check_scheme(url, target, "discovery jwks_uri")
        # The log line names the discovery URL; the reason names the jwks_uri it led to.
        return await self._fetch_jwks(src, target, f"JWKS at {echo(jwks_uri, _MAX_ECHO)}")

    async def _fetch_jwks(self, src: _Source, url: URL, what: str = "JWKS") -> tuple[dict[str, Any], float | None]:
        document, headers = await self._get_json(src, url, what)
        return document, cache_max_age(headers.get("Cache-Control"))

    async def _get_json(self, src: _Source, url: URL, what: str) -> tuple[dict[str, Any], Mapping[str, str]]:
        """GET ``url`` within the policy's bounds (invariant 5); the body must be a JSON object.
        TLS is verified against the issuer's ``ca_file`` when it has one."""
        tls: ssl.SSLContext | bool = src.group.tls if src.group.tls is not None else True
        session = self._session
        if session is None:
            raise FetchError("key manager is not started")
        policy = self._policy
        target = url
        try:
            async with asyncio.timeout(policy.timeout):
                for _ in range(policy.max_redirects + 1):
                    # Redirects are followed by hand so each hop's scheme can be checked.
                    async with session.get(target, allow_redirects=False, ssl=tls) as resp:
                        if resp.status in _REDIRECT_STATUSES:
                            location = resp.headers.get("Location")
                            if not location:
                                raise FetchError(f"HTTP {resp.status} redirect without Location")
                            try:
                                following = target.join(URL(location))
                            except ValueError:
                                raise FetchError(f"bad redirect Location {echo(location, _MAX_ECHO)}") from None
                            _check_scheme(target, following, "redirect to")
                            target = following
                            continue
                        if resp.status != 200:
                            hop = "" if target == url else f" (after redirects, from {target})"
                            raise FetchError(f"{what}: HTTP {resp.status}{hop}")
                        body = await self._read_capped(resp, what)
                        return _json_object(body, what), resp.headers
                raise FetchError(f"more than {policy.max_redirects} redirects")
        except TimeoutError:
            raise FetchError(f"{what}: timed out after {policy.timeout:g} s") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        cap = self._policy.max_bytes
        # Content-Length only lets us fail early; a small or missing one is never trusted.
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise FetchError(f"{what}: Content-Length {resp.content_length} exceeds {cap} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > cap:
                resp.close()  # drop the connection instead of draining the rest
                raise FetchError(f"{what}: body exceeds {cap} bytes")
        return bytes(body)

    def _parse(self, src: _Source, document: dict[str, Any]) -> KeySet:
        try:
            keyset = self._parse_jwks(document, src.cfg, self._key_log(src))
        except ValueError as exc:
            raise FetchError(f"not a JWKS: {exc}") from None
        if _empty_is_failure(keyset, src):
            raise FetchError("JWKS holds no usable key")
        return keyset

    # ------------------------------------------------------------------ outcomes

    def _install(self, src: _Source, keyset: KeySet, max_age: float | None) -> bool:
        """Record a successful load of one source; hand the issuer's key set on when it changed
        (invariant 2). True if the issuer's key set changed."""
        group = src.group
        source_changed = src.keyset is None or keyset.fingerprint != src.keyset.fingerprint
        refused: list[str] = group.refused
        merged = group.keyset
        if source_changed:
            if len(group.sources) == 1:
                merged, refused = keyset, []
            else:
                loaded = [keyset]
                loaded += [other.keyset for other in group.sources if other is not src and other.keyset is not None]
                merged, refused = merge_sources(loaded)
        changed = merged is not None and (group.keyset is None or merged.fingerprint != group.keyset.fingerprint)
        if changed:
            # First, so that if the verifier refuses the key set, the load counts as failed and
            # nothing below claims otherwise.
            assert merged is not None  # narrowing for mypy: changed implies a merged set
            self._verifier.set_keyset(src.cfg.name, merged)
        src.last_success = self._wall_clock()
        src.last_error = None
        src.failures = 0
        src.period = self._period(src, max_age)
        src.next_delay = src.period
        if not source_changed:
            self._count(src, "unchanged")
            return False
        first = src.keyset is None
        src.keyset = keyset
        kids = _kids(keyset)
        what = "keys loaded" if first else "key set changed"
        text = f"{what} from {src.source}: kids={kids}"
        self._emit(src, "jwks_keys_changed", "info", text, kids=kids, first=first)
        self._count(src, "ok")
        if refused and refused != group.refused:
            text = f"kids {refused} are published with different keys by two sources: refused"
            self._emit(src, "jwks_kid_conflict", "warning", text, kids=refused)
        group.refused = refused
        if not changed:
            return False
        group.keyset = merged
        try:
            self._on_change(src.cfg.name)
        except Exception as exc:  # the keys are installed; a failing listener must not undo that
            text = f"on_change failed: {type(exc).__name__}: {exc}"
            self._emit(src, "jwks_on_change_failed", "error", text, reason=text)
        return True

    def _failed(self, src: _Source, reason: str) -> None:
        src.last_error = reason
        src.last_failure = (self._wall_clock(), reason)
        src.failures += 1
        src.next_delay = self._backoff(src)
        if src.kind == "jwks_file":
            outcome = "keeping the last good keys" if src.keyset is not None else "no keys"
        elif src.keyset is not None:
            outcome = f"keeping the last good keys, retry in {src.next_delay:g} s"
        else:
            outcome = f"no keys yet, retry in {src.next_delay:g} s"
        retry_in = None if src.kind == "jwks_file" else src.next_delay
        text = f"load from {src.source} failed: {reason} ({outcome})"
        self._emit(
            src, "jwks_load_failed", "warning", text,
            reason=reason, has_keys=src.keyset is not None, retry_in=retry_in,
        )  # fmt: skip
        self._count(src, "error")

    def _emit(self, src: _Source, event: str, level: str, text: str, **fields: Any) -> None:
        """One log line: ``text`` to an injected ``log``, else a structured ``log_event`` line."""
        if self._text_log is not None:
            self._text_log(f"jwks: issuer {src.cfg.name}: {text}")
        else:
            log_event(event, level=level, issuer=src.cfg.name, source=src.source, **fields)

    def _key_log(self, src: _Source) -> Log:
        """The ``log`` handed to ``keys.keyset_from_jwks`` for keys it skips."""
        if self._text_log is not None:
            return self._text_log
        name = src.cfg.name
        return lambda message: log_event("jwks_key_skipped", level="warning", issuer=name, message=message)

    def _count(self, src: _Source, result: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(src.cfg.name, result)
