#!/usr/bin/env bash
# A device call that follows device_session.sh on the same warm machine (SmolLM2 joined in /tmp/m/s):
# GPU pytest of the state/decode/quant files in the background (accuracy work only runs meanwhile, no timing),
# `sparseattn gen-check` (greedy agreement of kernel/sparse decode and the mixed cache with dense) and the
# quantized kernel on SmolLM2's captured Q/K/V (collect + bench_quant.py --qkv). Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; mkdir -p "$OUT"
SMOL=/tmp/m/s/SmolLM2-135M-Instruct.Q4_1.gguf
ls .carry/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src"
[ -f "$SMOL" ] || cat /tmp/m/s/part.* > "$SMOL"
START=$SECONDS; B=${SESSION_BUDGET:-230}
timeout $((B - 10)) python3 -m pytest -q -rs -p no:cacheprovider -m "not model" ${PYTEST_FILES:-tests/ops/test_decode.py \
  tests/integrations/test_decode_route.py tests/state/test_segmented.py tests/state/test_kv_cache.py tests/ops/test_float_mask.py tests/eval/test_state_check.py \
  tests/integrations/test_quant_model.py tests/gate/test_gate.py tests/ops/test_custom_ops.py} > "$OUT/pytest_extra.log" 2>&1 &
PY=$!
echo "=== gen-check $(date -u +%H:%M:%S)"
SPARSEATTN_TRITON_AUTOTUNE=0 timeout $((B * 55 / 100)) python3 -m sparseattn.cli.main gen-check --model "$SMOL" --text-dir .carry/essays \
  --lengths ${GEN_LENGTHS:-4096} --new-tokens 64 --modes ${GEN_MODES:-kernel_decode,sparse_decode,mixed_int8} \
  --top-pages ${GEN_TOP_PAGES:-0.1} --page-size 16 --device cuda --out "$OUT/gen_check" > "$OUT/gen_check.log" 2>&1
echo "gen-check rc=$?"; tail -n 25 "$OUT/gen_check.log"
left=$(( B - 15 - (SECONDS - START) ))
if [ $left -ge 40 ]; then
  echo "=== captured Q/K/V quant accuracy $(date -u +%H:%M:%S) (at most ${left}s)"
  timeout $left bash -c "python3 -m sparseattn.cli.main collect --model $SMOL --text-dir .carry/essays --lengths 4096 \
      --layers 0,5,10,15,20,25,29 --samples 1 --device cuda --out /tmp/qkv --quiet && \
    python3 benchmarks/bench_quant.py --qkv /tmp/qkv --qkv-grans per_warp,per_block,per_thread --out $OUT/quant_qkv" \
    > "$OUT/quant_qkv.log" 2>&1
  echo "quant qkv rc=$?"; tail -n 30 "$OUT/quant_qkv.log"
fi
wait $PY; echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_extra.log" | head -30; tail -n 3 "$OUT/pytest_extra.log"
echo "=== done in $((SECONDS - START)) s"
