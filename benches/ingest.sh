#!/usr/bin/env bash
# Ingestion benchmark on the release binary: a 1 MB text file and a folder of small files,
# upload → completed, with the former and the current defaults interleaved (see
# benches/ingest.rs for what is measured). Environment: ROUNDS, SMALL, VARIANTS.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo build --release --locked
cargo bench --locked --bench ingest
