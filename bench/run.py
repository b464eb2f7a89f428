#!/usr/bin/env python3
"""jwtproxy benchmark: one command, jwtproxy side by side with what a user would run instead.

    python bench/run.py                      # every scenario, every peer, 3 reps x 8 s (~20 min)
    python bench/run.py --quick              # smoke test: jwtproxy alone, 1 s per scenario
    python bench/run.py --only a,e --peers envoy,jwtproxy-httptools --reps 1 --duration 2

Peers (bench/peers.py) share one upstream (nginx, pinned to the load core with wrk), the same
keys, tokens and routes; each proxy runs alone on the proxy core. Scenarios are in
bench/measure.py. Each (repetition, scenario, peer) starts the peer fresh, proves it
authenticates (sanity_check), warms it up, measures with wrk, reads its RSS and stops it;
repetitions are interleaved so slow drift on the machine spreads over all peers. Medians go to
bench/results/<timestamp>.md/.png and latest.md/latest.png (quick mode writes under bench/work/
instead: its figures mean nothing).

Exit status: 0 when every requested row was measured without unexpected responses; 1 otherwise
(in quick mode that is the whole point); 2 on a usage or setup problem.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Mapping

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from measure import SCENARIOS, Row, Sample, WrkError, run_wrk, to_sample, wrk_command  # noqa: E402
from peers import (ALL_PEERS, DEFAULT_PORT_BASE, BenchEnv, Peer, http_get, ports_for, render,  # noqa: E402
                   sanity_check)
from procs import Proc, Processes, can_pin, port_free, rss_bytes, wait_port  # noqa: E402
import report  # noqa: E402
import tokens  # noqa: E402

WORK = BENCH / "work"
RESULTS = BENCH / "results"
README = BENCH / "README.md"
QUICK_PEERS = ("jwtproxy-httptools", "jwtproxy-h11", "jwtproxy-assertion")
README_START = "<!-- latest-results:start -->"
README_END = "<!-- latest-results:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: jwtproxy alone, short runs, 1 rep, results under bench/work/quick")
    ap.add_argument("--reps", type=int, help="repetitions (medians reported); default 3, quick 1")
    ap.add_argument("--duration", type=int, help="seconds per measured run; default 8, quick 1")
    ap.add_argument("--warmup", type=int, help="seconds of unmeasured load first; default 1, quick 0")
    ap.add_argument("--only", help="comma-separated scenario keys (a-j); default all")
    ap.add_argument("--peers", help=f"comma-separated peers; default all: {','.join(ALL_PEERS)}")
    ap.add_argument("--tokens", type=int, help="distinct tokens in rotation; default 100000, quick 1000")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxy under test")
    ap.add_argument("--load-cpu", type=int, default=1, help="core for wrk and the upstream")
    ap.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE,
                    help=f"ports used: base+1..base+16 (default {DEFAULT_PORT_BASE})")
    ap.add_argument("--upstream", choices=("auto", "nginx", "python"), default="auto",
                    help="origin server: nginx (needed for full runs) or bench/upstream.py")
    ap.add_argument("--no-setup", action="store_true",
                    help="do not run bench/setup.sh when a peer is missing")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    ap.add_argument("--out", type=Path, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.duration = args.duration or (1 if quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    args.tokens = args.tokens or (1000 if quick else 100_000)
    args.scenarios = _split(args.only, SCENARIOS, "scenario") if args.only else list(SCENARIOS)
    default_peers = QUICK_PEERS if quick else tuple(ALL_PEERS)
    args.peer_keys = _split(args.peers, ALL_PEERS, "peer") if args.peers else list(default_peers)
    return args


def _split(value: str, known: Mapping[str, object], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown:
        raise SystemExit(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return items


def log(msg: str) -> None:
    print(msg, flush=True)


# --- setup -------------------------------------------------------------------------------------

def missing_prereqs(peer_keys: list[str], upstream: str) -> list[str]:
    """What is not installed for this run (each with its fix)."""
    problems = []
    if shutil.which("wrk") is None:
        problems.append("wrk not installed (apt-get install wrk)")
    if upstream == "nginx" and shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        problems.append("nginx not installed (apt-get install nginx)")
    for key in peer_keys:
        why = ALL_PEERS[key].missing()
        if why:
            problems.append(f"{key}: {why}")
    if "node" in peer_keys and not (BENCH / "node-gateway" / "node_modules" / "express").exists():
        problems.append("node: bench/node-gateway/node_modules missing (npm ci)")
    return problems


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def choose_upstream(args: argparse.Namespace) -> str:
    if args.upstream != "auto":
        return str(args.upstream)
    have_nginx = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
    if args.quick:
        return "nginx" if have_nginx else "python"
    return "nginx"


def start_upstream(env: BenchEnv, kind: str) -> Proc:
    """Start the origin on the load core and wait until it answers."""
    if kind == "nginx":
        (env.rundir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        conf = render(env.bench / "templates" / "nginx.conf", env.rundir / "nginx.conf", {
            "PORT": str(env.upstream_port), "WORK": str(env.rundir.resolve()),
            "WWW": str((env.work / "www").resolve()),
        })
        proc = env.procs.spawn("nginx", [nginx_binary(), "-c", str(conf.resolve()), "-p", str(env.rundir.resolve()),
                                         "-e", str((env.rundir / "nginx-error.log").resolve())],
                               env.load_cpu)
    else:
        proc = env.procs.spawn("origin", [sys.executable, str(env.bench / "upstream.py"), str(env.upstream_port)],
                               env.load_cpu)

    def probe() -> bool:
        try:
            return http_get(env.upstream_port, "/", timeout=1.0)[0] == 200
        except OSError:
            return False
    wait_port(proc, env.upstream_port, 15, probe)
    return proc


# --- measuring ---------------------------------------------------------------------------------

def dpop_proofs(args: argparse.Namespace) -> int:
    """Proofs per DPoP file: each is sent once, half for the warm-up and half for the measured
    run, which must not outrun its half (100,000 proofs cover 8 s at 12,500 req/s)."""
    return 30_000 if args.quick else max(2 * args.tokens, 200_000)


def token_arg(scen_tokens: str, files: dict[str, Path], env: BenchEnv) -> str:
    if scen_tokens == "none":
        return "-"
    if scen_tokens == "one-rs256":
        return env.rs_token
    if scen_tokens.startswith("dpop-"):
        return "dpop@" + str(files[scen_tokens].resolve())
    return "@" + str(files[scen_tokens].resolve())


def measure_one(peer: Peer, scen_key: str, env: BenchEnv, args: argparse.Namespace,
                files: dict[str, Path]) -> tuple[Sample | None, str]:
    """Start, check, warm up, measure and stop one peer for one scenario: (sample, failure)."""
    scen = SCENARIOS[scen_key]
    proc: Proc | None = None
    try:
        try:
            proc = peer.start(env)
        except (RuntimeError, OSError) as exc:
            log(f"{peer.key} did not start: {exc}")
            return None, f"did not start: {str(exc).splitlines()[0]} (log: {env.procs.logdir / peer.key}.log)"
        problems = sanity_check(peer, env)
        if problems:
            return None, "sanity check failed: " + "; ".join(problems)
        script = env.bench / "lua" / "bench.lua"
        tok = token_arg(scen.tokens, files, env)
        count = scen.expect != 200
        half = args.tokens // 2 if scen.rotating else 0
        if scen.dpop:  # the warm-up spends the second half of the proofs, the measured run the first
            half = dpop_proofs(args) // 2

        def wrk(duration: int, offset: int) -> list[str]:
            cmd = wrk_command(script, peer.port(env), scen, tok, duration, args.threads, args.connections,
                              offset, count)
            return ["taskset", "-c", str(env.load_cpu), *cmd] if env.procs.pin else cmd

        if args.warmup > 0:
            run_wrk(wrk(args.warmup, half), args.warmup + 60)
        time.sleep(peer.stats_delay)
        before = peer.cache_counts(env)
        result = run_wrk(wrk(args.duration, 0), args.duration + 60)
        sample = to_sample(result, scen.expect)
        time.sleep(peer.stats_delay)
        after = peer.cache_counts(env)
        if before is not None and after is not None:
            hits, misses = after[0] - before[0], after[1] - before[1]
            if hits + misses > 0:
                sample.cache_hit_ratio = hits / (hits + misses)
        if proc is not None:
            for part in peer.processes(proc):
                if not part.alive():
                    log(f"{part.name} exited during the run; its log ends with:\n{part.log_tail()}")
                    return None, f"exited during the run (status {part.popen.returncode}, log: {part.log_path})"
            sample.rss_mib = sum(rss_bytes(part.pid) for part in peer.processes(proc)) / 2**20
        return sample, ""
    except WrkError as exc:
        return None, f"wrk: {str(exc).splitlines()[0]}"
    finally:
        if proc is not None:
            peer.stop(env, proc)


def run_all(env: BenchEnv, args: argparse.Namespace, files: dict[str, Path]) -> dict[str, dict[str, Row]]:
    results: dict[str, dict[str, Row]] = {}
    for skey in args.scenarios:
        results[skey] = {k: Row(k, ALL_PEERS[k].label) for k in SCENARIOS[skey].peers if k in args.peer_keys}
    for rep in range(1, args.reps + 1):
        for skey, rows in results.items():
            for key, row in rows.items():
                if row.failure:
                    continue  # a peer that failed once is not retried: its row says why
                sample, failure = measure_one(ALL_PEERS[key], skey, env, args, files)
                if failure:
                    row.failure = failure
                    log(f"[rep {rep}/{args.reps}] ({skey}) {key}: NOT MEASURED: {failure}")
                    continue
                if sample is None:
                    continue  # unreachable: measure_one returns a sample or a failure
                row.samples.append(sample)
                rss = f"{sample.rss_mib:.0f} MiB" if sample.rss_mib is not None else "-"
                if sample.cache_hit_ratio is not None:
                    rss += f"  cache hits {sample.cache_hit_ratio:.0%}"
                err = f" ERRORS {sample.errors} {sample.error_detail}" if sample.errors else ""
                log(f"[rep {rep}/{args.reps}] ({skey}) {key:<20} {sample.rps:>10,.0f} req/s  "
                    f"p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms  rss {rss}{err}")
    return results


# --- report ------------------------------------------------------------------------------------

def run_meta(args: argparse.Namespace, upstream: str, pinned: bool,
             busy: dict[str, float]) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: list[str] = []
    for key in args.peer_keys:
        if key not in ("nginx", "envoy-nojwt") and (v := ALL_PEERS[key].version()) not in versions:
            versions.append(v)
    if upstream == "nginx":
        versions.insert(0, _cmd_first([nginx_binary(), "-v"]).replace("nginx version: ", ""))
    versions.append(_cmd_first(["wrk", "-v"]).split(" Copyright")[0].strip())
    # Read-only git queries: which code was measured, and whether it had uncommitted changes.
    commit = _cmd_first(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_first(["git", "-C", str(BENCH.parent), "status", "--porcelain", "--untracked-files=no",
                        "--", "jwtproxy"])
    if dirty not in ("?", ""):
        commit += " (with uncommitted changes in jwtproxy/)"
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return [
        ("machine", f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"),
        ("versions", ", ".join(versions)),
        ("jwtproxy commit", commit),
        ("load", f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s after {args.warmup}s warm-up, "
                 f"{args.reps} repetition(s), medians"
                 + (" (fewer than 3: indicative only)" if args.reps < 3 and not args.quick else "")
                 + f"; {args.tokens:,} distinct tokens in rotation"),
        ("token caches", f"{100 if args.quick else 10_000:,} entries (jwtproxy cache_size, Envoy jwt_cache_size); "
                         "Node has none"),
        ("placement", (f"proxy on core {args.proxy_cpu}; wrk and the {upstream} upstream on core {args.load_cpu} "
                       "(taskset)") if pinned else "not pinned (taskset or a second core missing)"),
        ("machine at start", "load average " + " ".join(load) + "; CPU already busy: "
         + (", ".join(f"{k} {v:.0%}" for k, v in busy.items()) or "?")
         + (" (**other processes were running: absolute figures are depressed and noisy**)"
            if any(v > 0.15 for v in busy.values()) else "")),
        ("command", "python bench/run.py " + " ".join(sys.argv[1:])),
    ]


def cpu_busy(seconds: float = 1.0) -> dict[str, float]:
    """Share of each CPU used (by anything) over `seconds`, from /proc/stat, e.g. {"cpu0": 0.03}.

    Taken before the bench starts anything: a busy machine makes absolute figures (and, less so,
    ratios) unreliable, and the report says so.
    """
    def snapshot() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields]
                idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
                out[name] = (sum(values), idle)
        return out
    try:
        first = snapshot()
        time.sleep(seconds)
        second = snapshot()
    except (OSError, ValueError):
        return {}
    busy = {}
    for name, (total, idle) in second.items():
        t0, i0 = first.get(name, (total, idle))
        busy[name] = 1.0 - (idle - i0) / (total - t0) if total > t0 else 0.0
    return busy


def _cmd_first(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def write_results(results: dict[str, dict[str, Row]], meta: list[tuple[str, str]],
                  args: argparse.Namespace, stamp: str) -> Path:
    outdir = args.out or (WORK / "quick" if args.quick else RESULTS)
    outdir.mkdir(parents=True, exist_ok=True)
    title = f"jwtproxy benchmark{' (quick smoke test: figures mean nothing)' if args.quick else ''} — {stamp}"
    png = outdir / f"{stamp}.png"
    chart_ok = True
    try:
        report.chart(results, png, title)
    except ImportError:
        chart_ok = False
        log("matplotlib missing: no chart (pip install matplotlib)")
    md = outdir / f"{stamp}.md"
    md.write_text(report.markdown(results, meta, title, png.name if chart_ok else None))
    latest_md = outdir / "latest.md"
    latest_md.write_text(report.markdown(results, meta, title, "latest.png" if chart_ok else None))
    if chart_ok:
        shutil.copyfile(png, outdir / "latest.png")
    if not args.quick and not args.no_readme and args.out is None and README.exists():
        update_readme(results, stamp)
    return md


def update_readme(results: dict[str, dict[str, Row]], stamp: str) -> None:
    """Put a req/s matrix of the latest run between the README's markers."""
    text = README.read_text()
    if README_START not in text or README_END not in text:
        return
    present = {key for rows in results.values() for key in rows}
    peers = [key for key in ALL_PEERS if key in present]
    lines = [README_START, "", f"Latest run: {stamp} ([full report](results/latest.md)); median req/s.", "",
             "| system | " + " | ".join(f"({k})" for k in results) + " |",
             "|---|" + "---:|" * len(results)]
    for key in peers:
        cells = []
        for rows in results.values():
            row = rows.get(key)
            rps = row.med("rps") if row is not None and row.ok else None
            cells.append("" if row is None else ("n/m" if rps is None else f"{rps:,.0f}"))
        lines.append(f"| {ALL_PEERS[key].label} | " + " | ".join(cells) + " |")
    targets = report.targets_table(results)
    if targets:
        lines += ["", report.TARGETS_HEAD, report.TARGETS_RULE, *targets]
    lines += ["", "![latest benchmark](results/latest.png)", "", README_END]
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(head + "\n".join(lines) + tail)


