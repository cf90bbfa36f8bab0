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
NAME=kafka-sasl.sh

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
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx384m -Xms128m}"
PARTITIONS=4 IO_THREADS=2 RETENTION_HOURS=24 SEGMENT_BYTES=10485760 LOG_ROLL_SIZE="20 MB" LOG_ROLL_MAX=2
FORMAT_NOTE=" with SCRAM user $USER_NAME"

# shellcheck source=scripts/lib/kafka-common.sh
source "$ROOT/scripts/lib/kafka-common.sh"
TLS="$DATA/tls"

healthy() {
    # An authenticated metadata request on the SASL listener: proves SCRAM works, not just that a port is open.
    port_in_use "$SASL_PORT" || return 1
    metadata_probe 20 "$HOST:$SASL_PORT" "$USER_NAME" "$USER_PASSWORD"
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

listener_properties() {
    local scram="org.apache.kafka.common.security.scram.ScramLoginModule required;"
    cat <<EOF
listeners=SASL_PLAINTEXT://$HOST:$SASL_PORT,CONTROLLER://$HOST:$CPORT,INTERNAL://$HOST:$IPORT,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT
advertised.listeners=SASL_PLAINTEXT://$HOST:$SASL_PORT,INTERNAL://$HOST:$IPORT,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
inter.broker.listener.name=INTERNAL

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
EOF
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
        format_storage \
            --add-scram "SCRAM-SHA-256=[name=$USER_NAME,password=$USER_PASSWORD]" \
            --add-scram "SCRAM-SHA-512=[name=$USER_NAME,password=$USER_PASSWORD]"
        launch
        pid=$BROKER_PID
        say "started pid $pid, waiting for $HOST:$SASL_PORT (timeout ${START_TIMEOUT}s)"
    fi
    wait_healthy "$pid" "$SECONDS" "SASL_PLAINTEXT://$HOST:$SASL_PORT SSL://$HOST:$SSL_PORT SASL_SSL://$HOST:$SASL_SSL_PORT"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    start) start ;;
    stop) stop "$@" ;;
    status) status "$HOST:$SASL_PORT" ;;
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
    *) usage 29 ;;
esac
