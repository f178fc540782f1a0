"""The decode kernels' GPU build, checked without a GPU: each compiles for sm_90 with the
ptxas Triton ships (the FP8 kernel's inline PTX included), and the FP8 cache read as words keeps
its point: no byte-wise shared-memory loads and no register spills in its main loop.

Compiled in a fresh interpreter: this directory's tests run Triton's interpreter, whose kernels
cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"q_ptr": "bf16", "block_tables_ptr": "i32", "seq_lens_ptr": "i32", "out_ptr": "bf16",
          "part_out_ptr": "fp32", "part_lse_ptr": "fp32", "k_scale_ptr": "fp32",
          "v_scale_ptr": "fp32"}  # fmt: skip
SHAPE = {"GROUP": 4, "GROUP_PAD": 16, "BLOCK_SIZE": 16, "BLOCK_N": 128}
COMPILE = """
import json, sys
from berth.kernels import decode
from berth.kernels.offline_compile import compile_for, main_loop_opcodes
name, pointers, constexprs = json.loads(sys.argv[1])
compiled = compile_for(getattr(decode, name), pointers, constexprs)
print(json.dumps({"ops": main_loop_opcodes(compiled.cubin), "stack": compiled.stack_bytes}))
"""


def compile_sm90(kernel: str, pointers: dict[str, str], constexprs: dict[str, Any]) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps([kernel, pointers, constexprs])],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("single_split", [False, True])
def test_fp8_words_kernel_builds_for_sm90_without_byte_loads_or_spills(
    single_split: bool,
) -> None:
    built = compile_sm90(
        "_decode_fp8_words_kernel",
        {**COMMON, "k_words_ptr": "i16", "v_words_ptr": "i16"},
        {**SHAPE, "HALF_DIM": 64, "SINGLE_SPLIT": single_split, "HW_CVT": True},
    )
    assert built["ops"].get("F2FP.F16.E4M3.UNPACK_B", 0) > 0, "no pair conversion in the loop"
    assert built["ops"].get("LDS.U8", 0) == 0
    assert built["stack"] == 0


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-bytes"])
def test_decode_kernel_builds_for_sm90(fp8: bool) -> None:
    cache = "fp8e4nv" if fp8 else "bf16"
    built = compile_sm90(
        "_decode_kernel",
        {**COMMON, "k_cache_ptr": cache, "v_cache_ptr": cache},
        {**SHAPE, "HEAD_DIM": 128, "SINGLE_SPLIT": False, "FP8": fp8},
    )
    assert any(op.startswith("HMMA") for op in built["ops"])
