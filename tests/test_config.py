"""Tests for jwtproxy.config: the shipped sample, a full config, defaults, env secrets, and one test
per rejection path (each fails if its check is removed)."""

from __future__ import annotations

import copy
import os
import pathlib
import types
from collections.abc import Callable
from typing import Any

import pytest

from jwtproxy.config import (
    DEFAULT_ALGORITHMS,
    DEFAULT_CLAIMS_TO_HEADERS,
    AdminConfig,
    AuthzConfig,
    Config,
    ConfigError,
    IssuerConfig,
    LimitsConfig,
    ListenAddr,
    RateLimitConfig,
    RevocationConfig,
    RouteConfig,
    ServerConfig,
    Target,
    TokenConfig,
    TokenSource,
    TracingConfig,
    UpstreamConfig,
    default_config_path,
    listeners_overlap,
    load_config,
    parse_config,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
F = "t.toml"
SECRET = "s" * 32
ALL_ALGS = "RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512 EdDSA Ed25519 HS256 HS384 HS512"
ROOT_KEYS = "server, admin, token, issuer, route, upstream, claims_to_headers, revocation, assertion, authz, tracing, limits"


def base() -> dict[str, Any]:
    """The smallest valid document: one issuer, one upstream, one route."""
    return {
        "issuer": [
            {
                "name": "corp",
                "issuer": "https://idp.example.com",
                "jwks_uri": "https://idp.example.com/jwks.json",
                "audiences": ["api"],
            }
        ],
        "upstream": {"backend": {"targets": ["http://127.0.0.1:9001"]}},
        "route": [{"path_prefix": "/api", "upstream": "backend"}],
    }


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, F, env or {})
    return info.value.problems


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(data, F, env or {})


