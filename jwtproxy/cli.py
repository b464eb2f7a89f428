"""The ``jwtproxy`` command (contract §2): serve, check-config, verify, revoke, systemd-unit, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from jwtproxy import __version__
from jwtproxy.config import Config, ConfigError, default_config_path, load_config


def _config_path(args: argparse.Namespace) -> str:
    return args.config or default_config_path(os.environ)


def _load(args: argparse.Namespace) -> Config | None:
    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_config(_config_path(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config = _load(args)
    if config is None:
        return 1
    from jwtproxy.supervisor import Supervisor

    return Supervisor(lambda: load_config(path), config=config).run()


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from jwtproxy.systemd import installed_command, unit_file

    command = installed_command()
    config_path = os.path.abspath(args.config) if args.config else "/etc/jwtproxy/jwtproxy.toml"
    shutdown_timeout = 30.0
    if args.config:
        config = _load(args)
        if config is None:
            return 1
        shutdown_timeout = config.server.shutdown_timeout
    # ProtectHome=yes hides these from the service: it would fail with status=203/EXEC. The
    # interpreter counts too: a virtualenv's python is a symlink to a base interpreter that may
    # live under /root (pyenv) even when the virtualenv is under /opt.
    for what, path in (("ExecStart", command[0]), ("its Python", os.path.realpath(sys.executable))):
        hidden = next((p for p in ("/home/", "/root/", "/run/user/") if path.startswith(p)), None)
        if hidden is not None:
            print(f"jwtproxy systemd-unit: warning: {what} {path} is under {hidden}, which the unit's "
                  "ProtectHome=yes hides (status=203/EXEC); install jwtproxy with a Python outside "
                  "home directories, e.g. python3 -m venv /opt/jwtproxy", file=sys.stderr)
            break
    print(unit_file(command, config_path, shutdown_timeout=shutdown_timeout), end="")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()
    import uvloop

    verdict = uvloop.run(_verify(config, token, args.issuer, args.route))
    print(json.dumps(verdict, indent=2, default=str))
    return 0 if verdict["verdict"] == "valid" else 1


async def _verify(config: Config, token: str, issuer: str | None, route_path: str | None) -> dict[str, Any]:
    """The full verification stage on one token, exactly as a worker runs it."""
    from dataclasses import replace

    from jwtproxy.auth import Allow, CachedToken, Deny, Pending, RouteRules
    from jwtproxy.config import RouteConfig, TracingConfig
    from jwtproxy.revocation import open_store
    from jwtproxy.tokencache import cache_key
    from jwtproxy.worker import build_worker

    if issuer is not None:
        issuers = tuple(i for i in config.issuers if i.name == issuer)
        if not issuers:
            return {"verdict": "rejected", "reason": f"no issuer named {issuer!r} in the config"}
        config = replace(config, issuers=issuers)
    # Every verdict from a full verification: one token, nothing worth caching; and not traced
    # (a one-off command would start, then wait on, an exporter for one span).
    config = replace(config, token=replace(config.token, cache_size=0), tracing=TracingConfig())
    # The configured store, so revocations count; its log stays quiet (stdout is the verdict).
    worker = build_worker(config, store=open_store(config.revocation, lambda *a, **k: None))
    route: RouteConfig
    if route_path is not None:
        matched = worker.gateway.router.match("", route_path)
        if matched is None:
            return {"verdict": "rejected", "reason": f"no route matches {route_path!r}"}
        route = matched
    else:
        route = RouteConfig(
            path_prefix="/", host="", upstream="", auth="required", issuers=(), require_scopes=(),
            require_claims=(), forward_token=True, strip_prefix=False, cors_preflight="forward",
        )
    try:
        await worker.start([])  # no listener: the store and the keys, as a worker loads them
        stage = worker.gateway.auth
        rules = RouteRules(route, config.issuers)
        decision = stage.authorize(rules, token, time.time())
        if isinstance(decision, Pending):
            await decision.wait
            decision = stage.authorize(rules, token, time.time(), refetched=True)
        result: dict[str, Any] = {"route": route.path_prefix, "keys": worker.keys.status()}
        if isinstance(decision, Allow):
            introspector = worker.introspectors.get(decision.issuer or "")
            introspected = introspector.cached(cache_key(token), time.time()) if introspector else None
            # An introspected token's claims are the members of its introspection response.
            claims = dict(introspected.claims) if isinstance(introspected, CachedToken) else _unverified_claims(token)
            result.update(
                verdict="valid",
                reason="ok",
                issuer=decision.issuer,
                claims=claims,
                headers={k.decode(): v.decode("utf-8", "replace") for k, v in decision.identity},
            )
        elif isinstance(decision, Deny):
            result.update(verdict="rejected", status=decision.status, reason=decision.description,
                          label=decision.reason)
        else:
            result.update(verdict="rejected", status=401, reason="unknown key")
        return result
    finally:
        await worker.stop(0.0)


def _unverified_claims(token: str) -> Any:
    """Claims of a token that has just been verified (so decoding it again is safe to show)."""
    from jwtproxy.jose import parse_compact

    return parse_compact(token, 1 << 20).payload


def cmd_revoke(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 1
    if config.admin.listen is None:
        print("revoke: the admin listener is disabled ([admin] listen = \"\")", file=sys.stderr)
        return 1
    body: dict[str, Any]
    if args.jti is not None:
        body = {"jti": args.jti}
        if args.exp is not None:
            body["exp"] = args.exp
    else:
        body = {"sub": args.sub, "before": args.before if args.before is not None else time.time()}
    host = config.admin.listen.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(
        f"http://{shown}:{config.admin.listen.port}/revocations",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if config.admin.token:
        request.add_header("Authorization", f"Bearer {config.admin.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode().strip() or "done")
        return 0
    except urllib.error.HTTPError as exc:
        print(f"revoke: {exc.code} {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"revoke: cannot reach the admin listener: {exc}", file=sys.stderr)
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from jwtproxy.demo import run_demo

    # Not ./jwtproxy.toml: the demo's own config ships in the package (any directory works).
    return run_demo(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jwtproxy", description="JWT-validating API gateway")
    parser.add_argument("--version", action="version", version=f"jwtproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="config file (default ./jwtproxy.toml or $JWTPROXY_CONFIG)")
        return p

    with_config(sub.add_parser("serve", help="run the daemon in the foreground")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check-config", help="validate the config")).set_defaults(func=cmd_check_config)
    verify = with_config(sub.add_parser("verify", help="run the verification stage on one token"))
    verify.add_argument("--issuer", help="only this issuer (by name)")
    verify.add_argument("--route", help="apply this path's route rules (scopes, claims, issuers)")
    verify.add_argument("token", help="the token, or - to read it from standard input")
    verify.set_defaults(func=cmd_verify)
    revoke = with_config(sub.add_parser("revoke", help="revoke a token or a subject via the admin API"))
    kind = revoke.add_mutually_exclusive_group(required=True)
    kind.add_argument("--jti", help="token id to revoke")
    kind.add_argument("--sub", help="subject whose earlier tokens are revoked")
    revoke.add_argument("--exp", type=float, help="with --jti: the token's exp (kept until then)")
    revoke.add_argument("--before", type=float, help="with --sub: revoke tokens issued before this time (default now)")
    revoke.set_defaults(func=cmd_revoke)
    unit = with_config(sub.add_parser("systemd-unit", help="print a hardened systemd unit"))
    unit.set_defaults(func=cmd_systemd_unit)
    demo = sub.add_parser("demo", help="gateway + demo issuer + echo backend, with a ready curl")
    demo.add_argument("-c", "--config", help="config file (default: the demo config shipped in the package)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "revoke" and args.jti is None and args.exp is not None:
        print("revoke: --exp goes with --jti", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
