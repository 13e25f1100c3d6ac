#!/usr/bin/env bash
# Enroll end to end with the issuing key in a file and in a SoftHSM2 token (PKCS#11), rounds
# alternating, one server of each kept running. Needs Debian's softhsm2.
#
#   cargo build --release
#   scripts/bench-hsm.sh [rounds] > results.tsv
#
# Prints one line per run: round, signer, scenario, requests per second, p50 and p99 (µs),
# server CPU per request (µs).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=target/release/payra
module=/usr/lib/softhsm/libsofthsm2.so
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" >"$work/softhsm2.conf"
export SOFTHSM2_CONF=$work/softhsm2.conf
softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 >/dev/null
printf '1234' >"$work/pin"
chmod 600 "$work/pin"
uri="pkcs11:token=bench;object=issuing?module-path=$module&pin-source=file:$work/pin"
"$bin" init --dir "$work/certs-file" >/dev/null
"$bin" init --dir "$work/certs-pkcs11" --pkcs11-uri "$uri" >/dev/null

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start NAME [serve flags...]
start() {
    local name=$1 grpc http
    shift
    grpc=$(port)
    http=$(port)
    RUST_LOG=warn "$bin" serve --certs "$work/certs-$name" --data "$work/data-$name" \
        --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$http" "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    printf -v "GRPC_$name" '%s' "$grpc"
    printf -v "HTTP_$name" '%s' "$http"
}
start file
start pkcs11 --pkcs11-uri "$uri"

echo -e "round\tsigner\tscenario\trps\tp50_us\tp99_us\tserver_cpu_us"
for round in $(seq "$rounds"); do
    for signer in file pkcs11; do
        g=GRPC_$signer h=HTTP_$signer
        "$bin" bench --scenario enroll --server "https://localhost:${!g}" \
            --http "http://127.0.0.1:${!h}" --certs "$work/certs-$signer" --duration-s 5 \
            --warmup-s 1 --concurrency 16 --json |
            python3 -c '
import json, sys
r = json.load(sys.stdin)
lat = r.get("latency") or {}
print("\t".join(str(x) for x in [*sys.argv[1:3], "enroll", round(r.get("throughput_per_s", 0)),
      lat.get("p50_us", ""), lat.get("p99_us", ""), r.get("server_cpu_us_per_request", "")]))
' "$round" "$signer"
    done
done
