#!/bin/bash
# Run `jwtproxy systemd-unit`'s unit under a real systemd, on a machine (or container) whose
# PID 1 is not systemd, and print a transcript: Type=notify start, requests, reload, watchdog
# pings, a hung supervisor killed and restarted by the watchdog, a clean stop.
#
#   sudo tests/systemd/boot.sh [REPO]      (REPO defaults to this script's repository)
#
# How: systemd (the distribution's /lib/systemd/systemd, 252 on Debian 12) becomes PID 1 of
# fresh PID, mount, network, UTS, IPC and cgroup namespaces (`unshare`), booting one target that
# wants only journald and jwtproxy.service. Inside its mount namespace /run, /tmp, /var/tmp,
# /var/lib, /var/log and /var/cache are empty tmpfs and the host's unit directories are replaced
# by a folder holding just those units, so nothing of the host's is started, cleaned or
# touched; its cgroups live in a subtree "jwtproxy-systemd-boot" that is removed at the end.
# jwtproxy is pip-installed into a virtualenv under /opt (ProtectHome=yes hides /root and /home
# from the service). Needs root, util-linux (unshare, nsenter), systemd, curl, python3-venv.
set -euo pipefail

REPO=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
WORK=/opt/jwtproxy-systemd-boot
VENV=$WORK/venv
CG=jwtproxy-systemd-boot
SYSTEMD=/lib/systemd/systemd
# Not a pyenv or other interpreter under /root or /home: ProtectHome=yes hides those from the
# service, and a virtualenv's python is a symlink to its base interpreter.
PYTHON=${PYTHON:-/usr/bin/python3}

