#!/usr/bin/env bash
# One-time machine set-up for building ragway: system packages the build needs.
# Idempotent; safe to run on every invocation of scripts/run.sh and scripts/test.sh.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)       # pingora → libz-ng-sys build
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || need+=(build-essential)  # usearch: C++17
command -v unzip >/dev/null 2>&1 || need+=(unzip)
# The web page's browser test (tests/browser.rs) drives Debian's Chromium over WebDriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# The side-by-side benchmark (benches/side-by-side.sh, tests/bench_harness.rs) puts Debian's
# nginx in front of the same upstream as ragway and drives both with wrk.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (Debian packages)" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

for bin in /usr/bin/chromium /usr/bin/chromedriver; do
  [ -x "$bin" ] || { echo "setup: $bin is still missing after apt-get; the browser test cannot run" >&2; exit 1; }
done

command -v cargo >/dev/null 2>&1 || {
  echo "setup: cargo not found; install Rust 1.92+ (https://rustup.rs) first" >&2
  exit 1
}