def with_(mutate: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    data = copy.deepcopy(base())
    mutate(data)
    return data


# ----------------------------------------------------------------------------------------------
# The shipped sample and a full config


def test_shipped_sample_parses_to_the_demo() -> None:
    cfg = load_config(REPO / "jwtproxy.toml", env={})
    assert cfg.server.listen == (ListenAddr("127.0.0.1", 8080),)
    assert cfg.admin == AdminConfig(listen=ListenAddr("127.0.0.1", 9901), token="")
    (demo,) = cfg.issuers
    assert demo.name == "demo"
    assert demo.issuer == "http://127.0.0.1:8081/demo-issuer"
    assert demo.jwks_uri == ("http://127.0.0.1:8081/demo-issuer/jwks.json",)
    assert (demo.discovery, demo.jwks_file, demo.hs_secret) == ("", "", b"")
    assert demo.audiences == ("demo-api",)
    assert demo.algorithms == ("RS256", "ES256", "EdDSA")
    by_prefix = {r.path_prefix: r for r in cfg.routes}
    assert set(by_prefix) == {"/", "/public", "/admin-only", "/write"}
    assert all(r.upstream == "demo" for r in cfg.routes)
    assert by_prefix["/"].auth == "required"
    assert by_prefix["/public"].auth == "off"
    assert by_prefix["/admin-only"].require_claims == (("role", ("admin",)),)
    assert by_prefix["/admin-only"].auth == "required"
    assert by_prefix["/write"].require_scopes == ("demo:write",)
    assert cfg.upstreams["demo"].targets == (Target("http", "127.0.0.1", 8082),)
    assert cfg.revocation == RevocationConfig(backend="sqlite", sqlite_path="jwtproxy-revocations.db")
    assert cfg.claims_to_headers == DEFAULT_CLAIMS_TO_HEADERS


def test_shipped_sample_sets_every_documented_key() -> None:
    # The sample doubles as documentation: it should show every key of every section.
    import tomllib

    from jwtproxy import config as mod

    data = tomllib.loads((REPO / "jwtproxy.toml").read_text())
    assert set(data["server"]) == set(mod._SERVER_KEYS)
    assert set(data["admin"]) == set(mod._ADMIN_KEYS)
    assert set(data["token"]) == set(mod._TOKEN_KEYS)
    # hs_secret is shown commented out: setting it without an HS algorithm is an error; so are the
    # introspection keys without an introspection_endpoint.
    introspection = {"introspection_endpoint", "introspection_client_id", "introspection_client_secret",
                     "introspection_cache"}
    assert set(data["issuer"][0]) == set(mod._ISSUER_KEYS) - {"discovery", "jwks_file", "hs_secret"} - introspection
    commented = (REPO / "jwtproxy.toml").read_text()
    assert all(f"# {key} = " in commented for key in introspection | {"hs_secret"})
    assert set(data["route"][0]) == set(mod._ROUTE_KEYS)
    assert set(data["upstream"]["demo"]) == set(mod._UPSTREAM_KEYS)
    assert set(data["revocation"]) == set(mod._REVOCATION_KEYS)
    assert set(data["assertion"]) == set(mod._ASSERTION_KEYS)
    assert set(data["authz"]) == set(mod._AUTHZ_KEYS)
    assert set(data["tracing"]) == set(mod._TRACING_KEYS)
    assert set(data["limits"]) == set(mod._LIMITS_KEYS)


FULL = """
[server]
listen = ["0.0.0.0:8443", "[::]:8443"]
workers = 4
http_parser = "h11"
tls_cert = "/etc/jwtproxy/cert.pem"
tls_key = "/etc/jwtproxy/key.pem"
max_header_bytes = 8192
max_body_bytes = 0
header_timeout = 5
keepalive_timeout = 12.5
shutdown_timeout = 0
access_log = false

[admin]
listen = "[::1]:9902"
token = "env:ADMIN_TOKEN"

[token]
max_bytes = 4096
cache_size = 0
sources = ["header:Authorization", "header:X-Api-Token", "query:access_token", "cookie:session"]

[[issuer]]
name = "corp"
issuer = "https://idp.example.com"
discovery = "https://idp.example.com/.well-known/openid-configuration"
audiences = ["api", "web"]
algorithms = ["PS256", "ES384", "HS512"]
leeway = 5
max_lifetime = 3600
required_claims = ["exp", "sub", "jti"]
typ = ["at+jwt", "JWT"]
hs_secret = "env:HS_SECRET"
jwks_refresh = 60.5
jwks_cooldown = 0

[[issuer]]
name = "partner.v2"
issuer = "https://partner.example.net/"
jwks_file = "/etc/jwtproxy/partner-jwks.json"
audiences = ["partner-api"]

[[route]]
path_prefix = "/payments"
host = "API.Example.com"
upstream = "payments"
auth = "optional"
issuers = ["corp"]
require_scopes = ["payments:read", "payments:write"]
require_claims = { role = ["merchant", "admin"], tier = "gold" }
forward_token = false
strip_prefix = true
cors_preflight = "auth"
rate_limit = { requests = 100, per = 60, burst = 20, key = "sub" }

[[route]]
path_prefix = "/payments"
host = "*.example.com"
upstream = "payments"

[[route]]
path_prefix = "/health"
upstream = "payments"
auth = "off"

[upstream.payments]
targets = ["http://10.0.0.1:9001", "https://pay.internal", "http://[fd00::1]:8080/"]
connect_timeout = 0.5
response_timeout = 10
idle_timeout = 30
max_idle = 0
preserve_host = false

[claims_to_headers]
"X-User-Id" = "sub"
"x-tenant" = "tid"

[revocation]
backend = "redis"
sqlite_path = "/var/lib/jwtproxy/rev.db"
redis_url = "env:REDIS_URL"

[limits]
backend = "redis"
failures_per_ip = 20
max_connections = 5000
upstream_max_connections = 256
"""


def _tls_pair(directory: pathlib.Path) -> tuple[str, str]:
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def test_full_config_parses_to_the_expected_objects(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "full.toml"
    cert, key = _tls_pair(tmp_path)
    path.write_text(FULL.replace("/etc/jwtproxy/cert.pem", cert).replace("/etc/jwtproxy/key.pem", key))
    env = {"ADMIN_TOKEN": "admintoken", "HS_SECRET": SECRET, "REDIS_URL": "rediss://:pw@redis:6380/1"}
    cfg = load_config(str(path), env=env)
    expected = Config(
        path=str(path),
        server=ServerConfig(
            listen=(ListenAddr("0.0.0.0", 8443), ListenAddr("::", 8443)),
            workers=4,
            http_parser="h11",
            tls_cert=cert,
            tls_key=key,
            max_header_bytes=8192,
            max_body_bytes=0,
            header_timeout=5.0,
            keepalive_timeout=12.5,
            shutdown_timeout=0.0,
            access_log=False,
        ),
        admin=AdminConfig(listen=ListenAddr("::1", 9902), token="admintoken"),
        token=TokenConfig(
            max_bytes=4096,
            cache_size=0,
            sources=(
                TokenSource("header", "authorization"),
                TokenSource("header", "x-api-token"),
                TokenSource("query", "access_token"),
                TokenSource("cookie", "session"),
            ),
        ),
        issuers=(
            IssuerConfig(
                name="corp",
                issuer="https://idp.example.com",
                discovery="https://idp.example.com/.well-known/openid-configuration",
                audiences=("api", "web"),
                algorithms=("PS256", "ES384", "HS512"),
                leeway=5.0,
                max_lifetime=3600.0,
                required_claims=("exp", "sub", "jti"),
                typ=("at+jwt", "JWT"),
                hs_secret=SECRET.encode(),
                jwks_refresh=60.5,
                jwks_cooldown=0.0,
            ),
            IssuerConfig(
                name="partner.v2",
                issuer="https://partner.example.net/",
                jwks_file="/etc/jwtproxy/partner-jwks.json",
                audiences=("partner-api",),
            ),
        ),
        routes=(
            RouteConfig(
                path_prefix="/payments",
                host="api.example.com",
                upstream="payments",
                auth="optional",
                issuers=("corp",),
                require_scopes=("payments:read", "payments:write"),
                require_claims=(("role", ("merchant", "admin")), ("tier", ("gold",))),
                forward_token=False,
                strip_prefix=True,
                cors_preflight="auth",
                rate_limit=RateLimitConfig(requests=100, per=60.0, burst=20, key="sub"),
            ),
            RouteConfig(path_prefix="/payments", host="*.example.com", upstream="payments"),
            RouteConfig(path_prefix="/health", upstream="payments", auth="off"),
        ),
        upstreams=types.MappingProxyType(
            {
                "payments": UpstreamConfig(
                    name="payments",
                    targets=(
                        Target("http", "10.0.0.1", 9001),
                        Target("https", "pay.internal", 443),
                        Target("http", "fd00::1", 8080),
                    ),
                    connect_timeout=0.5,
                    response_timeout=10.0,
                    idle_timeout=30.0,
                    max_idle=0,
                    preserve_host=False,
                )
            }
        ),
        claims_to_headers=(("x-user-id", "sub"), ("x-tenant", "tid")),
        revocation=RevocationConfig(
            backend="redis", sqlite_path="/var/lib/jwtproxy/rev.db", redis_url="rediss://:pw@redis:6380/1"
        ),
        # redis_url not given: the revocation one.
        limits=LimitsConfig(
            backend="redis", redis_url="rediss://:pw@redis:6380/1", failures_per_ip=20, max_connections=5000,
            upstream_max_connections=256,
        ),
    )
    assert cfg == expected


def test_result_is_immutable() -> None:
    cfg = parse(base())
    with pytest.raises(AttributeError):
        cfg.server.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.upstreams["x"] = cfg.upstreams["backend"]  # type: ignore[index]
    assert isinstance(cfg.issuers, tuple) and isinstance(cfg.routes, tuple)


# ----------------------------------------------------------------------------------------------
# Defaults


def test_defaults() -> None:
    cfg = parse(base())
    assert cfg.path == F
    assert cfg.server == ServerConfig(
        listen=(ListenAddr("127.0.0.1", 8080),),
        workers=1,
        http_parser="httptools",
        tls_cert="",
        tls_key="",
        max_header_bytes=16384,
        max_body_bytes=10485760,
        header_timeout=10.0,
        keepalive_timeout=75.0,
        shutdown_timeout=30.0,
        access_log=True,
    )
    assert cfg.admin == AdminConfig(listen=ListenAddr("127.0.0.1", 9901), token="")
    assert cfg.token == TokenConfig(max_bytes=8192, cache_size=10000, sources=(TokenSource("header", "authorization"),))
    (issuer,) = cfg.issuers
    assert issuer.algorithms == DEFAULT_ALGORITHMS
    assert DEFAULT_ALGORITHMS == tuple("RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 ES512 EdDSA Ed25519".split())
    assert (issuer.leeway, issuer.max_lifetime, issuer.jwks_refresh, issuer.jwks_cooldown) == (30.0, 0.0, 300.0, 30.0)
    assert issuer.required_claims == ("exp", "sub")  # contract §3
    assert issuer.typ == ()
    assert issuer.hs_secret == b""
    assert cfg.routes == (
        RouteConfig(
            path_prefix="/api",
            host="",
            upstream="backend",
            auth="required",
            issuers=(),
            require_scopes=(),
            require_claims=(),
            forward_token=True,
            strip_prefix=False,
            cors_preflight="forward",
        ),
    )
    up = cfg.upstreams["backend"]
    assert (up.connect_timeout, up.response_timeout, up.idle_timeout, up.max_idle, up.preserve_host) == (
        2.0,
        30.0,
        60.0,
        64,
        True,
    )
    assert cfg.claims_to_headers == (("x-user-id", "sub"), ("x-user-role", "role"), ("x-scope", "scope"))
    assert cfg.revocation == RevocationConfig("sqlite", "jwtproxy-revocations.db", "redis://127.0.0.1:6379/0")
    assert cfg.limits == LimitsConfig("local", "redis://127.0.0.1:6379/0", 0, 10000, 1024)
    assert cfg.routes[0].rate_limit is None


def test_rate_limit_defaults_and_an_empty_table_is_no_limit() -> None:
    cfg = parse(with_(_route(rate_limit={"requests": 5, "per": 1})))
    assert cfg.routes[0].rate_limit == RateLimitConfig(requests=5, per=1.0, burst=0, key="client_ip")
    assert parse(with_(_route(rate_limit={}))).routes[0].rate_limit is None
    # "client_ip" and "token" work without verification; claims need it.
    off = with_(_route(auth="off", rate_limit={"requests": 5, "per": 1, "key": "token"}))
    assert parse(off).routes[0].rate_limit == RateLimitConfig(5, 1.0, 0, "token")


def test_limits_redis_url_of_its_own_and_from_env() -> None:
    data = with_(lambda d: d.update(limits={"backend": "redis", "redis_url": "env:RL"}))
    cfg = parse(data, env={"RL": "redis://:pw@limits:6379/2"})
    assert cfg.limits.redis_url == "redis://:pw@limits:6379/2"
    assert "pw@limits" not in repr(cfg)


def test_durations_come_out_as_float() -> None:
    data = with_(lambda d: d.update(server={"header_timeout": 3}))
    data["issuer"][0]["leeway"] = 0
    data["upstream"]["backend"]["connect_timeout"] = 1
    cfg = parse(data)
    for value in (cfg.server.header_timeout, cfg.issuers[0].leeway, cfg.upstreams["backend"].connect_timeout):
        assert type(value) is float


def test_workers_auto_is_cpu_count() -> None:
    cfg = parse(with_(lambda d: d.update(server={"workers": "auto"})))
    assert cfg.server.workers == (os.cpu_count() or 1)


def test_admin_listen_empty_disables_admin() -> None:
    assert parse(with_(lambda d: d.update(admin={"listen": ""}))).admin.listen is None


def test_explicit_claims_to_headers_replace_the_defaults() -> None:
    assert parse(with_(lambda d: d.update(claims_to_headers={}))).claims_to_headers == ()
    cfg = parse(with_(lambda d: d.update(claims_to_headers={"X-Sub": "sub"})))
    assert cfg.claims_to_headers == (("x-sub", "sub"),)


def test_route_host_wildcard_and_case() -> None:
    data = with_(lambda d: d["route"][0].update(host="*.Example.COM"))
    assert parse(data).routes[0].host == "*.example.com"


def test_same_prefix_on_different_hosts_is_fine() -> None:
    data = base()
    data["route"].append({"path_prefix": "/api", "upstream": "backend", "host": "a.example.com"})
    assert len(parse(data).routes) == 2


def test_auth_off_routes_need_no_issuer() -> None:
    data = base()
    del data["issuer"]
    data["route"][0]["auth"] = "off"
    cfg = parse(data)
    assert cfg.issuers == () and cfg.routes[0].auth == "off"


def test_hs_issuer_with_secret() -> None:
    data = with_(lambda d: d["issuer"][0].update(algorithms=["HS256"], hs_secret=SECRET))
    assert parse(data).issuers[0].hs_secret == SECRET.encode()


def test_repeated_upstream_target_weights_round_robin() -> None:
    data = with_(lambda d: d["upstream"]["backend"].update(targets=["http://a:1", "http://a:1", "http://b:2"]))
    assert parse(data).upstreams["backend"].targets == (
        Target("http", "a", 1),
        Target("http", "a", 1),
        Target("http", "b", 2),
    )


def test_authz_is_off_by_default_and_takes_its_own_addresses() -> None:
    assert parse(base()).authz == AuthzConfig(listen=(), path_prefix="/")
    cfg = parse(with_(lambda d: d.update(
        server={"listen": ["0.0.0.0:8080", "[::]:8080"]},
        admin={"listen": "127.0.0.1:9901"},
        # Another port of the same wildcard, and the IPv6 loopback beside an IPv4 wildcard (the
        # sockets are IPv6-only, so "[::]:8081" and "0.0.0.0:8081" are two sockets).
        authz={"listen": ["127.0.0.1:8090", "[::1]:8091"], "path_prefix": "/authz"},
    )))
    assert cfg.authz == AuthzConfig(listen=(ListenAddr("127.0.0.1", 8090), ListenAddr("::1", 8091)), path_prefix="/authz")


def test_client_cert_header_without_trusted_proxies_serves_an_authz_listener() -> None:
    # Believed from an authz listener's peer (the front proxy), so not pointless without trusted_proxies.
    cfg = parse(with_(lambda d: d.update(server={"client_cert_header": "X-Client-Cert"},
                                         authz={"listen": ["127.0.0.1:8090"]})))
    assert cfg.server.client_cert_header == "x-client-cert"
    assert problems(with_(lambda d: d.update(server={"client_cert_header": "X-Client-Cert"}))) == [
        f"{F}: server.client_cert_header: is only believed from trusted_proxies, which is empty"
    ]


def test_authz_and_traffic_may_both_ask_for_port_zero() -> None:
    cfg = parse(with_(lambda d: d.update(server={"listen": ["127.0.0.1:0"]}, authz={"listen": ["127.0.0.1:0"]})))
    assert cfg.authz.listen == (ListenAddr("127.0.0.1", 0),)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("127.0.0.1:80", "127.0.0.1:80", True),
        ("127.0.0.1:80", "127.0.0.1:81", False),
        ("0.0.0.0:80", "127.0.0.2:80", True),
        ("127.0.0.2:80", "0.0.0.0:80", True),
        ("127.0.0.1:80", "127.0.0.2:80", False),
        ("[::]:80", "[::1]:80", True),
        ("[::]:80", "0.0.0.0:80", False),  # bound IPv6-only
        ("[::]:80", "127.0.0.1:80", False),
        ("localhost:80", "127.0.0.1:80", True),  # a name could resolve to anything
        ("localhost:80", "localhost:81", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),  # port 0: the OS picks two ports
    ],
)
def test_listeners_overlap(a: str, b: str, overlap: bool) -> None:
    from jwtproxy.config import _parse_listen

    left, right = _parse_listen(a), _parse_listen(b)
    assert isinstance(left, ListenAddr) and isinstance(right, ListenAddr)
    assert listeners_overlap(left, right) is overlap
    assert listeners_overlap(right, left) is overlap


