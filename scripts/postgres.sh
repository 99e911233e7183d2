#!/usr/bin/env bash
# A throwaway PostgreSQL 16 + pgvector cluster for tests, from PyPI only.
#
#   eval "$(scripts/postgres.sh start)"   # exports RAGWAY_TEST_POSTGRES_URL and RAGWAY_TEST_POSTGRES_DIR
#   scripts/postgres.sh stop "$RAGWAY_TEST_POSTGRES_DIR"
#
# Debian has PostgreSQL but no pgvector package; the PyPI wheel pgserver==0.1.4 ships
# PostgreSQL 16.2 with pgvector 0.6.2 as plain binaries (relative rpaths, only libc/libz
# needed). The wheel is fetched once with `pip download` (nothing is installed), checked
# against the sha256 pinned below and cached in ${RAGWAY_CACHE:-$HOME/.cache/ragway}/wheels.
#
# PostgreSQL refuses to run as root, and CI runs as root: then the cluster runs as the
# unprivileged user ragwaypg (created with `useradd -r` when missing; `nobody` if that fails),
# from a temp folder that user can read. The server listens on 127.0.0.1 only, on a free port,
# with trust authentication (loopback, throwaway data), and without fsync (the data is thrown
# away; durability is not what the tests check). `vector` is created in template1, so every
# database a test creates has it.
#
# `start` prints shell `export` lines on stdout (everything else goes to stderr).
# Environment: RAGWAY_CACHE, PYTHON (default python3), RAGWAY_PG_USER (the user to run as
# when root), TMPDIR.
set -euo pipefail
shopt -s inherit_errexit

CACHE="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
WHEELS="$CACHE/wheels"
PYTHON="${PYTHON:-python3}"

PGSERVER_VERSION=0.1.4
# sha256 of the whole wheel; the cp311 manylinux2014 build is fetched whatever Python runs pip
# (the binaries inside do not depend on Python).
WHEEL_x86_64=pgserver-$PGSERVER_VERSION-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
WHEEL_SHA256_x86_64=d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813

say() { echo "postgres: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
  fi
}

# Prints the path of the verified cached wheel, downloading it when missing or corrupt.
fetch_wheel() {
  [ "$(uname -s)" = Linux ] || die "only Linux is supported (manylinux wheel); got $(uname -s)"
  case "$(uname -m)" in
    x86_64 | amd64) ;;
    *) die "pgserver==$PGSERVER_VERSION has a verified wheel for x86_64 only; got $(uname -m). Point RAGWAY_TEST_POSTGRES_URL at a PostgreSQL with pgvector instead." ;;
  esac
  local wheel="$WHEELS/$WHEEL_x86_64" attempt got log
  for attempt in 1 2; do
    if [ -f "$wheel" ]; then
      got=$(sha256_of "$wheel")
      if [ "$got" = "$WHEEL_SHA256_x86_64" ]; then
        echo "$wheel"
        return
      fi
      say "sha256 mismatch for cached $(basename "$wheel") (got $got); downloading it again"
      rm -f "$wheel"
    fi
    [ "$attempt" = 2 ] && break
    "$PYTHON" -m pip --version >/dev/null 2>&1 ||
      die "'$PYTHON -m pip' is not available; install pip (Debian: apt-get install python3-pip) or set PYTHON"
    mkdir -p "$WHEELS"
    say "downloading pgserver==$PGSERVER_VERSION from PyPI into $WHEELS"
    log=$(mktemp)
    if ! "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
      --retries 2 --timeout 30 --dest "$WHEELS" --platform manylinux2014_x86_64 \
      --python-version 3.11 --implementation cp --abi cp311 \
      "pgserver==$PGSERVER_VERSION" >"$log" 2>&1; then
      sed 's/^/    pip: /' "$log" | tail -n 15 >&2
      rm -f "$log"
      die "could not download pgserver==$PGSERVER_VERSION from PyPI; check that PyPI (or PIP_INDEX_URL) is reachable, or copy $WHEEL_x86_64 into $WHEELS by hand"
    fi
    rm -f "$log"
  done
  die "pgserver==$PGSERVER_VERSION from PyPI does not have sha256 $WHEEL_SHA256_x86_64; the package changed or the download is corrupt: do not use it without checking"
}

