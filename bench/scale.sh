#!/usr/bin/env bash
# payra at scale: populates RECORDS synthetic devices (once per DATA directory), then starts
# a release server on them and measures what docs/performance.md reports: populate time and
# peak RSS, disk, ready time after a restart, RSS, and VerifyPayment and GetCertificateStatus
# with a uniform and a Zipf (skew 1.0) choice of devices, with the cache's hit rate. Not part
# of CI. Usage:
#   bash bench/scale.sh RECORDS DATA [RUNS] [DURATION_S]
# DATA is kept (populating 10M takes minutes); remove it when done (with BACKEND=postgres,
# stop its cluster first: PAYRA_TEST_POSTGRES_DIR=DATA/pg scripts/test-postgres.sh stop).
# PAYRA_BIN (an absolute path) runs that binary instead of building this tree's. CACHE_BYTES sets
# verification.cache_bytes (default: payra's default). BACKEND=postgres puts the certificates
# in a PostgreSQL cluster of its own under DATA/pg (scripts/test-postgres.sh), populated with
# COPY.
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${1:?records}
DATA=${2:?data directory}
RUNS=${3:-3}
DURATION=${4:-10}
if [ -n "${PAYRA_BIN:-}" ]; then
    BIN=$PAYRA_BIN
else
    cargo build --release --locked --bin payra >&2
    BIN=$PWD/target/release/payra
fi
mkdir -p "$DATA"
OUT="$DATA/results.jsonl"
STORE=()
if [ "${BACKEND:-sled}" = postgres ]; then
    export PAYRA_TEST_POSTGRES_DIR="$DATA/pg"
    if [ -f "$DATA/pg/env" ]; then
        scripts/test-postgres.sh resume 2>/dev/null || true
    else
        scripts/test-postgres.sh start >/dev/null
    fi
    # shellcheck disable=SC1091
    source "$DATA/pg/env"
    export PAYRA_DB_PASSWORD=$PAYRA_TEST_POSTGRES_PASSWORD
    URL=${PAYRA_TEST_POSTGRES_URL%/postgres}/payra
    psql() { PGPASSWORD=$PAYRA_DB_PASSWORD "$PAYRA_TEST_POSTGRES_BIN/psql" -qtA "$@"; }
    psql "$PAYRA_TEST_POSTGRES_URL" -c "CREATE DATABASE payra" 2>/dev/null || true
    STORE=(--store-url "$URL")
    WHERE=(--store-url "$URL")
else
    WHERE=(--data "$DATA/data")
fi
if [ ! -f "$DATA/populated" ]; then
    rm -rf "$DATA/certs" "$DATA/data"
    "$BIN" init --dir "$DATA/certs" >/dev/null
    if [ "${BACKEND:-sled}" = postgres ]; then
        "$BIN" db migrate "${STORE[@]}" >&2
    fi
    /usr/bin/time -f '%e s, %M KB peak RSS' -o "$DATA/populate.time" \
        "$BIN" bench populate "${WHERE[@]}" --records "$RECORDS" >&2
    echo "populate: $(cat "$DATA/populate.time")" | tee "$DATA/populated"
fi
mkdir -p "$DATA/data"
chmod -R go-rwx "$DATA/data"
if [ "${BACKEND:-sled}" = postgres ]; then
    psql "$URL" -c "VACUUM ANALYZE certificates"
    echo "certificates table, heap + TOAST / indexes (bytes), rows:"
    psql "$URL" -c "SELECT pg_table_size('certificates'), pg_indexes_size('certificates'), \
        (SELECT count(*) FROM certificates)"
    psql "$URL" -c "SELECT indexrelid::regclass, pg_relation_size(indexrelid) FROM pg_index \
        WHERE indrelid = 'certificates'::regclass"
    echo "database: $(psql "$URL" -c "SELECT pg_database_size('payra')") bytes"
else
    echo "disk: $(du -sb "$DATA/data" | cut -f1) bytes for $RECORDS records"
fi
CONFIG="$DATA/payra.toml"
echo "[verification]" >"$CONFIG"
[ -n "${CACHE_BYTES:-}" ] && echo "cache_bytes = $CACHE_BYTES" >>"$CONFIG"
SERVER=
trap 'kill $SERVER 2>/dev/null || true' EXIT
start() {
    local started=$EPOCHREALTIME
    RUST_LOG=warn "$BIN" serve --config "$CONFIG" --certs "$DATA/certs" --data "$DATA/data" "${STORE[@]}" \
        --grpc-addr 127.0.0.1:18443 --http-addr 127.0.0.1:18080 >>"$DATA/server.log" 2>&1 &
    SERVER=$!
    until curl -sf http://127.0.0.1:18080/readyz >/dev/null 2>&1; do
        kill -0 "$SERVER" || { tail "$DATA/server.log"; exit 1; }
        sleep 0.05
    done
    echo "ready after $(python3 -c "print(f'{$EPOCHREALTIME - $started:.2f}')") s," \
        "RSS $(($(awk '/VmRSS/ {print $2}' /proc/$SERVER/status) / 1024)) MB"
}
stop() { kill -INT "$SERVER"; wait "$SERVER" || true; }
# The first start after populating, then two restarts.
for n in 1 2 3; do start; stop; done
start
COMMON=(--server https://localhost:18443 --certs "$DATA/certs" --http http://127.0.0.1:18080
        --duration-s "$DURATION" --warmup-s 2 --json --population "$RECORDS")
label() { python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='$1'; print(json.dumps(r))"; }
: >"$OUT"
for run in $(seq 1 "$RUNS"); do
    for skew in 0 1; do
        "$BIN" bench --scenario verify --concurrency 64 --connections 1 --skew $skew "${COMMON[@]}" \
            | label "verify_skew$skew" | tee -a "$OUT"
        "$BIN" bench --scenario status --concurrency 16 --skew $skew "${COMMON[@]}" \
            | label "status_skew$skew" | tee -a "$OUT"
    done
done
echo "RSS after the runs: $(($(awk '/VmRSS/ {print $2}' /proc/$SERVER/status) / 1024)) MB"
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("scenario        runs  median/s  p50_us  p99_us  raw_verify/s  ratio  server_us/req  cache_hit")
for s in ["verify_skew0", "verify_skew1", "status_skew0", "status_skew1"]:
    r = [x for x in rows if x["scenario"] == s]
    med = lambda k: statistics.median((x[k] or 0) for x in r)
    lat = lambda k: statistics.median(x["latency"][k] for x in r)
    print(f"{s:<15} {len(r):>4} {med('throughput_per_s'):>9.0f} {lat('p50_us'):>7.0f} {lat('p99_us'):>7.0f}"
          f" {med('raw_verify_per_s'):>13.0f} {med('ratio_to_raw_verify'):>6.2f}"
          f" {med('server_cpu_us_per_request'):>14.1f} {med('cache_hit_rate') * 100:>9.1f}%")
PY
