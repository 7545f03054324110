#!/usr/bin/env bash
# One device call: the stages named in $STAGES (default: all), logs and JSON under $OUT.
#   STAGES="variants bench parity pytest cli headline fuzz resources"   FUZZ_ARGS=<gpu_fuzz.py flags>   PYTEST_ARGS=<paths>  PYTEST_MARK=<marker expr>   SPARSEATTN_COMMIT=<sha>   BENCH_BUDGET=<s>  VAR_BUDGET=<s>
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT"
STAGES="${STAGES:-variants bench parity}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia_smi.txt"
rc=0
for st in $STAGES; do
  echo "=== stage $st $(date -u +%H:%M:%S)"
  case "$st" in
    variants) python3 benchmarks/kernel_variants.py --repeats "${VAR_REPEATS:-3}" --budget-s "${VAR_BUDGET:-200}" ${VAR_ARGS:-} \
                --out "$OUT" > "$OUT/kernel_variants_log.txt" 2>&1 || rc=1; tail -n 60 "$OUT/kernel_variants_log.txt" ;;
    bench) python3 benchmarks/bench_attention.py --repeats "${BENCH_REPEATS:-3}" --budget-s "${BENCH_BUDGET:-330}" \
                --out "$OUT" > "$OUT/bench_attention_log.txt" 2>&1 || rc=1; tail -n 25 "$OUT/bench_attention_log.txt" ;;
    parity) python3 benchmarks/gpu_parity.py --out "$OUT" > "$OUT/gpu_parity_log.txt" 2>&1 || rc=1; tail -n 30 "$OUT/gpu_parity_log.txt" ;;
    cli) { python3 -m sparseattn.cli.main bench --seq-lens 8192,32768 --densities 1.0,0.2,0.1 --stress 3 || rc=1
           python3 -m sparseattn.cli.main bench --pattern sink_window --seq-lens 16384 --densities 0.1 --head-dim 64 --heads 9 --kv-heads 3 || rc=1
           python3 -m sparseattn.cli.main quick-test --device cuda --dtype bfloat16 --seq-len 4096 --causal --head-dim 128 --block-size 128 --benchmark || rc=1
           python3 -m sparseattn.cli.main accuracy --device cuda --dtypes bfloat16 float16 --no-progress --out /tmp/acc || rc=1; } > "$OUT/cli_log.txt" 2>&1
         tail -n 30 "$OUT/cli_log.txt" ;;
    headline) python3 benchmarks/bench_attention.py --repeats 5 --only "Llama-3.1-8B/32K/causal" --out "$OUT/headline" \
                > "$OUT/headline_log.txt" 2>&1 || rc=1; grep TARGET "$OUT/headline_log.txt" ;;
    fuzz) python3 benchmarks/gpu_fuzz.py --out "$OUT/fuzz" ${FUZZ_ARGS:-} > "$OUT/gpu_fuzz_log.txt" 2>&1 || rc=1
          tail -n 40 "$OUT/gpu_fuzz_log.txt" ;;
    resources) python3 benchmarks/gpu_resources.py --out "$OUT/resources" > "$OUT/gpu_resources_log.txt" 2>&1 || rc=1
          tail -n 30 "$OUT/gpu_resources_log.txt" ;;
    pytest) python3 -m pytest -q -rs -p no:cacheprovider -m "${PYTEST_MARK:-not model}" ${PYTEST_ARGS:-tests} > "$OUT/pytest_log.txt" 2>&1 || rc=1; tail -n 15 "$OUT/pytest_log.txt" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S) rc=$rc"
exit $rc
