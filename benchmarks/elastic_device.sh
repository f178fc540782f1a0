#!/usr/bin/env bash
# One device call for the elastic KV pool and co-location (issue 17): the GPU tests (CUDA virtual
# memory pool under the grow/shrink schedule, graphs replayed after shrinks, park and wake, the
# allocator held to its measured limit), VMM timings, then
# benchmarks/colocate.py. Results under $OUT.
# Usage: benchmarks/elastic_device.sh [tests|colocate|colocate-a|all]
#   colocate: (b) two halves vs one whole; colocate-a: (a) three models under the node agent,
#   fixed shares vs request/limit pairs, sized to end within a 9-minute call (not part of all).
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
# The web stack and locust only (the machine's own pytest stays in charge of the tests).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  $(ls benchmarks/wheels/*.whl | grep -v -E '/(pytest|pluggy|iniconfig|packaging|pygments)-') 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
python3 -c "import torch, triton; from cuda import bindings; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda-bindings', bindings.__version__)"
if [[ $part == tests || $part == all ]]; then
  timeout 300 python3 -m pytest -q -x -s -p no:cacheprovider tests/runtime/engine/test_elastic_pool.py \
    tests/runtime/engine/test_budget.py tests/runtime/engine/test_engine_gpu.py \
    tests/runtime/engine/test_park_wake.py tests/runtime/engine/test_memory_profile.py 2>&1 | tee "$OUT/tests.log" | tail -25
  timeout 120 python3 benchmarks/vmm_timing.py 2>&1 | tee "$OUT/vmm.txt"
fi
if [[ $part == colocate || $part == all ]]; then
  timeout "${COLOCATE_TIMEOUT:-480}" python3 benchmarks/colocate.py --model-cache /tmp/berth-models --out "$OUT/colocate-h200.md" \
    --load-site /tmp/site ${COLOCATE_ARGS:-} 2>&1 | tee "$OUT/colocate.log" | tail -40
fi
if [[ $part == colocate-a ]]; then
  # Highest level first: a run cut short by the timeout loses the least telling turns. On
  # SIGTERM the script stops its runtimes and keeps its logs; the raw results are saved after
  # every turn, and the report is rendered from them if the run did not get that far.
  timeout -k 20 "${COLOCATE_A_TIMEOUT:-480}" python3 benchmarks/colocate.py --mode a \
    --model-cache /tmp/berth-models --out "$OUT/colocate-a.md" --load-site /tmp/site \
    --concurrency 128,32 --warmup 5 --duration 13 ${COLOCATE_ARGS:-} 2>&1 | tee "$OUT/colocate-a.log" | tail -70
  [[ -f $OUT/colocate-a.md ]] || python3 benchmarks/colocate.py --mode a \
    --render "$OUT/colocate-a.json" --out "$OUT/colocate-a.md" | tail -70
fi
