#!/usr/bin/env bash
# Runs payra_example.py against a fresh payra server: a throwaway virtualenv, a fresh
# development PKI and database in a temp dir, loopback ports chosen by the kernel.
#
#   bash examples/python/run.sh PAYRA_BINARY
#
# Exits with the example's status. Works from any directory.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PAYRA_BINARY" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
payra="$1"
if [[ "$payra" != */* ]]; then
    payra="$(command -v "$payra" || true)"
fi
if [[ -z "$payra" || ! -x "$payra" ]]; then
    echo "error: $1 is not an executable payra binary" >&2
    exit 2
fi
payra="$(cd "$(dirname "$payra")" && pwd)/$(basename "$payra")"

work="$(mktemp -d "${TMPDIR:-/tmp}/payra-python-example.XXXXXX")"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== virtualenv in $work/venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt"

echo "== payra init"
"$payra" init --dir "$work/certs"

echo "== payra serve"
log="$work/server.log"
# The wait below reads the text log line "payra is serving grpc_addr=...": force the text
# format at info level without colour codes, whatever the caller's environment says, and
# keep a caller's PAYRA_CONFIG file out of this throwaway server.
env -u PAYRA_LOG_FORMAT -u PAYRA_CONFIG RUST_LOG=info NO_COLOR=1 \
    "$payra" serve --certs "$work/certs" --data "$work/data" \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 2>"$log" &
server_pid=$!

# Wait (at most ~30 s) for: ... payra is serving grpc_addr=127.0.0.1:45678 http_addr=...
port=""
deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    # Strip colour codes anyway, in case the logger ignores NO_COLOR.
    line="$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 'grpc_addr=' || true)"
    if [[ -n "$line" ]]; then
        port="$(sed -n 's/.*grpc_addr=[^ ]*:\([0-9][0-9]*\).*/\1/p' <<<"$line")"
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "error: payra serve exited before it was serving" >&2
        break
    fi
    sleep 0.2
done
if [[ -z "$port" ]]; then
    echo "error: payra did not report its gRPC address (grpc_addr=...); server log:" >&2
    cat "$log" >&2
    exit 1
fi
echo "payra is serving gRPC on port $port"

status=0
for algorithm in p256 sm2; do
    echo "== payra_example.py --algorithm $algorithm"
    "$work/venv/bin/python" "$here/payra_example.py" --algorithm "$algorithm" \
        --server "localhost:$port" --certs "$work/certs" || status=$?
done
if [[ $status -ne 0 ]]; then
    echo "== server log" >&2
    cat "$log" >&2
fi
exit "$status"
