"""Compile a Triton kernel for a CUDA target on a machine without a GPU.

Triton ships ptxas and cuobjdump, so the GPU build of a kernel (inline PTX included) can be
checked in CI, and its machine code read and counted before any device time is spent
(``benchmarks/kernel_sass.py``). Pointer and stride arguments are declared 16-byte divisible,
as the JIT specializes them for the engine's tensors.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass(frozen=True)
class Compiled:
    """What a compile gives: the cubin, registers and spill stack per thread, shared bytes."""

    cubin: bytes
    registers: int
    stack_bytes: int
    shared_bytes: int
    ttgir: str


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_for(
    kernel: Any,
    pointer_types: dict[str, str],
    constexprs: dict[str, Any],
    *,
    capability: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Compiled:
    """``kernel`` compiled for ``sm_<capability>``. ``pointer_types`` names the element type
    of each ``*_ptr`` argument (Triton's spelling: "bf16", "fp8e4nv", "i16", ...); other
    arguments are i32, except ``qk_scale`` (fp32); upper-case ones are ``constexprs`` (their
    defaults where left out)."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    # Constexprs left out take their defaults, as a launch that leaves them out does.
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    constexprs = {**defaults, **constexprs}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    cubin = compiled.asm["cubin"]
    usage = _dump(cubin, "-res-usage")
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return Compiled(
        cubin,
        int(registers.group(1)) if registers else -1,
        int(stack.group(1)) if stack else -1,
        int(compiled.metadata.shared),
        compiled.asm["ttgir"],
    )


def _dump(cubin: bytes, flag: str) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True
        ).stdout


def main_loop_opcodes(cubin: bytes) -> Counter[str]:
    """Opcodes of the kernel's largest loop (the body between a backward branch and its
    target), one count per instruction a thread issues per iteration."""
    instructions: list[tuple[int, str]] = []
    for line in _dump(cubin, "-sass").splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            instructions.append((int(m.group(1), 16), m.group(2)))
    best: list[str] = []
    for address, text in instructions:
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [t for a, t in instructions if start <= a <= address]
            if len(body) > len(best):
                best = body
    return Counter(_opcode(text) for text in best)


def _opcode(text: str) -> str:
    words = text.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
