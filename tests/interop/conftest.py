"""Session setup for the identity-provider interoperability tests (tests/interop/).

The provider is panva/oidc-provider, an OpenID Certified implementation, pinned in
``package-lock.json`` and run by ``provider.js`` under Node.js. These tests need ``node``
and the installed ``node_modules``; when ``node_modules`` is missing and ``npm`` is available
the session runs ``npm ci`` here once (CI's ``.ci/run`` does the same before pytest). Anything
missing skips the tests with the reason -- it never fails them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
MIN_NODE_MAJOR = 18  # oidc-provider 8.x supports every Node.js LTS from 18 ("Hydrogen") on
NPM_CI_TIMEOUT = 300.0


def _installed_provider_version() -> str | None:
    manifest = INTEROP_DIR / "node_modules" / "oidc-provider" / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def _locked_provider_version() -> str | None:
    try:
        lock = json.loads((INTEROP_DIR / "package-lock.json").read_text())
        return str(lock["packages"]["node_modules/oidc-provider"]["version"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="session")
def node_executable() -> str:
    """Path of ``node`` once ``node_modules`` holds the locked oidc-provider; else skip."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("interop: `node` is not on PATH (Node.js >= 18 runs the oidc-provider tests)")
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pytest.skip("interop: cannot tell the Node.js version (`node --version` failed)")
    if major < MIN_NODE_MAJOR:
        pytest.skip(f"interop: Node.js {version} is too old, oidc-provider needs >= {MIN_NODE_MAJOR}")

    locked = _locked_provider_version()
    if _installed_provider_version() is None or _installed_provider_version() != locked:
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("interop: tests/interop/node_modules is missing and `npm` is not on PATH "
                        "(run `npm ci` in tests/interop)")
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=INTEROP_DIR,
                capture_output=True, text=True, timeout=NPM_CI_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"interop: `npm ci` in tests/interop took longer than {NPM_CI_TIMEOUT:g} s")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip("interop: `npm ci` in tests/interop failed (offline?): " + " | ".join(tail))
        if _installed_provider_version() != locked:
            pytest.skip("interop: `npm ci` did not install the locked oidc-provider")
    return node
