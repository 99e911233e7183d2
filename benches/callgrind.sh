#!/usr/bin/env bash
# Instructions per request of the release ragway, counted by valgrind's callgrind: a figure
# that does not depend on what else the machine is doing, unlike wall-clock benchmarks.
# Starts the side-by-side harness's fake upstream, ragway under callgrind in front of it,
# creates an API key, and for each scenario sends W warm-up requests, zeroes the counters,
# sends N requests on one keep-alive connection and dumps the counters.
#
#   benches/callgrind.sh [N [BINARY]]   # N requests per scenario (default 200; the
#                                       # spaced stream always 10),
#                                       # BINARY defaults to target/release/ragway
#
# CALLGRIND_KEEP=DIR keeps the per-scenario dumps there (read them with callgrind_annotate).
#
# Needs valgrind, target/release/ragway and the harness built in release
# (benches/side-by-side.sh builds both; the harness alone:
# cargo build --release --locked --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
bin=${2:-target/release/ragway}
harness=target/bench-harness/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
up=$(port); rw=$(port)
"$harness/fake_upstream" "$up" 200 5 >/dev/null 2>&1 & pids+=($!)
wait_port "$up"
cat >"$work/ragway.toml" <<CONF
listen = "127.0.0.1:$rw"
metrics-listen = ""
data-dir = "$work/data"
[[ollama]]
url = "http://127.0.0.1:$up"
[embedding]
engine = "ollama"
url = "http://127.0.0.1:$up"
CONF
env -i PATH="$PATH" HOME="$HOME" RAGWAY_LOG=warn valgrind --tool=callgrind --collect-atstart=yes \
  --callgrind-out-file="$work/cg.%p" "$bin" serve --config "$work/ragway.toml" \
  >/dev/null 2>"$work/valgrind.log" & pids+=($!)
vg=$!
wait_port "$rw"
base="http://127.0.0.1:$rw"
jwt=$(curl -sf -H 'content-type: application/json' -d '{"name":"b","email":"b@example.com","password":"bench-pw-123456"}' "$base/api/v1/auths/signup" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
key=$(curl -sf -X POST -H "authorization: Bearer $jwt" "$base/api/v1/auths/api_key" | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
curl -sf -H "authorization: Bearer $key" "$base/api/models" >/dev/null
out=$(ls "$work"/cg.* | head -1)
chat='{"model":"m:latest","stream":false,"messages":[{"role":"user","content":"Why is the sky blue?"}]}'
generate='{"model":"m:latest","prompt":"hi"}'
chat_stream='{"model":"m:latest","stream":true,"messages":[{"role":"user","content":"Why is the sky blue?"}]}'
run() { # name method path body [requests]
  local name=$1 method=$2 path=$3 body=$4 n=${5:-$n}
  if [ "$method" = GET ]; then
    for _ in $(seq 20); do curl -sf -H "authorization: Bearer $key" "$base$path" >/dev/null; done
    callgrind_control -z "$vg" >/dev/null 2>&1
    seq "$n" | sed "s|.*|url = \"$base$path\"\noutput = /dev/null|" >"$work/curl.cfg"
    curl -sf -H "authorization: Bearer $key" -K "$work/curl.cfg"
  else
    "$harness/latency" --mode full --requests 20 --warm 0 --body "$body" "w,$rw,$path,$key" >/dev/null
    callgrind_control -z "$vg" >/dev/null 2>&1
    "$harness/latency" --mode full --requests "$n" --warm 0 --body "$body" "w,$rw,$path,$key" >/dev/null
  fi
  callgrind_control -d "$name" "$vg" >/dev/null 2>&1
  local dump; dump=$(ls -t "$work"/cg.*.* | head -1)
  local total; total=$(grep -m1 '^summary:\|^totals:' "$dump" | awk '{print $2}')
  # The usage recorder commits its rows every 250 ms, whatever the request rate: under
  # callgrind's slow-down that batch lands on a few dozen requests instead of thousands,
  # so it is reported apart.
  local flush; flush=$(callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null \
    | { grep -F 'ragway::usage::Recorder::flush' || true; } | head -1 | awk '{gsub(",","",$1); print $1}')
  flush=${flush:-0}
  printf '%-32s %9d instructions/request, %9d without the usage flush\n' \
    "$name" $((total / n)) $(((total - flush) / n))
  if [ -n "${CALLGRIND_KEEP:-}" ]; then mkdir -p "$CALLGRIND_KEEP"; cp "$dump" "$CALLGRIND_KEEP/$name.out"; fi
}
run "chat-completions-json-apikey" POST /api/chat/completions "$chat"
run "ollama-generate-stream-200" POST /ollama/api/generate "$generate"
run "chat-completions-stream-200" POST /api/chat/completions "$chat_stream"
run "api-models" GET /api/models ""
run "ollama-show-json" POST /ollama/api/show '{"model":"m:latest"}'
run "ollama-tags" GET /ollama/api/tags ""
# 200 chunks 5 ms apart (1 s per request): every chunk is a wake-up of its own, so this
# counts the per-wake-up cost of the stream loop, which the scenarios above batch away.
run "ollama-generate-spaced-200" POST /ollama/api/generate '{"model":"slow:latest","prompt":"hi"}' 10
