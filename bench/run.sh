#!/usr/bin/env bash
# Runs every `payra bench` scenario RUNS times against a fresh release server on loopback and
# prints one JSON report per line, then the medians. Not part of CI (it takes minutes and
# wants a quiet machine). Usage: bash bench/run.sh [RUNS] [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DURATION=${2:-5}
# shellcheck source=bench/serve.sh
source bench/serve.sh
OUT="$WORK/results.jsonl"
for run in $(seq 1 "$RUNS"); do
    # Closed loop: 64 calls in flight on one HTTP/2 connection, as one payment-service
    # instance with one gRPC channel would send them.
    "$BIN" bench --scenario verify --concurrency 64 --connections 1 "${COMMON[@]}" | tee -a "$OUT"
    # The same with 128 in flight: bigger decision-log batches, fewer syncs per call.
    "$BIN" bench --scenario verify --concurrency 128 --connections 1 "${COMMON[@]}" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='verify_c128'; print(json.dumps(r))" \
        | tee -a "$OUT"
    # The same with tonic's client in the load generator, which costs more of the shared cores.
    "$BIN" bench --scenario verify --concurrency 128 --connections 1 --client tonic "${COMMON[@]}" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='verify_c128_tonic'; print(json.dumps(r))" \
        | tee -a "$OUT"
    # Open loop at a quarter, half and 80% of this run's raw single-core verify rate: latency counted
    # from each request's scheduled time.
    RAW=$(grep '"scenario":"verify"' "$OUT" | tail -n 1 | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["raw_verify_per_s"]))')
    for share in 25 50 80; do
        "$BIN" bench --scenario verify --concurrency 512 --connections 1 --rate $((RAW * share / 100)) \
            "${COMMON[@]}" | python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='verify_open_${share}'; print(json.dumps(r))" \
            | tee -a "$OUT"
    done
    "$BIN" bench --scenario enroll --concurrency 16 --max-requests 100000 "${COMMON[@]}" | tee -a "$OUT"
    # Enroll with 64 in flight (many phones onboarding at once): bigger journal batches.
    "$BIN" bench --scenario enroll --concurrency 64 --max-requests 200000 "${COMMON[@]}" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='enroll_c64'; print(json.dumps(r))" \
        | tee -a "$OUT"
    # The payment service minting enrollment tokens (one per phone that will enroll).
    "$BIN" bench --scenario token --concurrency 16 "${COMMON[@]}" | tee -a "$OUT"
    "$BIN" bench --scenario status --concurrency 16 "${COMMON[@]}" | tee -a "$OUT"
    "$BIN" bench --scenario ocsp --concurrency 16 "${COMMON[@]}" | tee -a "$OUT"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("scenario           runs  median/s  p50_us  p99_us  raw_verify/s  ratio_verify  raw_sign/s  ratio_sign  server_us/req  loadgen_us/req"
      "  loadgen_core  server_p50<=us  server_p99<=us")
for s in ["verify", "verify_c128", "verify_c128_tonic", "verify_open_25", "verify_open_50", "verify_open_80", "enroll", "enroll_c64", "token", "status", "ocsp"]:
    r = [x for x in rows if x["scenario"] == s]
    med = lambda k: statistics.median(x[k] for x in r)
    lat = lambda k: statistics.median(x["latency"][k] for x in r)
    cpu = lambda k: statistics.median(x[k] or 0 for x in r)
    # The server's own percentiles (bucket bounds): none for OCSP (plain HTTP); a percentile
    # above the last bucket counts as infinite.
    def srv(k):
        got = [x["server_latency_at_most"] for x in r if x.get("server_latency_at_most")]
        if not got:
            return "-"
        m = statistics.median(float("inf") if g.get(k) is None else g[k] for g in got)
        return "inf" if m == float("inf") else f"{m:.0f}"
    print(f"{s:<18} {len(r):>4} {med('throughput_per_s'):>9.0f} {lat('p50_us'):>7.0f} {lat('p99_us'):>7.0f}"
          f" {med('raw_verify_per_s'):>13.0f} {med('ratio_to_raw_verify'):>13.2f} {med('raw_sign_per_s'):>11.0f} {med('ratio_to_raw_sign'):>11.2f}"
          f" {cpu('server_cpu_us_per_request'):>14.1f} {cpu('load_generator_cpu_us_per_request'):>15.1f}"
          f" {cpu('load_generator_core_share'):>13.2f} {srv('p50_us'):>15} {srv('p99_us'):>15}")
PY
