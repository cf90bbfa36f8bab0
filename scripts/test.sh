#!/usr/bin/env bash
# The test command (`make test`, called by .ci/run): installs and starts everything the tests need, then
# runs pytest. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

echo "==> installing the package with test extras"
"$PY" -m pip install -q -e '.[test,postgres]' 2>&1 | grep -v "Running pip as the 'root' user" || true
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
