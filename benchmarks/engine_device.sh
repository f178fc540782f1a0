#!/usr/bin/env bash
# One device call for the engine's speed (issue 23): the GPU tests of the graphed paths, then
# benchmarks/engine.py on the llama-3-8b shape in variants side by side (same process tree, same
# card): prefill/mixed steps eager (the landed engine) and as CUDA graphs, at the default step
# budget and at 2,048 tokens. Results under $OUT.
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
  # variant: tag, step budget, graph tokens
  for v in ${ENGINE_VARIANTS:-eager-8192:8192:0 graphs-8192:8192:2048 graphs-2048:2048:2048}; do
    IFS=: read -r tag budget graphs <<<"$v"
    echo "== $tag: step budget $budget, prefill graphs up to $graphs tokens"
    timeout 300 python3 benchmarks/engine.py $common --tag "-$tag" --max-num-batched-tokens "$budget" \
      --max-prefill-graph-tokens "$graphs" 2>&1 | tee "$OUT/engine-$tag.log" | grep -E "^\| [0-9]|TTFT|engine up|model ready|Error|error" | head -20
  done
fi
