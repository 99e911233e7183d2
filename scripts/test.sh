#!/usr/bin/env bash
# The test command: provisions what the tests need, then runs every test (unit,
# integration, doc). Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
scripts/python-env.sh
# Memory-bound tests run the release binary (tests/common/release.rs).
cargo build --release --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast "$@"
fi
