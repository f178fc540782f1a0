#!/usr/bin/env bash
# One device call for warm standby (issue 20): the GPU park/wake tests (CUDA virtual memory for
# weights and KV, decode graphs replayed after wakes), then benchmarks/standby.py on the
# llama-3-8b shape in bf16; `shared`: three runtimes under the node agent on a GPU that holds one
# at a time (benchmarks/standby_shared.py). Results under $OUT.
# `pinned`: which live allocations keep torch's large default-pool segments reserved after a load
# (benchmarks/pinned_blocks.py, llama-3.2-1b: quick).
# Usage: benchmarks/standby_device.sh [tests|bench|shared|pinned|all]
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
# The web stack for `berth serve` and the node agent (the machine's own pytest stays in charge).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  $(ls benchmarks/wheels/*.whl | grep -v -E '/(pytest|pluggy|iniconfig|packaging|pygments)-') 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
# Results are named after the card that measured them (h100, h200).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i 'h[0-9]00' | tr 'A-Z' 'a-z')
gpu=${gpu:-gpu}
python3 -c "import torch, triton; from cuda import bindings; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda-bindings', bindings.__version__)"
if [[ $part == tests || $part == all ]]; then
  timeout 150 python3 -m pytest -q -x -s -p no:cacheprovider tests/runtime/engine/test_park_wake.py \
    tests/runtime/engine/test_elastic_pool.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $part == bench || $part == all ]]; then
  # Making the random 16 GB model takes a minute or two the first time (cached after).
  timeout 400 python3 benchmarks/standby.py --shape llama-3-8b --model-cache /tmp/berth-models \
    --out "$OUT/standby-$gpu.md" ${STANDBY_ARGS:-} 2>&1 | tee "$OUT/standby.log" | tail -40
fi
if [[ $part == shared || $part == all ]]; then
  # The agent's default heartbeat interval (1 s), as a node runs it. The model `bench` made.
  [[ -d /tmp/berth-models/llama-3-8b-bfloat16 ]] && ln -sfn llama-3-8b-bfloat16 /tmp/berth-models/llama-3-8b
  timeout -k 20 "${SHARED_TIMEOUT:-400}" python3 benchmarks/standby_shared.py --shape llama-3-8b \
    --model-cache /tmp/berth-models --out "$OUT/standby-shared-$gpu.md" ${SHARED_ARGS:-} 2>&1 \
    | tee "$OUT/standby-shared.log" | tail -40
fi
if [[ $part == pinned ]]; then
  timeout 300 python3 benchmarks/pinned_blocks.py --shape llama-3.2-1b --model-cache /tmp/berth-models \
    2>&1 | tee "$OUT/pinned-$gpu.txt" | tail -40
fi
