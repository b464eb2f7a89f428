"""Configuration: frozen dataclasses and the one loader that validates them (contract §3).

Theory of operation
-------------------
``jwtproxy.toml`` is read once with :mod:`tomllib` and turned by :func:`parse_config` into a tree of
frozen, slotted dataclasses. Every other module codes against those dataclasses and may rely on these
invariants without checking again:

* Nothing invalid gets past the loader. Types are exact (a TOML boolean is not an integer, a float is
  not a size), durations are finite floats >= 0, sizes are integers >= 0, enumerations hold one of
  their listed values, and cross references are resolved: every route names a configured upstream
  and configured issuers.
* Every problem is reported, not just the first. Readers record a problem and carry on with the
  default; cross-field checks skip keys that already failed, so one mistake gives one line rather
  than a pile of follow-on noise. The dataclasses are only built when the list of problems is
  empty. Each problem is one line ``FILE: key.path: message`` (FILE as given by the caller; array
  elements are 0-based, so the first ``[[route]]`` is ``route[0]``).
* Unknown keys are errors at every level, with a "did you mean" hint: a typo such as
  ``requried_claims`` must never silently fall back to a weaker default.
* Secrets (``issuer.hs_secret``, ``admin.token``, ``revocation.redis_url``) may be written
  ``"env:NAME"``; they are resolved here, so a missing or empty variable is a config problem rather
  than a crash or an accidentally disabled check later. Secret fields are left out of ``repr()`` so a
  logged config never shows them.
* Names where HTTP is case-insensitive come out lower-cased (header names in ``[claims_to_headers]``
  and ``header:`` token sources, route hosts), so the hot path compares without folding case.
* Security invariants: issuer names and ``issuer`` values are unique; each issuer has exactly one
  key source; ``none`` is never an algorithm; HS algorithms appear exactly when ``hs_secret`` is set
  and at least 32 bytes (RFC 7518 §3.2); ``(host, path_prefix)`` is unique among routes; routes
  with ``auth = "off"`` carry no requirements that would silently go unchecked; no claim is ever
  mapped onto a framing, hop-by-hop, credential or gateway-managed header (request smuggling); an
  ``[authz]`` listener never shares a socket with a traffic or admin listener (it believes the
  headers that describe the original request, so only the front proxy may reach it).
* Defaults live in one place: the dataclass field defaults below, which the loader reads back.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from jwtproxy.algorithms import DEFAULT_ALGORITHMS, DPOP_DEFAULT_ALGORITHMS, HMAC_ALGORITHMS, KNOWN_ALGORITHMS
from jwtproxy.assertion import GATEWAY_CLAIMS, AssertionKey, AssertionKeyError, KeyRing, load_key_file
from jwtproxy.forwarded import parse_networks
from jwtproxy.upstream_tls import context_problem
from jwtproxy.routing import BadRequest, normalise_path
from jwtproxy.upstream_tls import context_problem

__all__ = [
    "AdminConfig",
    "AssertionConfig",
    "AuthzConfig",
    "Config",
    "ConfigError",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_CLAIMS_TO_HEADERS",
    "IssuerConfig",
    "KNOWN_ALGORITHMS",
    "LimitsConfig",
    "ListenAddr",
    "RateLimitConfig",
    "RevocationConfig",
    "TracingConfig",
    "RouteConfig",
    "ServerConfig",
    "Target",
    "TokenConfig",
    "TokenSource",
    "UpstreamConfig",
    "default_config_path",
    "listeners_overlap",
    "load_config",
    "parse_config",
]

# --------------------------------------------------------------------------------------------------
# Constants shared with other modules

# KNOWN_ALGORITHMS and DEFAULT_ALGORITHMS (every asymmetric algorithm; HS* must be asked for,
# because it only works together with hs_secret) come from jwtproxy.algorithms, the one table.
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output; 32 bytes covers HS256 and is
# the floor contract §3 sets for every HS algorithm.
MIN_HS_SECRET_BYTES: Final = 32
DEFAULT_CLAIMS_TO_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    ("x-user-id", "sub"),
    ("x-user-role", "role"),
    ("x-scope", "scope"),
)
DEFAULT_CONFIG_FILE: Final = "jwtproxy.toml"
CONFIG_ENV_VAR: Final = "JWTPROXY_CONFIG"

# Headers an identity mapping must never produce. The gateway removes every mapped header from the
# client request and then sets it from a claim, so mapping onto one of these would let a claim value
# rewrite message framing (request smuggling), the routing authority, the credentials, or the
# forwarding metadata the gateway itself manages.
RESERVED_IDENTITY_HEADERS: Final[frozenset[str]] = frozenset({
    # framing (RFC 9112 §6)
    "content-length", "transfer-encoding",
    # hop-by-hop (RFC 9110 §7.6.1) and friends
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect",
    # routing authority
    "host",
    # credentials
    "authorization", "proxy-authorization", "proxy-authenticate", "cookie",
    # set by the gateway itself (contract §4)
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
})  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The configuration tree


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """A listening address; ``host`` has no brackets (``"::"`` for ``"[::]:8080"``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TokenSource:
    """Where to look for the token. ``header`` names are lower-cased; ``header:authorization`` means
    ``Bearer`` parsing, any other header carries the raw token."""

    kind: Literal["header", "query", "cookie"]
    name: str


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listeners, workers, parser, TLS and per-connection limits."""

    listen: tuple[ListenAddr, ...] = (ListenAddr("127.0.0.1", 8080),)
    workers: int = 1  # "auto" already resolved to os.cpu_count()
    http_parser: Literal["httptools", "h11"] = "httptools"
    tls_cert: str = ""
    tls_key: str = ""  # both set or both "" (HTTPS on every listener)
    max_header_bytes: int = 16384
    max_body_bytes: int = 10485760  # 0 = no limit
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    shutdown_timeout: float = 30.0
    access_log: bool = True
    tls_client_ca: str = ""  # PEM bundle: TLS listeners ask for a client certificate (contract §5.2)
    tls_client_cert: Literal["optional", "required"] = "optional"
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* and client_cert_header count
    client_cert_header: str = ""  # lower-case header name; "" = none


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin listener (None = disabled) and its bearer token."""

    listen: ListenAddr | None = ListenAddr("127.0.0.1", 9901)  # None: admin listener disabled
    token: str = field(default="", repr=False)  # "" = no admin authentication


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    """``[authz]``: the forward-auth listeners (empty: off) and the prefix the original path
    follows on the request's own path (Envoy ext_authz ``path_prefix``), in normal form."""

    listen: tuple[ListenAddr, ...] = ()
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """``[token]``: token size cap, verified-token cache size, where to find the token."""

    max_bytes: int = 8192
    cache_size: int = 10000  # 0 disables the verified-token LRU
    sources: tuple[TokenSource, ...] = (TokenSource("header", "authorization"),)


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted token issuer. Exactly one key source (``jwks_uri``, one or more URLs;
    ``discovery``; ``jwks_file``) is set, or none when ``introspection_endpoint`` is set (then at
    most one); ``hs_secret`` is non-empty exactly when ``algorithms`` contains an HS algorithm.
    With ``introspection_endpoint`` set, ``introspection_client_id`` and
    ``introspection_client_secret`` are non-empty. ``ca_file`` is a loadable PEM bundle, set only
    when something is fetched over the network."""

    name: str
    issuer: str
    jwks_uri: tuple[str, ...] = ()  # written as one URL or a list; each source refreshed on its own
    discovery: str = ""
    jwks_file: str = ""
    audiences: tuple[str, ...] = ()
    aud_claim: str = "aud"  # the claim holding the audience (Cognito access tokens: "client_id")
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: float = 30.0
    max_lifetime: float = 0.0  # 0 = unbounded
    required_claims: tuple[str, ...] = ("exp", "sub")
    typ: tuple[str, ...] = ()  # empty = any JOSE typ
    hs_secret: bytes = field(default=b"", repr=False)
    jwks_refresh: float = 300.0
    jwks_cooldown: float = 30.0
    token_binding: Literal["allow", "require"] = "allow"
    dpop_algorithms: tuple[str, ...] = DPOP_DEFAULT_ALGORITHMS
    dpop_max_age: float = 60.0
    dpop_nonce: bool = False
    introspection_endpoint: str = ""  # RFC 7662; set = tokens that are not JWS are introspected
    introspection_client_id: str = ""
    introspection_client_secret: str = field(default="", repr=False)
    introspection_cache: float = 60.0  # seconds an active answer is reused (never past its exp)
    ca_file: str = ""  # PEM bundle verifying this issuer's discovery, JWKS and introspection fetches

    @property
    def fetches_keys(self) -> bool:
        """Whether the issuer has a JWKS source (else: HMAC only, or introspection only)."""
        return bool(self.jwks_uri or self.discovery or self.jwks_file)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A route's ``rate_limit``: at most ``requests`` + ``burst`` in any ``per`` seconds, and
    ``requests`` per ``per`` for a steady sender, counted per ``key``: a claim name,
    ``"client_ip"`` or ``"token"`` (printable ASCII: it is named in the RateLimit fields)."""

    requests: int
    per: float
    burst: int = 0
    key: str = "client_ip"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[[route]]``. ``upstream`` names a key of :attr:`Config.upstreams`; ``issuers`` are
    issuer names; ``require_claims`` is ``((claim, allowed_values), ...)`` in file order."""

    path_prefix: str
    host: str = ""  # "" = any; exact lower-case host, or "*.suffix"
    upstream: str = ""
    auth: Literal["required", "optional", "off"] = "required"
    issuers: tuple[str, ...] = ()  # empty = every configured issuer
    audiences: tuple[str, ...] = ()  # non-empty: replaces the issuers' audiences on this route
    require_scopes: tuple[str, ...] = ()
    require_claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    forward_token: bool = True
    strip_prefix: bool = False
    cors_preflight: Literal["forward", "auth"] = "forward"
    token_binding: Literal["", "allow", "require"] = ""  # "" = each issuer's own setting
    rate_limit: RateLimitConfig | None = None  # None: no rate limit on this route


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream target; the port is explicit (80 / 443 filled in)."""

    scheme: Literal["http", "https"]
    host: str  # no brackets for IPv6
    port: int


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One ``[upstream.NAME]``: round-robin targets and connection pool settings."""

    name: str
    targets: tuple[Target, ...]
    connect_timeout: float = 2.0
    response_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_idle: int = 64
    preserve_host: bool = True
    ca_file: str = ""  # PEM bundle for https:// targets; "" = the system store
    client_cert: str = ""  # both set or both "": the certificate presented to targets (mTLS)
    client_key: str = ""


@dataclass(frozen=True, slots=True)
class AssertionConfig:
    """``[assertion]``: the signed identity assertion (contract §5.4). ``keys`` are the loaded
    ``key_files`` in order (the first signs); empty means a key generated by the supervisor."""

    enabled: bool = False
    header: str = "x-jwtproxy-assertion"  # lower-case
    issuer: str = "jwtproxy"
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    key_files: tuple[str, ...] = ()
    lifetime: float = 60.0
    claims: tuple[str, ...] = ("sub", "scope", "role")
    keys: tuple[AssertionKey, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RevocationConfig:
    """``[revocation]``: backend choice; ``redis_url`` has any ``env:`` reference resolved."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    sqlite_path: str = "jwtproxy-revocations.db"
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``[tracing]``: OpenTelemetry spans over OTLP/HTTP; ``otlp_endpoint = ""`` is off."""

    otlp_endpoint: str = ""  # the full traces URL, e.g. http://127.0.0.1:4318/v1/traces
    sample_ratio: float = 1.0  # for traces that start here; an incoming traceparent decides its own
    service_name: str = "jwtproxy"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: where rate-limit cells live, the per-address verification-failure budget and
    the connection caps. ``redis_url`` is resolved: ``[revocation] redis_url`` when not given."""

    backend: Literal["local", "redis"] = "local"
    redis_url: str = field(default="", repr=False)  # may hold a password
    failures_per_ip: int = 0  # 0 = no failure budget
    max_connections: int = 10000  # client connections per worker
    upstream_max_connections: int = 1024  # per upstream target, summed over a host's workers


def _no_upstreams() -> Mapping[str, UpstreamConfig]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated ``jwtproxy.toml``. ``path`` is the file name as given to the loader;
    ``issuers`` and ``routes`` keep file order; ``claims_to_headers`` is ``((header, claim), ...)``
    with lower-case header names."""

    path: str
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    token: TokenConfig = TokenConfig()
    issuers: tuple[IssuerConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=_no_upstreams)
    claims_to_headers: tuple[tuple[str, str], ...] = DEFAULT_CLAIMS_TO_HEADERS  # (lower-case header, claim)
    revocation: RevocationConfig = RevocationConfig()
    assertion: AssertionConfig = AssertionConfig()
    authz: AuthzConfig = AuthzConfig()
    tracing: TracingConfig = TracingConfig()
    limits: LimitsConfig = LimitsConfig()


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds every problem found, one
    ``"FILE: key.path: message"`` line each; ``str()`` joins them with newlines."""

    problems: list[str]

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------------
# Entry points


def default_config_path(env: Mapping[str, str]) -> str:
    """The config file to use when no ``-c FILE`` is given: ``$JWTPROXY_CONFIG`` if set and
    non-empty, else ``jwtproxy.toml`` in the current directory (contract §2)."""
    return env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Raises :class:`ConfigError` listing every problem; an
    unreadable file or a TOML syntax error is a single problem (``FILE: cannot read: ...`` or
    ``FILE: line N: ...``). ``env`` defaults to ``os.environ`` (for ``"env:NAME"`` secrets)."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{filename}: cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{filename}: line {line}: not valid UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{filename}: {_toml_error(str(e), text)}"]) from None
    return parse_config(data, filename, env)


