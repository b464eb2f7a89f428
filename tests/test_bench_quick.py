"""The benchmark harness must never rot: run `bench/run.py --quick` (jwtproxy alone, both codecs,
every scenario, ~30 s) and check that it measured every row with only expected statuses.

It asserts that the harness works, never a timing threshold: figures on a shared CI machine mean
nothing. Skipped when wrk is missing; without nginx the harness falls back to its own Python
upstream (bench/upstream.py).
"""
from __future__ import annotations

import importlib.util
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"

pytestmark = pytest.mark.slow


def _free_port_base() -> int:
    """A base port whose whole block (base+1 .. base+16) is free right now."""
    for _ in range(50):
        base = random.randrange(20000, 29000, 20)
        if all(_port_free(base + i) for i in range(1, 17)):
            return base
    pytest.skip("no free block of 16 ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (bench/setup.sh --quick)")
@pytest.mark.parametrize(("upstream", "scenarios"), [("auto", "abcdefghi"), ("python", "adfgi")])
def test_bench_quick_mode_measures_every_row(tmp_path: Path, upstream: str, scenarios: str) -> None:
    if upstream == "auto" and shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx not installed: the python-upstream case covers the fallback")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--upstream", upstream, "--out", str(out),
         "--only", ",".join(scenarios), "--port-base", str(_free_port_base())],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    report = out / "latest.md"
    assert proc.returncode == 0, f"bench --quick failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert report.exists()
    if importlib.util.find_spec("matplotlib") is not None:  # the chart is optional (bench extra)
        assert (out / "latest.png").exists()
    text = report.read_text()
    for scenario in scenarios:
        assert f"## ({scenario})" in text
    # Two rows per scenario (one per codec; in (i) assertions off and on), each with a positive
    # req/s and zero errors.
    rows = re.findall(r"^\| jwtproxy \((httptools|h11)\)(?: \+ signed assertions)? \| ([\d,]+) \|.*\| (\S+) \|$",
                      text, re.M)
    assert len(rows) == 2 * len(scenarios), text
    for codec, rps, errors in rows:
        assert int(rps.replace(",", "")) > 0, (codec, rps)
        assert errors == "0", (codec, errors)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (bench/setup.sh --quick)")
def test_bench_quick_measures_the_forward_auth_row(tmp_path: Path) -> None:
    # nginx auth_request + jwtproxy's authz listener (contract §5.1) on the cached-token path,
    # nginx running the recipe of docs/forward-auth.md; its sanity check (forged x-user-id, 401s)
    # must pass for the row to be measured at all.
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx not installed (apt-get install nginx)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out), "--only", "a", "--peers", "nginx-authz",
         "--port-base", str(_free_port_base())],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, f"bench --quick failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    text = (out / "latest.md").read_text()
    row = re.search(r"^\| nginx auth_request \+ jwtproxy authz \| ([\d,]+) \|.*\| (\S+) \|$", text, re.M)
    assert row is not None, text
    assert int(row.group(1).replace(",", "")) > 0 and row.group(2) == "0", row.group(0)