for tool in unshare nsenter curl "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "systemd-boot: $tool is missing" >&2; exit 1; }
done
[ -x "$SYSTEMD" ] || { echo "systemd-boot: $SYSTEMD is missing (apt-get install systemd)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "systemd-boot: run as root" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK/units" "$WORK/empty" "$WORK/etc"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "$REPO" >/dev/null

# A jwks_file issuer with a key made here, and one token for it.
"$VENV/bin/python" - "$WORK/etc" <<'EOF'
import json, sys
from jwtproxy.demo import DemoIssuer
issuer = DemoIssuer("https://idp.example", "api")
with open(f"{sys.argv[1]}/jwks.json", "w") as f:
    json.dump(issuer.jwks(), f)
with open(f"{sys.argv[1]}/token", "w") as f:
    f.write(issuer.mint())
EOF
cat > "$WORK/etc/jwtproxy.toml" <<EOF
[server]
listen = ["127.0.0.1:18080"]
workers = 2
shutdown_timeout = 5

[admin]
listen = "127.0.0.1:19901"

[[issuer]]
name = "idp"
issuer = "https://idp.example"
jwks_file = "$WORK/etc/jwks.json"
audiences = ["api"]

[[route]]
path_prefix = "/"
upstream = "backend"

[upstream.backend]
targets = ["http://127.0.0.1:18082"]

[revocation]
sqlite_path = "/var/lib/jwtproxy/revocations.db"
EOF
chmod -R go+rX "$WORK"
"$VENV/bin/jwtproxy" check-config -c "$WORK/etc/jwtproxy.toml" >/dev/null

# The unit exactly as generated, plus the minimum a boot needs around it.
"$VENV/bin/jwtproxy" systemd-unit -c "$WORK/etc/jwtproxy.toml" > "$WORK/units/jwtproxy.service"
for t in sysinit basic sockets local-fs network network-online multi-user shutdown; do
  printf '[Unit]\nDescription=%s (minimal, for this boot)\nDefaultDependencies=no\n' "$t" > "$WORK/units/$t.target"
done
printf '[Unit]\nDescription=journald and jwtproxy only\nDefaultDependencies=no\nWants=systemd-journald.service jwtproxy.service\n' \
  > "$WORK/units/jwtproxy-boot.target"
cp /lib/systemd/system/systemd-journald.service /lib/systemd/system/systemd-journald.socket \
   /lib/systemd/system/systemd-journald-dev-log.socket /lib/systemd/system/systemd-journald-audit.socket "$WORK/units/"

cat > "$WORK/boot.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount -t proc proc /proc
for d in /run /tmp /var/tmp /var/lib /var/log /var/cache; do mount -t tmpfs tmpfs "\$d"; done
mount --bind $WORK/units /etc/systemd/system
mount --bind $WORK/empty /usr/lib/systemd/system
exec env container=jwtproxy-systemd-boot $SYSTEMD --system --unit=jwtproxy-boot.target --log-target=journal-or-kmsg --show-status=no
EOF

cat > "$WORK/transcript.sh" <<'EOF'
#!/bin/bash
set -u
run() { echo "\$ $*"; "$@" 2>&1; echo; }
status() { curl -s -o /dev/null -w '%{http_code}\n' "$@"; }
cd /tmp && python3 -m http.server 18082 --bind 127.0.0.1 >/dev/null 2>&1 &
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:18082/ && break; sleep 0.1; done
for _ in $(seq 50); do [ "$(systemctl show jwtproxy -p SubState --value)" = running ] && break; sleep 0.2; done
TOKEN=$(cat "$1/etc/token")
run ps -p 1 -o pid,args
run systemctl show jwtproxy -p Type -p NotifyAccess -p WatchdogUSec -p DynamicUser -p ActiveState -p SubState -p StatusText -p MainPID
MAIN=$(systemctl show jwtproxy -p MainPID --value)
if [ -z "$MAIN" ] || [ "$MAIN" = 0 ]; then
  echo "jwtproxy.service is not running:"; journalctl -u jwtproxy --no-pager | tail -20; exit 1
fi
run ps -o user,pid,ppid,args --ppid "$MAIN" -p "$MAIN"
echo "\$ curl with a valid token, then without one"; status -H "Authorization: Bearer $TOKEN" http://127.0.0.1:18080/; status http://127.0.0.1:18080/; echo
echo "# watchdog pings every WatchdogSec/2 = 15 s"
run systemctl show jwtproxy -p WatchdogTimestampMonotonic
sleep 16
run systemctl show jwtproxy -p WatchdogTimestampMonotonic
run systemctl reload jwtproxy
sleep 2
run systemctl show jwtproxy -p ActiveState -p SubState -p StatusText -p MainPID
echo "# a hung supervisor: its pings stop, systemd kills and restarts it after WatchdogSec"
run kill -STOP "$MAIN"
sleep 36
run systemctl show jwtproxy -p ActiveState -p SubState -p MainPID -p NRestarts -p StatusText
echo "\$ curl with a valid token"; status -H "Authorization: Bearer $TOKEN" http://127.0.0.1:18080/; echo
run systemctl stop jwtproxy
run systemctl show jwtproxy -p ActiveState -p Result
echo "\$ journalctl -u jwtproxy   (the workers' own start and stop lines left out)"
journalctl -u jwtproxy -o short-iso --no-pager | grep -v -E '"event":"(jwks_keys_changed|worker_serving|worker_stopping)"'
EOF
chmod +x "$WORK/boot.sh" "$WORK/transcript.sh"

for d in /sys/fs/cgroup/*/; do mkdir -p "$d$CG" 2>/dev/null || true; done
# Move a shell into the subtree (cpuset refuses members without cpus/mems: ignored), then boot.
sh -c "for d in /sys/fs/cgroup/*/; do echo \$\$ > \"\${d}$CG/cgroup.procs\" 2>/dev/null || true; done
       exec unshare --pid --fork --mount --uts --ipc --net --cgroup $WORK/boot.sh" >"$WORK/console.log" 2>&1 &
booted=""
for _ in $(seq 100); do
  booted=$(pgrep -f "^$SYSTEMD --system --unit=jwtproxy-boot.target" || true)
  [ -n "$booted" ] && break
  sleep 0.1
done
[ -n "$booted" ] || { echo "systemd-boot: systemd did not start:" >&2; cat "$WORK/console.log" >&2; exit 1; }
cleanup() {
  kill -s RTMIN+14 "$booted" 2>/dev/null || true      # systemd: exit at once (container)
  for _ in $(seq 50); do kill -0 "$booted" 2>/dev/null || break; sleep 0.1; done
  for d in /sys/fs/cgroup/*/; do find "$d$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true; done
}
trap cleanup EXIT
sleep 2
nsenter -t "$booted" -a "$WORK/transcript.sh" "$WORK"