def test_listen_port_zero_is_allowed_for_tests() -> None:
    cfg = parse(with_(lambda d: d.update(server={"listen": ["127.0.0.1:0"]}, admin={"listen": "127.0.0.1:0"})))
    assert cfg.server.listen == (ListenAddr("127.0.0.1", 0),)
    assert cfg.admin.listen == ListenAddr("127.0.0.1", 0)


def test_default_config_path() -> None:
    assert default_config_path({}) == "jwtproxy.toml"
    assert default_config_path({"JWTPROXY_CONFIG": ""}) == "jwtproxy.toml"
    assert default_config_path({"JWTPROXY_CONFIG": "/etc/jwtproxy/gw.toml"}) == "/etc/jwtproxy/gw.toml"


# ----------------------------------------------------------------------------------------------
# env: secrets


def test_env_secrets_are_resolved() -> None:
    data = with_(lambda d: d.update(admin={"token": "env:ADM"}, revocation={"redis_url": "env:R"}))
    data["issuer"][0].update(algorithms=["HS256"], hs_secret="env:HS")
    cfg = parse(data, env={"ADM": "tok", "R": "redis://:pw@h:1/0", "HS": SECRET})
    assert cfg.admin.token == "tok"
    assert cfg.revocation.redis_url == "redis://:pw@h:1/0"
    assert cfg.issuers[0].hs_secret == SECRET.encode()


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWTPROXY_TEST_ADMIN", "from-environ")
    cfg = parse_config(with_(lambda d: d.update(admin={"token": "env:JWTPROXY_TEST_ADMIN"})), F)
    assert cfg.admin.token == "from-environ"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "environment variable 'ADM' is not set"),
        ({"ADM": ""}, "environment variable 'ADM' is empty"),
    ],
)
def test_env_secret_missing_or_empty(env: dict[str, str], expected: str) -> None:
    data = with_(lambda d: d.update(admin={"token": "env:ADM"}))
    assert problems(data, env) == [f"{F}: admin.token: {expected}"]


def test_env_secret_missing_for_each_secret_field() -> None:
    data = with_(lambda d: d.update(admin={"token": "env:A"}, revocation={"redis_url": "env:B"}))
    data["issuer"][0].update(algorithms=["HS256"], hs_secret="env:C")
    assert problems(data) == [
        f"{F}: admin.token: environment variable 'A' is not set",
        f"{F}: issuer[0].hs_secret: environment variable 'C' is not set",
        f"{F}: revocation.redis_url: environment variable 'B' is not set",
    ]


def test_env_secret_bad_name() -> None:
    data = with_(lambda d: d.update(admin={"token": "env:1-x"}))
    assert problems(data) == [f"{F}: admin.token: 'env:1-x' is not a valid environment variable name"]


def test_short_env_secret_is_checked_after_resolution() -> None:
    data = with_(lambda d: d["issuer"][0].update(algorithms=["HS256"], hs_secret="env:HS"))
    assert problems(data, {"HS": "short"}) == [f"{F}: issuer[0].hs_secret: must be at least 32 bytes, got 5"]


def test_secrets_are_not_in_repr() -> None:
    data = with_(lambda d: d.update(admin={"token": "ADMINSECRET"}, revocation={"redis_url": "redis://:PW@h/0"}))
    data["issuer"][0].update(algorithms=["HS256"], hs_secret="H" * 40)
    text = repr(parse(data))
    assert "ADMINSECRET" not in text and "PW" not in text and "HHHH" not in text


def test_secret_values_are_never_echoed_in_problems() -> None:
    data = with_(lambda d: d.update(revocation={"redis_url": "http://:TOPSECRET@h"}))
    data["issuer"][0].update(hs_secret="TOPSECRET")
    found = problems(data)
    assert len(found) == 2
    assert not any("TOPSECRET" in line for line in found)


# ----------------------------------------------------------------------------------------------
# One problem per mutation: the exact line, key path included

Mutation = Callable[[dict[str, Any]], object]


def _set(section: str, **values: Any) -> Mutation:
    return lambda d: d.setdefault(section, {}).update(values)


def _issuer(**values: Any) -> Mutation:
    return lambda d: d["issuer"][0].update(values)


def _route(**values: Any) -> Mutation:
    return lambda d: d["route"][0].update(values)


def _upstream(**values: Any) -> Mutation:
    return lambda d: d["upstream"]["backend"].update(values)


def _del_issuer_key(key: str) -> Mutation:
    return lambda d: d["issuer"][0].pop(key)


def _two_routes(**second: Any) -> Mutation:
    return lambda d: d["route"].append({"path_prefix": "/api", "upstream": "backend", **second})


def _second_issuer(**values: Any) -> Mutation:
    return lambda d: d["issuer"].append({**d["issuer"][0], **values})


