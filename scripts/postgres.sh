#!/usr/bin/env bash
# Local PostgreSQL for the postgresql:// store backend and its tests (Debian cluster, no Docker).
#
#   scripts/postgres.sh start    install postgresql-15 if missing, create/start the cluster, wait until it
#                                accepts connections, ensure role and database idv/idv, print the URL
#   scripts/postgres.sh stop     stop the cluster
#   scripts/postgres.sh stop-if-ours  stop it only if `start` started it (.run/postgres.started)
#   scripts/postgres.sh status   exit 0 when the server accepts connections
#   scripts/postgres.sh url      print the connection URL
#
# Environment (all optional): PG_VERSION=15 PG_CLUSTER=main PG_PORT=5432 PG_START_TIMEOUT=30
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_PORT="${PG_PORT:-5432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-30}"
DB_USER=idv
DB_PASS=idv
DB_NAME=idv
URL="postgresql://$DB_USER:$DB_PASS@127.0.0.1:$PG_PORT/$DB_NAME"

die() { echo "postgres.sh: $*" >&2; exit 1; }
say() { echo "postgres.sh: $*"; }

as_root() {
    if ((EUID == 0)); then "$@"; else sudo "$@"; fi
}

as_postgres() {
    # cd /: the postgres user usually cannot read the caller's working directory.
    if ((EUID == 0)); then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && sudo -u postgres -- "$@")
    fi
}

psql_admin() {
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres -tA "$@"
}

ready() {
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" -t 2 2>/dev/null
}

ensure_installed() {
    if [[ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]] && command -v pg_ctlcluster >/dev/null; then
        return 0
    fi
    say "installing postgresql-$PG_VERSION"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "postgresql-$PG_VERSION" >/dev/null
}

ensure_cluster() {
    if ! pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c {f=1} END {exit !f}'; then
        say "creating cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
        as_root pg_createcluster "$PG_VERSION" "$PG_CLUSTER" --port "$PG_PORT" >/dev/null
    fi
    local port
    port="$(pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c {print $3}')"
    [[ "$port" == "$PG_PORT" ]] || die "cluster $PG_VERSION/$PG_CLUSTER is configured for port $port, not $PG_PORT"
}

cluster_online() {
    pg_lsclusters -h | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c && $4 ~ /^online/ {f=1} END {exit !f}'
}

ensure_role_and_db() {
    if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" ]]; then
        psql_admin -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASS'"
    else
        # Reassert the password so a hand-edited role still matches the documented URL.
        psql_admin -c "ALTER ROLE $DB_USER WITH LOGIN PASSWORD '$DB_PASS'"
    fi
    if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" ]]; then
        psql_admin -c "CREATE DATABASE $DB_NAME OWNER $DB_USER"
    fi
    # PostgreSQL 15 no longer lets every role create objects in the public schema.
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d "$DB_NAME" \
        -c "ALTER SCHEMA public OWNER TO $DB_USER"
}

start() {
    ensure_installed
    ensure_cluster
    if ! cluster_online; then
        say "starting cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
        # `make stop` stops the cluster only when this script started it (a server that was already
        # running belongs to someone else).
        mkdir -p "$ROOT/.run" && echo "$PG_VERSION/$PG_CLUSTER" >"$ROOT/.run/postgres.started"
    fi
    local deadline=$((SECONDS + PG_START_TIMEOUT))
    until ready; do
        if ((SECONDS >= deadline)); then
            tail -n 30 "/var/log/postgresql/postgresql-$PG_VERSION-$PG_CLUSTER.log" >&2 || true
            die "server not ready on 127.0.0.1:$PG_PORT after ${PG_START_TIMEOUT}s"
        fi
        sleep 0.5
    done
    ensure_role_and_db
    # Prove the URL works with password authentication over TCP, as the application connects.
    PGCONNECT_TIMEOUT=5 psql -X -q "$URL" -tAc 'SELECT 1' >/dev/null \
        || die "cannot log in as $DB_USER over TCP (check pg_hba.conf)"
    echo "$URL"
}

stop() {
    if pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c {f=1} END {exit !f}' \
        && cluster_online; then
        say "stopping cluster $PG_VERSION/$PG_CLUSTER"
        as_root pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop -m fast
        rm -f "$ROOT/.run/postgres.started"
    else
        say "not running"
    fi
}

cmd="${1:-}"
case "$cmd" in
    start) start ;;
    stop) stop ;;
    stop-if-ours)
        if [[ -f "$ROOT/.run/postgres.started" ]]; then stop; else say "not started by this project: left running"; fi ;;
    status)
        if ready; then say "up at 127.0.0.1:$PG_PORT"; else say "not reachable at 127.0.0.1:$PG_PORT"; exit 1; fi ;;
    url) echo "$URL" ;;
    *) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help || "$cmd" == help ]] ;;
esac
