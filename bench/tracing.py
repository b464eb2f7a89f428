"""What tracing costs on the cached-token path (scenario (a)): off against before, and on.

    python bench/tracing.py [--before REF] [--reps N] [--duration S] [--port-base N]

Variants, each a fresh ``python -m jwtproxy serve`` with one worker pinned to core 0, wrk
(``-t1 -c32``) and the Python origin on core 1, the same RS256 token on every request:

* ``before``: the checkout of git REF (default: the parent of the commit that added tracing),
  exported into a temporary directory, no ``[tracing]`` section;
* ``off``: this checkout, ``[tracing]`` absent (``otlp_endpoint = ""``);
* ``on 1.0`` / ``on 0.01``: this checkout exporting every trace, or 1 in 100, over OTLP/HTTP to a
  local sink that reads and discards the batches (the exporter's thread and its HTTP posts run
  in the worker process, as they would in production).

Repetitions interleave the variants (before, off, on 1.0, on 0.01, before, ...) so drift on a
shared machine spreads over all of them; the table gives median requests/s and the ratio to
``before``. Needs wrk; the tracing extra for the ``on`` rows.

``--calls N`` first prints the in-process CPU cost of the tracing calls one request makes (what
the connection calls: request, verify, upstream start/headers/end, finish), best of five rounds
of N, with a discarding exporter: unsampled (a new trace at ratio 0, an incoming unsampled
``traceparent``) and sampled. It is independent of wrk and of load on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from measure import SCENARIOS, run_wrk, to_sample, wrk_command  # noqa: E402
from peers import render  # noqa: E402
from procs import Processes, can_pin, wait_port  # noqa: E402
from tokens import AUDIENCE, ISSUER, ensure_keys, token_file, first_token  # noqa: E402

TEMPLATE = HERE / "templates" / "jwtproxy.toml"


def _sink(port: int, stop: threading.Event) -> None:
    """An OTLP/HTTP endpoint that accepts and discards every batch (its own thread and loop)."""
    from aiohttp import web

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", accept)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await runner.cleanup()

    asyncio.run(main())


def tracing_calls_us(calls: int) -> list[tuple[str, float]]:
    """CPU µs of the tracing calls of one request (see the module docstring)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    sys.path.insert(0, str(ROOT))
    from jwtproxy.config import TracingConfig
    from jwtproxy.tracing import Tracing

    class Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"authorization", b"Bearer " + b"x" * 600)]
    unsampled_parent = [*headers, (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]

    def one(tracing: Tracing, request_headers: list[tuple[bytes, bytes]]) -> None:
        trace = tracing.request(b"GET", b"1.1", request_headers, path="/", scheme=b"http", host="127.0.0.1:8080",
                                client="127.0.0.1", request_id=b"0123456789ab-1", age=0.0001, route="/",
                                upstream="origin")
        trace.verify(lambda: None)
        trace.upstream_start(b"GET")
        trace.upstream_headers("http", "127.0.0.1", 18882, "/")
        trace.upstream_end(200)
        trace.finish(200, "ok")

    rows = []
    for name, ratio, request_headers in (("unsampled (new trace, ratio 0)", 0.0, headers),
                                         ("unsampled (incoming flag 00)", 1.0, unsampled_parent),
                                         ("sampled (3 spans exported)", 1.0, headers)):
        tracing = Tracing(TracingConfig("http://127.0.0.1:9/v1/traces", ratio, "bench"), exporter=Discard())
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(calls):
                one(tracing, request_headers)
            best = min(best, time.process_time() - start)
        tracing.shutdown()
        rows.append((name, best / calls * 1e6))
    return rows


def _before_tree(ref: str, into: Path) -> Path:
    """``git archive`` of REF's jwtproxy package into ``into`` (importable with PYTHONPATH)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "jwtproxy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _default_before() -> str:
    """The parent of the first commit that created jwtproxy/tracing.py."""
    out = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--", "jwtproxy/tracing.py"],
                         capture_output=True, text=True, check=True).stdout.split()
    if not out:
        raise SystemExit("no commit adds jwtproxy/tracing.py: pass --before REF")
    return out[-1] + "^"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="git ref of the code without tracing (default: before tracing.py)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--port-base", type=int, default=18880)
    parser.add_argument("--calls", type=int, default=0, help="also time the tracing calls in-process (N per round)")
    args = parser.parse_args()
    if args.calls:
        print(f"{'tracing calls of one request':<34} {'CPU µs':>8}")
        for name, us in tracing_calls_us(args.calls):
            print(f"{name:<34} {us:8.1f}")
        print()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (bash bench/setup.sh)")
    work = HERE / "work"
    keys = ensure_keys(work)
    token = first_token(token_file(work, keys, "RS256", 1))
    scenario = SCENARIOS["a"]
    pin = can_pin()
    port, admin, origin_port, sink_port = (args.port_base + i for i in range(4))
    stop = threading.Event()
    threading.Thread(target=_sink, args=(sink_port, stop), daemon=True).start()

    with tempfile.TemporaryDirectory(prefix="jwtproxy-tracing-bench-") as tmp:
        tmpdir = Path(tmp)
        before_ref = args.before or _default_before()
        before = _before_tree(before_ref, tmpdir / "before")
        variants: list[tuple[str, Path, str]] = [
            ("before", before, ""),
            ("off", ROOT, ""),
            ("on, sample_ratio 1.0", ROOT, f'otlp_endpoint = "http://127.0.0.1:{sink_port}/v1/traces"\nsample_ratio = 1.0'),
            ("on, sample_ratio 0.01", ROOT, f'otlp_endpoint = "http://127.0.0.1:{sink_port}/v1/traces"\nsample_ratio = 0.01'),
        ]
        procs = Processes(tmpdir / "logs", pin)
        origin = procs.spawn("origin", [sys.executable, str(HERE / "upstream.py"), str(origin_port)], 1)
        wait_port(origin, origin_port, 10)
        results: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        try:
            for rep in range(args.reps):
                for name, tree, tracing in variants:
                    config = render(TEMPLATE, tmpdir / f"{rep}-{len(results[name])}-{name[:3]}.toml", {
                        "PORT": str(port), "ADMIN_PORT": str(admin), "PARSER": "httptools", "CACHE_SIZE": "10000",
                        "ISSUER": ISSUER, "JWKS": str(keys.jwks), "AUDIENCE": AUDIENCE,
                        "UPSTREAM_PORT": str(origin_port), "WORK": str(tmpdir), "ASSERTION": "", "AUTHZ": "",
                    })
                    if tracing:
                        config.write_text(config.read_text() + f"\n[tracing]\n{tracing}\n")
                    proxy = procs.spawn("jwtproxy", [sys.executable, "-m", "jwtproxy", "serve", "-c", str(config)], 0,
                                        env={"PYTHONPATH": str(tree)}, cwd=tmpdir)
                    try:
                        wait_port(proxy, port, 20)
                        time.sleep(0.5)  # the worker loads its keys after binding
                        script = HERE / "lua" / "bench.lua"
                        warm = wrk_command(script, port, scenario, token, args.warmup, 1, 32, 0, False)
                        run_wrk(warm, args.warmup + 30)
                        cmd = wrk_command(script, port, scenario, token, args.duration, 1, 32, 0, False)
                        if pin:
                            cmd = ["taskset", "-c", "1", *cmd]
                        sample = to_sample(run_wrk(cmd, args.duration + 30), scenario.expect)
                        if sample.errors:
                            raise SystemExit(f"{name}: {sample.errors} unexpected responses {sample.error_detail}")
                        results[name].append(sample.rps)
                        print(f"rep {rep + 1} {name:<24} {sample.rps:10,.0f} requests/s", file=sys.stderr)
                    finally:
                        procs.stop(proxy)
        finally:
            procs.stop_all()
            stop.set()

    base = statistics.median(results["before"])
    print(f"\ncached-token path (scenario a), median of {args.reps} x {args.duration:g} s, before = {before_ref}")
    print(f"{'variant':<24} {'requests/s':>12} {'vs before':>10}")
    for name, _, _ in variants:
        rps = statistics.median(results[name])
        print(f"{name:<24} {rps:12,.0f} {rps / base:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
