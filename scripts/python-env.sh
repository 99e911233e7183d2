#!/usr/bin/env bash
# A Python virtual environment with the official SDKs, for client-compatibility tests.
# From PyPI only; cached in .cache/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import openai" >/dev/null 2>&1; then
  echo "python-env: installing the openai SDK from PyPI" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3" \
    || { echo "python-env: pip could not reach PyPI" >&2; exit 1; }
fi
