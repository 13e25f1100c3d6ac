#!/usr/bin/env bash
# Enroll through a CFSSL upstream (RA mode) beside local signing, in one run: two fresh
# release servers on loopback, one signing with its own issuing CA, one having `cfssl serve`
# sign (authsign, HMAC key, SQLite certificate database), each measured RUNS times in turn at
# the same concurrency. Installs Debian's golang-cfssl if missing. Not part of CI.
# Usage: bash bench/upstream.sh [RUNS] [DURATION_S] [CONCURRENCY]
# CFSSL_DB=0 runs CFSSL without its certificate database (it then cannot revoke), to tell its
# SQLite writes from the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DURATION=${2:-5}
CONCURRENCY=${3:-16}
if ! command -v cfssl >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-cfssl
fi
cargo build --release --locked --bin payra >&2
BIN=$PWD/target/release/payra
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

# The upstream: a throwaway root and issuing CA made by OpenSSL, a `device` profile.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/root.key" \
    -out "$WORK/root.pem" -subj "/C=CN/O=Licensed CA/CN=Licensed Root" -days 3650 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$WORK/issuing.key" \
    -out "$WORK/issuing.csr" -subj "/C=CN/O=Licensed CA/CN=Licensed Device CA" 2>/dev/null
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' >"$WORK/issuing.ext"
openssl x509 -req -in "$WORK/issuing.csr" -CA "$WORK/root.pem" -CAkey "$WORK/root.key" \
    -set_serial 2 -days 1825 -out "$WORK/issuing.pem" -extfile "$WORK/issuing.ext" 2>/dev/null
python3 - "$WORK/certdb.db" <<'PY'
import sqlite3, sys
sqlite3.connect(sys.argv[1]).executescript("""
CREATE TABLE certificates (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
  ca_label blob, status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp,
  pem blob NOT NULL, PRIMARY KEY(serial_number, authority_key_identifier));
CREATE TABLE ocsp_responses (serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
  body blob NOT NULL, expiry timestamp, PRIMARY KEY(serial_number, authority_key_identifier));
""")
PY
echo "{\"driver\":\"sqlite3\",\"data_source\":\"$WORK/certdb.db\"}" >"$WORK/db.json"
KEY=$(openssl rand -hex 16)
(umask 077 && echo "$KEY" >"$WORK/auth.key")
cat >"$WORK/cfssl.json" <<JSON
{"signing": {"default": {"expiry": "168h"},
  "profiles": {"device": {"usages": ["digital signature", "client auth"], "expiry": "8760h",
                          "auth_key": "payra"}}},
 "auth_keys": {"payra": {"type": "standard", "key": "$KEY"}}}
JSON
DB_ARGS=(-db-config "$WORK/db.json")
[ "${CFSSL_DB:-1}" = 0 ] && DB_ARGS=()
cfssl serve -address 127.0.0.1 -port 18888 -ca "$WORK/issuing.pem" -ca-key "$WORK/issuing.key" \
    -config "$WORK/cfssl.json" "${DB_ARGS[@]}" >"$WORK/cfssl.log" 2>&1 &
PIDS+=($!)

# Two payra servers: local signing (18443) and RA mode in front of the CFSSL upstream (18444).
cat >"$WORK/upstream.toml" <<TOML
[ca]
mode = "upstream"
[ca.upstream]
url = "http://127.0.0.1:18888"
issuer_file = "$WORK/issuing.pem"
auth_key_file = "$WORK/auth.key"
TOML
for side in local upstream; do
    "$BIN" init --dir "$WORK/$side-certs" >/dev/null
done
RUST_LOG=warn "$BIN" serve --certs "$WORK/local-certs" --data "$WORK/local-data" \
    --grpc-addr 127.0.0.1:18443 --http-addr 127.0.0.1:18080 >"$WORK/local.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn "$BIN" serve --config "$WORK/upstream.toml" --certs "$WORK/upstream-certs" \
    --data "$WORK/upstream-data" --grpc-addr 127.0.0.1:18444 --http-addr 127.0.0.1:18081 \
    >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
for port in 18080 18081; do
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

OUT="$WORK/results.jsonl"
name() { python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='$1'; print(json.dumps(r))"; }
for run in $(seq 1 "$RUNS"); do
    for side in local upstream; do
        if [ "$side" = local ]; then port=18443 http=18080; else port=18444 http=18081; fi
        "$BIN" bench --scenario enroll --concurrency "$CONCURRENCY" --max-requests 20000 \
            --server "https://localhost:$port" --certs "$WORK/$side-certs" \
            --http "http://127.0.0.1:$http" --duration-s "$DURATION" --warmup-s 1 --json |
            name "enroll_$side" | tee -a "$OUT"
    done
done
echo "certificates in CFSSL's database: $(python3 -c "import sqlite3; print(sqlite3.connect('$WORK/certdb.db').execute('select count(*) from certificates').fetchone()[0])")"
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("scenario          runs  median/s  p50_us  p99_us  payra_server_us/req")
for s in ["enroll_local", "enroll_upstream"]:
    r = [x for x in rows if x["scenario"] == s]
    if not r:
        continue
    med = lambda f: statistics.median(f(x) for x in r)
    cpu = [x["server_cpu_us_per_request"] for x in r if x.get("server_cpu_us_per_request")]
    print(f"{s:<17} {len(r):>4}  {med(lambda x: x['throughput_per_s']):>8.0f}"
          f"  {med(lambda x: x['latency']['p50_us']):>6.0f}  {med(lambda x: x['latency']['p99_us']):>6.0f}"
          f"  {statistics.median(cpu) if cpu else float('nan'):>19.1f}")
PY