CASES: list[tuple[str, Mutation, str]] = [
    # --- unknown keys, at every level
    ("root typo", lambda d: d.update(sever={}), "sever: unknown key (did you mean 'server'?)"),
    ("root unknown", lambda d: d.update(xyz=1), f"xyz: unknown key (known keys: {ROOT_KEYS})"),
    ("server typo", _set("server", wokers=2), "server.wokers: unknown key (did you mean 'workers'?)"),
    ("admin typo", _set("admin", tokn="x"), "admin.tokn: unknown key (did you mean 'token'?)"),
    ("token typo", _set("token", source=[]), "token.source: unknown key (did you mean 'sources'?)"),
    (
        "issuer typo",
        _issuer(requried_claims=["sub"]),
        "issuer[0].requried_claims: unknown key (did you mean 'required_claims'?)",
    ),
    ("route typo", _route(require_scope=["a"]), "route[0].require_scope: unknown key (did you mean 'require_scopes'?)"),
    ("route case typo", _route(Auth="off"), "route[0].Auth: unknown key (did you mean 'auth'?)"),
    ("upstream typo", _upstream(target=[]), "upstream.backend.target: unknown key (did you mean 'targets'?)"),
    ("revocation typo", _set("revocation", backnd="redis"), "revocation.backnd: unknown key (did you mean 'backend'?)"),
    (
        "quoted key path",
        _set("server", **{"max header": 1}),
        'server."max header": unknown key (did you mean \'max_header_bytes\'?)',
    ),
    # --- section shapes
    ("server not a table", lambda d: d.update(server=[]), "server: expected a table ([server]), got array"),
    ("admin not a table", lambda d: d.update(admin="x"), "admin: expected a table ([admin]), got string"),
    ("token not a table", lambda d: d.update(token=1), "token: expected a table ([token]), got integer"),
    (
        "revocation not a table",
        lambda d: d.update(revocation=True),
        "revocation: expected a table ([revocation]), got boolean",
    ),
    (
        "issuer as a table",
        lambda d: d.update(issuer={"name": "x"}),
        "issuer: expected an array of tables ([[issuer]]), got table",
    ),
    ("issuer entry not a table", lambda d: d["issuer"].append(1), "issuer[1]: expected a table, got integer"),
    ("route as a table", lambda d: d.update(route={}), "route: expected an array of tables ([[route]]), got table"),
    ("no route", lambda d: d.update(route=[]), "route: at least one [[route]] is required"),
    ("no route key", lambda d: d.pop("route"), "route: at least one [[route]] is required"),
    (
        "upstream as array",
        lambda d: d.update(upstream=[{}]),
        "upstream: expected tables like [upstream.NAME], got array",
    ),
    (
        "upstream entry not a table",
        lambda d: d["upstream"].update(x=1),
        "upstream.x: expected a table ([upstream.NAME]), got integer",
    ),
    (
        "upstream bad name",
        lambda d: d["upstream"].update({"a b": {"targets": ["http://a"]}}),
        "upstream.\"a b\": upstream names may only contain letters, digits, '_', '.' and '-'",
    ),
    # --- server: types and ranges
    ("workers bool", _set("server", workers=True), 'server.workers: expected an integer or "auto", got boolean'),
    ("workers string", _set("server", workers="four"), "server.workers: expected an integer or \"auto\", got 'four'"),
    ("workers float", _set("server", workers=2.0), 'server.workers: expected an integer or "auto", got float'),
    ("workers zero", _set("server", workers=0), "server.workers: must be at least 1, got 0"),
    ("size float", _set("server", max_body_bytes=1.5), "server.max_body_bytes: expected an integer, got float"),
    ("size bool", _set("server", max_body_bytes=True), "server.max_body_bytes: expected an integer, got boolean"),
    ("size negative", _set("server", max_body_bytes=-1), "server.max_body_bytes: must be at least 0, got -1"),
    ("header size zero", _set("server", max_header_bytes=0), "server.max_header_bytes: must be at least 1, got 0"),
    (
        "duration string",
        _set("server", header_timeout="10s"),
        "server.header_timeout: expected a number of seconds, got string",
    ),
    (
        "duration bool",
        _set("server", shutdown_timeout=False),
        "server.shutdown_timeout: expected a number of seconds, got boolean",
    ),
    ("duration negative", _set("server", keepalive_timeout=-1), "server.keepalive_timeout: must not be negative, got -1"),
    (
        "duration inf",
        _set("server", shutdown_timeout=float("inf")),
        "server.shutdown_timeout: must be a finite number of seconds",
    ),
    (
        "duration nan",
        _set("server", keepalive_timeout=float("nan")),
        "server.keepalive_timeout: must be a finite number of seconds",
    ),
    ("header timeout zero", _set("server", header_timeout=0), "server.header_timeout: must be greater than 0, got 0"),
    ("bool as string", _set("server", access_log="yes"), "server.access_log: expected true or false, got string"),
    ("bool as int", _set("server", access_log=1), "server.access_log: expected true or false, got integer"),
    (
        "http_parser typo",
        _set("server", http_parser="httptool"),
        "server.http_parser: expected one of 'httptools', 'h11', got 'httptool' (did you mean 'httptools'?)",
    ),
    (
        "http_parser type",
        _set("server", http_parser=1),
        "server.http_parser: expected one of 'httptools', 'h11', got integer",
    ),
    ("tls_cert only", _set("server", tls_cert="c.pem"), "server.tls_key: tls_cert is set, so tls_key is required too"),
    ("tls_key only", _set("server", tls_key="k.pem"), "server.tls_cert: tls_key is set, so tls_cert is required too"),
    ("tls_cert type", _set("server", tls_cert=1), "server.tls_cert: expected a string, got integer"),
    # --- listen addresses
    ("listen string", _set("server", listen="127.0.0.1:80"), "server.listen: expected an array of strings, got string"),
    ("listen empty", _set("server", listen=[]), "server.listen: must not be empty"),
    ("listen int", _set("server", listen=[8080]), "server.listen[0]: expected a string, got integer"),
    (
        "listen no port",
        _set("server", listen=["127.0.0.1"]),
        'server.listen[0]: expected "host:port", e.g. "127.0.0.1:8080" (or "[::]:8080" for IPv6)',
    ),
    (
        "listen bare v6",
        _set("server", listen=["::1:8080"]),
        'server.listen[0]: an IPv6 address must be in brackets, e.g. "[::1]:8080"',
    ),
    (
        "listen v6 no colon",
        _set("server", listen=["[::1]8080"]),
        'server.listen[0]: expected "[IPv6]:port", e.g. "[::]:8080"',
    ),
    (
        "listen v6 unclosed",
        _set("server", listen=["[::1:8080"]),
        "server.listen[0]: missing ']' after the IPv6 address",
    ),
    ("listen v6 bad", _set("server", listen=["[zz]:80"]), "server.listen[0]: 'zz' is not an IPv6 address"),
    (
        "listen no host",
        _set("server", listen=[":8080"]),
        'server.listen[0]: missing host; use "0.0.0.0:PORT" or "[::]:PORT" for every interface',
    ),
    ("listen bad host", _set("server", listen=["bad!host:80"]), "server.listen[0]: 'bad!host' is not a valid host"),
    ("listen port name", _set("server", listen=["127.0.0.1:http"]), "server.listen[0]: port 'http' is not a number"),
    ("listen port empty", _set("server", listen=["127.0.0.1:"]), "server.listen[0]: port '' is not a number"),
    (
        "listen port range",
        _set("server", listen=["127.0.0.1:65536"]),
        "server.listen[0]: port 65536 is out of range 0-65535",
    ),
    (
        "listen duplicate",
        _set("server", listen=["127.0.0.1:80", "127.0.0.1:80"]),
        "server.listen[1]: duplicate value '127.0.0.1:80'",
    ),
    (
        "listen duplicate spelled differently",
        _set("server", listen=["[::]:80", "[0::0]:80"]),
        "server.listen[1]: duplicate address '[0::0]:80'",
    ),
    # --- [authz]: its own addresses, never a traffic or admin listener, a prefix in normal form
    ("authz typo", _set("authz", lissen=[]), "authz.lissen: unknown key (did you mean 'listen'?)"),
    ("authz listen type", _set("authz", listen="127.0.0.1:8090"), "authz.listen: expected an array of strings, got string"),
    ("authz listen bad", _set("authz", listen=["8090"]), 'authz.listen[0]: expected "host:port", e.g. "127.0.0.1:8080" (or "[::]:8080" for IPv6)'),
    (
        "authz listen duplicate spelled differently",
        _set("authz", listen=["[::1]:8090", "[0:0::1]:8090"]),
        "authz.listen[1]: duplicate address '[0:0::1]:8090'",
    ),
    (
        "authz on a traffic listener",
        lambda d: d.update(server={"listen": ["127.0.0.1:8080"]}, authz={"listen": ["127.0.0.1:8080"]}),
        "authz.listen[0]: '127.0.0.1:8080' overlaps server.listen '127.0.0.1:8080': "
        "the authz listener must never be a traffic listener",
    ),
    (
        "authz inside a wildcard traffic listener",
        lambda d: d.update(server={"listen": ["0.0.0.0:8080"]}, authz={"listen": ["127.0.0.1:8080"]}),
        "authz.listen[0]: '127.0.0.1:8080' overlaps server.listen '0.0.0.0:8080': "
        "the authz listener must never be a traffic listener",
    ),
    (
        "authz wildcard over a traffic listener",
        lambda d: d.update(server={"listen": ["[::1]:8080"]}, authz={"listen": ["[::]:8080"]}),
        "authz.listen[0]: '[::]:8080' overlaps server.listen '[::1]:8080': "
        "the authz listener must never be a traffic listener",
    ),
    (
        "authz host name on a traffic port",
        lambda d: d.update(server={"listen": ["127.0.0.1:8080"]}, authz={"listen": ["localhost:8080"]}),
        "authz.listen[0]: 'localhost:8080' overlaps server.listen '127.0.0.1:8080': "
        "the authz listener must never be a traffic listener",
    ),
    (
        "authz on the admin listener",
        lambda d: d.update(admin={"listen": "127.0.0.1:9901"}, authz={"listen": ["0.0.0.0:9901"]}),
        "authz.listen[0]: '0.0.0.0:9901' overlaps admin.listen '127.0.0.1:9901'",
    ),
    ("authz prefix type", _set("authz", path_prefix=1), "authz.path_prefix: expected a string, got integer"),
    ("authz prefix relative", _set("authz", path_prefix="authz"), "authz.path_prefix: must start with '/', got 'authz'"),
    (
        "authz prefix not normal",
        _set("authz", path_prefix="/a//b/./c"),
        "authz.path_prefix: '/a//b/./c' is not in normal form (write '/a/b/c')",
    ),
    (
        "authz prefix invalid",
        _set("authz", path_prefix="/a%2Fb"),
        "authz.path_prefix: '/a%2Fb' is not a valid path: encoded '/' (%2F) in path",
    ),
    ("admin listen bad", _set("admin", listen="9901"), 'admin.listen: expected "host:port", e.g. "127.0.0.1:8080" (or "[::]:8080" for IPv6)'),
    ("admin listen type", _set("admin", listen=["127.0.0.1:1"]), "admin.listen: expected a string, got array"),
    (
        "admin listen clash",
        _set("admin", listen="127.0.0.1:8080"),
        "admin.listen: '127.0.0.1:8080' is also in server.listen",
    ),
    ("admin token type", _set("admin", token=123), "admin.token: expected a string, got integer"),
    # --- token
    ("token max_bytes zero", _set("token", max_bytes=0), "token.max_bytes: must be at least 1, got 0"),
    ("cache_size negative", _set("token", cache_size=-5), "token.cache_size: must be at least 0, got -5"),
    ("sources empty", _set("token", sources=[]), "token.sources: must not be empty"),
    (
        "source kind",
        _set("token", sources=["bearer:x"]),
        'token.sources[0]: expected "header:NAME", "query:NAME" or "cookie:NAME", got \'bearer:x\' '
        "(did you mean 'header'?)",
    ),
    (
        "source no colon",
        _set("token", sources=["authorization"]),
        'token.sources[0]: expected "header:NAME", "query:NAME" or "cookie:NAME", got \'authorization\'',
    ),
    ("source no name", _set("token", sources=["cookie:"]), "token.sources[0]: missing the cookie name after 'cookie:'"),
    (
        "source bad header",
        _set("token", sources=["header:x token"]),
        "token.sources[0]: 'x token' is not a valid header name",
    ),
    (
        "source duplicate",
        _set("token", sources=["header:authorization", "header:Authorization"]),
        "token.sources[1]: duplicate source 'header:Authorization'",
    ),
    # --- issuers
    ("issuer name missing", _del_issuer_key("name"), "issuer[0].name: is required"),
    ("issuer name empty", _issuer(name=""), "issuer[0].name: must not be empty"),
    (
        "issuer name chars",
        _issuer(name="corp idp"),
        "issuer[0].name: 'corp idp' may only contain letters, digits, '_', '.' and '-'",
    ),
    (
        "issuer name duplicate",
        _second_issuer(issuer="https://other"),
        "issuer[1].name: duplicate issuer name 'corp' (also issuer[0])",
    ),
    (
        "issuer value duplicate",
        _second_issuer(name="corp2"),
        "issuer[1].issuer: 'https://idp.example.com' is already configured by issuer[0]",
    ),
    ("issuer missing", _del_issuer_key("issuer"), "issuer[0].issuer: is required"),
    ("issuer empty", _issuer(issuer=""), "issuer[0].issuer: must not be empty"),
    ("issuer type", _issuer(issuer=1), "issuer[0].issuer: expected a string, got integer"),
    ("no key source", _del_issuer_key("jwks_uri"),
     "issuer[0]: one of jwks_uri, discovery or jwks_file is required (or introspection_endpoint)"),
    ("empty key source", _issuer(jwks_uri=""),
     "issuer[0]: one of jwks_uri, discovery or jwks_file is required (or introspection_endpoint)"),
    (
        "two key sources",
        _issuer(jwks_file="/k.json"),
        "issuer[0]: set only one of jwks_uri, discovery or jwks_file (got jwks_uri and jwks_file)",
    ),
    (
        "three key sources",
        _issuer(jwks_file="/k.json", discovery="https://x/"),
        "issuer[0]: set only one of jwks_uri, discovery or jwks_file (got jwks_uri and discovery and jwks_file)",
    ),
    ("jwks_uri scheme", _issuer(jwks_uri="ftp://x/jwks"), "issuer[0].jwks_uri: expected an http:// or https:// URL"),
    ("jwks_uri relative", _issuer(jwks_uri="/jwks.json"), "issuer[0].jwks_uri: expected an http:// or https:// URL"),
    (
        "jwks_uri bad port",
        _issuer(jwks_uri="https://x:99999/"),
        "issuer[0].jwks_uri: not a valid URL (Port out of range 0-65535)",
    ),
    (
        "discovery not url",
        lambda d: d["issuer"][0].update(jwks_uri="", discovery="idp.example.com"),
        "issuer[0].discovery: expected an http:// or https:// URL",
    ),
    ("jwks_file type", _issuer(jwks_uri="", jwks_file=1), "issuer[0].jwks_file: expected a string, got integer"),
    ("audiences missing", _del_issuer_key("audiences"), "issuer[0].audiences: is required"),
    ("audiences empty", _issuer(audiences=[]), "issuer[0].audiences: must not be empty"),
    ("audiences string", _issuer(audiences="api"), "issuer[0].audiences: expected an array of strings, got string"),
    ("audience int", _issuer(audiences=[1]), "issuer[0].audiences[0]: expected a string, got integer"),
    ("audience empty", _issuer(audiences=["api", ""]), "issuer[0].audiences[1]: must not be empty"),
    ("audience duplicate", _issuer(audiences=["api", "api"]), "issuer[0].audiences[1]: duplicate value 'api'"),
    ("alg none", _issuer(algorithms=["RS256", "none"]), "issuer[0].algorithms[1]: 'none' (unsigned tokens) is never allowed"),
    ("alg None", _issuer(algorithms=["None"]), "issuer[0].algorithms[0]: 'none' (unsigned tokens) is never allowed"),
    (
        "alg case",
        _issuer(algorithms=["rs256"]),
        f"issuer[0].algorithms[0]: unknown algorithm 'rs256' (did you mean 'RS256'?); known: {ALL_ALGS}",
    ),
    (
        "alg unknown",
        _issuer(algorithms=["XYZ"]),
        f"issuer[0].algorithms[0]: unknown algorithm 'XYZ'; known: {ALL_ALGS}",
    ),
    ("alg empty list", _issuer(algorithms=[]), "issuer[0].algorithms: must not be empty"),
    ("alg duplicate", _issuer(algorithms=["RS256", "RS256"]), "issuer[0].algorithms[1]: duplicate value 'RS256'"),
    ("HS without secret", _issuer(algorithms=["RS256", "HS256", "HS512"]), "issuer[0].algorithms: HS256, HS512 needs hs_secret"),
    (
        "secret without HS",
        _issuer(hs_secret=SECRET),
        "issuer[0].hs_secret: set, but algorithms has no HS256, HS384 or HS512",
    ),
    (
        "secret without HS (default algs)",
        _issuer(hs_secret=SECRET, algorithms=["ES256"]),
        "issuer[0].hs_secret: set, but algorithms has no HS256, HS384 or HS512",
    ),
    (
        "secret short",
        _issuer(algorithms=["HS256"], hs_secret="s" * 31),
        "issuer[0].hs_secret: must be at least 32 bytes, got 31",
    ),
    (
        "secret short in bytes",
        _issuer(algorithms=["HS384"], hs_secret="é" * 15),
        "issuer[0].hs_secret: must be at least 32 bytes, got 30",
    ),
    ("secret type", _issuer(algorithms=["HS256"], hs_secret=12), "issuer[0].hs_secret: expected a string, got integer"),
    ("leeway negative", _issuer(leeway=-1), "issuer[0].leeway: must not be negative, got -1"),
    ("max_lifetime type", _issuer(max_lifetime="1h"), "issuer[0].max_lifetime: expected a number of seconds, got string"),
    ("jwks_refresh zero", _issuer(jwks_refresh=0), "issuer[0].jwks_refresh: must be greater than 0, got 0"),
    ("jwks_cooldown negative", _issuer(jwks_cooldown=-0.5), "issuer[0].jwks_cooldown: must not be negative, got -0.5"),
    ("required_claims item", _issuer(required_claims=[1]), "issuer[0].required_claims[0]: expected a string, got integer"),
    ("typ string", _issuer(typ="at+jwt"), "issuer[0].typ: expected an array of strings, got string"),
    # --- routes
    ("path_prefix missing", lambda d: d["route"][0].pop("path_prefix"), "route[0].path_prefix: is required"),
    ("path_prefix empty", _route(path_prefix=""), "route[0].path_prefix: must not be empty"),
    ("path_prefix no slash", _route(path_prefix="api"), "route[0].path_prefix: must start with '/', got 'api'"),
    (
        "path_prefix dot segment",
        _route(path_prefix="/a/../b"),
        "route[0].path_prefix: must be a normalised path: no '//', '.' or '..' segments",
    ),
    (
        "path_prefix double slash",
        _route(path_prefix="//a"),
        "route[0].path_prefix: must be a normalised path: no '//', '.' or '..' segments",
    ),
    (
        "path_prefix percent-encoded unreserved",
        _route(path_prefix="/%7euser"),
        "route[0].path_prefix: must be written in normalised form: '/~user'",
    ),
    (
        "path_prefix encoded slash",
        _route(path_prefix="/a%2Fb"),
        "route[0].path_prefix: is not a valid path: encoded '/' (%2F) in path",
    ),
    (
        "path_prefix query",
        _route(path_prefix="/a?x=1"),
        "route[0].path_prefix: must be a plain path: no query, fragment, spaces or control characters",
    ),
    (
        "path_prefix space",
        _route(path_prefix="/a b"),
        "route[0].path_prefix: must be a plain path: no query, fragment, spaces or control characters",
    ),
    (
        "host with port",
        _route(host="api.example.com:8080"),
        "route[0].host: expected an exact host or \"*.suffix\" (no port), got 'api.example.com:8080'",
    ),
    (
        "host inner wildcard",
        _route(host="a.*.com"),
        "route[0].host: expected an exact host or \"*.suffix\" (no port), got 'a.*.com'",
    ),
    ("host type", _route(host=["a"]), "route[0].host: expected a string, got array"),
    ("upstream missing", lambda d: d["route"][0].pop("upstream"), "route[0].upstream: is required"),
    ("upstream unknown", _route(upstream="pay"), "route[0].upstream: unknown upstream 'pay' (configured: backend)"),
    ("upstream typo", _route(upstream="backnd"), "route[0].upstream: unknown upstream 'backnd' (did you mean 'backend'?)"),
    (
        "upstream none configured",
        lambda d: d.pop("upstream"),
        "route[0].upstream: unknown upstream 'backend' (no [upstream] is configured)",
    ),
    (
        "auth value",
        _route(auth="Required"),
        "route[0].auth: expected one of 'required', 'optional', 'off', got 'Required' (did you mean 'required'?)",
    ),
    ("auth without issuers", lambda d: d.pop("issuer"), "route[0].auth: 'required' needs at least one [[issuer]]"),
    (
        "optional auth without issuers",
        lambda d: (d.pop("issuer"), d["route"][0].update(auth="optional")),
        "route[0].auth: 'optional' needs at least one [[issuer]]",
    ),
    ("issuers unknown", _route(issuers=["corpp"]), "route[0].issuers[0]: unknown issuer 'corpp' (did you mean 'corp'?)"),
    ("issuers unknown far", _route(issuers=["zzz"]), "route[0].issuers[0]: unknown issuer 'zzz' (configured: corp)"),
    ("issuers string", _route(issuers="corp"), "route[0].issuers: expected an array of strings, got string"),
    (
        "scope with space",
        _route(require_scopes=["read write"]),
        "route[0].require_scopes[0]: a scope cannot contain whitespace; list each scope separately",
    ),
    ("scope empty", _route(require_scopes=[""]), "route[0].require_scopes[0]: must not be empty"),
    (
        "require_claims type",
        _route(require_claims="role"),
        "route[0].require_claims: expected a table of claim = [values], got string",
    ),
    (
        "require_claims empty list",
        _route(require_claims={"role": []}),
        "route[0].require_claims.role: must not be empty (no value could ever match)",
    ),
    (
        "require_claims int value",
        _route(require_claims={"role": 5}),
        "route[0].require_claims.role: expected a string or an array of strings, got integer",
    ),
    (
        "require_claims int item",
        _route(require_claims={"role": ["admin", 1]}),
        "route[0].require_claims.role[1]: expected a string, got integer",
    ),
    (
        "require_claims empty name",
        _route(require_claims={"": ["x"]}),
        'route[0].require_claims."": claim name must not be empty',
    ),
    (
        "scopes on auth off",
        _route(auth="off", require_scopes=["a"]),
        'route[0].require_scopes: has no effect with auth = "off"',
    ),
    (
        "claims on auth off",
        _route(auth="off", require_claims={"role": "admin"}),
        'route[0].require_claims: has no effect with auth = "off"',
    ),
    ("issuers on auth off", _route(auth="off", issuers=["corp"]), 'route[0].issuers: has no effect with auth = "off"'),
    ("forward_token type", _route(forward_token="no"), "route[0].forward_token: expected true or false, got string"),
    ("strip_prefix type", _route(strip_prefix=0), "route[0].strip_prefix: expected true or false, got integer"),
    (
        "cors_preflight value",
        _route(cors_preflight="skip"),
        "route[0].cors_preflight: expected one of 'forward', 'auth', got 'skip'",
    ),
    ("duplicate route", _two_routes(), "route[1]: same host and path_prefix as route[0]"),
    (
        "duplicate route host case",
        lambda d: (d["route"][0].update(host="a.example.com"), d["route"].append(
            {"path_prefix": "/api", "upstream": "backend", "host": "A.example.com"}
        )),
        "route[1]: same host and path_prefix as route[0]",
    ),
    # --- upstreams
    ("targets missing", lambda d: d["upstream"]["backend"].pop("targets"), "upstream.backend.targets: is required"),
    ("targets empty", _upstream(targets=[]), "upstream.backend.targets: must not be empty"),
    ("targets string", _upstream(targets="http://a:1"), "upstream.backend.targets: expected an array of URLs, got string"),
    ("target int", _upstream(targets=[1]), "upstream.backend.targets[0]: expected a string, got integer"),
    (
        "target no scheme",
        _upstream(targets=["127.0.0.1:9001"]),
        'upstream.backend.targets[0]: expected an http:// or https:// URL like "http://127.0.0.1:9001"',
    ),
    (
        "target ftp",
        _upstream(targets=["ftp://a"]),
        'upstream.backend.targets[0]: expected an http:// or https:// URL like "http://127.0.0.1:9001"',
    ),
    (
        "target no host",
        _upstream(targets=["http://"]),
        'upstream.backend.targets[0]: expected an http:// or https:// URL like "http://127.0.0.1:9001"',
    ),
    (
        "target path",
        _upstream(targets=["http://a:1/api"]),
        "upstream.backend.targets[0]: must not have a path (got '/api'); routes decide the path (see strip_prefix)",
    ),
    ("target query", _upstream(targets=["http://a:1/?x=1"]), "upstream.backend.targets[0]: must not have a query or fragment"),
    ("target fragment", _upstream(targets=["http://a:1#f"]), "upstream.backend.targets[0]: must not have a query or fragment"),
    ("target credentials", _upstream(targets=["http://u:p@a:1"]), "upstream.backend.targets[0]: must not contain credentials"),
    ("target port zero", _upstream(targets=["http://a:0"]), "upstream.backend.targets[0]: port is not a number in range 1-65535"),
    (
        "target port range",
        _upstream(targets=["http://a:70000"]),
        "upstream.backend.targets[0]: port is not a number in range 1-65535",
    ),
    ("target port text", _upstream(targets=["http://a:xx"]), "upstream.backend.targets[0]: port is not a number in range 1-65535"),
    (
        "target bad IPv6",
        _upstream(targets=["http://[::1:80"]),
        "upstream.backend.targets[0]: not a valid URL (Invalid IPv6 URL); expected an http:// or https:// URL like "
        '"http://127.0.0.1:9001"',
    ),
    ("target bad host", _upstream(targets=["http://a!b:80"]), "upstream.backend.targets[0]: 'a!b' is not a valid host"),
    ("connect_timeout zero", _upstream(connect_timeout=0), "upstream.backend.connect_timeout: must be greater than 0, got 0"),
    ("response_timeout negative", _upstream(response_timeout=-1), "upstream.backend.response_timeout: must be greater than 0, got -1"),
    ("idle_timeout type", _upstream(idle_timeout="60"), "upstream.backend.idle_timeout: expected a number of seconds, got string"),
    ("max_idle negative", _upstream(max_idle=-1), "upstream.backend.max_idle: must be at least 0, got -1"),
    ("max_idle bool", _upstream(max_idle=True), "upstream.backend.max_idle: expected an integer, got boolean"),
    ("preserve_host type", _upstream(preserve_host="yes"), "upstream.backend.preserve_host: expected true or false, got string"),
    # --- claims_to_headers
    (
        "claims_to_headers type",
        lambda d: d.update(claims_to_headers=["x"]),
        "claims_to_headers: expected a table of header = claim, got array",
    ),
    (
        "header not a token",
        lambda d: d.update(claims_to_headers={"x user": "sub"}),
        "claims_to_headers.\"x user\": 'x user' is not a valid HTTP header name",
    ),
    (
        "header claim type",
        lambda d: d.update(claims_to_headers={"x-user": 1}),
        "claims_to_headers.x-user: expected a claim name (string), got integer",
    ),
    (
        "header claim empty",
        lambda d: d.update(claims_to_headers={"x-user": ""}),
        "claims_to_headers.x-user: claim name must not be empty",
    ),
    (
        "header duplicate by case",
        lambda d: d.update(claims_to_headers={"x-user": "sub", "X-User": "sub"}),
        "claims_to_headers.X-User: duplicate header (same as claims_to_headers.x-user; header names are "
        "case-insensitive)",
    ),
    (
        "header is a token source",
        lambda d: d.update(claims_to_headers={"x-api-token": "sub"}, token={"sources": ["header:X-Api-Token"]}),
        "claims_to_headers.x-api-token: 'x-api-token' is also a token source in token.sources",
    ),
    (
        "underscore spelling of framing header",
        lambda d: d.update(claims_to_headers={"Content_Length": "sub"}),
        "claims_to_headers.Content_Length: 'content_length' is a hop-by-hop, framing, credential or "
        "gateway-managed header; it cannot carry a claim",
    ),
    # --- revocation
    (
        "backend value",
        _set("revocation", backend="postgres"),
        "revocation.backend: expected one of 'sqlite', 'redis', got 'postgres'",
    ),
    ("sqlite_path empty", _set("revocation", sqlite_path=""), 'revocation.sqlite_path: must not be empty with backend = "sqlite"'),
    (
        "redis_url empty",
        _set("revocation", backend="redis", redis_url=""),
        'revocation.redis_url: must not be empty with backend = "redis"',
    ),
    ("redis_url scheme", _set("revocation", redis_url="http://h:6379"), "revocation.redis_url: expected a redis://, rediss:// or unix:// URL"),
    ("redis_url type", _set("revocation", redis_url=6379), "revocation.redis_url: expected a string, got integer"),
    # --- tracing
    ("tracing typo", _set("tracing", otlp_endpoit=""), "tracing.otlp_endpoit: unknown key (did you mean 'otlp_endpoint'?)"),
    (
        "otlp_endpoint scheme",
        _set("tracing", otlp_endpoint="grpc://collector:4317"),
        "tracing.otlp_endpoint: expected an http:// or https:// URL "
        "(the full traces URL, e.g. http://127.0.0.1:4318/v1/traces)",
    ),
    ("sample_ratio above 1", _set("tracing", sample_ratio=1.5), "tracing.sample_ratio: must be from 0 to 1, got 1.5"),
    ("sample_ratio negative", _set("tracing", sample_ratio=-0.1), "tracing.sample_ratio: must be from 0 to 1, got -0.1"),
    ("sample_ratio nan", _set("tracing", sample_ratio=float("nan")), "tracing.sample_ratio: must be from 0 to 1, got nan"),
    ("sample_ratio type", _set("tracing", sample_ratio="0.5"), "tracing.sample_ratio: expected a number from 0 to 1, got string"),
    ("sample_ratio bool", _set("tracing", sample_ratio=True), "tracing.sample_ratio: expected a number from 0 to 1, got boolean"),
    ("service_name empty", _set("tracing", service_name=" "), "tracing.service_name: must not be empty"),
    # --- rate limits
    ("rate_limit type", _route(rate_limit=5), "route[0].rate_limit: expected a table ([route[0].rate_limit]), got integer"),
    ("rate_limit requests missing", _route(rate_limit={"per": 1}), "route[0].rate_limit.requests: is required"),
    ("rate_limit per missing", _route(rate_limit={"requests": 1}), "route[0].rate_limit.per: is required"),
    (
        "rate_limit requests zero",
        _route(rate_limit={"requests": 0, "per": 1}),
        "route[0].rate_limit.requests: must be at least 1, got 0",
    ),
    (
        "rate_limit per zero",
        _route(rate_limit={"requests": 1, "per": 0}),
        "route[0].rate_limit.per: must be greater than 0, got 0",
    ),
    (
        "rate_limit burst negative",
        _route(rate_limit={"requests": 1, "per": 1, "burst": -1}),
        "route[0].rate_limit.burst: must be at least 0, got -1",
    ),
    (
        "rate_limit unknown key",
        _route(rate_limit={"requests": 1, "per": 1, "brust": 2}),
        "route[0].rate_limit.brust: unknown key (did you mean 'burst'?)",
    ),
    (
        "rate_limit key empty",
        _route(rate_limit={"requests": 1, "per": 1, "key": ""}),
        'route[0].rate_limit.key: must not be empty: a claim name, "client_ip" or "token"',
    ),
    (
        "rate_limit key not ascii",
        _route(rate_limit={"requests": 1, "per": 1, "key": "sübject"}),
        "route[0].rate_limit.key: a claim name here must be printable ASCII (it is named in the RateLimit "
        "response fields)",
    ),
    (
        "rate_limit claim on auth off",
        _route(auth="off", rate_limit={"requests": 1, "per": 1, "key": "sub"}),
        'route[0].rate_limit.key: \'sub\' is a claim, but the route has auth = "off" (use "client_ip" or '
        '"token")',
    ),
    # --- limits
    ("limits backend", _set("limits", backend="memcached"), "limits.backend: expected one of 'local', 'redis', got 'memcached'"),
    ("limits redis_url scheme", _set("limits", redis_url="http://h"), "limits.redis_url: expected a redis://, rediss:// or unix:// URL"),
    (
        "limits redis without any url",
        lambda d: d.update(revocation={"redis_url": ""}, limits={"backend": "redis"}),
        'limits.redis_url: must not be empty with backend = "redis" (nor revocation.redis_url)',
    ),
    ("limits failures negative", _set("limits", failures_per_ip=-1), "limits.failures_per_ip: must be at least 0, got -1"),
    ("limits max_connections zero", _set("limits", max_connections=0), "limits.max_connections: must be at least 1, got 0"),
    (
        "limits upstream_max_connections zero",
        _set("limits", upstream_max_connections=0),
        "limits.upstream_max_connections: must be at least 1, got 0",
    ),
    ("limits not a table", lambda d: d.update(limits=[]), "limits: expected a table ([limits]), got array"),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_problem_is_reported_exactly(mutate: Mutation, expected: str) -> None:
    assert problems(with_(mutate)) == [f"{F}: {expected}"]


RESERVED = [
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "authorization", "proxy-authorization", "cookie", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "x-request-id", "forwarded", "expect", "proxy-connection", "proxy-authenticate",
]  # fmt: skip


@pytest.mark.parametrize("header", RESERVED)
def test_claims_cannot_map_onto_reserved_headers(header: str) -> None:
    spelled = header.title()  # also caught when written in mixed case
    data = with_(lambda d: d.update(claims_to_headers={spelled: "sub"}))
    assert problems(data) == [
        f"{F}: claims_to_headers.{spelled}: '{header}' is a hop-by-hop, framing, credential or gateway-managed "
        "header; it cannot carry a claim"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::]:8080", ListenAddr("::", 8080)),
        ("[fe80::1]:1", ListenAddr("fe80::1", 1)),
        ("0.0.0.0:80", ListenAddr("0.0.0.0", 80)),
        ("LocalHost:65535", ListenAddr("localhost", 65535)),
    ],
)
def test_listen_forms(text: str, expected: ListenAddr) -> None:
    assert parse(with_(lambda d: d.update(server={"listen": [text]}))).server.listen == (expected,)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://a", Target("http", "a", 80)),
        ("https://a/", Target("https", "a", 443)),
        ("HTTPS://A.Example:8443", Target("https", "a.example", 8443)),
        ("http://[::1]:9000", Target("http", "::1", 9000)),
        ("http://my_service:8080", Target("http", "my_service", 8080)),
    ],
)
def test_target_forms(url: str, expected: Target) -> None:
    data = with_(_upstream(targets=[url]))
    assert parse(data).upstreams["backend"].targets == (expected,)


