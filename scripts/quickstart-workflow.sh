#!/usr/bin/env bash
# `make run-workflow`: one kyc_workflow end to end on embedded defaults, then exit. A virtualenv with the
# package, the Kafka broker of `make run` (left alone if one already answers), a sandbox of its own in the
# `didit` profile whose simulated applicant finishes each session after a few seconds, one kyc_workflow
# request, and the daemon in the background until the workflow's final decision is recorded (session →
# the applicant → decision by polling the decision endpoint → AML screening on approval → finished).
#
# Why not part of `make run`: that sandbox runs the `ietf` profile (the sample requests' contract), while
# workflows need Didit's (`didit`: session dedupe, decision endpoint, simulated applicant). Webhooks are not
# used here (the polling fallback decides); docs/workflows.md and `make webhooks` show the signed path.
#
#   IDV_WORKFLOW_SANDBOX_PORT=8081  its sandbox (0: any free port)   IDV_HEALTH_PORT=9401  daemon health
#   IDV_WORKFLOW_SUBJECT=applicant-demo  (a subject containing DECLINE is declined)
#   IDV_SKIP_INSTALL=1  the package is importable already: no pip install
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .run

# shellcheck source=scripts/venv.sh
source scripts/venv.sh
if [[ "${IDV_SKIP_INSTALL:-}" != 1 ]]; then
    echo "==> installing the package into ${VIRTUAL_ENV:-the system interpreter} (pip install -e .)"
    pip_install ""
fi

KAFKA_PORT="${KAFKA_PORT:-9092}"
export IDV_KAFKA_BOOTSTRAP="${IDV_KAFKA_BOOTSTRAP:-127.0.0.1:$KAFKA_PORT}"
echo "==> Apache Kafka at $IDV_KAFKA_BOOTSTRAP (log: .run/kafka/)"
bash scripts/kafka.sh start
export IDV_TOPIC="${IDV_TOPIC:-idv.workflow-demo}"
export IDV_EVENTS_TOPIC="${IDV_EVENTS_TOPIC:-$IDV_TOPIC.events}"
# The topics (2 partitions each; existing ones are kept), created over the Kafka protocol.
"$PY" - "$IDV_KAFKA_BOOTSTRAP" "$IDV_TOPIC" "$IDV_TOPIC.dlq" "$IDV_TOPIC.results" "$IDV_EVENTS_TOPIC" <<'PY'
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
async def main(bootstrap, *names):
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        missing = set(names) - set(await admin.list_topics())
        if missing:
            await admin.create_topics([NewTopic(n, num_partitions=2, replication_factor=1) for n in missing])
    finally:
        await admin.close()
asyncio.run(main(*sys.argv[1:]))
PY
echo "==> topics ready: $IDV_TOPIC (.dlq, .results), $IDV_EVENTS_TOPIC"

export IDV_PROVIDER=didit
export IDV_PROVIDER_API_KEY="${IDV_PROVIDER_API_KEY:-sandbox-demo-key}"
if [[ -z "${IDV_FINGERPRINT_KEY:-}" && -z "${IDV_FINGERPRINT_KEY_FILE:-}" ]]; then
    export IDV_FINGERPRINT_KEY="quickstart-dev-fingerprint-key" # development only (docs/configuration.md)
fi
sandbox_pid="" daemon_pid=""
cleanup() {
    [[ -n "$daemon_pid" ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [[ -n "$sandbox_pid" ]] && kill "$sandbox_pid" 2>/dev/null
    true
}
trap cleanup EXIT
echo "==> starting a sandbox in the didit profile, simulated applicant on (log: .run/workflow-sandbox.log)"
rm -f .run/workflow-sandbox.url
"$PY" -m sandbox --profile didit --port "${IDV_WORKFLOW_SANDBOX_PORT:-8081}" \
    --api-key "$IDV_PROVIDER_API_KEY" --applicant-delay-ms 3000 \
    --ready-file .run/workflow-sandbox.url >.run/workflow-sandbox.log 2>&1 &
sandbox_pid=$!
for _ in $(seq 1 50); do [[ -s .run/workflow-sandbox.url ]] && break; sleep 0.2; done
[[ -s .run/workflow-sandbox.url ]] || { echo "sandbox did not start:"; cat .run/workflow-sandbox.log; exit 1; }
export IDV_PROVIDER_URL="$(cat .run/workflow-sandbox.url)"

MID="wf-demo-$(date +%s)"
echo "==> publishing one kyc_workflow request ($MID: session → decision → AML on approval)"
"$PY" -m producer one --operation kyc_workflow --subject "${IDV_WORKFLOW_SUBJECT:-applicant-demo}" \
    --message-id "$MID" --request '{"workflow_id": "wf-kyc", "steps": ["session", "decision", "aml"]}'

export IDV_GROUP_ID="${IDV_GROUP_ID:-idv-workflow-demo}"
export IDV_STORE_URL="${IDV_STORE_URL:-sqlite:///.run/workflow-demo.db}"
export IDV_HEALTH_PORT="${IDV_HEALTH_PORT:-9401}"
export IDV_LOG_FORMAT="${IDV_LOG_FORMAT:-text}"
export IDV_WORKFLOW_POLL_AFTER_S=1 IDV_WORKFLOW_POLL_MAX_S=2 IDV_WORKFLOW_SCAN_INTERVAL_S=0.5
echo "==> running the daemon until the workflow is final (log: .run/workflow-daemon.log)"
"$PY" -m consumer run 2>.run/workflow-daemon.log &
daemon_pid=$!
state=""
for _ in $(seq 1 120); do
    sleep 1
    kill -0 "$daemon_pid" 2>/dev/null || { echo "the daemon exited:"; tail -n 30 .run/workflow-daemon.log; exit 1; }
    state="$("$PY" -m consumer show "$MID" --json 2>/dev/null \
        | "$PY" -c 'import json, sys; print((json.load(sys.stdin).get("workflow") or {}).get("state", ""))' \
        2>/dev/null || true)"
    case "$state" in finished | abandoned | expired | failed) break ;; esac
done
"$PY" -m consumer show "$MID" || true
kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
daemon_pid=""
case "$state" in
    finished | abandoned | expired | failed)
        echo "==> workflow $MID: $state; its final decision is on $IDV_TOPIC.results (revision 1)" ;;
    *) echo "==> workflow $MID did not finish within 120 s (state: ${state:-none}); see .run/workflow-daemon.log"
       exit 1 ;;
esac