free_port() {
  "$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# The user the cluster runs as, and how to run a command as that user.
pick_user() {
  if [ "$(id -u)" != 0 ]; then
    PG_USER=$(id -un)
    as_pg() { "$@"; }
    return
  fi
  PG_USER="${RAGWAY_PG_USER:-ragwaypg}"
  if ! id "$PG_USER" >/dev/null 2>&1; then
    if useradd -r -M -s /usr/sbin/nologin -d /nonexistent "$PG_USER" >/dev/null 2>&1; then
      say "created system user $PG_USER to run PostgreSQL (it refuses to run as root)"
    else
      say "could not create user $PG_USER; running PostgreSQL as nobody"
      PG_USER=nobody
    fi
  fi
  command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) is needed to run PostgreSQL as $PG_USER"
  as_pg() { runuser -u "$PG_USER" -- "$@"; }
}

start() {
  local wheel dir bin port attempt
  wheel=$(fetch_wheel)
  pick_user
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ragway-pg.XXXXXX")
  chmod 755 "$dir"
  # Headers and static libraries are not needed to run the server.
  "$PYTHON" - "$wheel" "$dir" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
# The layout of the wheel is kept: the binaries find libpq through the rpath
# $ORIGIN/../../../pgserver.libs.
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if name.endswith("/"):
            continue
        if not (name.startswith("pgserver/pginstall/") or name.startswith("pgserver.libs/")):
            continue
        if name.startswith("pgserver/pginstall/include/") or name.endswith(".a"):
            continue
        out = os.path.join(dest, "pg", name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(out, (mode or 0o644) | 0o444)
EOF
  bin="$dir/pg/pgserver/pginstall/bin"
  chmod -R a+rX "$dir/pg"
  mkdir "$dir/data" "$dir/run"
  chown "$PG_USER" "$dir/data" "$dir/run" 2>/dev/null || true
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
    {
      tail -n 20 "$dir/initdb.log" >&2
      die "initdb failed (log above)"
    }
  touch "$dir/server.log"
  chown "$PG_USER" "$dir/server.log" 2>/dev/null || true
  for attempt in 1 2 3; do
    port=$(free_port)
    # max_connections: every test opens a small pool, and nextest runs many tests at once.
    if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/run -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
      start >/dev/null 2>&1; then
      break
    fi
    # The port may have been taken between choosing and binding it: try another.
    [ "$attempt" = 3 ] && {
      tail -n 20 "$dir/server.log" >&2
      die "PostgreSQL did not start (server log above)"
    }
  done
  as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d template1 \
    -c 'CREATE EXTENSION IF NOT EXISTS vector' >&2 ||
    die "CREATE EXTENSION vector failed"
  say "PostgreSQL 16 + pgvector running as $PG_USER on 127.0.0.1:$port (data in $dir)"
  echo "export RAGWAY_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
  echo "export RAGWAY_TEST_POSTGRES_DIR=$dir"
  echo "export RAGWAY_TEST_POSTGRES_BIN=$bin"
}

stop() {
  local dir=${1:-}
  [ -n "$dir" ] || die "usage: $0 stop DIR (the RAGWAY_TEST_POSTGRES_DIR that start printed)"
  [ -d "$dir/data" ] || die "$dir is not a cluster made by '$0 start'"
  pick_user
  as_pg "$dir/pg/pgserver/pginstall/bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 ||
    say "pg_ctl stop failed (already stopped?)"
  rm -rf "$dir"
  say "stopped and removed $dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  fetch) fetch_wheel >/dev/null && say "wheel cached and verified" ;;
  *) die "usage: $0 start | stop DIR | fetch" ;;
esac