def test_token_sources_forms() -> None:
    data = with_(_set("token", sources=["header:X-Token", "query:Access_Token", "cookie:Sess"]))
    assert parse(data).token.sources == (
        TokenSource("header", "x-token"),
        TokenSource("query", "Access_Token"),
        TokenSource("cookie", "Sess"),
    )


def test_require_claims_single_string_and_duplicates_collapse() -> None:
    data = with_(_route(require_claims={"role": "admin", "tier": ["gold", "gold", "silver"]}))
    assert parse(data).routes[0].require_claims == (("role", ("admin",)), ("tier", ("gold", "silver")))


# ----------------------------------------------------------------------------------------------
# Many problems at once


def test_every_problem_is_reported_together() -> None:
    data = base()
    data["server"] = {"workers": 0, "listn": ["x"], "tls_cert": "c.pem"}
    data["issuer"][0].update(algorithms=["none", "HS256"], audiences=[])
    data["route"].append({"path_prefix": "pay", "upstream": "pay", "auth": "maybe"})
    data["upstream"]["backend"]["targets"] = ["http://a/x"]
    data["claims_to_headers"] = {"Host": "sub"}
    data["revocation"] = {"backend": "redis", "redis_url": "env:NOPE"}
    assert problems(data) == [
        f"{F}: server.listn: unknown key (did you mean 'listen'?)",
        f"{F}: server.workers: must be at least 1, got 0",
        f"{F}: server.tls_key: tls_cert is set, so tls_key is required too",
        f"{F}: issuer[0].audiences: must not be empty",
        f"{F}: issuer[0].algorithms[0]: 'none' (unsigned tokens) is never allowed",
        f"{F}: issuer[0].algorithms: HS256 needs hs_secret",
        f"{F}: upstream.backend.targets[0]: must not have a path (got '/x'); routes decide the path (see strip_prefix)",
        f"{F}: route[1].path_prefix: must start with '/', got 'pay'",
        f"{F}: route[1].upstream: unknown upstream 'pay' (configured: backend)",
        f"{F}: route[1].auth: expected one of 'required', 'optional', 'off', got 'maybe'",
        f"{F}: claims_to_headers.Host: 'host' is a hop-by-hop, framing, credential or gateway-managed header; "
        "it cannot carry a claim",
        f"{F}: revocation.redis_url: environment variable 'NOPE' is not set",
    ]


