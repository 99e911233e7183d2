#!/bin/sh
# Start and zero-downtime upgrade of ragway under systemd (deploy/systemd/ragway.service):
#
#   ragway-upgrade.sh start  [serve flags]   ExecStart: run `ragway serve`, write the PID file,
#                                            return once /health answers (Type=forking).
#   ragway-upgrade.sh reload [serve flags]   ExecReload: start `ragway serve --upgrade` (it
#                                            waits for the listening sockets), point the PID
#                                            file at it, SIGQUIT the old process (it hands
#                                            over its sockets and the store, drains and exits),
#                                            and return once the new one serves alone.
#
# systemd follows the main process through the PID file: it re-reads the file when the old
# main process exits and after a successful reload. If the new process dies before the old
# one is told to hand over, the PID file is restored and the old process keeps serving.
#
# Environment: RAGWAY_BIN (default /usr/local/bin/ragway); RAGWAY_PIDFILE (default
# $RUNTIME_DIRECTORY/ragway.pid); RAGWAY_START_TIMEOUT (s, default 30): how long the new
# process may take to serve; RAGWAY_DRAIN_TIMEOUT (s, default 60): how long the old one may
# take to drain; RAGWAY_UPGRADE_SOCKET (default $DATA_DIR/upgrade.sock, DATA_DIR defaulting to
# ./data as ragway's does): where the new process waits for the sockets — set it when the data
# directory comes from the config file instead. Everything else (DATA_DIR, RAGWAY_LISTEN, ...)
# is passed to ragway unchanged.
set -eu

BIN=${RAGWAY_BIN:-/usr/local/bin/ragway}
PIDFILE=${RAGWAY_PIDFILE:-${RUNTIME_DIRECTORY:-/run/ragway}/ragway.pid}
START_TIMEOUT=${RAGWAY_START_TIMEOUT:-30}
DRAIN_TIMEOUT=${RAGWAY_DRAIN_TIMEOUT:-60}
UPGRADE_SOCKET=${RAGWAY_UPGRADE_SOCKET:-${DATA_DIR:-./data}/upgrade.sock}

say() { echo "ragway-upgrade: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}
alive() { kill -0 "$1" 2>/dev/null; }

# Atomic: systemd may read the file at any moment.
write_pid() {
  echo "$1" >"$PIDFILE.tmp"
  mv -f "$PIDFILE.tmp" "$PIDFILE"
}

# wait_gone PID SECONDS: 0 once PID has exited, 1 at the deadline. Polls every 0.2 s.
wait_gone() {
  n=$(($2 * 5))
  while alive "$1"; do
    [ "$n" -gt 0 ] || return 1
    n=$((n - 1))
    sleep 0.2
  done
}

# wait_listening PID: 0 once the new process waits on the upgrade socket (it exists only
# while the process waits for the hand-over); fails if PID dies or the start timeout passes.
wait_listening() {
  n=$((START_TIMEOUT * 5))
  until [ -S "$UPGRADE_SOCKET" ]; do
    alive "$1" || {
      say "ragway (pid $1) exited"
      return 1
    }
    [ "$n" -gt 0 ] || {
      say "ragway (pid $1) did not open $UPGRADE_SOCKET within ${START_TIMEOUT}s"
      return 1
    }
    n=$((n - 1))
    sleep 0.2
  done
}

# wait_serving PID: 0 once /health answers while PID is alive; fails if PID dies or the
# start timeout passes. The probe reads the listen address from the same environment.
wait_serving() {
  n=$((START_TIMEOUT * 5))
  while :; do
    alive "$1" || {
      say "ragway (pid $1) exited"
      return 1
    }
    if "$BIN" probe --timeout 2s >/dev/null 2>&1; then
      return 0
    fi
    [ "$n" -gt 0 ] || {
      say "ragway (pid $1) did not answer /health within ${START_TIMEOUT}s"
      return 1
    }
    n=$((n - 1))
    sleep 0.2
  done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  start)
    mkdir -p "$(dirname "$PIDFILE")"
    "$BIN" serve "$@" &
    pid=$!
    write_pid "$pid"
    wait_serving "$pid" || die "start failed"
    say "ragway serving (pid $pid)"
    ;;
  reload)
    [ -r "$PIDFILE" ] || die "no PID file $PIDFILE: is ragway running?"
    old=$(cat "$PIDFILE")
    case $old in '' | *[!0-9]*) die "PID file $PIDFILE holds ${old:-nothing}, not a PID" ;; esac
    alive "$old" || die "ragway (pid $old from $PIDFILE) is not running"
    "$BIN" serve --upgrade "$@" &
    new=$!
    # A new binary that cannot start (bad config, missing library, model) exits before it
    # opens the upgrade socket: notice it before the old process gives anything away.
    if ! wait_listening "$new"; then
      kill -TERM "$new" 2>/dev/null || true
      die "the new ragway is not ready to take over; pid $old keeps serving"
    fi
    write_pid "$new"
    if ! kill -QUIT "$old"; then
      write_pid "$old"
      kill -TERM "$new" 2>/dev/null || true
      die "cannot signal pid $old; the new process was stopped"
    fi
    say "pid $old hands over to pid $new"
    wait_gone "$old" "$DRAIN_TIMEOUT" || die "pid $old still draining after ${DRAIN_TIMEOUT}s"
    wait_serving "$new" || die "the new ragway (pid $new) does not serve"
    say "upgrade done: pid $new serving"
    ;;
  *)
    die "usage: $0 start|reload [ragway serve flags]"
    ;;
esac
