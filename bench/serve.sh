# Sourced by bench/run.sh and bench/sm2.sh: builds the release binary, starts a fresh server
# on loopback with a fresh development PKI (both hierarchies), and sets BIN, WORK, SERVER and
# COMMON (the `payra bench` flags that reach it, with DURATION). The caller's EXIT trap stops it.
cargo build --release --locked --bin payra >&2
BIN=$PWD/target/release/payra
WORK=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN" init --dir "$WORK/certs" >/dev/null
RUST_LOG=warn "$BIN" serve --certs "$WORK/certs" --data "$WORK/data" \
    --grpc-addr 127.0.0.1:18443 --http-addr 127.0.0.1:18080 >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:18080/healthz >/dev/null 2>&1 && break
    sleep 0.1
done
COMMON=(--server https://localhost:18443 --certs "$WORK/certs" --http http://127.0.0.1:18080
        --duration-s "$DURATION" --warmup-s 1 --json)
