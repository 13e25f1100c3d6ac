#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for payra's PostgreSQL tests, on a free loopback port.
#
#   eval "$(scripts/test-postgres.sh start)"   # prints the variables the tests read
#   cargo test
#   scripts/test-postgres.sh stop              # stops it and deletes its directory
#   scripts/test-postgres.sh halt|resume       # stops and starts the server, keeping its data
#                                              # and port (the fault tests use their own cluster)
#   scripts/test-postgres.sh standby           # adds a synchronous streaming standby on another
#                                              # port; prints PAYRA_TEST_POSTGRES_STANDBY_PORT
#   scripts/test-postgres.sh failover          # crashes the primary, promotes the standby
#
# Needs Debian's `postgresql` package (initdb, pg_ctl). Run as root, the cluster runs as the
# `postgres` user. Password authentication (SCRAM) on 127.0.0.1 only.
set -euo pipefail

state=${PAYRA_TEST_POSTGRES_DIR:-${TMPDIR:-/tmp}/payra-test-postgres}

bin_dir() {
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        # (through symbolic links: the other server programs sit beside the real one)
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$dir" ]; then
        echo "PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql" >&2
        exit 1
    fi
    echo "$dir"
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        # A random high port; start() tries another if it is taken.
        echo $((20000 + RANDOM % 40000))
    fi
}

run_server() {
    local data=${3:-$state/data}
    as_owner "$1/pg_ctl" -D "$data" -l "$data.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -c port=$2 -c unix_socket_directories=$state \
            -c max_connections=400 -c shared_buffers=128MB" >/dev/null
}

start() {
    local bin port password
    bin=$(bin_dir)
    if [ -f "$state/env" ]; then
        stop >/dev/null 2>&1 || true
    fi
    rm -rf "$state"
    mkdir -p "$state"
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    printf '%s\n' "$password" >"$state/pwfile"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$state"
    fi
    chmod 700 "$state"
    as_owner "$bin/initdb" -D "$state/data" -U postgres --pwfile="$state/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-instructions >"$state/initdb.log"
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        if run_server "$bin" "$port"; then
            break
        fi
        port=
    done
    if [ -z "$port" ]; then
        echo "PostgreSQL did not start; see $state/data.log" >&2
        exit 1
    fi
    echo "$port" >"$state/port"
    {
        echo "export PAYRA_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
        echo "export PAYRA_TEST_POSTGRES_PASSWORD=$password"
        echo "export PAYRA_TEST_POSTGRES_BIN=$bin"
        echo "export PAYRA_TEST_POSTGRES_DATA=$state/data"
    } >"$state/env"
    cat "$state/env"
}

stop() {
    local bin data
    bin=$(bin_dir)
    for data in "$state/data" "$state/standby"; do
        if [ -d "$data" ]; then
            as_owner "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
        fi
    done
    rm -rf "$state"
}

# A hot standby streaming from the primary, which then waits for it on every commit
# (synchronous_commit = on with a synchronous standby): what a commit acknowledged, the
# standby has.
standby() {
    local bin port
    bin=$(bin_dir)
    rm -rf "$state/standby"
    as_owner env PGPASSWORD="$(cat "$state/pwfile")" "$bin/pg_basebackup" -h 127.0.0.1 \
        -p "$(cat "$state/port")" -U postgres -D "$state/standby" -R -X stream \
        -c fast >/dev/null
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        if run_server "$bin" "$port" "$state/standby"; then
            break
        fi
        port=
    done
    if [ -z "$port" ]; then
        echo "the standby did not start; see $state/standby.log" >&2
        exit 1
    fi
    echo "$port" >"$state/standby_port"
    as_owner "$bin/psql" -q -h "$state" -p "$(cat "$state/port")" -U postgres -d postgres \
        -c "ALTER SYSTEM SET synchronous_standby_names = '*'" -c "SELECT pg_reload_conf()" \
        >/dev/null
    echo "export PAYRA_TEST_POSTGRES_STANDBY_PORT=$port"
}

# The primary dies without a clean shutdown; the standby becomes the primary.
failover() {
    local bin
    bin=$(bin_dir)
    as_owner "$bin/pg_ctl" -D "$state/data" -m immediate -w stop >/dev/null
    as_owner "$bin/pg_ctl" -D "$state/standby" -w -t 60 promote >/dev/null
}

halt() {
    as_owner "$(bin_dir)/pg_ctl" -D "$state/data" -m fast -w stop >/dev/null
}

resume() {
    run_server "$(bin_dir)" "$(cat "$state/port")"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
halt) halt ;;
resume) resume ;;
standby) standby ;;
failover) failover ;;
*)
    echo "usage: $0 start|stop|halt|resume|standby|failover" >&2
    exit 2
    ;;
esac
