#!/usr/bin/env bash
# The test command: provisions what the tests need, then runs every test (unit,
# integration, doc). Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
scripts/python-env.sh
# A throwaway PostgreSQL + pgvector for the storage tests (tests/storage_conformance.rs),
# unless the caller points at one already; stopped and removed on exit.
if [ -z "${RAGWAY_TEST_POSTGRES_URL:-}" ]; then
  pg_env=$(scripts/postgres.sh start)
  eval "$pg_env"
  trap 'scripts/postgres.sh stop "$RAGWAY_TEST_POSTGRES_DIR"' EXIT
fi
# Memory-bound tests run the release binary (tests/common/release.rs).
cargo build --release --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast "$@"
fi
