#!/usr/bin/env bash
# The test command (`make test`, called by .ci/run): installs and starts everything the tests need, then
# runs pytest. Extra arguments go to pytest. Leaves the broker (and the SASL test broker, and PostgreSQL)
# running for the next run: `make stop` stops them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The virtualenv .venv (IDV_NO_VENV=1: the interpreter on PATH), first on PATH for the helper scripts and
# the tests' subprocesses.
# shellcheck source=scripts/venv.sh
source scripts/venv.sh

echo "==> installing the package with test extras into ${VIRTUAL_ENV:-the system interpreter}"
pip_install '[test,postgres,encryption]'
# kcat (an independent Kafka client), docker-compose (the Compose parser), promtool (Debian package
# prometheus: checks and unit-tests the alert rules) and chromium (the status-page browser test) for the
# tests that use them.
missing=()
command -v kcat >/dev/null || missing+=(kcat)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "==> apt-get install ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } || true
fi

if [[ -f tests/browser/package-lock.json ]] && command -v npm >/dev/null; then
    echo "==> npm ci in tests/browser (playwright-core for the status-page test)"
    (cd tests/browser && npm ci --no-audit --no-fund --silent) || true
fi

echo "==> starting Apache Kafka"
bash scripts/kafka.sh start
export IDV_TEST_KAFKA_BOOTSTRAP="127.0.0.1:${KAFKA_PORT:-9092}"

if [[ -f consumer/store/postgres.py ]]; then
    echo "==> starting PostgreSQL"
    IDV_TEST_POSTGRES_URL="$(bash scripts/postgres.sh start | tail -n 1)"
    export IDV_TEST_POSTGRES_URL
fi

echo "==> pytest"
set +e
"$PY" -m pytest "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit $code
