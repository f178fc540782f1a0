#!/usr/bin/env bash
# One device call for the engine's speed (issue 23): the GPU tests of the graphed paths, then
# benchmarks/engine.py on the llama-3-8b shape in variants side by side (same process tree, same
# card): the landed engine (prefill/mixed steps eager, no cap on prompt tokens beside decodes,
# 8,192-token steps), then CUDA graphs for prefill/mixed steps, then the 2,048-token budget and
# the cap on prompt tokens while decoding. Results under $OUT.
# Usage: benchmarks/engine_device.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $part == tests || $part == all ]]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/runtime/engine/test_prefill_graphs.py \
    tests/runtime/engine/test_engine_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [[ $part == bench || $part == all ]]; then
  common="--concurrency ${ENGINE_CONCURRENCY:-1,64,256} --skip-hf --out $OUT"
  # variant: tag, step budget, graph tokens, prompt tokens while decoding (0: no cap)
  for v in ${ENGINE_VARIANTS:-landed:8192:0:0 graphs:8192:2048:0 graphs-2048:2048:2048:0 graphs-2048-cap512:2048:2048:512}; do
    IFS=: read -r tag budget graphs cap <<<"$v"
    echo "== $tag: step budget $budget, prefill graphs up to $graphs tokens, prompt cap $cap"
    timeout 300 python3 benchmarks/engine.py $common --tag "-$tag" --max-num-batched-tokens "$budget" \
      --max-prefill-graph-tokens "$graphs" --max-prefill-tokens-while-decoding "$cap" 2>&1 | tee "$OUT/engine-$tag.log" | grep -E "^\| [0-9]|TTFT|engine up|model ready|Error|error" | head -20
  done
fi
