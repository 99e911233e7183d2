#!/usr/bin/env bash
# Build and run the gateway on its embedded defaults (127.0.0.1:3000 → Ollama at
# 127.0.0.1:11434, data in ./data, metrics on 127.0.0.1:9091). Extra arguments go to
# `ragway serve`, e.g. scripts/run.sh --ollama-url http://gpu-box:11434
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/fetch-model.sh
exec cargo run --release --locked -- serve "$@"