def test_broken_sections_do_not_cascade_into_route_references() -> None:
    # A route naming a declared-but-broken upstream or issuer gets no second, misleading problem.
    data = with_(_upstream(targets=[]))
    data["issuer"][0]["audiences"] = []
    data["route"][0]["issuers"] = ["corp"]
    assert problems(data) == [
        f"{F}: issuer[0].audiences: must not be empty",
        f"{F}: upstream.backend.targets: must not be empty",
    ]
    # A mistyped HS algorithm is one problem, not also "hs_secret set but no HS algorithm".
    data = with_(_issuer(algorithms=["HS265"], hs_secret=SECRET))
    assert problems(data) == [
        f"{F}: issuer[0].algorithms[0]: unknown algorithm 'HS265' (did you mean 'HS256'?); known: {ALL_ALGS}"
    ]
    # A wrongly typed auth does not also claim that an issuer is needed.
    data = with_(_route(auth=1))
    del data["issuer"]
    assert problems(data) == [f"{F}: route[0].auth: expected one of 'required', 'optional', 'off', got integer"]
    # An issuer without a usable name makes the issuer names unknowable: skip that check.
    data = with_(_del_issuer_key("name"))
    data["route"][0]["issuers"] = ["whatever"]
    assert problems(data) == [f"{F}: issuer[0].name: is required"]


