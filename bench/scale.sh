#!/usr/bin/env bash
# payra at scale on sled: populates RECORDS synthetic devices (once per DATA directory), then
# starts a release server on them and measures what docs/performance.md reports: populate
# time and peak RSS, disk, ready time after a restart, RSS, and VerifyPayment and
# GetCertificateStatus with a uniform and a Zipf (skew 1.0) choice of devices, with the
# cache's hit rate. Not part of CI. Usage:
#   bash bench/scale.sh RECORDS DATA [RUNS] [DURATION_S]
# DATA is kept (populating 10M takes minutes); remove it when done. CACHE_BYTES sets
# verification.cache_bytes (default: payra's default).
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${1:?records}
DATA=${2:?data directory}
RUNS=${3:-3}
DURATION=${4:-10}
cargo build --release --locked --bin payra >&2
BIN=$PWD/target/release/payra
mkdir -p "$DATA"
OUT="$DATA/results.jsonl"
if [ ! -f "$DATA/populated" ]; then
    rm -rf "$DATA/certs" "$DATA/data"
    "$BIN" init --dir "$DATA/certs" >/dev/null
    /usr/bin/time -f '%e s, %M KB peak RSS' -o "$DATA/populate.time" \
        "$BIN" bench populate --data "$DATA/data" --records "$RECORDS" >&2
    chmod -R go-rwx "$DATA/data"
    echo "populate: $(cat "$DATA/populate.time")" | tee "$DATA/populated"
fi
echo "disk: $(du -sb "$DATA/data" | cut -f1) bytes for $RECORDS records" | tee -a "$DATA/populated"
CONFIG="$DATA/payra.toml"
echo "[verification]" >"$CONFIG"
[ -n "${CACHE_BYTES:-}" ] && echo "cache_bytes = $CACHE_BYTES" >>"$CONFIG"
SERVER=
trap 'kill $SERVER 2>/dev/null || true' EXIT
start() {
    local started=$EPOCHREALTIME
    RUST_LOG=warn "$BIN" serve --config "$CONFIG" --certs "$DATA/certs" --data "$DATA/data" \
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
