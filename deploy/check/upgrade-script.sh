#!/usr/bin/env bash
# Exercises deploy/systemd/ragway-upgrade.sh against deploy/check/fake_ragway.py: start writes
# the PID file and waits for /health; reload repoints the PID file at the new process and the
# old one exits; a new binary that cannot start leaves the old one serving and the PID file
# unchanged. Usage: upgrade-script.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$1
T=$(mktemp -d)
cleanup() {
  local p
  while read -r p; do kill "$p" 2>/dev/null || true; done <"$T/pids" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
printf '#!/bin/sh\nexec %s %s "$@"\n' "$PY" "$PWD/deploy/check/fake_ragway.py" >"$T/ragway"
chmod +x "$T/ragway"
export FAKE_STATE=$T RAGWAY_BIN=$T/ragway RAGWAY_PIDFILE=$T/run/ragway.pid
export RAGWAY_START_TIMEOUT=30 RAGWAY_DRAIN_TIMEOUT=30 DATA_DIR=$T/data
script=deploy/systemd/ragway-upgrade.sh
fail() {
  echo "upgrade-script: FAIL: $*" >&2
  exit 1
}

"$script" start 2>/dev/null || fail "start"
p1=$(cat "$RAGWAY_PIDFILE")
echo "$p1" >>"$T/pids"
kill -0 "$p1" || fail "start: PID file points at a dead process"
[ "$(cat "$T/serving")" = "$p1" ] || fail "start: the PID file is not the serving process"

"$script" reload 2>/dev/null || fail "reload"
p2=$(cat "$RAGWAY_PIDFILE")
echo "$p2" >>"$T/pids"
[ "$p2" != "$p1" ] || fail "reload: PID file not repointed"
kill -0 "$p2" || fail "reload: the new process is not running"
! kill -0 "$p1" 2>/dev/null || fail "reload: the old process is still running"
[ "$(cat "$T/serving")" = "$p2" ] || fail "reload: the new process does not serve"

# A new process slower to start than the old fixed one-second wait is still waited for.
FAKE_SLOW=1 "$script" reload 2>/dev/null || fail "reload of a slow-starting process"
p3=$(cat "$RAGWAY_PIDFILE")
echo "$p3" >>"$T/pids"
! kill -0 "$p2" 2>/dev/null || fail "slow reload: the old process is still running"
[ "$(cat "$T/serving")" = "$p3" ] || fail "slow reload: the new process does not serve"
[ ! -e "$DATA_DIR/upgrade.sock" ] || fail "slow reload: the upgrade socket was left behind"
p2=$p3

if FAKE_FAIL=1 "$script" reload 2>/dev/null; then fail "reload with a broken binary succeeded"; fi
[ "$(cat "$RAGWAY_PIDFILE")" = "$p2" ] || fail "failed reload changed the PID file"
kill -0 "$p2" || fail "failed reload stopped the serving process"

rm -f "$RAGWAY_PIDFILE"
if "$script" reload 2>/dev/null; then fail "reload without a PID file succeeded"; fi
echo "upgrade-script: start, reload, slow reload, failed reload and missing PID file behave" >&2