# --- main --------------------------------------------------------------------------------------

def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    upstream = choose_upstream(args)
    problems = missing_prereqs(args.peer_keys, upstream)
    if problems and not args.quick and not args.no_setup:
        log("missing: " + "; ".join(problems) + "\nrunning bench/setup.sh ...")
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=False)
        problems = missing_prereqs(args.peer_keys, upstream)
    if problems:
        log("cannot run: " + "; ".join(problems) + ("" if args.quick else " (bench/setup.sh installs them)"))
        return 2
    ports = ports_for(args.port_base)
    taken = [port for port in ports.values() if not port_free(port)]
    if taken:
        log(f"ports in use: {sorted(taken)} (another bench run? choose another --port-base)")
        return 2

    pinned = can_pin()
    if not pinned:
        log("note: not pinning to cores (needs taskset and 2 CPUs)")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    # Quick runs may overlap (test suites run in parallel): each gets its own directory.
    rundir = WORK / (f"quick-{os.getpid()}" if args.quick else f"run-{stamp}")
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    _prune_runs()

    t0 = time.monotonic()
    with tokens.work_lock(WORK):  # another run may be generating the same files right now
        keys = tokens.ensure_keys(WORK)
        files = {
            "rs256": tokens.token_file(WORK, keys, "RS256", args.tokens, log),
            "es256": tokens.token_file(WORK, keys, "ES256", args.tokens, log),
            "bad-rs256": tokens.bad_token_file(WORK, keys, args.tokens, log),
        }
        for kind, alg in (("dpop-es256", "ES256"), ("dpop-eddsa", "EdDSA")):
            if any(SCENARIOS[k].tokens == kind for k in args.scenarios):
                files[kind] = tokens.dpop_file(WORK, keys, alg, dpop_proofs(args), log)
        www = WORK / "www"
        www.mkdir(parents=True, exist_ok=True)
        big = www / "big.bin"
        if not big.exists() or big.stat().st_size != 65536:
            big.write_bytes(b"x" * 65536)  # the same bytes bench/upstream.py serves

    procs = Processes(rundir / "logs", pin=pinned)
    env = BenchEnv(
        bench=BENCH, work=WORK, repo=BENCH.parent, keys=keys,
        rs_token=tokens.first_token(files["rs256"]), es_token=tokens.first_token(files["es256"]),
        bad_token=tokens.first_token(files["bad-rs256"]), procs=procs,
        proxy_cpu=args.proxy_cpu if pinned else None, load_cpu=args.load_cpu if pinned else None,
        ports=ports, rundir=rundir,
        # Quick mode rotates only 1,000 tokens: a 100-entry cache keeps (b)-(d) on the
        # verify-every-request path they exist to exercise.
        cache_size=100 if args.quick else 10_000,
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when started in the background with SIGINT ignored: Ctrl-C / kill -INT must clean up.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        busy = cpu_busy()
        if any(v > 0.15 for v in busy.values()):
            log("warning: the machine is busy before the bench starts ("
                + ", ".join(f"{k} {v:.0%}" for k, v in busy.items()) + "): figures will be noisy")
        meta = run_meta(args, upstream, pinned, busy)
        start_upstream(env, upstream)
        log(f"upstream: {upstream} on 127.0.0.1:{env.upstream_port}; peers: {', '.join(args.peer_keys)}; "
            f"scenarios: {', '.join(args.scenarios)}")
        results = run_all(env, args, files)
    except KeyboardInterrupt:
        log("interrupted: stopping everything the bench started")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)

    md = write_results(results, meta, args, stamp)
    log(f"\n{md.read_text()}\nwritten: {md} (and {md.with_suffix('.png').name}, latest.*) "
        f"in {time.monotonic() - t0:.0f}s")
    bad = [(s, r.peer, r.failure or f"{r.errors} unexpected responses")
           for s, rows in results.items() for r in rows.values() if not r.ok or r.errors
           or r.requests == 0]
    for skey, peer, why in bad:
        log(f"FAILED ({skey}) {peer}: {why}")
    if bad:
        log(f"configs and logs kept in {rundir}")
        return 1
    if args.quick:
        shutil.rmtree(rundir, ignore_errors=True)
    return 0


def _prune_runs(keep: int = 5) -> None:
    """Keep the configs and logs of the last few full runs only."""
    runs = sorted(WORK.glob("run-*"))
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
