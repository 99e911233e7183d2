#!/usr/bin/env bash
# The side-by-side proxy benchmark in one command: installs nginx and wrk (scripts/setup.sh),
# builds release ragway and the harness (benches/harness: fake upstream, latency client),
# then runs benches/side_by_side.py with the arguments given. The table goes to stdout and
# benches/results/side-by-side.md.
#
#   benches/side-by-side.sh            # 3 rounds, ~10 minutes
#   benches/side-by-side.sh --quick    # 1 round, < 2 minutes
#   benches/side-by-side.sh --help     # every option
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin ragway
cargo build --release --locked --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness
exec python3 benches/side_by_side.py "$@"
