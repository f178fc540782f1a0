"""Machine code of the decode kernels for sm_90, counted on a machine without a GPU.

METHOD.md's first step (count before timing) for the decode loop: each variant is compiled for
sm_90 with the ptxas that Triton ships, and its main loop's instructions are counted per thread
and per iteration, then divided by the KV bytes one iteration reads. A memory-bound kernel
should issue few instructions per byte. This is how the FP8 cache's byte-wise reads were found
(``LDS.U8``: the keys' transposed dot operand gathered from shared memory a byte at a time).
These are counts, not times: the device run (``kernels.py``) decides.

    PYTHONPATH=. python benchmarks/kernel_sass.py --out benchmarks/results

writes ``decode-sass-sm90-triton<version>.md`` there (the device's Triton may differ from CI's:
run it once per version, with that Triton first on the path).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton

from berth.kernels import decode
from berth.kernels.offline_compile import compile_for, main_loop_opcodes

GROUP, HEAD_DIM, BLOCK_SIZE = 4, 128, 16  # Llama-3-8B: 32 query heads over 8 KV heads
COMMON = {"q_ptr": "bf16", "block_tables_ptr": "i32", "seq_lens_ptr": "i32", "out_ptr": "bf16",
          "part_out_ptr": "fp32", "part_lse_ptr": "fp32", "k_scale_ptr": "fp32",
          "v_scale_ptr": "fp32"}  # fmt: skip
CLASSES = {
    "byte loads from shared (LDS.U8)": lambda op: op == "LDS.U8",
    "other shared loads (LDS, LDSM)": lambda op: op.startswith("LDS") and op != "LDS.U8",
    "global to shared copies (LDGSTS)": lambda op: op.startswith("LDGSTS"),
    "conversions (F2FP)": lambda op: op.startswith("F2FP"),
    "tensor-core MMAs (HMMA)": lambda op: op.startswith("HMMA"),
    "spill traffic (LDL, STL)": lambda op: op.startswith(("LDL", "STL")),
}


def variants(block_n: int, num_warps: int) -> list[tuple[str, object, dict[str, str], dict, int]]:
    """(name, kernel, pointer types, constexprs, KV bytes per iteration)."""
    base = {"GROUP": GROUP, "GROUP_PAD": 16, "BLOCK_SIZE": BLOCK_SIZE, "BLOCK_N": block_n,
            "SINGLE_SPLIT": False}  # fmt: skip
    tokens = 2 * block_n * HEAD_DIM  # K and V elements per iteration
    return [
        ("bf16 cache", decode._decode_kernel,
         {**COMMON, "k_cache_ptr": "bf16", "v_cache_ptr": "bf16"},
         {**base, "HEAD_DIM": HEAD_DIM, "FP8": False}, 2 * tokens),
        ("FP8 cache read as bytes", decode._decode_kernel,
         {**COMMON, "k_cache_ptr": "fp8e4nv", "v_cache_ptr": "fp8e4nv"},
         {**base, "HEAD_DIM": HEAD_DIM, "FP8": True}, tokens),
        ("FP8 cache read as words", decode._decode_fp8_words_kernel,
         {**COMMON, "k_words_ptr": "i16", "v_words_ptr": "i16"},
         {**base, "HALF_DIM": HEAD_DIM // 2, "HW_CVT": True}, tokens),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the Markdown table")
    args = parser.parse_args()
    header = (
        "| kernel | block_n / warps | registers | spill stack (B) | shared (KB) "
        "| loop instructions | per KV KB | " + " | ".join(CLASSES) + " |"
    )
    lines = [header, "| --- " * (7 + len(CLASSES)) + "|"]
    for block_n, warps in ((128, 4), (64, 4), (128, 8)):
        for name, kernel, pointers, constexprs, kv_bytes in variants(block_n, warps):
            compiled = compile_for(kernel, pointers, constexprs, num_warps=warps, num_stages=3)
            ops: Counter[str] = main_loop_opcodes(compiled.cubin)
            total = sum(ops.values())
            counts = [sum(n for op, n in ops.items() if test(op)) for test in CLASSES.values()]
            lines.append(
                f"| {name} | {block_n} / {warps} | {compiled.registers} | "
                f"{compiled.stack_bytes} | {compiled.shared_bytes / 1024:.1f} | {total} | "
                f"{total / (kv_bytes / 1024):.0f} | " + " | ".join(map(str, counts)) + " |"
            )
            print(lines[-1], flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# Decode kernels' machine code for sm_90 (counted, not timed)",
            "",
            f"{when}; triton {triton.__version__} (its ptxas), compiled on a machine without a "
            f"GPU; Llama-3-8B heads (group {GROUP}, head_dim {HEAD_DIM}), {BLOCK_SIZE}-token "
            "pages, num_stages 3. `benchmarks/kernel_sass.py`.",
            "",
            "Instructions are per thread and per iteration of the main loop (one block_n-token "
            "tile of K and V); 'per KV KB' divides them by the KV bytes that iteration reads. "
            "The default launch is block_n 128 with 4 warps.",
            "",
            *lines,
            "",
        ]
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decode-sass-sm90-triton{triton.__version__}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
