#!/usr/bin/env bash
# Everything `make run` does on a fresh machine: a virtualenv (.venv) with the package, a real Kafka broker
# and the sandbox provider (both keep running afterwards: `make stop`), a few sample requests, then the
# consumer daemon in the foreground on embedded defaults (SQLite dedupe store). Ctrl-C stops it cleanly
# (drain, commit), prints one line about the run and exits 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .run

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
echo "==> installing the package into ${VIRTUAL_ENV:-the system interpreter} (pip install -e .)"
pip_install ""

KAFKA_PORT="${KAFKA_PORT:-9092}"
export IDV_KAFKA_BOOTSTRAP="${IDV_KAFKA_BOOTSTRAP:-127.0.0.1:$KAFKA_PORT}"
echo "==> starting Apache Kafka (KRaft, $IDV_KAFKA_BOOTSTRAP; log: .run/kafka/)"
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

side_effects() {
    curl -fsS "$IDV_PROVIDER_URL/_admin/stats" 2>/dev/null \
        | "$PY" -c 'import json, sys; print(json.load(sys.stdin).get("side_effects", 0))' 2>/dev/null || echo "?"
}
effects_before="$(side_effects)"

echo "==> publishing 10 sample requests (2 of them repeat an earlier message ID, as an upstream retry would)"
"$PY" -m producer samples --count 10 --duplicates 0.2 --seed "$(date +%s)"

export IDV_STORE_URL="${IDV_STORE_URL:-sqlite:///.run/dedupe.db}"
export IDV_LOG_FORMAT="${IDV_LOG_FORMAT:-text}"
echo "==> running the consumer daemon (health and metrics: http://127.0.0.1:${IDV_HEALTH_PORT:-9400}/readyz;"
echo "    Ctrl-C to stop; results appear as 'outcome recorded' lines)"
set +e
# The daemon's log goes to the terminal and to .run/daemon.log (for the summary below); foreground.py
# makes Ctrl-C reach the daemon alone, so it drains and this script (and make) exit with its code.
"$PY" scripts/foreground.py "$PY" -m consumer run 2> >(tee .run/daemon.log >&2)
code=$?
tee_pid=$!
set -e
for _ in $(seq 1 30); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done # tee has written all
effects_after="$(side_effects)"
summary="$(grep -o 'stopped cleanly: .*' .run/daemon.log | tail -n 1 | sed 's/^stopped cleanly: //')"
if [[ -n "$summary" ]]; then
    if [[ "$effects_before" =~ ^[0-9]+$ && "$effects_after" =~ ^[0-9]+$ ]]; then
        n=$((effects_after - effects_before))
        summary="${summary/ verified/ verified ($n side effect$([[ $n == 1 ]] || echo s) at the provider)}"
    fi
    echo "==> $summary"
else
    echo "==> the daemon stopped with exit code $code (log: .run/daemon.log)"
fi
echo "==> still running: Kafka ($IDV_KAFKA_BOOTSTRAP) and the sandbox ($IDV_PROVIDER_URL); \`make stop\` stops them"
echo "    (\`idv-consumer status\` in .venv shows the store's records; \`make run\` again sends 10 new samples)"
exit $code
