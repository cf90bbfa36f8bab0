#!/usr/bin/env bash
# Everything `make run` does on a fresh machine: install, start a real Kafka broker and the sandbox
# provider, publish a few sample requests, then run the consumer daemon in the foreground on embedded
# defaults (SQLite dedupe store). Ctrl-C stops it cleanly (drain, commit) and prints what it recorded.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .run

PY="${PYTHON:-python3}"
echo "==> installing the package (pip install -e .)"
"$PY" -m pip install -q -e . 2>&1 | grep -v "Running pip as the 'root' user" || true

echo "==> starting Apache Kafka (KRaft, 127.0.0.1:9092)"
bash scripts/kafka.sh start
for t in idv.requests idv.requests.dlq idv.requests.results; do bash scripts/kafka.sh topic "$t" 8; done

SANDBOX_PORT="${IDV_SANDBOX_PORT:-8080}"
export IDV_PROVIDER_URL="${IDV_PROVIDER_URL:-http://127.0.0.1:$SANDBOX_PORT}"
export IDV_PROVIDER_API_KEY="${IDV_PROVIDER_API_KEY:-sandbox-demo-key}"
# The quick start's development HMAC key for request fingerprints (docs/configuration.md): never reuse it
# where the data is real.
if [[ -z "${IDV_FINGERPRINT_KEY:-}" && -z "${IDV_FINGERPRINT_KEY_FILE:-}" ]]; then
    export IDV_FINGERPRINT_KEY="quickstart-dev-fingerprint-key"
fi
if ! curl -fsS "$IDV_PROVIDER_URL/healthz" >/dev/null 2>&1; then
    echo "==> starting the sandbox provider on $IDV_PROVIDER_URL (log: .run/sandbox.log)"
    rm -f .run/sandbox.url
    # setsid: its own session, so Ctrl-C on the daemon below does not stop the sandbox too.
    setsid nohup "$PY" -m sandbox --port "$SANDBOX_PORT" --api-key "$IDV_PROVIDER_API_KEY" \
        --latency-ms 50 --ready-file .run/sandbox.url >.run/sandbox.log 2>&1 &
    echo $! >.run/sandbox.pid
    for _ in $(seq 1 50); do [[ -s .run/sandbox.url ]] && break; sleep 0.2; done
    [[ -s .run/sandbox.url ]] || { echo "sandbox did not start:"; cat .run/sandbox.log; exit 1; }
fi

echo "==> publishing 10 sample requests (2 of them repeat an earlier message ID, as an upstream retry would)"
"$PY" -m producer samples --count 10 --duplicates 0.2 --seed "$(date +%s)"

export IDV_STORE_URL="${IDV_STORE_URL:-sqlite:///.run/dedupe.db}"
export IDV_LOG_FORMAT="${IDV_LOG_FORMAT:-text}"
echo "==> running the consumer daemon (Ctrl-C to stop; results appear as 'outcome recorded' lines)"
set +e
"$PY" -m consumer run
code=$?
set -e
echo "==> dedupe store after the run:"
"$PY" -m consumer status
echo "==> provider ledger totals:"
curl -fsS "$IDV_PROVIDER_URL/_admin/stats" || true
echo
exit $code
