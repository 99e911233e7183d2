#!/usr/bin/env bash
# The storage backends benchmark in one command: installs wrk (scripts/setup.sh), fetches the
# embedding model, builds release ragway and the harness (benches/harness: fake upstream,
# latency client), then runs benches/backends.py with the arguments given. It starts its own
# throwaway PostgreSQL (scripts/postgres.sh) unless --postgres-url is given. The table goes
# to stdout and benches/results/backends.md.
#
#   benches/backends.sh            # ~12 minutes
#   benches/backends.sh --quick    # < 3 minutes
#   benches/backends.sh --help     # every option
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
cargo build --release --locked --bin ragway
cargo build --release --locked --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness
exec python3 benches/backends.py "$@"
