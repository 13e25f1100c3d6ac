#!/usr/bin/env bash
# Durable Enroll (payra) against CFSSL's /api/v1/cfssl/sign, side by side in one run, on
# loopback, RUNS times, same concurrency. Installs Debian's golang-cfssl and wrk if missing.
# Not part of CI. Usage: bash bench/compare-cfssl.sh [RUNS] [DURATION_S] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DURATION=${2:-5}
CONCURRENCY=${3:-16}
if ! command -v cfssl >/dev/null || ! command -v wrk >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-cfssl wrk
fi
cargo build --release --locked --bin payra >&2
BIN=$PWD/target/release/payra
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$BIN" init --dir "$WORK/certs" >/dev/null
RUST_LOG=warn "$BIN" serve --certs "$WORK/certs" --data "$WORK/data" \
    --grpc-addr 127.0.0.1:18443 --http-addr 127.0.0.1:18080 >"$WORK/payra.log" 2>&1 &
PIDS+=($!)

# CFSSL signs with the same issuing CA (it wants the key in SEC1 form), P-256 CSRs, no store.
openssl ec -in "$WORK/certs/issuing.key" -out "$WORK/cfssl-ca.key" 2>/dev/null
cat >"$WORK/cfssl.json" <<'JSON'
{"signing": {"default": {"expiry": "8760h", "usages": ["digital signature", "client auth"]}}}
JSON
cfssl serve -address 127.0.0.1 -port 18888 -ca "$WORK/certs/issuing.pem" \
    -ca-key "$WORK/cfssl-ca.key" -config "$WORK/cfssl.json" >"$WORK/cfssl.log" 2>&1 &
PIDS+=($!)
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/device.key"
openssl req -new -key "$WORK/device.key" -subj /CN=device -out "$WORK/device.csr"
python3 - "$WORK/device.csr" "$WORK/sign.lua" <<'PY'
import json, sys
csr = open(sys.argv[1]).read()
body = json.dumps({"certificate_request": csr})
open(sys.argv[2], "w").write(
    'wrk.method = "POST"\n'
    'wrk.headers["Content-Type"] = "application/json"\n'
    f'wrk.body = {json.dumps(body)}\n')
PY
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 \
        && curl -s -o /dev/null http://127.0.0.1:18888/api/v1/cfssl/sign && break
    sleep 0.1
done

RESULTS="$WORK/results.txt"
for run in $(seq 1 "$RUNS"); do
    payra_rate=$("$BIN" bench --scenario enroll --concurrency "$CONCURRENCY" \
        --duration-s "$DURATION" --warmup-s 1 --max-requests 200000 \
        --server https://localhost:18443 --certs "$WORK/certs" --json \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["throughput_per_s"]))')
    cfssl_rate=$(wrk -t2 -c"$CONCURRENCY" -d"${DURATION}s" -s "$WORK/sign.lua" \
        http://127.0.0.1:18888/api/v1/cfssl/sign | awk '/Requests\/sec/ {printf "%d", $2}')
    echo "run $run: payra durable Enroll ${payra_rate}/s, CFSSL sign ${cfssl_rate}/s"
    echo "$payra_rate $cfssl_rate" >>"$RESULTS"
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
p = statistics.median(r[0] for r in rows)
c = statistics.median(r[1] for r in rows)
print(f"median: payra {p:.0f}/s, CFSSL {c:.0f}/s, ratio {p / c:.2f} (target >= 1.5)")
PY
