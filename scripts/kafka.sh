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
KAFKA_HOME="$ROOT/kafka"
LIB="$KAFKA_HOME/lib"
STAMP="$LIB/.fetched"
CP="$LIB/*"

HOST=127.0.0.1
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-9093}"
BOOTSTRAP="$HOST:$PORT"
DATA="${KAFKA_DATA_DIR:-.run/kafka}"
[[ "$DATA" = /* ]] || DATA="$ROOT/$DATA"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
# A test run creates thousands of partitions (a few topics per test); 512 MiB ran out of heap at ~18,000.
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1536m -Xms512m}"

PIDFILE="$DATA/kafka.pid"
PROPS="$DATA/server.properties"
LOG4J="$DATA/log4j2.xml"
TOOLS_LOG4J="$DATA/log4j2-tools.xml"
LOGDIR="$DATA/logs"      # broker's own log4j output
LOGFILE="$LOGDIR/server.log"
STDOUT="$DATA/kafka.out" # JVM stdout/stderr (crashes, GC warnings)
LOGDIRS="$DATA/data"     # Kafka log segments (log.dirs / metadata.log.dir)

die() { echo "kafka.sh: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*"; }

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
running_pid() {
    # Prints the broker pid when the pid file names a live JVM running *this* data dir's config.
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $PROPS" || return 1
    echo "$pid"
}

port_in_use() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

healthy() {
    # A TCP accept is not enough: the broker must answer a metadata request and list itself.
    # The cheap port probe first spares the client's retry wait when nothing listens at all.
    port_in_use "$PORT" || return 1
    if command -v kcat >/dev/null; then
        timeout 10 kcat -b "$BOOTSTRAP" -L -m 3 -X topic.metadata.refresh.interval.ms=-1 2>/dev/null \
            | grep -q "broker 1 at $BOOTSTRAP"
    else
        timeout 15 python3 - "$BOOTSTRAP" <<'EOF' >/dev/null 2>&1
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient

async def main() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=sys.argv[1], request_timeout_ms=5000)
    await admin.start()
    try:
        meta = await admin.describe_cluster()
        assert meta["brokers"], meta
    finally:
        await admin.close()

asyncio.run(main())
EOF
    fi
}

log_tail() {
    local n="${1:-30}"
    if [[ -f "$LOGFILE" ]] && grep -qE '^\[[^]]*\] (ERROR|FATAL) ' "$LOGFILE"; then
        # The real cause is usually far above the shutdown chatter that follows it.
        echo "---- first errors in $LOGFILE ----" >&2
        grep -E -A3 '^\[[^]]*\] (ERROR|FATAL) ' "$LOGFILE" | head -n 20 >&2
    fi
    if [[ -f "$LOGFILE" ]]; then
        echo "---- last $n lines of $LOGFILE ----" >&2
        tail -n "$n" "$LOGFILE" >&2
    fi
    if [[ -s "$STDOUT" ]]; then
        echo "---- last 20 lines of $STDOUT ----" >&2
        tail -n 20 "$STDOUT" >&2
    fi
}

write_config() {
    mkdir -p "$DATA" "$LOGDIR" "$LOGDIRS"
    # Regenerated on every start so port / path changes apply; the data itself is kept.
    cat >"$PROPS" <<EOF
# Generated by scripts/kafka.sh -- edits are overwritten on the next start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CPORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER

log.dirs=$LOGDIRS
metadata.log.dir=$LOGDIRS

# Single node: every internal topic has exactly one replica.
num.partitions=8
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
# 50 partitions (the default) make the first group join and the first InitProducerId wait several
# seconds on a small machine while the internal topics are created.
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create their topics explicitly; a typo must fail, not silently create a topic.
auto.create.topics.enable=false
# Consumers join at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0

# Small footprint for a shared 2-core machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=104857600
log.retention.check.interval.ms=300000
EOF

    cat >"$LOG4J" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh. INFO to a rolling file under the data dir, nothing on the console. -->
<Configuration status="warn">
  <Appenders>
    <RollingFile name="server" fileName="$LOGFILE" filePattern="$LOGDIR/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="info"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="org.apache.kafka.raft" level="warn"/>
    <Logger name="org.apache.kafka.controller" level="info"/>
  </Loggers>
</Configuration>
EOF

    write_tools_log4j
}

write_tools_log4j() {
    mkdir -p "$DATA"
    cat >"$TOOLS_LOG4J" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka.sh for the CLI tools: warnings to stderr only. -->
<Configuration status="warn">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="stderr"/></Root></Loggers>
</Configuration>
EOF
}

tool() {
    # Runs one of Kafka's own CLI classes from the jars.
    local main="$1"; shift
    java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$CP" "$main" "$@"
}

format_storage() {
    [[ -f "$LOGDIRS/meta.properties" ]] && return 0
    local cluster_id
    cluster_id="$(tool kafka.tools.StorageTool random-uuid)"
    say "formatting $LOGDIRS (cluster id $cluster_id)"
    tool kafka.tools.StorageTool format --config "$PROPS" --cluster-id "$cluster_id" --ignore-formatted \
        >"$DATA/format.out" 2>&1 || { cat "$DATA/format.out" >&2; die "storage format failed"; }
}

lock() {
    # Serialises start/stop of one data dir: test sessions may call `start` concurrently.
    mkdir -p "$DATA"
    exec 9>"$DATA/.lock"
    flock -w $((START_TIMEOUT + 60)) 9 || die "timed out waiting for the lock on $DATA"
}

# --------------------------------------------------------------------------------------------- start
start() {
    command -v java >/dev/null || die "java not found (apt-get install -y openjdk-17-jre-headless)"
    lock
    local pid
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
        local t0=$SECONDS
        : >"$STDOUT"
        # setsid: own session, so Ctrl-C in the calling shell or the end of a CI step does not reach it.
        # shellcheck disable=SC2086  # HEAP_OPTS is a list of JVM flags
        setsid java $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGDIR" \
            -cp "$CP" kafka.Kafka "$PROPS" \
            </dev/null >>"$STDOUT" 2>&1 9>&- &
        pid=$!
        echo "$pid" >"$PIDFILE"
        say "started pid $pid, waiting for $BOOTSTRAP (timeout ${START_TIMEOUT}s)"
    fi

    local deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            log_tail
            die "broker process $pid exited during start-up"
        fi
        if healthy; then
            say "up at $BOOTSTRAP after $((SECONDS - ${t0:-$SECONDS}))s (logs: $LOGFILE)"
            return 0
        fi
        sleep 1
    done
    log_tail
    die "broker not healthy after ${START_TIMEOUT}s (still running as pid $pid; 'scripts/kafka.sh stop' to end it)"
}

# ---------------------------------------------------------------------------------------------- stop
stop() {
    local wipe=0 pid
    for arg in "$@"; do
        case "$arg" in
            --wipe) wipe=1 ;;
            *) die "stop: unknown option $arg" ;;
        esac
    done
    lock
    if pid="$(running_pid)"; then
        say "stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            say "pid $pid still alive after 30s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        fi
    else
        say "not running"
    fi
    rm -f "$PIDFILE"
    if ((wipe)); then
        case "$DATA" in
            "" | / | "$ROOT" | "$ROOT/") die "refusing to wipe $DATA" ;;
        esac
        say "wiping $DATA"
        rm -rf "$DATA"
    fi
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
    status)
        if healthy; then
            pid="$(running_pid || true)"
            say "up at $BOOTSTRAP${pid:+ (pid $pid)}"
        else
            say "not reachable at $BOOTSTRAP"; exit 1
        fi ;;
    topic) topic "$@" ;;
    logs) tail -n "${1:-100}" "$LOGFILE" ;;
    *) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help || "$cmd" == help ]] ;;
esac
