#!/usr/bin/env bash
# Side-by-side figures for docs/performance.md: payra on sled and on PostgreSQL (one and two
# replicas on one database), measured with `payra bench` in one run, rounds alternating.
#
#   cargo build --release
#   eval "$(scripts/test-postgres.sh start)"
#   scripts/bench-postgres.sh [rounds] > results.tsv
#
# Prints one line per measurement: round, setup, scenario, requests per second, p50 and p99
# latency (microseconds), raw ECDSA verify rate of the same binary, server CPU per request.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=target/release/payra
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

: "${PAYRA_TEST_POSTGRES_URL:?start a cluster: eval \"\$(scripts/test-postgres.sh start)\"}"
export PGPASSWORD=$PAYRA_TEST_POSTGRES_PASSWORD PAYRA_DB_PASSWORD=$PAYRA_TEST_POSTGRES_PASSWORD
db=bench_$(date +%s)
psql -q "$PAYRA_TEST_POSTGRES_URL" -c "CREATE DATABASE $db"
pg_url="${PAYRA_TEST_POSTGRES_URL%/*}/$db"
"$bin" init --dir "$work/certs" >/dev/null
"$bin" db migrate --store-url "$pg_url" >/dev/null

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start NAME [serve flags...]: starts a server, waits until it answers, sets GRPC_NAME/HTTP_NAME.
start() {
    local name=$1 grpc http
    shift
    grpc=$(port)
    http=$(port)
    RUST_LOG=warn "$bin" serve --certs "$work/certs" --data "$work/data-$name" \
        --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$http" "$@" \
        >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    printf -v "GRPC_$name" '%s' "$grpc"
    printf -v "HTTP_$name" '%s' "$http"
}

start sled
start pg --store-url "$pg_url"
start pg2 --store-url "$pg_url"

# bench SETUP SCENARIO GRPC HTTP [flags...]
bench() {
    local setup=$1 scenario=$2 grpc=$3 http=$4
    shift 4
    "$bin" bench --scenario "$scenario" --server "https://localhost:$grpc" \
        --http "http://127.0.0.1:$http" --certs "$work/certs" --duration-s 5 --warmup-s 1 \
        --json "$@"
}

report() {
    python3 -c '
import json, sys
round_, setup, scenario = sys.argv[1:4]
r = json.load(sys.stdin)
lat = r.get("latency") or {}
print("\t".join(str(x) for x in [round_, setup, scenario, round(r.get("throughput_per_s", 0)),
      lat.get("p50_us", ""), lat.get("p99_us", ""), round(r.get("raw_verify_per_s", 0)),
      r.get("server_cpu_us_per_request", "")]))
' "$@"
}

echo -e "round\tsetup\tscenario\trps\tp50_us\tp99_us\traw_verify_per_s\tserver_cpu_us"
for round in $(seq "$rounds"); do
    for setup in sled pg; do
        g=GRPC_$setup h=HTTP_$setup
        bench "$setup" verify "${!g}" "${!h}" --concurrency 64 --connections 1 | report "$round" "$setup" verify
        bench "$setup" verify "${!g}" "${!h}" --concurrency 64 --connections 1 --reserve | report "$round" "$setup" verify-reserve
        bench "$setup" enroll "${!g}" "${!h}" --concurrency 16 | report "$round" "$setup" enroll
        bench "$setup" token "${!g}" "${!h}" --concurrency 16 | report "$round" "$setup" token
        bench "$setup" status "${!g}" "${!h}" --concurrency 64 | report "$round" "$setup" status
    done
    # Two replicas on the same database, half the load each, at the same time.
    for scenario in verify-reserve enroll; do
        flags=(--concurrency 32 --connections 1 --reserve)
        real=verify
        if [ "$scenario" = enroll ]; then flags=(--concurrency 8); real=enroll; fi
        bench pg "$real" "$GRPC_pg" "$HTTP_pg" "${flags[@]}" >"$work/a.json" &
        a=$!
        bench pg2 "$real" "$GRPC_pg2" "$HTTP_pg2" "${flags[@]}" >"$work/b.json"
        wait "$a"
        python3 -c '
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
total = a.get("throughput_per_s", 0) + b.get("throughput_per_s", 0)
print("\t".join(str(x) for x in [sys.argv[3], "pg-2-replicas", sys.argv[4], round(total),
      (a.get("latency") or {}).get("p50_us", ""), (a.get("latency") or {}).get("p99_us", ""),
      round(a.get("raw_verify_per_s", 0)), ""]))
' "$work/a.json" "$work/b.json" "$round" "$scenario"
    done
done
