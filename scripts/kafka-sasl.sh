#!/usr/bin/env bash
# A SECOND local Apache Kafka broker with authenticated and encrypted listeners, for the security tests.
# Same jars as scripts/kafka.sh (kafka/lib), its own data dir, ports, pid file and lock, so it runs next to
# the plain broker on 9092 without touching it.
#
#   scripts/kafka-sasl.sh start            make the test CA and certificates (first start), format storage
#                                          with the SCRAM users, launch, wait until healthy
#   scripts/kafka-sasl.sh stop [--wipe]    SIGTERM, SIGKILL after 30 s; --wipe also deletes the data dir
#   scripts/kafka-sasl.sh status           exit 0 when the broker answers an authenticated metadata request
#   scripts/kafka-sasl.sh env              print the client settings (IDV_KAFKA_* lines) for the SASL listener
#   scripts/kafka-sasl.sh logs [N]         last N lines of the broker log
#
# Listeners (all on 127.0.0.1):
#   19094  SASL_PLAINTEXT  SCRAM-SHA-256 and SCRAM-SHA-512
#   19095  CONTROLLER      KRaft controller (PLAINTEXT, loopback only)
#   19096  INTERNAL        PLAINTEXT inter-broker listener (loopback only; the tests do not use it)
#   19097  SSL             TLS with client certificates required (mutual TLS), CA made by this script
#   19098  SASL_SSL        TLS (server certificate only) plus SCRAM-SHA-256/512
#
# The SCRAM credentials are created when the storage is formatted (StorageTool --add-scram), so they exist
# before the broker accepts its first connection. User and password come from KAFKA_SASL_USER /
# KAFKA_SASL_PASSWORD (default idv / idv-secret) and only apply to a fresh data dir (stop --wipe to change).
# Test material only: the CA key sits unencrypted in the data dir.
#
# Environment (all optional):
#   KAFKA_SASL_DATA_DIR=.run/kafka-sasl  KAFKA_SASL_BASE_PORT=19094  KAFKA_START_TIMEOUT=90
#   KAFKA_HEAP_OPTS="-Xmx384m -Xms128m"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIB="$ROOT/kafka/lib"
CP="$LIB/*"

