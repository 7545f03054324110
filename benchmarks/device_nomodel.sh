#!/usr/bin/env bash
# One device call without a model: the GPU tests of the state, decode, quant, gate and layer-graph code,
# benchmarks/bench_decode.py, benchmarks/bench_quant.py (--stress) and `sparseattn state-check --device cuda`.
# Results under $OUT (decode/, quant/, state_check.*, pytest.log); a summary is printed last.
# PIECE=DIR also copies a model piece into /tmp/m/s/ first (../shared/DEVICE.md), so the next call can use it.
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT"
[ -n "${PIECE:-}" ] && mkdir -p /tmp/m/s && cp "$PIECE"/* /tmp/m/s/
START=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/nvidia_smi.txt"
echo "=== pytest $(date -u +%H:%M:%S)"
timeout "${PYTEST_S:-170}" python3 -m pytest -q -rs -p no:cacheprovider -m "not model" ${PYTEST_FILES:-tests/integrations/test_layer_graphs.py \
  tests/ops/test_quant.py tests/ops/test_decode.py tests/state/test_segmented.py tests/state/test_kv_cache.py tests/ops/test_float_mask.py \
  tests/eval/test_state_check.py tests/gate/test_gate.py tests/ops/test_custom_ops.py} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30; tail -n 3 "$OUT/pytest.log"
echo "=== state-check $(date -u +%H:%M:%S)"
timeout 60 python3 -m sparseattn.cli.main state-check --device cuda --json "$OUT/state_check.json" --markdown "$OUT/state_check.md" \
  --no-table > "$OUT/state_check.log" 2>&1
echo "state-check rc=$?"; grep -E "PASS|FAIL" "$OUT/state_check.log" | head -20
echo "=== bench_decode $(date -u +%H:%M:%S)"
left=$(( ${SESSION_BUDGET:-560} - (SECONDS - START) - ${QUANT_S:-150} ))
timeout $left python3 benchmarks/bench_decode.py --out "$OUT/decode" --budget-s $((left - 30)) > "$OUT/decode.log" 2>&1
echo "bench_decode rc=$?"; tail -n 30 "$OUT/decode.log"
echo "=== bench_quant $(date -u +%H:%M:%S)"
left=$(( ${SESSION_BUDGET:-560} - (SECONDS - START) ))
timeout $left python3 benchmarks/bench_quant.py --out "$OUT/quant" --stress 20 --budget-s $((left - 30)) > "$OUT/quant.log" 2>&1
echo "bench_quant rc=$?"; tail -n 30 "$OUT/quant.log"
echo "=== done in $((SECONDS - START)) s"