def parse_config(data: Mapping[str, Any], filename: str, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed TOML document and build the :class:`Config`. Raises
    :class:`ConfigError` with every problem found. ``env`` defaults to ``os.environ``."""
    p = _Problems(filename, os.environ if env is None else env)
    if not isinstance(data, Mapping):
        p.add("", f"expected a table at the top level, got {_tname(data)}")
        raise ConfigError(p.items)
    root = _Table(p, "", data, _ROOT_KEYS)
    # An [authz] listener believes a front proxy's certificate header too (contract §5.1).
    raw_authz = data.get("authz")
    authz_listening = isinstance(raw_authz, Mapping) and bool(raw_authz.get("listen"))
    server = _parse_server(p, root.table("server", _SERVER_KEYS), authz_listening)
    admin = _parse_admin(p, root.table("admin", _ADMIN_KEYS), server)
    authz = _parse_authz(p, root.table("authz", _AUTHZ_KEYS), server, admin)
    token = _parse_token(p, root.table("token", _TOKEN_KEYS))
    issuer_entries = root.array_of_tables("issuer")
    issuers = _parse_issuers(p, issuer_entries)
    upstreams = _parse_upstreams(p, root)
    # Routes are checked against the names *declared*, even where that section had problems of its
    # own, so a broken [upstream.x] still reports a route naming a missing [upstream.y] but not one
    # naming x. None means the declarations themselves are unreadable: skip those checks.
    issuer_names = _declared_issuer_names(issuer_entries)
    raw_upstreams = data.get("upstream", {})
    upstream_names = list(raw_upstreams) if isinstance(raw_upstreams, dict) else None
    introspecting = _declared_introspecting_issuers(issuer_entries)
    routes = _parse_routes(p, root.array_of_tables("route"), issuer_names, upstream_names, introspecting)
    claims_to_headers = _parse_claims_to_headers(p, root, token)
    revocation = _parse_revocation(p, root.table("revocation", _REVOCATION_KEYS))
    assertion = _parse_assertion(p, root.table("assertion", _ASSERTION_KEYS), token, claims_to_headers)
    tracing = _parse_tracing(p, root.table("tracing", _TRACING_KEYS))
    limits = _parse_limits(p, root.table("limits", _LIMITS_KEYS), revocation)
    if p.items:
        raise ConfigError(p.items)
    # No problems means every part parsed; the checks below only narrow the types for mypy.
    if (
        server is None or admin is None or token is None or issuers is None or upstreams is None
        or routes is None or claims_to_headers is None or revocation is None or assertion is None
        or authz is None or tracing is None or limits is None
    ):  # pragma: no cover - guarded by the problem list above
        raise ConfigError([f"{filename}: internal error: incomplete configuration"])
    return Config(
        path=filename,
        server=server,
        admin=admin,
        token=token,
        issuers=tuple(issuers),
        routes=tuple(routes),
        upstreams=types.MappingProxyType(upstreams),
        claims_to_headers=claims_to_headers,
        revocation=revocation,
        assertion=assertion,
        authz=authz,
        tracing=tracing,
        limits=limits,
    )


def _toml_error(message: str, text: str) -> str:
    """``Invalid value (at line 3, column 7)`` -> ``line 3: Invalid value (column 7)``."""
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.S)
    if m:
        return f"line {m[2]}: {m[1]} (column {m[3]})"
    # tomllib reports some problems only "(at end of document)": point at the last line.
    return f"line {max(1, len(text.splitlines()))}: {message}"


# --------------------------------------------------------------------------------------------------
# Reading machinery: record a problem, carry on with the default


class _Problems:
    def __init__(self, filename: str, env: Mapping[str, str]) -> None:
        self.filename = filename
        self.env = env
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.filename}: {path}: {message}" if path else f"{self.filename}: {message}")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: str) -> str:
    # Spell the path as TOML would, so it can be searched for in the file.
    k = key if _BARE_KEY.fullmatch(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}.{k}" if path else k


def _tname(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"  # the only other TOML value type


def _hint(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match (case-insensitive first), else ``""``."""
    for c in choices:
        if c.lower() == word.lower():
            return f" (did you mean '{c}'?)"
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(f"'{c}'" for c in choices)


_C = TypeVar("_C", bound=str)


class _Table:
    """One TOML table being read. Unknown keys are reported on construction. Each getter checks one
    key and returns its value, or the default when absent; on a problem it records it, remembers
    the key in ``failed`` and returns the default, so reading carries on with a plausible value.
    Cross-field checks consult :meth:`ok` so a bad value does not produce follow-on noise."""

    def __init__(self, p: _Problems, path: str, data: Mapping[str, Any], keys: Sequence[str]) -> None:
        self.p = p
        self.path = path
        self.data = data
        self.failed: set[str] = set()
        for key in data:
            if key not in keys:
                hint = _hint(key, keys) or f" (known keys: {', '.join(keys)})"
                p.add(_join(path, key), "unknown key" + hint)

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def ok(self, *keys: str) -> bool:
        """True if none of ``keys`` had a problem."""
        return self.failed.isdisjoint(keys)

    def fail(self, key: str, message: str, path: str | None = None) -> None:
        """Record a problem with ``key`` (reported at ``path``, default the key's own path)."""
        self.failed.add(key)
        self.p.add(path or self.at(key), message)

    def bad_type(self, key: str, expected: str) -> None:
        self.fail(key, f"expected {expected}, got {_tname(self.data[key])}")

    def table(self, key: str, keys: Sequence[str]) -> _Table | None:
        """The sub-table ``key`` to read (empty when absent), or None if it is not a table."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.bad_type(key, f"a table ([{self.at(key)}])")
            return None
        return _Table(self.p, self.at(key), value, keys)

    def array_of_tables(self, key: str) -> list[tuple[str, dict[str, Any]]] | None:
        """``[[key]]`` entries as (path, table) pairs; None if the key has the wrong shape."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.bad_type(key, f"an array of tables ([[{self.at(key)}]])")
            return None
        out: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(value):
            path = f"{self.at(key)}[{i}]"
            if isinstance(item, dict):
                out.append((path, item))
            else:
                self.fail(key, f"expected a table, got {_tname(item)}", path)
        return out if self.ok(key) else None

    def string(self, key: str, default: str = "", *, required: bool = False) -> str:
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return default
        value: object = self.data[key]
        if not isinstance(value, str):
            self.bad_type(key, "a string")
            return default
        if required and not value:
            self.fail(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.bad_type(key, "true or false")
            return default
        return value

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        # bool is a subclass of int in Python, but `max_idle = true` is a mistake, not a 1.
        if not isinstance(value, int) or isinstance(value, bool):
            self.bad_type(key, "an integer")
            return default
        if value < minimum:
            self.fail(key, f"must be at least {minimum}, got {value}")
            return default
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.data.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.bad_type(key, "a number of seconds")
        elif not math.isfinite(value):  # TOML allows inf and nan
            self.fail(key, "must be a finite number of seconds")
        elif positive and value <= 0:
            self.fail(key, f"must be greater than 0, got {value}")
        elif value < 0:
            self.fail(key, f"must not be negative, got {value}")
        else:
            return float(value)
        return default

    def choice(self, key: str, default: _C, choices: tuple[_C, ...]) -> _C:
        value = self.data.get(key, default)
        if not isinstance(value, str):
            self.bad_type(key, f"one of {_one_of(choices)}")
            return default
        for c in choices:
            if value == c:
                return c
        self.fail(key, f"expected one of {_one_of(choices)}, got '{value}'{_hint(value, choices)}")
        return default

    def strings(
        self, key: str, default: tuple[str, ...] = (), *, required: bool = False, nonempty: bool = False
    ) -> list[tuple[str, str]]:
        """An array of non-empty, distinct strings as (path, value) pairs, the good ones only. An
        empty array is a problem when ``nonempty``, absence when ``required``."""
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return [(f"{self.at(key)}[{i}]", v) for i, v in enumerate(default)]
        value = self.data[key]
        if not isinstance(value, list):
            self.bad_type(key, "an array of strings")
            return []
        if nonempty and not value:
            self.fail(key, "must not be empty")
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, item in enumerate(value):
            path = f"{self.at(key)}[{i}]"
            if not isinstance(item, str):
                self.fail(key, f"expected a string, got {_tname(item)}", path)
            elif not item:
                self.fail(key, "must not be empty", path)
            elif item in seen:
                self.fail(key, f"duplicate value '{item}'", path)
            else:
                seen.add(item)
                out.append((path, item))
        return out

    def secret(self, key: str, default: str = "") -> str:
        """A string that may be written ``"env:NAME"``, resolved from the environment. The value
        is never echoed in a problem."""
        value = self.string(key, default)
        if not value.startswith("env:"):
            return value
        name = value[4:]
        if not _ENV_NAME.fullmatch(name):
            self.fail(key, f"'env:{name}' is not a valid environment variable name")
            return ""
        resolved = self.p.env.get(name)
        if resolved is None:
            self.fail(key, f"environment variable '{name}' is not set")
            return ""
        if not resolved:
            # An empty variable would silently turn a secret off (e.g. admin auth): refuse it.
            self.fail(key, f"environment variable '{name}' is empty")
        return resolved


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# RFC 9110 §5.6.2 token
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# "_" is not valid DNS but common in container service names, and resolvers accept it.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?", re.I)
# Issuer and upstream names appear in metric labels and log lines: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PORT = re.compile(r"[0-9]{1,5}")

_ROOT_KEYS = (
    "server", "admin", "token", "issuer", "route", "upstream", "claims_to_headers", "revocation", "assertion",
    "authz", "tracing",
    "limits",
)  # fmt: skip
_SERVER_KEYS = (
    "listen", "workers", "http_parser", "tls_cert", "tls_key", "max_header_bytes", "max_body_bytes",
    "header_timeout", "keepalive_timeout", "shutdown_timeout", "access_log",
    "tls_client_ca", "tls_client_cert", "trusted_proxies", "client_cert_header",
)  # fmt: skip
_ADMIN_KEYS = ("listen", "token")
_AUTHZ_KEYS = ("listen", "path_prefix")
_TOKEN_KEYS = ("max_bytes", "cache_size", "sources")
_ISSUER_KEYS = (
    "name", "issuer", "jwks_uri", "discovery", "jwks_file", "audiences", "aud_claim", "algorithms",
    "leeway", "max_lifetime", "required_claims", "typ", "hs_secret", "jwks_refresh", "jwks_cooldown",
    "token_binding", "dpop_algorithms", "dpop_max_age", "dpop_nonce",
    "introspection_endpoint", "introspection_client_id", "introspection_client_secret",
    "introspection_cache", "ca_file",
)  # fmt: skip
_ROUTE_KEYS = (
    "path_prefix", "host", "upstream", "auth", "issuers", "audiences", "require_scopes",
    "require_claims", "forward_token", "strip_prefix", "cors_preflight", "token_binding", "rate_limit",
)  # fmt: skip
_UPSTREAM_KEYS = (
    "targets", "connect_timeout", "response_timeout", "idle_timeout", "max_idle", "preserve_host",
    "ca_file", "client_cert", "client_key",
)  # fmt: skip
_REVOCATION_KEYS = ("backend", "sqlite_path", "redis_url")
_ASSERTION_KEYS = ("enabled", "header", "issuer", "algorithm", "key_files", "lifetime", "claims")
_TRACING_KEYS = ("otlp_endpoint", "sample_ratio", "service_name")
_LIMITS_KEYS = (
    "backend", "redis_url", "failures_per_ip", "max_connections", "upstream_max_connections",
)  # fmt: skip
_RATE_LIMIT_KEYS = ("requests", "per", "burst", "key")

_D_SERVER = ServerConfig()
_D_ADMIN = AdminConfig()
_D_AUTHZ = AuthzConfig()
_D_TOKEN = TokenConfig()
_D_ISSUER = IssuerConfig(name="", issuer="")
_D_ROUTE = RouteConfig(path_prefix="/")
_D_UPSTREAM = UpstreamConfig(name="", targets=())
_D_REVOCATION = RevocationConfig()
_D_ASSERTION = AssertionConfig()
_D_LIMITS = LimitsConfig()


# --------------------------------------------------------------------------------------------------
# Value parsers: return the value, or an error message


def _parse_listen(text: str) -> ListenAddr | str:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return "missing ']' after the IPv6 address"
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            return 'expected "[IPv6]:port", e.g. "[::]:8080"'
        port_text = rest[1:]
        try:
            # Canonical form, so "[0::0]:80" and "[::]:80" are recognised as the same address.
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            return f"'{host}' is not an IPv6 address"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            return 'expected "host:port", e.g. "127.0.0.1:8080" (or "[::]:8080" for IPv6)'
        if ":" in host:
            return 'an IPv6 address must be in brackets, e.g. "[::1]:8080"'
        if not host:
            return 'missing host; use "0.0.0.0:PORT" or "[::]:PORT" for every interface'
        if not _HOSTNAME.fullmatch(host):
            return f"'{host}' is not a valid host"
        host = host.lower()
    if not _PORT.fullmatch(port_text):
        return f"port '{port_text}' is not a number"
    port = int(port_text)
    if port > 65535:  # 0 is allowed: the OS picks a free port (useful in tests)
        return f"port {port} is out of range 0-65535"
    return ListenAddr(host, port)


def _parse_target(text: str) -> Target | str:
    example = 'an http:// or https:// URL like "http://127.0.0.1:9001"'
    try:
        parts = urlsplit(text)
    except ValueError as e:
        return f"not a valid URL ({e}); expected {example}"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"expected {example}"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    host = parts.hostname
    if not host:
        return "missing host"
    try:
        port = parts.port
    except ValueError:
        return "port is not a number in range 1-65535"
    if port == 0:
        return "port is not a number in range 1-65535"
    if not _HOSTNAME.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"'{host}' is not a valid host"
    if parts.path not in ("", "/"):
        return f"must not have a path (got '{parts.path}'); routes decide the path (see strip_prefix)"
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        return "must not have a query or fragment"
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    return Target(scheme, host, port if port is not None else (443 if scheme == "https" else 80))


def _check_http_url(text: str) -> str | None:
    """An error message unless ``text`` is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return f"not a valid URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL"
    return None


# --------------------------------------------------------------------------------------------------
# Sections. Each returns its dataclass, or None when it recorded a problem.


def _tls_problem(cert: str, key: str) -> str | None:
    """Load the pair as the listeners will, so a bad file fails the config, not every worker."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        return f"cannot load the certificate and key: {reason}"
    return None


def _client_ca_problem(cafile: str) -> str | None:
    """Load the client CA bundle as the listeners will, so a bad file fails the config."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_verify_locations(cafile=cafile)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        return f"cannot load the CA bundle: {reason}"
    if not context.get_ca_certs():
        return "the CA bundle holds no CA certificate"
    return None


def _parse_server(p: _Problems, t: _Table | None, authz_listening: bool = False) -> ServerConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = _D_SERVER

    listen: list[ListenAddr] = []
    for path, text in t.strings("listen", tuple(str(a) for a in d.listen), nonempty=True):
        addr = _parse_listen(text)
        if isinstance(addr, str):
            p.add(path, addr)
        elif addr in listen:
            p.add(path, f"duplicate address '{text}'")
        else:
            listen.append(addr)

    raw_workers = t.data.get("workers", d.workers)
    if raw_workers == "auto":
        workers = os.cpu_count() or 1
    elif isinstance(raw_workers, int) and not isinstance(raw_workers, bool):
        workers = t.integer("workers", d.workers, minimum=1)
    else:
        got = f"'{raw_workers}'" if isinstance(raw_workers, str) else _tname(raw_workers)
        t.fail("workers", f'expected an integer or "auto", got {got}')
        workers = d.workers

    http_parser = t.choice("http_parser", d.http_parser, ("httptools", "h11"))
    tls_cert = t.string("tls_cert", d.tls_cert)
    tls_key = t.string("tls_key", d.tls_key)
    if t.ok("tls_cert", "tls_key") and bool(tls_cert) != bool(tls_key):
        if tls_cert:
            t.fail("tls_key", "tls_cert is set, so tls_key is required too")
        else:
            t.fail("tls_cert", "tls_key is set, so tls_cert is required too")
    elif tls_cert and tls_key:
        problem = _tls_problem(tls_cert, tls_key)
        if problem:
            t.fail("tls_cert", problem)
    tls_client_ca = t.string("tls_client_ca", d.tls_client_ca)
    tls_client_cert = t.choice("tls_client_cert", d.tls_client_cert, ("optional", "required"))
    if tls_client_ca and t.ok("tls_client_ca", "tls_cert", "tls_key"):
        if not tls_cert:
            t.fail("tls_client_ca", "client certificates need TLS listeners: set tls_cert and tls_key too")
        else:
            problem = _client_ca_problem(tls_client_ca)
            if problem:
                t.fail("tls_client_ca", problem)
    if tls_client_cert == "required" and not tls_client_ca and t.ok("tls_client_cert", "tls_client_ca"):
        t.fail("tls_client_cert", '"required" needs tls_client_ca (the CAs client certificates must chain to)')
    trusted_proxies: list[str] = []
    for path, cidr in t.strings("trusted_proxies", d.trusted_proxies):
        try:
            parse_networks([cidr])
        except ValueError as exc:
            t.fail("trusted_proxies", str(exc), path)
        else:
            trusted_proxies.append(cidr.strip())
    client_cert_header = t.string("client_cert_header", d.client_cert_header).strip().lower()
    if client_cert_header and t.ok("client_cert_header"):
        if not _TOKEN.fullmatch(client_cert_header):
            t.fail("client_cert_header", f"'{client_cert_header}' is not a valid header name")
        elif client_cert_header in RESERVED_IDENTITY_HEADERS or client_cert_header == "dpop":
            t.fail("client_cert_header", f"'{client_cert_header}' is a header the gateway manages itself")
        elif not trusted_proxies and t.ok("trusted_proxies") and not authz_listening:
            t.fail("client_cert_header", "is only believed from trusted_proxies, which is empty")
    max_header_bytes = t.integer("max_header_bytes", d.max_header_bytes, minimum=1)
    max_body_bytes = t.integer("max_body_bytes", d.max_body_bytes)
    header_timeout = t.duration("header_timeout", d.header_timeout, positive=True)
    keepalive_timeout = t.duration("keepalive_timeout", d.keepalive_timeout)
    shutdown_timeout = t.duration("shutdown_timeout", d.shutdown_timeout)
    access_log = t.boolean("access_log", d.access_log)
    if len(p.items) != n:
        return None
    return ServerConfig(
        listen=tuple(listen),
        workers=workers,
        http_parser=http_parser,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_header_bytes=max_header_bytes,
        max_body_bytes=max_body_bytes,
        header_timeout=header_timeout,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
        access_log=access_log,
        tls_client_ca=tls_client_ca,
        tls_client_cert=tls_client_cert,
        trusted_proxies=tuple(trusted_proxies),
        client_cert_header=client_cert_header,
    )


def _parse_admin(p: _Problems, t: _Table | None, server: ServerConfig | None) -> AdminConfig | None:
    if t is None:
        return None
    n = len(p.items)
    listen: ListenAddr | None = None
    text = t.string("listen", str(_D_ADMIN.listen))
    if text and t.ok("listen"):
        addr = _parse_listen(text)
        if isinstance(addr, str):
            t.fail("listen", addr)
        elif server is not None and addr in server.listen and addr.port != 0:
            t.fail("listen", f"'{text}' is also in server.listen")
        else:
            listen = addr
    token = t.secret("token", _D_ADMIN.token)
    if len(p.items) != n:
        return None
    return AdminConfig(listen=listen, token=token)


def listeners_overlap(a: ListenAddr, b: ListenAddr) -> bool:
    """Whether two listen addresses could be the same socket: the same port (never port 0, which
    the OS picks afresh) and hosts that are equal, or where one is the wildcard of the other's
    family (``0.0.0.0:X`` takes ``127.0.0.1:X``; ``[::]:X`` is IPv6-only, as bound). A host
    name cannot be told apart from an address without resolving it, so it overlaps anything
    on its port: such a pair is refused rather than left to fail, or not, at bind time."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    try:
        ip_a = ipaddress.ip_address(a.host)
        ip_b = ipaddress.ip_address(b.host)
    except ValueError:
        return True
    return ip_a.version == ip_b.version and (ip_a.is_unspecified or ip_b.is_unspecified)


def _parse_authz(
    p: _Problems, t: _Table | None, server: ServerConfig | None, admin: AdminConfig | None
) -> AuthzConfig | None:
    if t is None:
        return None
    n = len(p.items)
    listen: list[ListenAddr] = []
    for path, text in t.strings("listen", tuple(str(a) for a in _D_AUTHZ.listen)):
        addr = _parse_listen(text)
        if isinstance(addr, str):
            p.add(path, addr)
            continue
        if addr in listen:
            p.add(path, f"duplicate address '{text}'")
            continue
        # The authz listener believes X-Original-URI and friends from anyone who reaches it, so a
        # socket shared with traffic would let any client describe its own request.
        clash = next((str(a) for a in server.listen if listeners_overlap(addr, a)), None) if server else None
        if clash is not None:
            p.add(path, f"'{text}' overlaps server.listen '{clash}': the authz listener must never be a traffic listener")
        elif admin is not None and admin.listen is not None and listeners_overlap(addr, admin.listen):
            p.add(path, f"'{text}' overlaps admin.listen '{admin.listen}'")
        else:
            listen.append(addr)
    path_prefix = t.string("path_prefix", _D_AUTHZ.path_prefix)
    if t.ok("path_prefix"):
        if not path_prefix.startswith("/"):
            t.fail("path_prefix", f"must start with '/', got '{path_prefix}'")
        else:
            try:
                normal = normalise_path(path_prefix)
            except BadRequest as exc:
                normal = None
                t.fail("path_prefix", f"'{path_prefix}' is not a valid path: {exc.description}")
            if normal is not None and normal != path_prefix:
                t.fail("path_prefix", f"'{path_prefix}' is not in normal form (write '{normal}')")
    if len(p.items) != n:
        return None
    return AuthzConfig(listen=tuple(listen), path_prefix=path_prefix)


_SOURCE_KINDS: Final = ("header", "query", "cookie")


def _parse_token(p: _Problems, t: _Table | None) -> TokenConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = _D_TOKEN
    max_bytes = t.integer("max_bytes", d.max_bytes, minimum=1)
    cache_size = t.integer("cache_size", d.cache_size)
    sources: list[TokenSource] = []
    for path, text in t.strings("sources", tuple(f"{s.kind}:{s.name}" for s in d.sources), nonempty=True):
        source = _parse_source(text)
        if isinstance(source, str):
            p.add(path, source)
        elif source in sources:
            p.add(path, f"duplicate source '{text}'")
        else:
            sources.append(source)
    if len(p.items) != n:
        return None
    return TokenConfig(max_bytes=max_bytes, cache_size=cache_size, sources=tuple(sources))


def _parse_source(text: str) -> TokenSource | str:
    kind, sep, name = text.partition(":")
    if kind == "header" and sep and _TOKEN.fullmatch(name):
        return TokenSource("header", name.lower())  # header names are case-insensitive
    if kind == "cookie" and sep and _TOKEN.fullmatch(name):
        return TokenSource("cookie", name)
    if kind == "query" and sep and name:
        return TokenSource("query", name)
    if not sep or kind not in _SOURCE_KINDS:
        return f'expected "header:NAME", "query:NAME" or "cookie:NAME", got \'{text}\'{_hint(kind, _SOURCE_KINDS)}'
    if not name:
        return f"missing the {kind} name after '{kind}:'"
    return f"'{name}' is not a valid {kind} name"


def _parse_issuers(p: _Problems, entries: list[tuple[str, dict[str, Any]]] | None) -> list[IssuerConfig] | None:
    if entries is None:
        return None
    out: list[IssuerConfig] = []
    names: dict[str, str] = {}
    issuer_values: dict[str, str] = {}
    n = len(p.items)
    for path, data in entries:
        issuer = _parse_issuer(_Table(p, path, data, _ISSUER_KEYS), names, issuer_values)
        if issuer is not None:
            out.append(issuer)
    return out if len(p.items) == n else None


def _parse_issuer(t: _Table, names: dict[str, str], issuer_values: dict[str, str]) -> IssuerConfig | None:
    n = len(t.p.items)
    d = _D_ISSUER
    name = t.string("name", required=True)
    if name:
        if not _NAME.fullmatch(name):
            t.fail("name", f"'{name}' may only contain letters, digits, '_', '.' and '-'")
        elif name in names:
            t.fail("name", f"duplicate issuer name '{name}' (also {names[name]})")
        else:
            names[name] = t.path
    iss = t.string("issuer", required=True)
    if iss:
        # The verifier finds the issuer by the token's iss claim: two entries would be ambiguous.
        if iss in issuer_values:
            t.fail("issuer", f"'{iss}' is already configured by {issuer_values[iss]}")
        else:
            issuer_values[iss] = t.path

    jwks_uris = _jwks_uris(t)
    discovery, jwks_file = t.string("discovery"), t.string("jwks_file")
    key_sources = {"jwks_uri": bool(jwks_uris), "discovery": bool(discovery), "jwks_file": bool(jwks_file)}
    if discovery:
        err = _check_http_url(discovery)
        if err:
            t.fail("discovery", err)

    introspection = _parse_introspection(t)
    if t.ok("jwks_uri", "discovery", "jwks_file", "introspection_endpoint"):
        given = [k for k, v in key_sources.items() if v]
        if len(given) > 1:
            t.p.add(t.path, f"set only one of jwks_uri, discovery or jwks_file (got {' and '.join(given)})")
        elif not given and not introspection[0]:
            # An introspecting issuer may do without keys: its tokens are judged by the endpoint.
            t.p.add(t.path, "one of jwks_uri, discovery or jwks_file is required (or introspection_endpoint)")

    ca_file = t.string("ca_file")
    if ca_file:
        problem = context_problem(ca_file=ca_file)
        if problem:
            t.fail("ca_file", problem)
        elif t.ok("jwks_uri", "discovery", "introspection_endpoint") and not (
            jwks_uris or discovery or introspection[0]
        ):
            t.fail("ca_file", "has no effect: nothing of this issuer is fetched (jwks_uri, discovery or "
                              "introspection_endpoint)")

    audiences = t.strings("audiences", required=True, nonempty=True)
    aud_claim = t.string("aud_claim", d.aud_claim)
    if "aud_claim" in t.data and not aud_claim and t.ok("aud_claim"):
        t.fail("aud_claim", "must not be empty")

    algorithms: list[str] = []
    for path, alg in t.strings("algorithms", d.algorithms, nonempty=True):
        if alg.lower() == "none":
            t.fail("algorithms", "'none' (unsigned tokens) is never allowed", path)
        elif alg not in KNOWN_ALGORITHMS:
            hint = _hint(alg, KNOWN_ALGORITHMS)
            t.fail("algorithms", f"unknown algorithm '{alg}'{hint}; known: {' '.join(KNOWN_ALGORITHMS)}", path)
        else:
            algorithms.append(alg)

    leeway = t.duration("leeway", d.leeway)
    max_lifetime = t.duration("max_lifetime", d.max_lifetime)
    required_claims = t.strings("required_claims", d.required_claims)
    typ = t.strings("typ", d.typ)

    hs_secret = t.secret("hs_secret").encode("utf-8")
    hs_wanted = [a for a in algorithms if a in HMAC_ALGORITHMS]
    if t.ok("hs_secret"):
        if hs_wanted and not hs_secret:
            t.fail("algorithms", f"{', '.join(hs_wanted)} needs hs_secret")
        elif hs_secret and not hs_wanted:
            # Only judged on a clean list: a mistyped "HS265" should not also produce this.
            if t.ok("algorithms"):
                t.fail("hs_secret", "set, but algorithms has no HS256, HS384 or HS512")
        elif hs_secret and len(hs_secret) < MIN_HS_SECRET_BYTES:
            # Never echo the secret, only its length.
            t.fail("hs_secret", f"must be at least {MIN_HS_SECRET_BYTES} bytes, got {len(hs_secret)}")

    jwks_refresh = t.duration("jwks_refresh", d.jwks_refresh, positive=True)
    jwks_cooldown = t.duration("jwks_cooldown", d.jwks_cooldown)
    token_binding = t.choice("token_binding", d.token_binding, ("allow", "require"))
    dpop_algorithms: list[str] = []
    for path, alg in t.strings("dpop_algorithms", d.dpop_algorithms, nonempty=True):
        if alg.lower() == "none" or alg in HMAC_ALGORITHMS:
            t.fail("dpop_algorithms", f"'{alg}' is not an asymmetric algorithm; a DPoP proof is signed with the client's own key", path)
        elif alg not in KNOWN_ALGORITHMS:
            hint = _hint(alg, KNOWN_ALGORITHMS)
            t.fail("dpop_algorithms", f"unknown algorithm '{alg}'{hint}; known: {' '.join(DEFAULT_ALGORITHMS)}", path)
        else:
            dpop_algorithms.append(alg)
    dpop_max_age = t.duration("dpop_max_age", d.dpop_max_age, positive=True)
    dpop_nonce = t.boolean("dpop_nonce", d.dpop_nonce)
    if len(t.p.items) != n:
        return None
    return IssuerConfig(
        name=name,
        issuer=iss,
        jwks_uri=jwks_uris,
        discovery=discovery,
        jwks_file=jwks_file,
        audiences=_values(audiences),
        aud_claim=aud_claim,
        algorithms=tuple(algorithms),
        leeway=leeway,
        max_lifetime=max_lifetime,
        required_claims=_values(required_claims),
        typ=_values(typ),
        hs_secret=hs_secret,
        jwks_refresh=jwks_refresh,
        jwks_cooldown=jwks_cooldown,
        token_binding=token_binding,
        dpop_algorithms=tuple(dpop_algorithms),
        dpop_max_age=dpop_max_age,
        dpop_nonce=dpop_nonce,
        introspection_endpoint=introspection[0],
        introspection_client_id=introspection[1],
        introspection_client_secret=introspection[2],
        introspection_cache=introspection[3],
        ca_file=ca_file,
    )


def _jwks_uris(t: _Table) -> tuple[str, ...]:
    """``jwks_uri``: one URL, or a non-empty list of distinct URLs (keys merged)."""
    raw = t.data.get("jwks_uri", "")
    if isinstance(raw, str):
        if not raw:
            return ()
        err = _check_http_url(raw)
        if err:
            t.fail("jwks_uri", err)
            return ()
        return (raw,)
    if not isinstance(raw, list):
        t.bad_type("jwks_uri", "a URL or an array of URLs")
        return ()
    urls: list[str] = []
    for path, url in t.strings("jwks_uri", nonempty=True):
        err = _check_http_url(url)
        if err:
            t.fail("jwks_uri", err, path)
        else:
            urls.append(url)
    return tuple(urls) if t.ok("jwks_uri") else ()


def _parse_introspection(t: _Table) -> tuple[str, str, str, float]:
    """``introspection_*``: (endpoint, client id, client secret, cache seconds); the endpoint is
    "" when introspection is off, and then no other introspection key may be set."""
    d = _D_ISSUER
    endpoint = t.string("introspection_endpoint")
    client_id = t.secret("introspection_client_id")
    client_secret = t.secret("introspection_client_secret")
    cache = t.duration("introspection_cache", d.introspection_cache, positive=True)
    if endpoint:
        err = _check_http_url(endpoint)
        if err:
            t.fail("introspection_endpoint", err)
        # RFC 7662 §2.1: the endpoint requires the caller to authenticate (client_secret_basic).
        for key, value in (("introspection_client_id", client_id), ("introspection_client_secret", client_secret)):
            if not value and t.ok(key):
                t.fail(key, "is required with introspection_endpoint (client_secret_basic credentials)")
    elif t.ok("introspection_endpoint"):
        for key in ("introspection_client_id", "introspection_client_secret", "introspection_cache"):
            if key in t.data:
                t.fail(key, "has no effect without introspection_endpoint")
    return endpoint, client_id, client_secret, cache


def _values(entries: list[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(v for _, v in entries)


def _declared_introspecting_issuers(entries: list[tuple[str, dict[str, Any]]] | None) -> list[str]:
    """Names of the issuers written with an ``introspection_endpoint``, in file order."""
    return [
        data["name"] for _, data in entries or ()
        if isinstance(data.get("name"), str) and data["name"]
        and isinstance(data.get("introspection_endpoint"), str) and data["introspection_endpoint"]
    ]


def _declared_issuer_names(entries: list[tuple[str, dict[str, Any]]] | None) -> list[str] | None:
    """Issuer names as written, or None when some entry has no usable name (then a route's
    reference cannot be judged)."""
    if entries is None:
        return None
    names = [data.get("name") for _, data in entries]
    return [n for n in names if isinstance(n, str) and n] if all(isinstance(n, str) and n for n in names) else None


def _parse_upstreams(p: _Problems, root: _Table) -> dict[str, UpstreamConfig] | None:
    value = root.data.get("upstream", {})
    if not isinstance(value, dict):
        p.add("upstream", f"expected tables like [upstream.NAME], got {_tname(value)}")
        return None
    out: dict[str, UpstreamConfig] = {}
    n = len(p.items)
    for name, data in value.items():
        path = _join("upstream", name)
        if not isinstance(data, dict):
            p.add(path, f"expected a table ([upstream.NAME]), got {_tname(data)}")
        elif not _NAME.fullmatch(name):
            p.add(path, "upstream names may only contain letters, digits, '_', '.' and '-'")
        else:
            upstream = _parse_upstream(_Table(p, path, data, _UPSTREAM_KEYS), name)
            if upstream is not None:
                out[name] = upstream
    return out if len(p.items) == n else None


def _parse_upstream(t: _Table, name: str) -> UpstreamConfig | None:
    n = len(t.p.items)
    d = _D_UPSTREAM
    targets: list[Target] = []
    raw = t.data.get("targets")
    if raw is None:
        t.fail("targets", "is required")
    elif not isinstance(raw, list):
        t.bad_type("targets", "an array of URLs")
    elif not raw:
        t.fail("targets", "must not be empty")
    else:
        # Repeating a target is allowed on purpose: it weights round robin.
        for i, item in enumerate(raw):
            path = f"{t.at('targets')}[{i}]"
            target = _parse_target(item) if isinstance(item, str) else f"expected a string, got {_tname(item)}"
            if isinstance(target, str):
                t.fail("targets", target, path)
            else:
                targets.append(target)
    connect_timeout = t.duration("connect_timeout", d.connect_timeout, positive=True)
    response_timeout = t.duration("response_timeout", d.response_timeout, positive=True)
    idle_timeout = t.duration("idle_timeout", d.idle_timeout, positive=True)
    max_idle = t.integer("max_idle", d.max_idle)
    preserve_host = t.boolean("preserve_host", d.preserve_host)
    ca_file = t.string("ca_file", d.ca_file)
    client_cert = t.string("client_cert", d.client_cert)
    client_key = t.string("client_key", d.client_key)
    if t.ok("ca_file", "client_cert", "client_key", "targets"):
        _check_upstream_tls(t, targets, ca_file, client_cert, client_key)
    if len(t.p.items) != n:
        return None
    return UpstreamConfig(
        name=name,
        targets=tuple(targets),
        connect_timeout=connect_timeout,
        response_timeout=response_timeout,
        idle_timeout=idle_timeout,
        max_idle=max_idle,
        preserve_host=preserve_host,
        ca_file=ca_file,
        client_cert=client_cert,
        client_key=client_key,
    )


def _check_upstream_tls(t: _Table, targets: list[Target], ca_file: str, client_cert: str, client_key: str) -> None:
    """The TLS files load as the workers will load them, and only where they take effect."""
    if bool(client_cert) != bool(client_key):
        t.fail("client_key" if client_cert else "client_cert",
               "client_cert and client_key must be set together")
        return
    if not (ca_file or client_cert):
        return
    if not any(target.scheme == "https" for target in targets):
        # A CA or client certificate on a plain-HTTP upstream would silently protect nothing.
        t.fail("ca_file" if ca_file else "client_cert", "is set, but no target uses https://")
        return
    problem = context_problem(ca_file, client_cert, client_key)
    if problem is not None:
        t.fail("ca_file" if problem.startswith("cannot load ca_file") else "client_cert", problem)


def _parse_routes(
    p: _Problems,
    entries: list[tuple[str, dict[str, Any]]] | None,
    issuer_names: list[str] | None,
    upstream_names: list[str] | None,
    introspecting: Sequence[str] = (),
) -> list[RouteConfig] | None:
    if entries is None:
        return None
    if not entries:
        p.add("route", "at least one [[route]] is required")
        return None
    out: list[RouteConfig] = []
    seen: dict[tuple[str, str], str] = {}
    n = len(p.items)
    for path, data in entries:
        route = _parse_route(_Table(p, path, data, _ROUTE_KEYS), issuer_names, upstream_names, introspecting)
        if route is None:
            continue
        key = (route.host, route.path_prefix)
        if key in seen:
            p.add(path, f"same host and path_prefix as {seen[key]}")
        else:
            seen[key] = path
            out.append(route)
    return out if len(p.items) == n else None


def _parse_route(
    t: _Table, issuer_names: list[str] | None, upstream_names: list[str] | None, introspecting: Sequence[str] = ()
) -> RouteConfig | None:
    n = len(t.p.items)
    d = _D_ROUTE

    prefix = t.string("path_prefix", required=True)
    if prefix:
        err = _check_path_prefix(prefix)
        if err:
            t.fail("path_prefix", err)

    host = t.string("host", d.host).lower()
    if host:
        bare = host[2:] if host.startswith("*.") else host
        if not _HOSTNAME.fullmatch(bare) or bare.endswith("."):
            t.fail("host", f"expected an exact host or \"*.suffix\" (no port), got '{host}'")

    upstream = t.string("upstream", required=True)
    if upstream and upstream_names is not None and upstream not in upstream_names:
        hint = _hint(upstream, upstream_names) or _known(upstream_names, "[upstream]")
        t.fail("upstream", f"unknown upstream '{upstream}'{hint}")

    auth = t.choice("auth", d.auth, ("required", "optional", "off"))
    if t.ok("auth") and auth != "off" and issuer_names is not None and not issuer_names:
        t.fail("auth", f"'{auth}' needs at least one [[issuer]]")

    route_issuers = t.strings("issuers", d.issuers)
    if issuer_names is not None:
        for path, name in route_issuers:
            if name not in issuer_names:
                hint = _hint(name, issuer_names) or _known(issuer_names, "[[issuer]]")
                t.fail("issuers", f"unknown issuer '{name}'{hint}", path)
    if t.ok("issuers", "auth") and auth != "off":
        # An opaque token names no issuer: with two introspecting issuers allowed, which endpoint
        # should see it? Guessing would hand tokens to the wrong party; refuse the config.
        allowed = [name for name in introspecting if not route_issuers or name in _values(route_issuers)]
        if len(allowed) > 1:
            where = "issuers" if route_issuers else "auth"
            scope = "allows" if route_issuers else "allows every issuer, so"
            t.fail(where, f"{scope} {len(allowed)} introspecting issuers ({', '.join(allowed)}); "
                          "a route may allow at most one (name it in issuers)")

    route_audiences = t.strings("audiences", d.audiences)

    scopes = t.strings("require_scopes", d.require_scopes)
    for path, scope in scopes:
        if any(c.isspace() for c in scope):
            t.fail("require_scopes", "a scope cannot contain whitespace; list each scope separately", path)

    claims = _parse_require_claims(t)

    if auth == "off" and t.ok("auth"):
        # Requirements on an unauthenticated route would never be checked: the operator meant
        # something else, and silently ignoring it is exactly the weakening we refuse.
        for key in ("issuers", "audiences", "require_scopes", "require_claims", "token_binding"):
            if t.data.get(key):
                t.fail(key, 'has no effect with auth = "off"')

    forward_token = t.boolean("forward_token", d.forward_token)
    strip_prefix = t.boolean("strip_prefix", d.strip_prefix)
    cors_preflight = t.choice("cors_preflight", d.cors_preflight, ("forward", "auth"))
    token_binding = t.choice("token_binding", d.token_binding, ("", "allow", "require"))
    rate_limit = _parse_rate_limit(t, auth if t.ok("auth") else None)
    if len(t.p.items) != n:
        return None
    return RouteConfig(
        path_prefix=prefix,
        host=host,
        upstream=upstream,
        auth=auth,
        issuers=_values(route_issuers),
        audiences=_values(route_audiences),
        require_scopes=_values(scopes),
        require_claims=claims,
        forward_token=forward_token,
        strip_prefix=strip_prefix,
        cors_preflight=cors_preflight,
        token_binding=token_binding,
        rate_limit=rate_limit,
    )


_RATE_LIMIT_KEYWORDS: Final = ("client_ip", "token")


def _parse_rate_limit(route: _Table, auth: str | None) -> RateLimitConfig | None:
    """A route's ``rate_limit`` inline table; ``{}`` (the default) is no limit."""
    t = route.table("rate_limit", _RATE_LIMIT_KEYS)
    if t is None or not t.data:
        return None
    n = len(t.p.items)
    for key in ("requests", "per"):
        if key not in t.data:
            t.fail(key, "is required")
    requests = t.integer("requests", 1, minimum=1)
    per = t.duration("per", 1.0, positive=True)
    burst = t.integer("burst", 0)
    key = t.string("key", "client_ip")
    if t.ok("key"):
        if not key:
            t.fail("key", 'must not be empty: a claim name, "client_ip" or "token"')
        elif not (key.isascii() and key.isprintable()):
            t.fail("key", "a claim name here must be printable ASCII (it is named in the "
                          "RateLimit response fields)")
        elif key not in _RATE_LIMIT_KEYWORDS and auth == "off":
            # Without verification there are no claims: every request would fall back to its
            # address, which is not what a per-claim limit says.
            t.fail("key", f"'{key}' is a claim, but the route has auth = \"off\" (use "
                          f"\"client_ip\" or \"token\")")
    if len(t.p.items) != n:
        return None
    return RateLimitConfig(requests=requests, per=per, burst=burst, key=key)


def _known(names: Sequence[str], what: str) -> str:
    return f" (configured: {', '.join(names)})" if names else f" (no {what} is configured)"


def _check_path_prefix(prefix: str) -> str | None:
    """Routes match the normalised path (contract §4), so a prefix that is not itself normalised could
    never match; say so instead of shipping a dead route."""
    if not prefix.startswith("/"):
        return f"must start with '/', got '{prefix}'"
    if any(c in "?#" or ord(c) <= 0x20 or ord(c) == 0x7F for c in prefix):
        return "must be a plain path: no query, fragment, spaces or control characters"
    if "//" in prefix or any(seg in (".", "..") for seg in prefix.split("/")):
        return "must be a normalised path: no '//', '.' or '..' segments"
    try:
        normal = normalise_path(prefix)
    except BadRequest as exc:
        return f"is not a valid path: {exc.description}"
    if normal != prefix:
        return f"must be written in normalised form: '{normal}'"
    return None


def _parse_require_claims(t: _Table) -> tuple[tuple[str, tuple[str, ...]], ...]:
    raw = t.data.get("require_claims", {})
    if not isinstance(raw, dict):
        t.bad_type("require_claims", "a table of claim = [values]")
        return ()
    out: list[tuple[str, tuple[str, ...]]] = []
    for claim, value in raw.items():
        path = _join(t.at("require_claims"), claim)
        values = [value] if isinstance(value, str) else value
        if not claim:
            t.fail("require_claims", "claim name must not be empty", path)
        elif not isinstance(values, list):
            t.fail("require_claims", f"expected a string or an array of strings, got {_tname(value)}", path)
        elif not values:
            t.fail("require_claims", "must not be empty (no value could ever match)", path)
        else:
            bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, str)]
            for i, v in bad:
                t.fail("require_claims", f"expected a string, got {_tname(v)}", f"{path}[{i}]")
            if not bad:
                out.append((claim, tuple(dict.fromkeys(values))))  # de-duplicated, order kept
    return tuple(out)


def _parse_claims_to_headers(p: _Problems, root: _Table, token: TokenConfig | None) -> tuple[tuple[str, str], ...] | None:
    if "claims_to_headers" not in root.data:
        return DEFAULT_CLAIMS_TO_HEADERS
    raw = root.data["claims_to_headers"]
    if not isinstance(raw, dict):
        root.bad_type("claims_to_headers", "a table of header = claim")
        return None
    # An explicit table replaces the defaults entirely (an empty table injects nothing).
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    source_headers = {s.name for s in token.sources if s.kind == "header"} if token else set()
    n = len(p.items)
    for header, claim in raw.items():
        path = _join("claims_to_headers", header)
        name = header.lower()
        if not _TOKEN.fullmatch(header):
            p.add(path, f"'{header}' is not a valid HTTP header name")
        # The gateway also strips the underscore spelling, so check that spelling too.
        elif name in RESERVED_IDENTITY_HEADERS or name.replace("_", "-") in RESERVED_IDENTITY_HEADERS:
            p.add(path, f"'{name}' is a hop-by-hop, framing, credential or gateway-managed header; it cannot carry a claim")
        elif name in source_headers:
            p.add(path, f"'{name}' is also a token source in token.sources")
        elif name in seen:
            p.add(path, f"duplicate header (same as {seen[name]}; header names are case-insensitive)")
        elif not isinstance(claim, str):
            p.add(path, f"expected a claim name (string), got {_tname(claim)}")
        elif not claim:
            p.add(path, "claim name must not be empty")
        else:
            seen[name] = path
            out.append((name, claim))
    return tuple(out) if len(p.items) == n else None


def _spelling(name: str) -> str:
    """A header name as the header policy compares it: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _parse_assertion(
    p: _Problems,
    t: _Table | None,
    token: TokenConfig | None,
    claims_to_headers: tuple[tuple[str, str], ...] | None,
) -> AssertionConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = _D_ASSERTION
    enabled = t.boolean("enabled", d.enabled)
    header = t.string("header", d.header).lower()
    issuer = t.string("issuer", d.issuer)
    for key, value in (("header", header), ("issuer", issuer)):
        if t.ok(key) and not value:
            t.fail(key, "must not be empty")
    algorithm = t.choice("algorithm", d.algorithm, ("ES256", "EdDSA"))
    lifetime = t.duration("lifetime", d.lifetime, positive=True)
    claims = t.strings("claims", d.claims)
    for path, claim in claims:
        if claim in GATEWAY_CLAIMS:
            t.fail("claims", f"'{claim}' is set by the gateway itself (iss, aud, iat, exp, nbf, jti)", path)
    if t.ok("header") and header:
        key = _spelling(header)
        # The header policy drops the client's copy in every spelling, so compare spellings.
        if not _TOKEN.fullmatch(header):
            t.fail("header", f"'{header}' is not a valid HTTP header name")
        elif any(_spelling(r) == key for r in RESERVED_IDENTITY_HEADERS):
            t.fail("header", f"'{header}' is a hop-by-hop, framing, credential or gateway-managed header")
        elif claims_to_headers is not None and any(_spelling(h) == key for h, _ in claims_to_headers):
            t.fail("header", f"'{header}' is also a [claims_to_headers] header")
        elif token is not None and any(s.kind == "header" and _spelling(s.name) == key for s in token.sources):
            t.fail("header", f"'{header}' is also a token source in token.sources")
    key_files = t.strings("key_files", d.key_files)
    keys: list[AssertionKey] = []
    for path, file in key_files:
        try:
            keys.append(load_key_file(file))
        except AssertionKeyError as exc:
            t.fail("key_files", str(exc), path)
    if keys and t.ok("key_files", "algorithm"):
        try:
            KeyRing.from_keys(keys, algorithm)
        except AssertionKeyError as exc:
            t.fail("key_files", str(exc))
    if len(p.items) != n:
        return None
    return AssertionConfig(
        enabled=enabled,
        header=header,
        issuer=issuer,
        algorithm=algorithm,
        key_files=tuple(file for _, file in key_files),
        lifetime=lifetime,
        claims=tuple(claim for _, claim in claims),
        keys=tuple(keys),
    )


def _check_redis_url(t: _Table, redis_url: str) -> None:
    """One rule for every ``redis_url`` key ([revocation], [limits])."""
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        # Do not echo the value: it may carry a password.
        t.fail("redis_url", "expected a redis://, rediss:// or unix:// URL")


def _parse_revocation(p: _Problems, t: _Table | None) -> RevocationConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = _D_REVOCATION
    backend = t.choice("backend", d.backend, ("sqlite", "redis"))
    sqlite_path = t.string("sqlite_path", d.sqlite_path)
    redis_url = t.secret("redis_url", d.redis_url)
    if t.ok("backend", "sqlite_path") and backend == "sqlite" and not sqlite_path:
        t.fail("sqlite_path", 'must not be empty with backend = "sqlite"')
    if t.ok("backend", "redis_url"):
        if not redis_url:
            if backend == "redis":
                t.fail("redis_url", 'must not be empty with backend = "redis"')
        else:
            _check_redis_url(t, redis_url)
    if len(p.items) != n:
        return None
    return RevocationConfig(backend=backend, sqlite_path=sqlite_path, redis_url=redis_url)


def _parse_tracing(p: _Problems, t: _Table | None) -> TracingConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = TracingConfig()
    endpoint = t.string("otlp_endpoint", d.otlp_endpoint)
    service_name = t.string("service_name", d.service_name)
    ratio = d.sample_ratio
    raw = t.data.get("sample_ratio", ratio)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        t.bad_type("sample_ratio", "a number from 0 to 1")
    elif not 0.0 <= raw <= 1.0:  # also refuses nan
        t.fail("sample_ratio", f"must be from 0 to 1, got {raw}")
    else:
        ratio = float(raw)
    if t.ok("service_name") and not service_name.strip():
        t.fail("service_name", "must not be empty")
    if t.ok("otlp_endpoint") and endpoint:
        problem = _check_http_url(endpoint)
        if problem is not None:
            t.fail("otlp_endpoint", f"{problem} (the full traces URL, e.g. http://127.0.0.1:4318/v1/traces)")
        elif not _tracing_sdk_installed():
            t.fail("otlp_endpoint", "tracing needs the OpenTelemetry SDK: pip install 'jwtproxy[tracing]'")
    if len(p.items) != n:
        return None
    return TracingConfig(otlp_endpoint=endpoint, sample_ratio=ratio, service_name=service_name)


def _tracing_sdk_installed() -> bool:
    """Whether the ``jwtproxy[tracing]`` extra (SDK and OTLP/HTTP exporter) is importable."""
    try:
        return (importlib.util.find_spec("opentelemetry.sdk.trace") is not None
                and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http.trace_exporter") is not None)
    except ModuleNotFoundError:
        return False
def _parse_limits(p: _Problems, t: _Table | None, revocation: RevocationConfig | None) -> LimitsConfig | None:
    if t is None:
        return None
    n = len(p.items)
    d = _D_LIMITS
    backend = t.choice("backend", d.backend, ("local", "redis"))
    redis_url = t.secret("redis_url", d.redis_url)
    if t.ok("redis_url") and redis_url:
        _check_redis_url(t, redis_url)
    if not redis_url and revocation is not None:
        redis_url = revocation.redis_url
    if t.ok("backend", "redis_url") and backend == "redis" and not redis_url and revocation is not None:
        t.fail("redis_url", 'must not be empty with backend = "redis" (nor revocation.redis_url)')
    failures_per_ip = t.integer("failures_per_ip", d.failures_per_ip)
    max_connections = t.integer("max_connections", d.max_connections, minimum=1)
    upstream_max_connections = t.integer("upstream_max_connections", d.upstream_max_connections, minimum=1)
    if len(p.items) != n:
        return None
    return LimitsConfig(
        backend=backend,
        redis_url=redis_url,
        failures_per_ip=failures_per_ip,
        max_connections=max_connections,
        upstream_max_connections=upstream_max_connections,
    )
