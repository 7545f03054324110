#!/usr/bin/env bash
# Named device jobs (2026-12-03 sessions), one call = `bash benchmarks/device_jobs.sh JOB...`.
# The model files travel in pieces (../shared/DEVICE.md): copy_s0 / copy_s1 (SmolLM2, .carry/s2/c*; or copy_sa, copy_sb,
# copy_s1 where c0 and the tree pass 64 MiB) and
# copy_g0..copy_g5 (Gemma-3-270M in 41 MiB pieces, .carry/g/gemma-3-270m-q4_k_m.gguf.d/c*) copy the carried piece into /tmp/m,
# which a warm machine keeps between calls. The right Gemma tokenizer travels as .carry/gtok.tar.xz (made with
# `tar -C .carry -cJf .carry/gtok.tar.xz gemma_tok`; 3.5 MB) beside c5 (copy_gtok). Every job has its own time limit; its files land in
# $OUT/s3/<job>/ and are packed into $OUT/s3_<first job>.tar.gz at the end (the device returns few files).
# Env: SMOL_SHA, GEMMA_SHA (sha256 of the joined models), RULER_SAMPLES, RULER_GEMMA_SAMPLES.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-./device_out}"; R="$OUT/s3"; mkdir -p "$R"
GPIECES=.carry/g/gemma-3-270m-q4_k_m.gguf.d
SMOL=/tmp/m/s/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA=/tmp/m/g/gemma-3-270m-q4_k_m.gguf
SMOL_SHA="${SMOL_SHA:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
GEMMA_SHA="${GEMMA_SHA:-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818}"
if [ -d .carry/whl ] && [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl 2>/dev/null
fi
export PYTHONPATH="/tmp/site:$PWD/src"
ESSAYS=.carry/essays; [ -d $ESSAYS ] || ESSAYS=/tmp/m/essays
[ -d .carry/essays ] && { mkdir -p /tmp/m/essays && cp .carry/essays/* /tmp/m/essays/; }
M="python3 -m sparseattn.cli.main"
DEFAULT_PRED="mean_sim:score=mixed,cdf_threshold=0.97,keep_local=8"
T0=$SECONDS
st() { echo "=== $1 $(date -u +%H:%M:%S) (t=$((SECONDS-T0))s)"; }
# Gemma-3's GGUF tokenizer is built wrongly by transformers < 5.25 (a Unigram model: ~1.8x the tokens; docs/RULER.md):
# a right one, saved here with save_pretrained (`copy_gtok`, .carry/gemma_tok), is used by every Gemma command.
gem() { if [ -d /tmp/m/gemma_tok ]; then SPARSEATTN_TOKENIZER=/tmp/m/gemma_tok "$@"; else "$@"; fi; }
gem_if_md() { if [ "${MD:-}" = "$GEMMA" ]; then gem "$@"; else "$@"; fi; }
# Gemma RULER in float32 through masked SDPA with a dense tail of 128 (s18_ruler_gemma, s19_gemma_alloc), right tokenizer
# required: gruler_f32 <out dir> <seconds> <lines of the log to print> <ruler arguments...>
GEMMA_SIM0="mean_sim:score=mixed,cdf_threshold=0.9,keep_local=8,sim_threshold=0"  # ~55% of the global layers at 8K
GEMMA_SAMP="sampled:rows_per_block=8,cdf_threshold=0.9,keep_local=8"  # exact mass of 8 rows per block (twentieth session)
need_gtok() { [ -d /tmp/m/gemma_tok ] || { echo "$1: /tmp/m/gemma_tok is missing (run copy_gtok first)"; return 1; }; }
gruler_f32() {
  local out=$1 secs=$2 lines=$3; shift 3
  gem timeout "$secs" $M ruler --model $GEMMA --text-dir $ESSAYS --dense-tails 128 --dtype float32 --backend masked_sdpa \
    --device cuda --no-plots --quiet --out "$out" "$@" > "$out.log" 2>&1; grep -v Converting "$out.log" | tail -n "$lines"
}
join() {  # join <dir> <file> <sha>
  [ -f "$1/$2" ] || cat "$1"/part.* > "$1/$2"
  echo "$3  $1/$2" | sha256sum -c - >/dev/null || { echo "join: $2 is incomplete"; return 1; }
}
run_job() {
  local job=$1 d="$R/$1"; mkdir -p "$d"; st "$job"
  case "$job" in
    copy_s0) mkdir -p /tmp/m/s && cp .carry/s2/c0/* /tmp/m/s/ && ls /tmp/m/s ;;
    copy_s1) mkdir -p /tmp/m/s && cp .carry/s2/c1/* /tmp/m/s/ && join /tmp/m/s SmolLM2-135M-Instruct.Q4_1.gguf $SMOL_SHA && echo smol ok ;;
    copy_sa|copy_sb)  # SmolLM2's first piece in two halves (c0's 57 MB and the tree pass the 64 MiB carry limit):
      # head -c 29360128 c0/part.00 > xa/part.00a, the rest > xb/part.00b; copy_s1 then joins part.00a part.00b part.01
      mkdir -p /tmp/m/s && cp .carry/s2/x${job#copy_s}/* /tmp/m/s/ && ls /tmp/m/s ;;
    copy_g[0-9]) mkdir -p /tmp/m/g && cp $GPIECES/c${job#copy_g}/* /tmp/m/g/ && ls /tmp/m/g ;;
    join_g) join /tmp/m/g gemma-3-270m-q4_k_m.gguf $GEMMA_SHA && echo gemma ok ;;
    copy_gtok)  # the tokenizer folder, or its tar.xz (3.5 MB instead of 32 MB: it travels with the last model piece)
      mkdir -p /tmp/m/gemma_tok
      if [ -f .carry/gtok.tar.xz ]; then tar -xJf .carry/gtok.tar.xz -C /tmp/m; else cp .carry/gemma_tok/* /tmp/m/gemma_tok/; fi
      ls /tmp/m/gemma_tok ;;
    gtok_folder)  # the carried Gemma tokenizer folder alone (no model staged): this machine's transformers reads it and
      # gives the essay's 1108 tokens (5.17's own GGUF conversion gives about 2000), BOS first, '▁startup' whole
      python3 -c "
import transformers, tokenizers; t = transformers.AutoTokenizer.from_pretrained('.carry/gemma_tok')
ids = t(open('$ESSAYS/founders.txt').read())['input_ids']
print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, '|', type(t).__name__, len(t),
      '| founders.txt', len(ids), 'tokens | BOS first:', ids[0] == t.bos_token_id, '| startup ->', t.tokenize(' startup'))" 2>&1 | tail -n 4 ;;
    gtok_check)  # the carried Gemma tokenizer on this machine's transformers: the essay's token count (1108 with the
      # right BPE tokenizer, about 2000 with 5.17's own), a probe word, BOS, and load()'s warning if any
      gem python3 -W always -c "
import transformers; from sparseattn.models.loader import load, tokenizer_check
m, t = load('$GEMMA'); ids = t(open('$ESSAYS/founders.txt').read())['input_ids']
print('transformers', transformers.__version__, '| founders.txt', len(ids), 'tokens | BOS first:', ids[0] == t.bos_token_id,
      '| startup ->', t.tokenize(' startup'), '| check:', tokenizer_check(t))" 2>&1 | grep -v Converting | tail -n 6 ;;
    s20_pred_gemma)  # issue 17: predictor cost at Gemma-3-270M's global-layer shape (H=4, H_kv=1, D=256), bf16, beside
      # cuDNN/flash dense in the same process: mean_sim at cdf 0.9 vs the sampled exact mass (8 and 16 rows per block;
      # the one-launch Triton mass), then the sampled-mass kernel's tests on the GPU
      timeout ${S20P_S:-150} python3 benchmarks/bench_predictors.py --shape 4,1,256 --lengths ${S20P_LENGTHS:-16384 32768} \
        --budget-s ${S20P_BUDGET:-120} --out "$d" --predictors "$GEMMA_SIM0" "$GEMMA_SAMP" \
        "sampled:rows_per_block=16,cdf_threshold=0.9,keep_local=8" > "$d/log" 2>&1; tail -n 8 "$d/log"
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/predictors/test_fused_sampled.py > "$d/pytest.log" 2>&1
      tail -n 2 "$d/pytest.log" ;;
    s21_sampled_split)  # issue 17: the sampled mass's split method (twenty-first session, never run on a GPU before): its
      # GPU tests (split and walk against the float64 PyTorch mass), then split vs walk beside cuDNN (Gemma's global-layer
      # shape and the Llama shape, 16K/32K, 8/16/32 rows, bf16 and float32)
      timeout ${S21S_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider tests/predictors/test_fused_sampled.py > "$d/pytest.log" 2>&1
      tail -n 2 "$d/pytest.log"
      timeout ${S21S_S:-200} python3 benchmarks/bench_sampled_mass.py --out "$d" --budget-s ${S21S_BUDGET:-160} \
        --lengths ${S21S_LENGTHS:-16384 32768} > "$d/log" 2>&1; tail -n 26 "$d/log" ;;
    s22_full_tiles)  # issue 14: the decode kernel's FULL_TILES launch (no element masks on its loads) against the
      # tuned default, bf16 and int8 caches: its GPU tests (bit for bit against the masked launch), then the timing
      timeout ${S22F_TEST_S:-80} python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_full_tiles.py > "$d/pytest.log" 2>&1
      tail -n 2 "$d/pytest.log"
      timeout ${S22F_S:-110} python3 benchmarks/decode_full_tiles.py --out "$d" --budget-s ${S22F_BUDGET:-80} > "$d/log" 2>&1
      tail -n 16 "$d/log" ;;
    pred)  # issue 10: predictor overhead vs cuDNN, same process (Llama shape, 32K)
      timeout 100 python3 benchmarks/bench_predictors.py --lengths 32768 --budget-s 80 --out "$d" \
        --predictors "$DEFAULT_PRED" "mean_sim:cdf_threshold=0.9" > "$d/log" 2>&1; tail -n 6 "$d/log" ;;
    kern)  # issue 11: GPU parity and the headline attention rows, the folded kernel and the one before, same call
      NEWPP="$PYTHONPATH"; if [ -f .carry/new_src.tar.gz ]; then mkdir -p /tmp/new && tar -xzf .carry/new_src.tar.gz -C /tmp/new; NEWPP="/tmp/site:/tmp/new/src"; fi
      PYTHONPATH="$NEWPP" timeout 75 python3 benchmarks/gpu_parity.py --budget-s 55 --out "$d" > "$d/parity.log" 2>&1; tail -n 4 "$d/parity.log"
      for side in new old; do
        if [ $side = old ]; then mkdir -p /tmp/old && tar -xzf .carry/old_src.tar.gz -C /tmp/old; PP="/tmp/site:/tmp/old/src"; else PP="$NEWPP"; fi
        PYTHONPATH="$PP" timeout 100 python3 benchmarks/bench_attention.py --only "Llama-3.1-8B/32K/causal" --repeats 5 \
          --budget-s 80 --out "$d/$side$SECONDS" > "$d/bench_$side.log" 2>&1
        echo "--- $side"; grep -E "d=|sdpa" "$d/bench_$side.log" | tail -n 6
      done ;;
    smol_eager)  # issue 10: eager whole-model rows, many rounds (GC off, order swapped every round)
      timeout 200 python3 benchmarks/bench_model.py --model $SMOL --lengths 8192,4096 --text-dir $ESSAYS --repeats 21 \
        --predictors "$DEFAULT_PRED" --patterns "sink_window:window_blocks=8,block_m=128,block_n=128" --no-plot \
        --out "$d" > "$d/log" 2>&1; tail -n 12 "$d/log" ;;
    gtests)  # layer graphs, packed documents and window layers on the GPU
      timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests -k "layer_graph or packed or document or sliding_window" \
        > "$d/pytest.log" 2>&1; tail -n 3 "$d/pytest.log" ;;
    packed)  # issue 10: packed sequences through the real model
      timeout 100 python3 benchmarks/gpu_packed_model.py --model $SMOL --text-dir $ESSAYS --out "$d" > "$d/log" 2>&1
      tail -n 5 "$d/log" ;;
    tune4k)  # issue 13: GPU bf16 tuning with model-level calibration, then NIAH with the file
      timeout 200 $M tune --model $SMOL --text-dir $ESSAYS --samples 8 --seq-len 4096 --l1 0.06 --keep-local-grid 4,2,1 \
        --target-top1 0.95 --target-cosine 0.999 --target-kl 0.01 --calibrate-samples 2 --compare --compare-samples 2 \
        --device cuda --dtype bfloat16 --no-plot --quiet --out "$d/smol4k.safetensors" > "$d/log" 2>&1; tail -n 14 "$d/log"
      cp "$d/smol4k.safetensors" /tmp/m/smol4k.safetensors 2>/dev/null
      timeout 150 $M niah --model $SMOL --text-dir $ESSAYS --lengths 4096,8000 --depths 0.1,0.5,0.9 --trials 2 \
        --tuned "$d/smol4k.safetensors" --device cuda --no-plots --quiet --out "$d/niah" > "$d/niah.log" 2>&1; tail -n 12 "$d/niah.log" ;;
    tune8k)  # issue 13: the 8K target
      timeout 260 $M tune --model $SMOL --text-dir $ESSAYS --samples 6 --seq-len 8192 --l1 0.06 --keep-local-grid 4,2,1 \
        --target-top1 0.95 --target-cosine 0.999 --target-kl 0.01 --calibrate-samples 2 --compare --compare-samples 2 \
        --device cuda --dtype bfloat16 --no-plot --quiet --out "$d/smol8k.safetensors" > "$d/log" 2>&1; tail -n 14 "$d/log" ;;
    alloc4k|alloc8k)  # issue 13: per-layer allocation by KL sensitivity (docs/TUNING.md), mean_sim, calibrated to top-1
      # 95% in bf16 on 2 calibration windows, compared on held-out windows; with ALLOC_GATE=<gate file> over that gate
      n=4096; s=8; [ $job = alloc8k ] && { n=8192; s=4; }
      G=""; [ -n "${ALLOC_GATE:-}" ] && G="--gate $ALLOC_GATE"
      timeout ${ALLOC_S:-240} $M tune --model $SMOL --text-dir $ESSAYS --samples $s --seq-len $n $G --allocate \
        --kl-budget ${ALLOC_KL:-0.006} --sensitivity-samples 2 --target-top1 0.95 --target-cosine 0.999 --target-kl 0.01 \
        --calibrate-samples 2 --compare --compare-samples 2 --device cuda --dtype bfloat16 --no-plot --quiet \
        --out "$d/alloc$n.safetensors" > "$d/log" 2>&1; tail -n 14 "$d/log"
      cp "$d/alloc$n.safetensors" /tmp/m/alloc$n.safetensors 2>/dev/null ;;
    gemma_alloc)  # issue 13: the allocation on Gemma-3-270M's 3 global layers (3 sensitivity forwards per sample)
      gem timeout ${ALLOC_S:-240} $M tune --model $GEMMA --text-dir $ESSAYS --samples 4 --seq-len 8192 --allocate \
        --kl-budget ${ALLOC_KL:-0.004} --sensitivity-samples 2 --target-top1 0.955 --target-cosine 0.999 --calibrate-samples 2 \
        --compare --compare-samples 1 --device cuda --dtype bfloat16 --no-plot --quiet --out "$d/gemma_alloc.safetensors" \
        > "$d/log" 2>&1; tail -n 12 "$d/log" ;;
    gate_smol)  # issue 17: the learned gate on the default model (first 15 essays train; RULER's haystack is all essays)
      mapfile -t ES < <(ls $ESSAYS/*.txt)
      timeout 120 $M train-gate --model $SMOL --text-file "${ES[@]:0:15}" --samples 8 --val-samples 1 --seq-len 4096 \
        --steps 300 --d-gate 64 --device cuda --out "$d/smol_gate.safetensors" > "$d/log" 2>&1; tail -n 4 "$d/log"
      cp "$d/smol_gate.safetensors" /tmp/m/smol_gate.safetensors 2>/dev/null ;;
    gate_v2_smol)  # issue 17: the position-bias gate trained around held-out windows 8-11 (docs/GATE.md), then
      # top-1 vs sparsity on windows 8-10 in bf16: gate rows, CDF-oracle rows and the all-blocks floor, one run
      timeout 150 python3 benchmarks/gate_more_text.py capture --model $SMOL --text-dir $ESSAYS --seq-len 4096 --windows 0-7,12-18 \
        --half-offsets --device cuda --out "$d/data" > "$d/log" 2>&1
      timeout 120 python3 benchmarks/gate_more_text.py fit --data "$d/data" --train w00-w07,w12-w16,h00-h06,h12-h15 \
        --val w17,w18 --steps 500 --val-every 50 --device cuda --out "$d/gate_v2.safetensors" 2>/dev/null >> "$d/log"
      G="$d/gate_v2.safetensors"; rm -rf "$d/data"
      timeout ${GATEV2_S:-300} python3 benchmarks/tune_frontier.py --model $SMOL --text-dir $ESSAYS --seq-len 4096 --skip 8 \
        --samples 3 --device cuda --dtype bfloat16 --out "$d/frontier.jsonl" --patterns "dense:block_m=128,block_n=128" \
        --specs "gate:path=$G,cdf_threshold=0.95,keep_local=8" "gate:path=$G,cdf_threshold=0.9,keep_local=8" \
        "gate:path=$G,cdf_threshold=0.95" "oracle:cdf_threshold=0.97" "oracle:cdf_threshold=0.95" \
        "oracle:cdf_threshold=0.92" >> "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 10 ;;
    ruler_smol4k|ruler_smol8k)  # issue 17: RULER on the default model, batched prompts, dense vs each predictor
      n=4096; [ $job = ruler_smol8k ] && n=8000
      P="${RULER_PRED:-$DEFAULT_PRED;mean_sim:score=mixed,cdf_threshold=0.99,keep_local=8}"
      [ -f /tmp/m/smol_gate.safetensors ] && P="$P;gate:path=/tmp/m/smol_gate.safetensors,topk=${GATE_TOPK:-0.4},keep_local=4"
      mapfile -t ES < <(ls $ESSAYS/*.txt)  # haystack: the 10 essays the gate did not train on
      timeout ${RULER_S:-280} $M ruler --model $SMOL --text-file "${ES[@]:15}" --lengths $n --samples ${RULER_SAMPLES:-24} --device cuda --quiet \
        --predictors "$P" --batch-size ${RULER_BATCH:-8} --no-plots --out "$d" > "$d/log" 2>&1; tail -n 14 "$d/log" ;;
    niah_decode_smol|niah_decode_gemma)  # issue 14: NIAH with the decode paths (dense prefill), SmolLM2 4K/8K, Gemma 16K/32K
      MD=$SMOL; L=4096,8000; [ $job = niah_decode_gemma ] && { MD=$GEMMA; L=16384,32000; }
      gem_if_md timeout ${NIAHD_S:-150} $M niah --model $MD --text-dir $ESSAYS --lengths $L --depths 0.1,0.5,0.9 --trials 2 \
        --decode-modes sparse_decode,kernel_decode,mixed_int8,mixed_fp8 --top-pages ${NIAHD_PAGES:-0.5} --device cuda \
        --no-plots --quiet --out "$d" > "$d/log" 2>&1; tail -n 10 "$d/log" ;;
    gen_gemma)  # issue 14: greedy agreement of the decode paths on Gemma-3-270M at 16K/32K
      gem timeout ${GENG_S:-200} $M gen-check --model $GEMMA --text-dir $ESSAYS --lengths ${GENG_LENGTHS:-16384,32000} \
        --modes ${GENG_MODES:-sparse_decode,kernel_decode,mixed_int8,mixed_fp8} --top-pages ${GENG_PAGES:-0.5} --samples ${GENG_SAMPLES:-2} \
        --device cuda --dtype ${GENG_DTYPE:-bfloat16} ${GENG_ARGS:-} --out "$d" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 24 ;;
    gen_smol)  # issue 14: greedy agreement of the decode paths on SmolLM2 at 4K/8K, read against kernel_decode (the floor)
      timeout ${GENS_S:-240} $M gen-check --model $SMOL --text-dir $ESSAYS --lengths ${GENS_LENGTHS:-4096,8128} \
        --modes ${GENS_MODES:-kernel_decode,sparse_decode,mixed_int8,mixed_fp8} --top-pages ${GENS_PAGES:-0.5} \
        --samples ${GENS_SAMPLES:-4} --device cuda --dtype ${GENS_DTYPE:-bfloat16} --out "$d" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 12 ;;
    decode_probe)  # issue 14: per decode path, ms per eager decode step, host time (cProfile) and host syncs
      timeout ${DPROBE_S:-150} python3 benchmarks/decode_host_probe.py --model ${DPROBE_MODEL:-$SMOL} --text-dir $ESSAYS \
        --length ${DPROBE_LEN:-8128} ${DPROBE_ARGS:-} --out "$d" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 80 ;;
    gemma_tune)  # issue 13: Gemma-3-270M global layers (window layers are exact bands, left out)
      gem timeout 240 $M tune --model $GEMMA --text-dir $ESSAYS --samples 4 --seq-len 8192 --l1 0.06 --keep-local-grid 4,2,1 \
        --target-top1 0.955 --target-cosine 0.999 --calibrate-samples 2 --compare --compare-samples 1 \
        --device cuda --dtype bfloat16 --no-plot --quiet --out "$d/gemma8k.safetensors" > "$d/log" 2>&1; tail -n 12 "$d/log"
      cp "$d/gemma8k.safetensors" /tmp/m/gemma8k.safetensors 2>/dev/null ;;
    gemma_bench)  # issue 13: the tuned file at 8K/16K/32K against the all-blocks floor, same runs
      gem timeout 280 python3 benchmarks/bench_model.py --model $GEMMA --lengths 8192,16384,32000 --text-dir $ESSAYS --repeats 5 \
        --tuned /tmp/m/gemma8k.safetensors --no-profile --no-plot --out "$d" > "$d/log" 2>&1; tail -n 12 "$d/log" ;;
    decode_parity_gemma)  # issue 14: one decode step per layer, model SDPA / our triton and reference decode vs float64
      gem timeout ${DPAR_S:-120} python3 benchmarks/decode_layer_parity.py --model $GEMMA --text-dir $ESSAYS \
        --length ${DPAR_LEN:-16384} --dtype bfloat16 --backends triton,reference --json "$d/parity.json" > "$d/log" 2>&1
      grep -v Converting "$d/log" | tail -n 22 ;;
    gemma_oracle)  # issue 13: can any block selection reach 50% on Gemma's global layers within 2 points of the floor?
      gem timeout ${GORC_S:-240} python3 benchmarks/bench_model.py --model $GEMMA --lengths ${GORC_LENGTHS:-8192,16384,32000} \
        --text-dir $ESSAYS --repeats ${GORC_REPEATS:-3} --no-profile --no-plot --out "$d" --predictors \
        "${GORC_PRED:-oracle:cdf_threshold=0.99;oracle:cdf_threshold=0.97;oracle:cdf_threshold=0.9;oracle:topk=0.5,cdf_threshold=None;$DEFAULT_PRED}" \
        > "$d/log" 2>&1; tail -n 24 "$d/log" ;;
    ruler_gemma)  # issue 17: RULER on Gemma-3-270M, batched prompts
      T="--tuned /tmp/m/gemma8k.safetensors"; [ -f /tmp/m/gemma8k.safetensors ] || T=""
      gem timeout ${RULER_GEMMA_S:-420} $M ruler --model $GEMMA --text-dir $ESSAYS --lengths ${RULER_GEMMA_LENGTHS:-8192,16384,32000} \
        --samples ${RULER_GEMMA_SAMPLES:-3} --device cuda --quiet --batch-size ${RULER_BATCH:-8} \
        --predictors "${RULER_GEMMA_PRED:-$DEFAULT_PRED}" $T --no-plots --out "$d" > "$d/log" 2>&1; tail -n 30 "$d/log" ;;
    gpu_tests)  # issue 11: the kernel, state, integration and predictor tests on the GPU (real kernels, no interpreter)
      timeout ${GT_S:-420} python3 -m pytest -v -rfE -p no:cacheprovider ${GT_DIRS:-tests/ops tests/state tests/integrations tests/predictors tests/test_nonfinite.py} \
        > "$d/pytest.log" 2>&1; grep -cE " PASSED" "$d/pytest.log"; grep -E " FAILED| ERROR" "$d/pytest.log" | head -n 20; tail -n 2 "$d/pytest.log" ;;
    probe)  # issue 10: where the eager patched forward spends its host time, per row
      timeout ${PROBE_S:-200} python3 benchmarks/eager_host_probe.py --model $SMOL --text-dir $ESSAYS --length ${PROBE_LEN:-8192} \
        --repeats ${PROBE_REPEATS:-11} ${PROBE_PACKED:+--packed $PROBE_PACKED} --out "$d" > "$d/log" 2>&1; tail -n 45 "$d/log" ;;
    gen_mixed)  # issue 14: greedy agreement with the mixed cache, sink tokens 4 (default) vs 0, SmolLM2 4K/8K
      for sink in 4 0; do
        timeout 150 $M gen-check --model $SMOL --text-dir $ESSAYS --lengths 4096,8128 --modes mixed_int8,mixed_fp8 \
          --mixed-sink-tokens $sink --samples 2 --device cuda --dtype bfloat16 --quiet --out "$d/sink$sink" > "$d/log$sink" 2>&1
        echo "--- sink $sink"; tail -n 8 "$d/log$sink"
      done ;;
    host_nomodel)  # issue 10: host cost per layer call and eager whole-model rows on SmolLM2's shapes (random weights)
      timeout 60 python3 benchmarks/layer_call_host.py --out "$d" > "$d/host.log" 2>&1; tail -n 8 "$d/host.log"
      timeout 100 python3 benchmarks/bench_model.py --arch smollm2-135m --lengths 8192 --random-ids --repeats 21 \
        --predictors "$DEFAULT_PRED" --patterns "sink_window:window_blocks=8,block_m=128,block_n=128" --no-profile --no-plot \
        --out "$d" > "$d/log" 2>&1; tail -n 5 "$d/log" ;;
    crossover)  # issue 10 item 5: the measured density crossover per shape (SmolLM2, Gemma global, Llama-8B)
      cp src/sparseattn/ops/tuned/crossover.json /tmp/m/crossover.json
      timeout ${CROSS_S:-220} python3 benchmarks/bench_crossover.py --shapes 9,3,64 4,1,256 32,8,128 \
        --lengths ${CROSS_LENGTHS:-2048 4096 8192 16384 32768} --budget-s ${CROSS_BUDGET:-170} --out "$d" \
        --merge-into /tmp/m/crossover.json > "$d/log" 2>&1; tail -n 18 "$d/log"; cp /tmp/m/crossover.json "$d/merged.json" ;;
    auto_nomodel)  # issue 10 item 5: dense_above=auto on random-weight Gemma/SmolLM2 shapes, with and without
      [ -n "${CROSS_FILE:-}" ] && export SPARSEATTN_CROSSOVER=$CROSS_FILE
      for arch in ${AUTO_ARCHS:-gemma3-270m}; do
        L=${AUTO_LENGTHS:-8192,32768}; [ $arch = smollm2-135m ] && L=8192
        for da in none auto; do
          A=""; [ $da = auto ] && A="--dense-above auto"
          timeout ${AUTO_S:-70} python3 benchmarks/bench_model.py --arch $arch --lengths $L --random-ids --repeats ${AUTO_REPEATS:-7} \
            --mode ${AUTO_MODE:-eager} \
            --predictors "$DEFAULT_PRED" --no-profile --no-plot $A --out "$d/${arch}_$da" > "$d/${arch}_$da.log" 2>&1
          echo "--- $arch $da"; tail -n 4 "$d/${arch}_$da.log"
        done
      done ;;
    smol_auto)  # issue 10 item 5: real SmolLM2, a dense-ish predictor and the default, with dense_above=auto
      [ -n "${CROSS_FILE:-}" ] && export SPARSEATTN_CROSSOVER=$CROSS_FILE
      for md in eager graphs; do
        timeout ${SMOLAUTO_S:-110} python3 benchmarks/bench_model.py --model $SMOL --lengths 8192,4096 --text-dir $ESSAYS \
          --repeats 11 --mode $md --predictors "$DEFAULT_PRED;mean_sim:score=mixed,cdf_threshold=0.995,keep_local=8" \
          --dense-above auto --no-profile --no-plot --out "$d/$md" > "$d/$md.log" 2>&1; echo "--- $md"; tail -n 8 "$d/$md.log"
      done ;;
    decode_sweep)  # issue 14: INT8/FP8 decode kernel variants
      timeout 250 python3 benchmarks/decode_int8_sweep.py --out "$d" > "$d/log" 2>&1; tail -n 25 "$d/log" ;;
    decode_bench)  # issue 14: dense/int8/fp8/sparse decode (sparse at page 16/32/64, radix-select pick kernel)
      timeout ${DB_S:-330} python3 benchmarks/bench_decode.py --page-sizes ${DB_PAGES:-16,32,64} --budget-s ${DB_BUDGET:-280} \
        --flex-budget-s 60 ${DB_ARGS:-} --out "$d" > "$d/log" 2>&1; tail -n 32 "$d/log" ;;
    splits_sweep)  # issue 14: decode split counts x launch configs at small batches (graphed), the launcher's default
      # against the wave heuristic; SS_BATCHES (1 2 4 8), SS_SPLITS / SS_CONFIGS (the script's grid), SS_BUDGET (150)
      timeout ${SS_S:-240} python3 benchmarks/decode_splits_sweep.py --out "$d" --contexts 131072 32768 \
        --batches ${SS_BATCHES:-1 2 4 8} ${SS_SPLITS:+--splits $SS_SPLITS} ${SS_CONFIGS:+--configs $SS_CONFIGS} \
        --budget-s ${SS_BUDGET:-150} > "$d/log" 2>&1; grep -v "^  n" "$d/log" | tail -n 24 ;;
    vkeys)  # issue 14: keys-contiguous V (V_KEYS) and PV="fp16w" against the plain default, bf16 and int8, graphed, cuDNN
      timeout ${VK_S:-300} python3 benchmarks/decode_vkeys.py --out "$d" --budget-s ${VK_BUDGET:-240} \
        ${VK_ARGS:-} > "$d/log" 2>&1; tail -n 70 "$d/log" ;;
    stage_probe)  # issue 14: sparse decode stage by stage (graphed), pick variants, paged launch sweep
      timeout ${SP_S:-200} python3 benchmarks/decode_stage_probe.py --batch ${SP_BATCH:-1,8} --pages ${SP_PAGES:-64,32} \
        --out "$d" > "$d/log" 2>&1; tail -n 12 "$d/log" ;;
    ncu_decode)  # issue 14: Nsight Compute on the dense decode split kernel (the launcher's default config), bf16 and
      # int8 caches; NCU_CASES "kind:batch:ctx ..." (kind bf16 / int8 / int8vk = keys-contiguous V; default: the three
      # at 128K x 8 and bf16 at 32K x 1); full set with SASS-level
      # stall samples: the report, its raw and source pages as CSV, and benchmarks/ncu_summary.py's digest
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
      for case in ${NCU_CASES:-int8:8:131072 int8vk:8:131072 bf16:8:131072 bf16:1:32768}; do
        IFS=: read -r kind b ctx <<< "$case"; n="${kind}_b${b}_${ctx}"
        timeout ${NCU_S:-150} $NCU --clock-control none -k regex:_decode_split --launch-skip 1 --launch-count 1 \
          --set full --import-source yes -f -o "$d/$n" \
          python3 benchmarks/decode_stage_probe.py --ncu $kind --batch $b --ctx $ctx > "$d/ncu_$n.txt" 2>&1
        $NCU -i "$d/$n.ncu-rep" --page details > "$d/details_$n.txt" 2>&1
        $NCU -i "$d/$n.ncu-rep" --page raw --csv > "$d/raw_$n.csv" 2>&1
        $NCU -i "$d/$n.ncu-rep" --page source --csv --print-source sass > "$d/source_$n.csv" 2>&1
        echo "--- $n"; grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Issue Slots Busy|Executed Ipc Active|Block Limit Shared Mem|Dynamic Shared Memory Per Block|Grid Size)" "$d/details_$n.txt" | head -n 14
        python3 benchmarks/ncu_summary.py --raw "$d/raw_$n.csv" --source "$d/source_$n.csv" --top 14 2>&1 | head -n 40
        rm -f "$d/$n.ncu-rep"
      done ;;
    s13_alloc)  # issue 13: the 8K allocation over the bias-extended gate, fp32 (masked SDPA: the targets as stated)
      # and bf16 (read against the all-blocks floor); 8K windows 0-3 tune (2 calibrate), 4-5 (4K windows 8-11) held out
      G=${ALLOC_GATE:-.carry/gate_v2x.safetensors}
      for dt in float32 bfloat16; do
        B=""; [ $dt = float32 ] && B="--backend masked_sdpa"
        timeout ${S13_S:-200} $M tune --model $SMOL --text-dir $ESSAYS --samples 4 --seq-len 8192 --gate $G --allocate \
          --kl-budget ${ALLOC_KL:-0.006} --sensitivity-samples 2 --target-top1 ${S13_TOP1:-0.955} --target-cosine 0.999 \
          --target-kl 0.01 --calibrate-samples 2 --compare --compare-samples 2 --device cuda --dtype $dt $B --no-plot \
          --out "$d/a8_$dt.safetensors" > "$d/log_$dt" 2>&1; echo "--- $dt"; grep -v Converting "$d/log_$dt" | tail -n 9
        cp "$d/a8_$dt.safetensors" /tmp/m/ 2>/dev/null
      done ;;
    s13_gate8k)  # issue 13: a gate trained at 8K (8K windows 0-3 and 6-8 with half offsets, window 9 validates; 4-5 never
      # seen), then the 8K allocation over it in fp32 (masked SDPA) and bf16, compared on windows 4-5
      timeout 120 python3 benchmarks/gate_more_text.py capture --model $SMOL --text-dir $ESSAYS --seq-len 8192 --windows 0-3,6-9 \
        --half-offsets --device cuda --out /tmp/m/g8data > "$d/log" 2>&1
      timeout 150 python3 benchmarks/gate_more_text.py fit --data /tmp/m/g8data --train w00-w03,w06-w08,h00-h02,h06-h07 --val w09 \
        --steps 500 --val-every 50 --device cuda --out "$d/gate8k.safetensors" >> "$d/log" 2>&1; tail -n 3 "$d/log"
      cp "$d/gate8k.safetensors" /tmp/m/ && ALLOC_GATE=/tmp/m/gate8k.safetensors S13_S=150 run_job s13_alloc
      mv "$R/s13_alloc" "$d/alloc" ;;
    s13_eval)  # issue 13: held-out 8K windows 4-5: floor, default curve, the allocated files; NIAH; whole-model speed
      for dt in bfloat16 float32; do
        B=auto; [ $dt = float32 ] && B=masked_sdpa
        timeout ${S13E_S:-100} python3 benchmarks/tune_frontier.py --model $SMOL --text-dir $ESSAYS --seq-len 8192 --skip 4 \
          --samples 2 --device cuda --dtype $dt --backend $B --out "$d/frontier_$dt.jsonl" \
          $( [ $dt = bfloat16 ] && echo --patterns dense:block_m=128,block_n=128 ) --specs "$DEFAULT_PRED" \
          "mean_sim:score=mixed,cdf_threshold=0.98,keep_local=8" "mean_sim:score=mixed,cdf_threshold=0.99,keep_local=8" \
          "mean_sim:score=mixed,cdf_threshold=0.995,keep_local=8" > "$d/frontier_$dt.log" 2>&1
        for f in /tmp/m/a8_*.safetensors; do
          timeout 60 python3 benchmarks/tune_frontier.py --model $SMOL --text-dir $ESSAYS --seq-len 8192 --skip 4 --samples 2 \
            --device cuda --dtype $dt --backend $B --tuned $f --tuned-scales 1,0.8 --out "$d/frontier_$dt.jsonl" >> "$d/frontier_$dt.log" 2>&1
        done
        echo "--- frontier $dt"; grep -v Converting "$d/frontier_$dt.log" | grep -iE "top1|sparsity" | tail -n 12
      done
      F=/tmp/m/a8_bfloat16.safetensors
      timeout 150 $M niah --model $SMOL --text-dir $ESSAYS --lengths 4096,8000 --depths 0.1,0.5,0.9 --trials 2 \
        --tuned $F --device cuda --no-plots --quiet --out "$d/niah" > "$d/niah.log" 2>&1; tail -n 8 "$d/niah.log"
      timeout 90 python3 benchmarks/bench_model.py --model $SMOL --lengths 8192 --text-dir $ESSAYS --repeats 7 --tuned $F \
        --no-profile --no-plot --out "$d/speed" > "$d/speed.log" 2>&1; tail -n 6 "$d/speed.log" ;;
    s13_gemma)  # issue 13: Gemma global layers: the allocation, the exact-mass oracle with top-1, the file at 8K-32K
      # (2026-12-05: 140 s ended the allocation during its first sensitivity forwards, cold Triton compiles likely)
      gem timeout ${S13G_S:-300} $M tune --model $GEMMA --text-dir $ESSAYS --samples 4 --seq-len 8192 --allocate \
        --kl-budget ${ALLOC_KL:-0.004} --sensitivity-samples 2 --target-top1 ${S13G_TOP1:-0.96} --target-cosine 0.999 \
        --calibrate-samples 2 --compare --compare-samples 1 --device cuda --dtype bfloat16 --no-plot \
        --out "$d/gemma_alloc.safetensors" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 8
      gem timeout ${S13GB_S:-150} python3 benchmarks/bench_model.py --model $GEMMA --lengths 8192,16384,32000 --text-dir $ESSAYS \
        --repeats 3 --tuned "$d/gemma_alloc.safetensors" --no-profile --no-plot --out "$d/bench" > "$d/bench.log" 2>&1
      tail -n 8 "$d/bench.log"
      gem timeout ${S13GO_S:-200} python3 benchmarks/bench_model.py --model $GEMMA --lengths 8192,16384,32000 --text-dir $ESSAYS \
        --repeats 3 --no-profile --no-plot --out "$d/oracle" --predictors \
        "oracle:cdf_threshold=0.97;oracle:cdf_threshold=0.9;oracle:topk=0.5,cdf_threshold=None;$DEFAULT_PRED" \
        > "$d/oracle.log" 2>&1; tail -n 16 "$d/oracle.log" ;;
    s14_ruler)  # issue 17: RULER in float32 (masked SDPA: no bf16 rounding floor to read against), each sparse row with
      # and without a dense query tail of 128 tokens; S14_LEN 4096 (default) or 8000, S14_TUNED a tuned file as one more row,
      # S14R_EXTRA more ruler arguments (e.g. "--seed 1")
      # (the essays haystack includes text a tuned file's gate trained on; say so when reading that row)
      n=${S14_LEN:-4096}; T=""; [ -n "${S14_TUNED:-}" ] && [ -f "${S14_TUNED}" ] && T="--tuned ${S14_TUNED}"
      timeout ${S14R_S:-540} $M ruler --model $SMOL --text-dir $ESSAYS --lengths $n --samples ${S14R_SAMPLES:-24} \
        --predictors "${S14_PRED:-$DEFAULT_PRED;mean_sim:score=mixed,cdf_threshold=0.95,keep_local=8}" $T \
        --dense-tails ${S14_TAILS:-0,128} --device cuda --dtype float32 --backend masked_sdpa --batch-size 8 --no-plots \
        ${S14R_EXTRA:-} --quiet --out "$d" > "$d/log" 2>&1; tail -n 40 "$d/log" ;;
    s14_ruler_gemma)  # issue 17: RULER on Gemma-3-270M (bf16 with the all-blocks floor), the default with and without the
      # dense tail; S14G_TUNED: a tuned file for its global layers as one more row
      # S14G_FP32=1: float32 through masked SDPA (no rounding floor, as s14_ruler; no all-blocks row needed);
      # S14G_BS: prompts per batch (8; 2 at 16K and 1 at 32K fit an 80 GB card in float32); S14G_TEXT: the haystack folder
      T=""; [ -n "${S14G_TUNED:-}" ] && [ -f "${S14G_TUNED}" ] && T="--tuned ${S14G_TUNED}"
      DT=""; [ -n "${S14G_FP32:-}" ] && DT="--dtype float32 --backend masked_sdpa"
      gem timeout ${S14G_S:-540} $M ruler --model $GEMMA --text-dir ${S14G_TEXT:-$ESSAYS} --lengths ${S14G_LENGTHS:-8192,16384,32000} \
        --samples ${S14G_SAMPLES:-8} --predictors "${S14G_PRED:-$DEFAULT_PRED}" $T --dense-tails ${S14G_TAILS:-0,128} $DT --device cuda \
        --batch-size ${S14G_BS:-8} --no-plots --quiet --out "$d" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 40 ;;
    s18_gate_gemma)  # issue 17: the Gemma gate trained on the device (global layers 5/11/17, 8K, the right tokenizer) on
      # the first 15 essays (windows 0-4 with half offsets, window 5 validates); the other 10 go to /tmp/m/essays_ho,
      # the held-out haystack of s14_ruler_gemma with S14G_TEXT=/tmp/m/essays_ho
      mapfile -t ES < <(ls $ESSAYS/*.txt); mkdir -p /tmp/m/essays_ho && cp "${ES[@]:15}" /tmp/m/essays_ho/
      gem timeout ${S18G_S:-300} $M train-gate --model $GEMMA --text-file "${ES[@]:0:15}" --seq-len 8192 --windows 0-4 \
        --half-offsets --val-windows 5 --layers 5,11,17 --steps 500 --val-every 50 --device cuda --dtype float32 \
        --out "$d/gemma_gate8k.safetensors" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 6
      cp "$d/gemma_gate8k.safetensors" "$d/gemma_gate8k.json" /tmp/m/ 2>/dev/null; ls /tmp/m/essays_ho | wc -l ;;
    s18_ruler_gemma)  # issue 17: RULER on Gemma-3-270M with the right tokenizer (copy_gtok first; refuses without it),
      # float32 through masked SDPA, dense vs the default and vs mean_sim with sim_threshold=0 at cdf 0.9 (about 55% of
      # the global layers' blocks skipped at 8K; the default skips about 16%), both with a dense tail of 128.
      # S18R_LENGTHS (default "8192 16384 32000"), S18R_SAMPLES (8), S18R_S (seconds per length, 280), S18R_BS (prompts
      # per batch at every length; default 8 / 2 / 1 by length), S18R_PRED (the ';'-separated predictors; default both),
      # S18R_EXTRA (more ruler arguments, e.g. "--tasks niah_multikey --seed 1"), S18R_TAG (a suffix for the run folders)
      need_gtok s18_ruler_gemma || return
      for n in ${S18R_LENGTHS:-8192 16384 32000}; do
        bs=8; [ "$n" -gt 8192 ] && bs=2; [ "$n" -gt 16384 ] && bs=1; bs=${S18R_BS:-$bs}
        gruler_f32 "$d/len$n${S18R_TAG:-}" ${S18R_S:-280} 14 --lengths $n --samples ${S18R_SAMPLES:-8} --batch-size $bs \
          --predictors "${S18R_PRED:-$DEFAULT_PRED;$GEMMA_SIM0}" ${S18R_EXTRA:-}
      done ;;
    s19_gemma_alloc)  # issue 17: a per-layer allocation on Gemma's global layers (nineteenth session: the two 16K
      # niah_multikey prompts mean_sim loses at cdf 0.9 come back with layer 5 dense; the exact-mass oracle keeps them at
      # the same sparsity), float32, at S19A_LEN (16384) tokens, then the file through RULER: the 16K multikey prompts
      # (seed 0 x 8, seed 1 x 16) beside mean_sim cdf 0.9 sim_threshold=0, then every task at S19A_RULER_LENGTHS.
      # Read the file's sparsity over the predicted layers in the RULER rows (>= 50% is the target's condition).
      need_gtok s19_gemma_alloc || return
      gem timeout ${S19A_S:-300} $M tune --model $GEMMA --text-dir $ESSAYS --samples ${S19A_SAMPLES:-2} --seq-len ${S19A_LEN:-16384} \
        --allocate --kl-budget ${S19A_KL:-0.01} --sensitivity-samples 1 --target-top1 ${S19A_TOP1:-0.95} --target-cosine 0.999 \
        --calibrate-samples 1 --device cuda --dtype float32 --backend masked_sdpa --no-plot --quiet \
        --out "$d/gemma_alloc16k.safetensors" > "$d/tune.log" 2>&1; grep -v Converting "$d/tune.log" | tail -n 12
      [ -f "$d/gemma_alloc16k.safetensors" ] || { echo "s19_gemma_alloc: no tuned file (tune.log above)"; return; }
      for sd in 0:8 1:16; do
        gruler_f32 "$d/mk16_seed${sd%:*}" ${S19A_MK_S:-150} 6 --lengths 16384 --tasks niah_multikey --samples ${sd#*:} \
          --seed ${sd%:*} --predictors "$GEMMA_SIM0" --tuned "$d/gemma_alloc16k.safetensors" --batch-size 4
      done
      for n in ${S19A_RULER_LENGTHS:-}; do
        bs=8; [ "$n" -gt 8192 ] && bs=4; [ "$n" -gt 16384 ] && bs=1
        gruler_f32 "$d/len$n" ${S19A_R_S:-280} 14 --lengths $n --samples 8 --predictors "$GEMMA_SIM0" \
          --tuned "$d/gemma_alloc16k.safetensors" --batch-size $bs
      done ;;
    s14_gemma_gate)  # issue 17: the Gemma gate (trained on the CPU, fourteenth session; /tmp/m/gemma_gate8k.safetensors)
      # against the default and the exact-mass oracle on held-out 8K windows 4-5, bf16 with the floor, 512 positions each
      G=/tmp/m/gemma_gate8k.safetensors
      gem timeout ${S14GG_S:-300} python3 benchmarks/tune_frontier.py --model $GEMMA --text-dir $ESSAYS --seq-len 8192 --skip 4 \
        --samples 2 --positions 512 --device cuda --dtype bfloat16 --patterns dense:block_m=128,block_n=128 \
        --specs "$DEFAULT_PRED" "gate:path=$G,cdf_threshold=0.95,keep_local=4" "gate:path=$G,cdf_threshold=0.9,keep_local=4" \
        "gate:path=$G,cdf_threshold=0.8,keep_local=4" "oracle:cdf_threshold=0.97" "oracle:cdf_threshold=0.9" \
        --out "$d/frontier.jsonl" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 10 ;;
    s14_speed)  # the product number: whole-model prefill, SmolLM2 8K, dense vs the default vs the 8K allocation file (its
      # layers take the gate's fused path since 54df47d, never timed), eager and graphed
      F=${S14_SPEED_TUNED:-/tmp/m/alloc8k_gate8k_fp32.safetensors}
      for mode in eager graphs; do  # --tuned excludes --predictors: the default is its own run (each has its dense side)
        timeout ${S14S_S:-120} python3 benchmarks/bench_model.py --model $SMOL --lengths 8192 --text-dir $ESSAYS --repeats 11 \
          --mode $mode --tuned $F --no-profile --no-plot --out "$d/tuned_$mode" > "$d/tuned_$mode.log" 2>&1
        timeout ${S14S_S:-120} python3 benchmarks/bench_model.py --model $SMOL --lengths 8192 --text-dir $ESSAYS --repeats 11 \
          --mode $mode --predictors "$DEFAULT_PRED" --no-profile --no-plot --out "$d/default_$mode" > "$d/default_$mode.log" 2>&1
        tail -n 5 "$d/tuned_$mode.log" "$d/default_$mode.log"
      done ;;
    s15_quant)  # issue 15: Q smoothing, Q/K channel balancing (both on by default since the fifteenth session) and
      # per_token scales, never run on a GPU: kernel-vs-emulation parity, the 32K speed table (per_warp with and without
      # them, same run), then the captured SmolLM2 Q/K/V at 4K (dense causal) for every granularity with and without
      # balancing; needs SmolLM2 staged (copy_s0, copy_s1); Gemma (staged) as S15_MODEL=$GEMMA with layers 0,5,11,17
      run_job s15_kernel; run_job s15_qkv ;;
    s15_kernel)  # the model-free half of s15_quant: GPU parity tests and the 32K speed table
      timeout ${S15K_TEST_S:-150} python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_quant.py > "$d/pytest.log" 2>&1
      tail -n 3 "$d/pytest.log"
      timeout ${S15K_BENCH_S:-260} python3 benchmarks/bench_quant.py --no-patterns --stress 20 --budget-s ${S15K_BUDGET:-200} \
        --out "$d" > "$d/bench.log" 2>&1; tail -n 24 "$d/bench.log" ;;
    s17_qvar)  # issue 15: quantized-kernel load paths (TMA, PREFETCH) and configs, 32K, beside our bf16 and cuDNN
      # (S17Q_ARGS: more quant_kernel_variants.py options, e.g. --variants / --operands);
      # then the new switches' GPU parity tests (bitwise vs plain loads)
      timeout ${S17Q_S:-330} python3 benchmarks/quant_kernel_variants.py --budget-s ${S17Q_BUDGET:-240} \
        --repeats ${S17Q_REPEATS:-5} --out "$d" ${S17Q_ARGS:-} > "$d/variants.log" 2>&1; tail -n 32 "$d/variants.log"
      timeout ${S17Q_TEST_S:-90} python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_quant.py -k "switch" \
        > "$d/pytest.log" 2>&1; tail -n 3 "$d/pytest.log" ;;
    ncu_quant)  # issue 15: Nsight Compute on the quantized prefill kernel, pipe utilisation and stall samples per
      # fixed config (NCU_QCASES "variant:operands:seqlen ...", variants of quant_kernel_variants.py)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
      for case in ${NCU_QCASES:-tma:int8_default:8192 tma:int8_k_only:8192}; do
        IFS=: read -r var ops n <<< "$case"; tag="${var}_${ops}_${n}"
        timeout ${NCU_S:-150} $NCU --clock-control none -k regex:_block_sparse_fwd_quant --launch-skip 1 --launch-count 1 \
          --set full --import-source yes -f -o "$d/$tag" \
          python3 benchmarks/quant_ncu_probe.py --variant $var --operands $ops --seqlen $n > "$d/ncu_$tag.txt" 2>&1
        $NCU -i "$d/$tag.ncu-rep" --page raw --csv > "$d/raw_$tag.csv" 2>&1
        $NCU -i "$d/$tag.ncu-rep" --page source --csv --print-source sass > "$d/source_$tag.csv" 2>&1
        echo "--- $tag"; python3 benchmarks/ncu_summary.py --raw "$d/raw_$tag.csv" --pipes --source "$d/source_$tag.csv" \
          --top 8 2>&1 | head -n 40
        rm -f "$d/$tag.ncu-rep"
      done ;;
    quant_profile)  # issue 15: the quantization's host vs device time, per kernel, and the whole call eager vs graphed
      timeout ${QP_S:-200} python3 benchmarks/quant_profile.py --out "$d" ${QP_ARGS:-} > "$d/log" 2>&1; tail -n 60 "$d/log" ;;
    quant_d256)  # issue 15: the quantization at Gemma-3's global-layer shape (H=4, H_kv=1, D=256; timed in the
      # thirty-second session: BENCHMARKS.md), alternated with the tree carried as
      # .carry/src_base when there is one (e.g. `git archive b6520fe src | tar -x -C .carry/src_base`)
      # (QD_ARGS replaces the shape, e.g. "--seqlens 32768 4096" for the default H=32, H_kv=8, D=128; rounds are kept
      # apart as base1 new1 base2 new2)
      for t in base1 new1 base2 new2; do
        if [ ${t%?} = base ]; then [ -d .carry/src_base/src ] || continue; P=$PWD/.carry/src_base/src; else P=$PWD/src; fi
        PYTHONPATH=/tmp/site:$P timeout ${QD_S:-90} python3 benchmarks/quant_profile.py \
          ${QD_ARGS:---seqlens 32768 8192 --heads 4 --kv-heads 1 --head-dim 256} --calls 10 --out "$d/$t" > "$d/$t.log" 2>&1
        echo "== $t"; grep "^| [0-9]" "$d/$t.log"
      done ;;
    s15_qkv)  # the model half of s15_quant: captured Q/K/V at 4K through the kernel
      MD=${S15_MODEL:-$SMOL}; gem_if_md timeout 60 $M collect --model $MD --layers ${S15_LAYERS:-5,10,15,20,25,29} --lengths 4096 \
        --samples 1 --text-dir $ESSAYS --device cuda --out /tmp/m/qkv_s15 --quiet > "$d/collect.log" 2>&1
      timeout 90 python3 benchmarks/bench_quant.py --qkv /tmp/m/qkv_s15 --qkv-grans per_warp,per_thread,per_token \
        --qkv-balance both --out "$d" > "$d/qkv.log" 2>&1; tail -n 16 "$d/qkv.log" ;;
    s16_e2e)  # issue 15: SmolLM2 end to end, the default predictor in bf16 and its int8 per_warp twin (Q smoothing and
      # balancing on), top-1 / KL vs dense and vs the all-blocks floor, 4K and 8K, eager
      timeout ${S16E_S:-200} python3 benchmarks/bench_model.py --model $SMOL --lengths ${S16E_LENGTHS:-4096,8192} \
        --text-dir $ESSAYS --repeats 5 --predictors "$DEFAULT_PRED" --quant int8 --quant-gran per_warp --no-profile \
        --no-plot --out "$d" > "$d/log" 2>&1; grep -v Converting "$d/log" | tail -n 14 ;;
    *) echo "unknown job $job" ;;
  esac
}
for job in "$@"; do run_job "$job"; done
tar -C "$OUT" -czf "$OUT/jobs_$1.tar.gz" s3 && rm -rf "$R"
st done
