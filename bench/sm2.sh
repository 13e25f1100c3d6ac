#!/usr/bin/env bash
# SM2 beside P-256 in one run: VerifyPayment and Enroll with SM2 devices and with P-256
# devices against one fresh release server, each report beside the raw rate of its own
# algorithm measured in the same run. Not part of CI. Usage: bash bench/sm2.sh [RUNS] [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DURATION=${2:-5}
# shellcheck source=bench/serve.sh
source bench/serve.sh
OUT="$WORK/results.jsonl"
name() { python3 -c "import json,sys; r=json.load(sys.stdin); r['scenario']='$1'; print(json.dumps(r))"; }
for run in $(seq 1 "$RUNS"); do
    for alg in p256 sm2; do
        "$BIN" bench --scenario verify --key-algorithm "$alg" --concurrency 64 --connections 1 \
            "${COMMON[@]}" | name "verify_$alg" | tee -a "$OUT"
        RAW=$(grep "\"scenario\": \"verify_$alg\"" "$OUT" | tail -n 1 |
            python3 -c 'import json,sys; print(int(json.load(sys.stdin)["raw_verify_per_s"]))')
        "$BIN" bench --scenario verify --key-algorithm "$alg" --concurrency 512 --connections 1 \
            --rate $((RAW * 80 / 100)) "${COMMON[@]}" | name "verify_open_80_$alg" | tee -a "$OUT"
        "$BIN" bench --scenario enroll --key-algorithm "$alg" --concurrency 16 \
            --max-requests 100000 "${COMMON[@]}" | name "enroll_$alg" | tee -a "$OUT"
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("scenario              runs  median/s  p50_us  p99_us  raw_verify/s  ratio_verify  raw_sign/s  server_us/req")
for s in ["verify_p256", "verify_sm2", "verify_open_80_p256", "verify_open_80_sm2", "enroll_p256", "enroll_sm2"]:
    r = [x for x in rows if x["scenario"] == s]
    if not r:
        continue
    med = lambda k: statistics.median(x[k] for x in r)
    cpu = [x["server_cpu_us_per_request"] for x in r if x.get("server_cpu_us_per_request")]
    print(f"{s:<21} {len(r):>4}  {med('throughput_per_s'):>8.0f}  {statistics.median(x['latency']['p50_us'] for x in r):>6.0f}"
          f"  {statistics.median(x['latency']['p99_us'] for x in r):>6.0f}  {med('raw_verify_per_s'):>12.0f}"
          f"  {med('ratio_to_raw_verify'):>12.2f}  {med('raw_sign_per_s'):>10.0f}"
          f"  {statistics.median(cpu) if cpu else float('nan'):>13.1f}")
PY