def test_listen_addr_str_round_trips() -> None:
    assert str(ListenAddr("::", 8080)) == "[::]:8080"
    assert str(ListenAddr("127.0.0.1", 80)) == "127.0.0.1:80"


def test_config_error_str_joins_problems() -> None:
    err = ConfigError(["a: x: one", "a: y: two"])
    assert err.problems == ["a: x: one", "a: y: two"]
    assert str(err) == "a: x: one\na: y: two"


def test_top_level_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([], F, {})  # type: ignore[arg-type]
    assert info.value.problems == [f"{F}: expected a table at the top level, got array"]


# ----------------------------------------------------------------------------------------------
# load_config: the file itself


def test_missing_file_is_one_problem(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_one_problem(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_toml_syntax_error_names_the_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nworkers = 1\nlisten = ["a:1",\n  nope]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: line 4: Invalid value (column 3)"]


def test_toml_error_at_end_of_document_names_the_last_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nworkers = 1\nworkers = 2")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: line 3: ")


def test_invalid_utf8_is_one_problem(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[server]\n# \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: line 2: not valid UTF-8"]


def test_problems_use_the_path_as_given(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.toml").write_text("[server]\nworkers = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config("x.toml", env={})
    assert info.value.problems == [
        "x.toml: server.workers: must be at least 1, got 0",
        "x.toml: route: at least one [[route]] is required",
    ]


def test_tls_files_that_cannot_be_loaded_are_config_errors(tmp_path: pathlib.Path) -> None:
    """Found by check-config, not by workers crash-looping on start."""
    cert, key = _tls_pair(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = _tls_pair(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem")
    cases = {
        (str(tmp_path / "missing.pem"), key): "No such file or directory",
        (str(garbage), key): "",
        (other_cert, key): "",  # a certificate that does not belong to the key
    }
    for (cert_path, key_path), detail in cases.items():
        data = {"server": {"tls_cert": cert_path, "tls_key": key_path}, "upstream": {"u": {"targets": ["http://127.0.0.1:1"]}},
                "route": [{"path_prefix": "/", "upstream": "u", "auth": "off"}]}
        with pytest.raises(ConfigError) as info:
            parse_config(data, "t.toml")
        (problem,) = info.value.problems
        assert problem.startswith("t.toml: server.tls_cert: cannot load the certificate and key: "), problem
        assert detail in problem
    data = {"server": {"tls_cert": cert, "tls_key": key}, "upstream": {"u": {"targets": ["http://127.0.0.1:1"]}},
            "route": [{"path_prefix": "/", "upstream": "u", "auth": "off"}]}
    assert parse_config(data, "t.toml").server.tls_cert == cert


def test_tracing_defaults_off_and_reads_its_keys() -> None:
    assert parse_config(base(), F).tracing == TracingConfig("", 1.0, "jwtproxy")
    data = base()
    data["tracing"] = {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces", "sample_ratio": 0, "service_name": "edge"}
    assert parse_config(data, F).tracing == TracingConfig("http://127.0.0.1:4318/v1/traces", 0.0, "edge")


def test_tracing_without_the_sdk_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from jwtproxy import config as mod

    monkeypatch.setattr(mod, "_tracing_sdk_installed", lambda: False)
    data = base()
    data["tracing"] = {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces"}
    assert problems(data) == [
        f"{F}: tracing.otlp_endpoint: tracing needs the OpenTelemetry SDK: pip install 'jwtproxy[tracing]'"]
    data["tracing"] = {"otlp_endpoint": ""}   # off: the SDK is not needed
    assert parse(data).tracing.otlp_endpoint == ""
