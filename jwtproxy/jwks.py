"""JWKS key lifecycle: fetch each issuer's keys, keep them fresh, hand them to the verifier.

This is the I/O shell around the sans-I/O ``keys.py``: it reads the network (aiohttp), the disk
(``jwks_file``) and the clock, and never verifies a token itself.

Theory of operation
-------------------
Each configured issuer has one ``_Issuer`` state and exactly one *source*:

* ``jwks_uri``  -- GET the JWK Set (RFC 7517 §5);
* ``discovery`` -- GET the OpenID Connect / RFC 8414 metadata, whose ``issuer`` must equal the
  configured issuer exactly (RFC 8414 §3.3, OIDC Discovery §4.3), then GET its ``jwks_uri``;
* ``jwks_file`` -- read from disk at start, and again when a token names an unknown ``kid``
  (invariant 4 applies); never on a timer. A SIGHUP reload starts new workers, which read it anew;
* no JWKS source (an HMAC-only issuer) -- nothing to fetch: the verifier builds the HMAC keys
  from ``hs_secret`` itself (``keys.keyset_from_secret``), so the issuer counts as loaded. For an
  issuer with ``hs_secret`` *and* a JWKS source, the HMAC keys likewise live in the verifier and
  this module only manages the JWKS part.

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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from yarl import URL

from jwtproxy import __version__
from jwtproxy.accesslog import echo, log_event
from jwtproxy.config import IssuerConfig
from jwtproxy.keys import KeySet, keyset_from_jwks
from jwtproxy.tracing import OperationTracer

__all__ = ["FetchError", "FetchPolicy", "KeyManager", "KeySink", "cache_max_age"]

Log = Callable[[str], None]
SourceKind = Literal["jwks_uri", "discovery", "jwks_file", "hs_secret"]
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


def _empty_is_failure(keyset: KeySet, st: _Issuer) -> bool:
    """Invariant 1: an empty key set only replaces "no JWKS keys" of an issuer with hs_secret."""
    if len(keyset):
        return False
    return not st.cfg.hs_secret or (st.keyset is not None and len(st.keyset) > 0)


def _describe(exc: Exception) -> str:
    """The log/status reason for a failed load."""
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"unexpected {type(exc).__name__}: {exc}"


class _Issuer:
    """Mutable per-issuer state; only KeyManager touches it, on the event loop thread."""

    __slots__ = (
        "cfg", "kind", "source", "keyset", "last_success", "last_error", "last_failure",
        "failures", "period", "next_delay", "next_refresh", "inflight", "last_refetch", "loop_task",
    )  # fmt: skip

    def __init__(self, cfg: IssuerConfig) -> None:
        self.cfg = cfg
        self.kind: SourceKind
        if cfg.jwks_uri:
            self.kind, self.source = "jwks_uri", cfg.jwks_uri
        elif cfg.discovery:
            self.kind, self.source = "discovery", cfg.discovery
        elif cfg.jwks_file:
            self.kind, self.source = "jwks_file", cfg.jwks_file
        else:
            self.kind, self.source = "hs_secret", "hs_secret"
        self.keyset: KeySet | None = None
        self.last_success: float | None = None  # wall clock, for humans reading /readyz
        self.last_error: str | None = None
        # (wall clock, reason) of the latest failure; unlike last_error it outlives a success,
        # so the status page can still say why tokens failed a while ago.
        self.last_failure: tuple[float, str] | None = None
        self.failures = 0  # consecutive
        self.period: float = cfg.jwks_refresh  # current refresh period after a success
        self.next_delay: float = cfg.jwks_refresh  # what the refresh task sleeps next
        self.next_refresh: float | None = None  # wall clock the refresh task wakes up at
        self.inflight: asyncio.Task[bool] | None = None
        self.last_refetch: float | None = None  # monotonic start of the last unknown-kid refetch
        self.loop_task: asyncio.Task[None] | None = None
        if self.kind == "hs_secret" and not cfg.hs_secret:
            self.last_error = "no key source: none of jwks_uri, discovery, jwks_file, hs_secret"

    @property
    def loaded(self) -> bool:
        """Whether tokens of this issuer can be verified (else the gateway answers 503)."""
        if self.kind == "hs_secret":
            return bool(self.cfg.hs_secret)  # the verifier holds the HMAC keys itself
        return self.keyset is not None


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
        fetched = [st for st in self._issuers.values() if st.kind != "hs_secret"]
        await asyncio.gather(*(self._shared_load(st) for st in fetched))
        for st in fetched:
            if st.keyset is None and st.kind != "jwks_file":
                self._restore_last_good(st)
        for st in fetched:
            # jwks_file issuers are not re-read on a timer: a SIGHUP reload replaces the worker.
            if st.kind != "jwks_file":
                st.loop_task = asyncio.get_running_loop().create_task(
                    self._refresh_loop(st), name=f"jwks-refresh-{st.cfg.name}"
                )

    async def close(self) -> None:
        """Cancel the refresh tasks and any fetch in flight; close the session if we made it."""
        self._running = False
        tasks: list[asyncio.Task[Any]] = []
        for st in self._issuers.values():
            for task in (st.loop_task, st.inflight):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
            st.loop_task = None
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
        for an unknown issuer name.
        """
        st = self._issuers[issuer_name]
        loop = asyncio.get_running_loop()
        if st.inflight is not None:
            return asyncio.shield(st.inflight)
        now = self._clock()
        in_cooldown = st.last_refetch is not None and now - st.last_refetch < st.cfg.jwks_cooldown
        if not self._running or st.kind == "hs_secret" or in_cooldown:
            done: asyncio.Future[bool] = loop.create_future()
            done.set_result(False)
            return done
        st.last_refetch = now
        return asyncio.shield(self._shared_load(st))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per issuer, for /readyz and the status page: loaded, kids, keys (each ``{"kid",
        "alg"}``), last_success, last_error (the current failure, None once a load succeeds),
        last_failure (``{"at", "reason"}`` of the latest failure, kept after a success),
        next_refresh (unix time; None when no refresh is scheduled), source, kind."""
        return {
            name: {
                "loaded": st.loaded,
                "kids": _kids(st.keyset) if st.keyset is not None else [],
                "keys": _key_list(st.keyset) if st.keyset is not None else [],
                "last_success": st.last_success,
                "last_error": st.last_error,
                "last_failure": (None if st.last_failure is None
                                 else {"at": st.last_failure[0], "reason": st.last_failure[1]}),
                "next_refresh": st.next_refresh if st.loop_task is not None else None,
                "source": st.source,
                "kind": st.kind,
            }
            for name, st in self._issuers.items()
        }

    # ------------------------------------------------------------------ scheduling

    def _shared_load(self, st: _Issuer) -> asyncio.Task[bool]:
        """The one in-flight load of this issuer, started if there is none (invariant 3)."""
        if st.inflight is None:
            task = asyncio.get_running_loop().create_task(
                self._load(st), name=f"jwks-load-{st.cfg.name}"
            )
            st.inflight = task

            def _clear(done: asyncio.Task[bool]) -> None:
                if st.inflight is done:
                    st.inflight = None

            task.add_done_callback(_clear)
        return st.inflight

    async def _refresh_loop(self, st: _Issuer) -> None:
        while True:
            st.next_refresh = self._wall_clock() + st.next_delay
            await self._sleep(st.next_delay)
            # shield: the fetch may be shared with unknown-kid waiters, so cancelling this loop
            # must not cancel it for them; close() cancels in-flight fetches itself.
            await asyncio.shield(self._shared_load(st))

    def _backoff(self, st: _Issuer) -> float:
        cap = st.period if st.keyset is not None else min(st.period, self._policy.backoff_cap_unloaded)
        # The exponent is bounded so a week-long outage cannot overflow the float.
        return min(self._policy.backoff_initial * 2.0 ** min(st.failures - 1, 40), cap)

    def _period(self, st: _Issuer, max_age: float | None) -> float:
        if max_age is None:
            return st.cfg.jwks_refresh
        return min(max(max_age, self._policy.min_period), self._policy.max_period)

    # ------------------------------------------------------------------ loading

    async def _load(self, st: _Issuer) -> bool:
        if st.kind == "jwks_file":
            return self._load_file(st)
        op = None
        if self._tracer is not None:
            # A child of the request whose unknown kid started it, else a trace of its own.
            op = self._tracer.operation("jwks fetch", {
                "http.request.method": "GET",
                "url.full": str(URL(st.source).with_user(None).with_query(None).with_fragment(None)),
                "jwtproxy.issuer": st.cfg.name,
            })
        result, error = "error", "cancelled"
        try:
            try:
                if st.kind == "discovery":
                    document, max_age = await self._fetch_discovery(st)
                else:
                    document, max_age = await self._fetch_jwks(URL(st.source))
                changed = self._install(st, self._parse(st, document), max_age)
            except Exception as exc:  # any failure keeps the last good keys (invariant 1)
                error = type(exc).__name__
                self._failed(st, _describe(exc))
                return False
            result, error = ("ok" if changed else "unchanged"), ""
            if changed:
                self._remember(st, document)
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

    def _last_good_path(self, st: _Issuer) -> str | None:
        if not self._last_good_dir:
            return None
        digest = hashlib.sha256(f"{st.cfg.name}\0{st.cfg.issuer}\0{st.source}".encode()).hexdigest()[:32]
        return os.path.join(self._last_good_dir, f"{digest}.json")

    def _remember(self, st: _Issuer, document: dict[str, Any]) -> None:
        path = self._last_good_path(st)
        if path is None:
            return
        try:
            temporary = f"{path}.{os.getpid()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(document, f)
            os.replace(temporary, path)
        except (OSError, TypeError, ValueError) as exc:
            self._emit(st, "jwks_last_good_write_failed", "warning", f"cannot keep last good keys: {exc}",
                       reason=str(exc))

    def _restore_last_good(self, st: _Issuer) -> None:
        path = self._last_good_path(st)
        if path is None or not os.path.exists(path):
            return
        try:
            document = self._read_file(path)
            self._install(st, self._parse(st, document), None)
        except Exception as exc:  # a bad copy is only a missed shortcut; the fetch keeps retrying
            self._emit(st, "jwks_last_good_unusable", "warning", f"last good keys unusable: {_describe(exc)}",
                       reason=_describe(exc))
            return
        # _install scheduled a full period; the source is still failing, so retry on backoff.
        st.failures = max(st.failures, 1)
        st.next_delay = self._backoff(st)
        st.last_error = "source unreachable; serving the last good keys of a previous worker"
        self._emit(st, "jwks_last_good_restored", "warning", "serving the last good keys of a previous worker")

    def _load_file(self, st: _Issuer) -> bool:
        try:
            return self._install(st, self._parse(st, self._read_file(st.source)), None)
        except Exception as exc:  # any failure keeps the last good keys (invariant 1)
            self._failed(st, _describe(exc))
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

    async def _fetch_discovery(self, st: _Issuer) -> tuple[dict[str, Any], float | None]:
        url = URL(st.source)
        metadata, _ = await self._get_json(url, "discovery document")
        issuer = metadata.get("issuer")
        if issuer != st.cfg.issuer:
            raise FetchError(
                f"discovery issuer {echo(issuer, _MAX_ECHO)} does not equal the configured issuer "
                f"{echo(st.cfg.issuer, _MAX_ECHO)} (RFC 8414 §3.3)"
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
        return await self._fetch_jwks(target, f"JWKS at {echo(jwks_uri, _MAX_ECHO)}")

    async def _fetch_jwks(self, url: URL, what: str = "JWKS") -> tuple[dict[str, Any], float | None]:
        document, headers = await self._get_json(url, what)
        return document, cache_max_age(headers.get("Cache-Control"))

    async def _get_json(self, url: URL, what: str) -> tuple[dict[str, Any], Mapping[str, str]]:
        """GET ``url`` within the policy's bounds (invariant 5); the body must be a JSON object."""
        session = self._session
        if session is None:
            raise FetchError("key manager is not started")
        policy = self._policy
        target = url
        try:
            async with asyncio.timeout(policy.timeout):
                for _ in range(policy.max_redirects + 1):
                    # Redirects are followed by hand so each hop's scheme can be checked.
                    async with session.get(target, allow_redirects=False) as resp:
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

    def _parse(self, st: _Issuer, document: dict[str, Any]) -> KeySet:
        try:
            keyset = self._parse_jwks(document, st.cfg, self._key_log(st))
        except ValueError as exc:
            raise FetchError(f"not a JWKS: {exc}") from None
        if _empty_is_failure(keyset, st):
            raise FetchError("JWKS holds no usable key")
        return keyset

    # ------------------------------------------------------------------ outcomes

    def _install(self, st: _Issuer, keyset: KeySet, max_age: float | None) -> bool:
        """Record a successful load; hand a changed key set on (invariant 2). True if changed."""
        changed = st.keyset is None or keyset.fingerprint != st.keyset.fingerprint
        if changed:
            # First, so that if the verifier refuses the key set, the load counts as failed and
            # nothing below claims otherwise.
            self._verifier.set_keyset(st.cfg.name, keyset)
        st.last_success = self._wall_clock()
        st.last_error = None
        st.failures = 0
        st.period = self._period(st, max_age)
        st.next_delay = st.period
        if not changed:
            self._count(st, "unchanged")
            return False
        first = st.keyset is None
        st.keyset = keyset
        kids = _kids(keyset)
        what = "keys loaded" if first else "key set changed"
        text = f"{what} from {st.source}: kids={kids}"
        self._emit(st, "jwks_keys_changed", "info", text, kids=kids, first=first)
        self._count(st, "ok")
        try:
            self._on_change(st.cfg.name)
        except Exception as exc:  # the keys are installed; a failing listener must not undo that
            text = f"on_change failed: {type(exc).__name__}: {exc}"
            self._emit(st, "jwks_on_change_failed", "error", text, reason=text)
        return True

    def _failed(self, st: _Issuer, reason: str) -> None:
        st.last_error = reason
        st.last_failure = (self._wall_clock(), reason)
        st.failures += 1
        st.next_delay = self._backoff(st)
        if st.kind == "jwks_file":
            outcome = "keeping the last good keys" if st.keyset is not None else "no keys"
        elif st.keyset is not None:
            outcome = f"keeping the last good keys, retry in {st.next_delay:g} s"
        else:
            outcome = f"no keys yet, retry in {st.next_delay:g} s"
        retry_in = None if st.kind == "jwks_file" else st.next_delay
        text = f"load from {st.source} failed: {reason} ({outcome})"
        self._emit(
            st, "jwks_load_failed", "warning", text,
            reason=reason, has_keys=st.keyset is not None, retry_in=retry_in,
        )  # fmt: skip
        self._count(st, "error")

    def _emit(self, st: _Issuer, event: str, level: str, text: str, **fields: Any) -> None:
        """One log line: ``text`` to an injected ``log``, else a structured ``log_event`` line."""
        if self._text_log is not None:
            self._text_log(f"jwks: issuer {st.cfg.name}: {text}")
        else:
            log_event(event, level=level, issuer=st.cfg.name, source=st.source, **fields)

    def _key_log(self, st: _Issuer) -> Log:
        """The ``log`` handed to ``keys.keyset_from_jwks`` for keys it skips."""
        if self._text_log is not None:
            return self._text_log
        name = st.cfg.name
        return lambda message: log_event("jwks_key_skipped", level="warning", issuer=name, message=message)

    def _count(self, st: _Issuer, result: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(st.cfg.name, result)