HOST=127.0.0.1
BASE="${KAFKA_SASL_BASE_PORT:-19094}"
SASL_PORT=$BASE
CPORT=$((BASE + 1))
IPORT=$((BASE + 2))
SSL_PORT=$((BASE + 3))
SASL_SSL_PORT=$((BASE + 4))
USER_NAME="${KAFKA_SASL_USER:-idv}"
USER_PASSWORD="${KAFKA_SASL_PASSWORD:-idv-secret}"
DATA="${KAFKA_SASL_DATA_DIR:-.run/kafka-sasl}"
[[ "$DATA" = /* ]] || DATA="$ROOT/$DATA"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx384m -Xms128m}"

PIDFILE="$DATA/kafka.pid"
PROPS="$DATA/server.properties"
LOG4J="$DATA/log4j2.xml"
TOOLS_LOG4J="$DATA/log4j2-tools.xml"
LOGDIR="$DATA/logs"
LOGFILE="$LOGDIR/server.log"
STDOUT="$DATA/kafka.out"
LOGDIRS="$DATA/data"
TLS="$DATA/tls"

die() { echo "kafka-sasl.sh: $*" >&2; exit 1; }
say() { echo "kafka-sasl.sh: $*"; }

running_pid() {
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
    # An authenticated metadata request on the SASL listener: proves SCRAM works, not just that a port is open.
    port_in_use "$SASL_PORT" || return 1
    timeout 20 python3 - "$HOST:$SASL_PORT" "$USER_NAME" "$USER_PASSWORD" <<'EOF' >/dev/null 2>&1
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient

async def main() -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=sys.argv[1], request_timeout_ms=5000, security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256", sasl_plain_username=sys.argv[2], sasl_plain_password=sys.argv[3],
    )
    await admin.start()
    try:
        meta = await admin.describe_cluster()
        assert meta["brokers"], meta
    finally:
        await admin.close()

asyncio.run(main())
EOF
}

log_tail() {
    if [[ -f "$LOGFILE" ]] && grep -qE '^\[[^]]*\] (ERROR|FATAL) ' "$LOGFILE"; then
        echo "---- first errors in $LOGFILE ----" >&2
        grep -E -A3 '^\[[^]]*\] (ERROR|FATAL) ' "$LOGFILE" | head -n 20 >&2
    fi
    [[ -f "$LOGFILE" ]] && { echo "---- last 30 lines of $LOGFILE ----" >&2; tail -n 30 "$LOGFILE" >&2; }
    [[ -s "$STDOUT" ]] && { echo "---- last 20 lines of $STDOUT ----" >&2; tail -n 20 "$STDOUT" >&2; }
    return 0
}

make_tls() {
    # A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate, all PEM.
    # Keys are PKCS#8 and unencrypted (Kafka's PEM keystore then needs no ssl.key.password).
    [[ -f "$TLS/server.pem" && -f "$TLS/client.crt" ]] && return 0
    command -v openssl >/dev/null || die "openssl not found"
    say "creating a test CA and certificates in $TLS"
    rm -rf "$TLS"
    mkdir -p "$TLS"
    (
        cd "$TLS"
        umask 077
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=idv test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -out ca.crt 2>/dev/null
        local name
        for name in server client; do
            openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name.key" 2>/dev/null
            openssl req -new -key "$name.key" -subj "/CN=idv-$name" -out "$name.csr" 2>/dev/null
        done
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "extendedKeyUsage=serverAuth" \
            "keyUsage=critical,digitalSignature" >server.ext
        printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature" >client.ext
        for name in server client; do
            openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 3650 \
                -extfile "$name.ext" -out "$name.crt" 2>/dev/null
        done
        # Kafka's PEM keystore: the private key followed by the certificate chain, in one file.
        cat server.key server.crt ca.crt >server.pem
        # A second, unrelated CA: a client trusting only this one must reject the broker.
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other-ca.key 2>/dev/null
        openssl req -x509 -new -key other-ca.key -sha256 -days 3650 -subj "/CN=unrelated CA" \
            -out other-ca.crt 2>/dev/null
        rm -f ./*.csr ./*.ext ./*.srl
        chmod 644 ./*.crt
    ) || die "certificate generation failed"
}

write_config() {
    mkdir -p "$DATA" "$LOGDIR" "$LOGDIRS"
    local scram="org.apache.kafka.common.security.scram.ScramLoginModule required;"
    cat >"$PROPS" <<EOF
# Generated by scripts/kafka-sasl.sh -- edits are overwritten on the next start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CPORT
listeners=SASL_PLAINTEXT://$HOST:$SASL_PORT,CONTROLLER://$HOST:$CPORT,INTERNAL://$HOST:$IPORT,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT
advertised.listeners=SASL_PLAINTEXT://$HOST:$SASL_PORT,INTERNAL://$HOST:$IPORT,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER

# SASL/SCRAM: the server side of the JAAS configuration, per listener and mechanism. The users and their
# salted credentials live in the cluster metadata (created at format time, see format_storage).
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=$scram
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=$scram
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=$scram
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$scram

# TLS: one PEM keystore (key + chain) for both TLS listeners; the SSL listener also demands a client
# certificate signed by the test CA, the SASL_SSL listener authenticates clients by SCRAM instead.
ssl.keystore.type=PEM
ssl.keystore.location=$TLS/server.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.crt
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none

log.dirs=$LOGDIRS
metadata.log.dir=$LOGDIRS
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=10485760
EOF

    cat >"$LOG4J" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka-sasl.sh. INFO to a rolling file under the data dir, nothing on the console. -->
<Configuration status="warn">
  <Appenders>
    <RollingFile name="server" fileName="$LOGFILE" filePattern="$LOGDIR/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="info"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="org.apache.kafka.raft" level="warn"/>
  </Loggers>
</Configuration>
EOF

    cat >"$TOOLS_LOG4J" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="stderr"/></Root></Loggers>
</Configuration>
EOF
}

tool() {
    local main="$1"; shift
    java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$CP" "$main" "$@"
}

format_storage() {
    [[ -f "$LOGDIRS/meta.properties" ]] && return 0
    local cluster_id
    cluster_id="$(tool kafka.tools.StorageTool random-uuid)"
    say "formatting $LOGDIRS (cluster id $cluster_id) with SCRAM user $USER_NAME"
    tool kafka.tools.StorageTool format --config "$PROPS" --cluster-id "$cluster_id" --ignore-formatted \
        --add-scram "SCRAM-SHA-256=[name=$USER_NAME,password=$USER_PASSWORD]" \
        --add-scram "SCRAM-SHA-512=[name=$USER_NAME,password=$USER_PASSWORD]" \
        >"$DATA/format.out" 2>&1 || { cat "$DATA/format.out" >&2; die "storage format failed"; }
}

lock() {
    mkdir -p "$DATA"
    exec 9>"$DATA/.lock"
    flock -w $((START_TIMEOUT + 60)) 9 || die "timed out waiting for the lock on $DATA"
}

start() {
    command -v java >/dev/null || die "java not found (apt-get install -y openjdk-17-jre-headless)"
    if [[ ! -d "$LIB" ]]; then
        bash "$ROOT/scripts/kafka.sh" fetch
    fi
    lock
    local pid
    if pid="$(running_pid)"; then
        if healthy; then
            say "already running (pid $pid) at $HOST:$SASL_PORT"
            return 0
        fi
        say "pid $pid is running but not answering yet; waiting"
    else
        rm -f "$PIDFILE"
        local p
        for p in "$SASL_PORT" "$CPORT" "$IPORT" "$SSL_PORT" "$SASL_SSL_PORT"; do
            port_in_use "$p" && die "port $HOST:$p is taken by another process (set KAFKA_SASL_BASE_PORT)"
        done
        make_tls
        write_config
        format_storage
        : >"$STDOUT"
        # shellcheck disable=SC2086  # HEAP_OPTS is a list of JVM flags
        setsid java $HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGDIR" \
            -cp "$CP" kafka.Kafka "$PROPS" \
            </dev/null >>"$STDOUT" 2>&1 9>&- &
        pid=$!
        echo "$pid" >"$PIDFILE"
        say "started pid $pid, waiting for $HOST:$SASL_PORT (timeout ${START_TIMEOUT}s)"
    fi
    local t0=$SECONDS deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            log_tail
            die "broker process $pid exited during start-up"
        fi
        if healthy; then
            say "up at SASL_PLAINTEXT://$HOST:$SASL_PORT SSL://$HOST:$SSL_PORT SASL_SSL://$HOST:$SASL_SSL_PORT after $((SECONDS - t0))s"
            return 0
        fi
        sleep 1
    done
    log_tail
    die "broker not healthy after ${START_TIMEOUT}s (still running as pid $pid; 'scripts/kafka-sasl.sh stop' to end it)"
}

stop() {
    local wipe=0 pid arg
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

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    start) start ;;
    stop) stop "$@" ;;
    status)
        if healthy; then
            pid="$(running_pid || true)"
            say "up at $HOST:$SASL_PORT${pid:+ (pid $pid)}"
        else
            say "not reachable at $HOST:$SASL_PORT"; exit 1
        fi ;;
    env)
        cat <<EOF
IDV_KAFKA_BOOTSTRAP=$HOST:$SASL_PORT
IDV_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT
IDV_KAFKA_SASL_MECHANISM=SCRAM-SHA-256
IDV_KAFKA_SASL_USERNAME=$USER_NAME
IDV_KAFKA_SASL_PASSWORD=$USER_PASSWORD
EOF
        ;;
    logs) tail -n "${1:-100}" "$LOGFILE" ;;
    *) sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help || "$cmd" == help ]] ;;
esac
