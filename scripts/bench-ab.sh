#!/usr/bin/env bash
# A/B of two payra release binaries on the embedded store, rounds alternating, a fresh server
# and data directory per run. By default VerifyPayment with and without reservations; other
# runs are named SCENARIO or SCENARIO:FLAGS (flags of `payra bench`, `_` for a space).
#
#   scripts/bench-ab.sh OLD_BINARY NEW_BINARY [rounds] [run ...] > ab.txt
#   scripts/bench-ab.sh old/payra new/payra 5 ocsp:--concurrency_16 status
#
# Prints one line per run: round, build (old/new), run, requests per second, raw ECDSA
# verify rate of the same binary, server CPU per request (µs).
set -euo pipefail
old=${1:?old binary}
new=${2:?new binary}
rounds=${3:-5}
shift $(($# < 3 ? $# : 3))
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then runs=(verify verify:--reserve); fi
work=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
"$new" init --dir "$work/certs" >/dev/null
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
for round in $(seq "$rounds"); do
    for build in old new; do
        bin=$old
        if [ "$build" = new ]; then bin=$new; fi
        for run in "${runs[@]}"; do
            scenario=${run%%:*}
            flags=
            if [ "$run" != "$scenario" ]; then flags=${run#*:}; flags=${flags//_/ }; fi
            case " $flags " in *" --concurrency "*) ;; *) flags="--concurrency 64 $flags" ;; esac
            grpc=$(port)
            http=$(port)
            rm -rf "$work/data"
            RUST_LOG=warn "$bin" serve --certs "$work/certs" --data "$work/data" \
                --grpc-addr "127.0.0.1:$grpc" --http-addr "127.0.0.1:$http" >"$work/log" 2>&1 &
            pid=$!
            for _ in $(seq 100); do
                curl -sf "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break
                sleep 0.1
            done
            # shellcheck disable=SC2086 # $flags is a list of flags
            "$bin" bench --scenario "$scenario" --server "https://localhost:$grpc" \
                --http "http://127.0.0.1:$http" --certs "$work/certs" --duration-s 5 \
                --warmup-s 1 --connections 1 --json $flags |
                python3 -c '
import json, sys
r = json.load(sys.stdin)
print("\t".join(str(x) for x in [*sys.argv[1:4], round(r["throughput_per_s"]),
      round(r.get("raw_verify_per_s", 0)), r.get("server_cpu_us_per_request", "")]))
' "$round" "$build" "$run"
            kill "$pid"
            wait "$pid" 2>/dev/null || true
            pid=
        done
    done
done
