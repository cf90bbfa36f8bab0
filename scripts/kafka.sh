#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) run from the Maven jars in kafka/lib.
# No Docker needed: Java 17 and Maven are enough.
#
#   scripts/kafka.sh fetch                 resolve kafka/pom.xml into kafka/lib (only when missing or stale)
#   scripts/kafka.sh start                 format storage on first start, launch, wait until healthy
#   scripts/kafka.sh stop [--wipe]         SIGTERM, SIGKILL after 30 s; --wipe also deletes the data dir
#   scripts/kafka.sh status                exit 0 when the broker answers a metadata request
#   scripts/kafka.sh topic NAME [PARTS]    create a topic if missing (default 8 partitions, rf 1)
#   scripts/kafka.sh logs [N]              last N lines of the broker log
#
# Environment (all optional):
#   KAFKA_PORT=9092  KAFKA_CONTROLLER_PORT=9093  KAFKA_DATA_DIR=.run/kafka (relative to the repo root)
#   KAFKA_START_TIMEOUT=90  KAFKA_HEAP_OPTS="-Xmx1536m -Xms512m"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME=kafka.sh
KAFKA_HOME="$ROOT/kafka"

HOST=127.0.0.1
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
BOOTSTRAP="$HOST:$PORT"
DATA="${KAFKA_DATA_DIR:-.run/kafka}"
# A test run creates thousands of partitions (a few topics per test); 512 MiB ran out of heap at ~18,000.
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1536m -Xms512m}"
PARTITIONS=8 IO_THREADS=4 RETENTION_HOURS=168 SEGMENT_BYTES=104857600 LOG_ROLL_SIZE="50 MB" LOG_ROLL_MAX=3

# shellcheck source=scripts/lib/kafka-common.sh
source "$ROOT/scripts/lib/kafka-common.sh"
STAMP="$LIB/.fetched"

# --------------------------------------------------------------------------------------------- fetch
fetch() {
    command -v mvn >/dev/null || die "mvn not found (apt-get install -y maven)"
    if [[ -d "$LIB" && -f "$STAMP" && ! "$KAFKA_HOME/pom.xml" -nt "$STAMP" ]]; then
        return 0
    fi
    say "resolving kafka/pom.xml into kafka/lib"
    local tmp="$KAFKA_HOME/lib.tmp" out
    rm -rf "$tmp"
    out="$(mktemp)"
    # Maven 3.8 prints colour escapes even with -q -B, so its output is only shown when it fails.
    if ! (cd "$KAFKA_HOME" && mvn -q -B dependency:copy-dependencies \
            -DoutputDirectory="$tmp" -DincludeScope=runtime) >"$out" 2>&1; then
        cat "$out" >&2; rm -f "$out"; rm -rf "$tmp"
        die "mvn dependency:copy-dependencies failed"
    fi
    rm -f "$out"
    # Replace the whole directory so jars of a previous kafka.version cannot linger on the classpath.
    rm -rf "$LIB"
    mv "$tmp" "$LIB"
    touch "$STAMP"
}

# ------------------------------------------------------------------------------------------- helpers
healthy() {
    # A TCP accept is not enough: the broker must answer a metadata request and list itself.
    # The cheap port probe first spares the client's retry wait when nothing listens at all.
    port_in_use "$PORT" || return 1
    if command -v kcat >/dev/null; then
        timeout 10 kcat -b "$BOOTSTRAP" -L -m 3 -X topic.metadata.refresh.interval.ms=-1 2>/dev/null \
            | grep -q "broker 1 at $BOOTSTRAP"
    else
        metadata_probe 15 "$BOOTSTRAP"
    fi
}

listener_properties() {
    cat <<EOF
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
}

# --------------------------------------------------------------------------------------------- start
start() {
    command -v java >/dev/null || die "java not found (apt-get install -y openjdk-17-jre-headless)"
    lock
    local pid t0=$SECONDS
    if pid="$(running_pid)"; then
        if healthy; then
            say "already running (pid $pid) at $BOOTSTRAP"
            return 0
        fi
        say "pid $pid is running but not answering yet; waiting"
    else
        if healthy; then
            # Something else (another data dir, a container) already serves this port.
            say "a broker already answers at $BOOTSTRAP (not started by this data dir); leaving it alone"
            return 0
        fi
        rm -f "$PIDFILE"
        local p
        for p in "$PORT" "$CPORT"; do
            port_in_use "$p" && die "port $HOST:$p is taken by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT)"
        done
        fetch
        write_config
        format_storage
        t0=$SECONDS
        launch
        pid=$BROKER_PID
        say "started pid $pid, waiting for $BOOTSTRAP (timeout ${START_TIMEOUT}s)"
    fi
    wait_healthy "$pid" "$t0" "$BOOTSTRAP"
}

# --------------------------------------------------------------------------------------------- topic
topic() {
    (($# >= 1 && $# <= 2)) || die "usage: kafka.sh topic NAME [PARTITIONS]"
    local name="$1" parts="${2:-8}"
    [[ "$parts" =~ ^[1-9][0-9]*$ ]] || die "partitions must be a positive integer: $parts"
    healthy || die "no broker at $BOOTSTRAP (run scripts/kafka.sh start)"
    [[ -f "$TOOLS_LOG4J" ]] || write_tools_log4j
    tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
        --topic "$name" --partitions "$parts" --replication-factor 1 >/dev/null
    say "topic $name ready"
}

# -------------------------------------------------------------------------------------------- main
cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    fetch) fetch ;;
    start) start ;;
    stop) stop "$@" ;;
    status) status "$BOOTSTRAP" ;;
    topic) topic "$@" ;;
    logs) tail -n "${1:-100}" "$LOGFILE" ;;
    *) usage 15 ;;
esac
