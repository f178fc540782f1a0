"""Paged-attention kernel benchmark: Berth's Triton kernels against SDPA on contiguous KV.

Run on a GPU machine from the repository root:

    PYTHONPATH=. python benchmarks/kernels.py --out /tmp/results [--sweep]

Every timed variant is first checked against the PyTorch reference on the same inputs. Times
are medians of CUDA-graph replays (timed with CUDA events), so host launch overhead, which the
runtime also hides behind graphs, stays out of both sides; inputs are rotated among enough copies
to exceed the L2 cache several times. Decode bandwidth counts the K and V bytes that must be read
once; the device's read bandwidth is measured in the same run. Writes ``kernels-<gpu>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention as sdpa
from triton.runtime.errors import OutOfResources

from berth.kernels import reference
from berth.kernels.decode import DecodeConfig, default_config, launch_decode
from berth.kernels.prefill import PrefillConfig, launch_prefill
from berth.kernels.synthetic import PagedBatch, random_paged_batch

HQ, HKV, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16  # Llama-3-8B attention
DECODE_SHAPES = [
    (1, 4096), (1, 32768), (8, 32768), (16, 8192), (64, 2048), (64, 4096), (256, 1024), (256, 4096),
]  # fmt: skip
PAGE_SIZES = [16, 32]
PREFILL_BATCH, PREFILL_CHUNK, PREFIXES = 4, 2048, [0, 2048]
PREFILL_ROUNDS = 5  # prefill timings are medians of this many interleaved rounds
SCALE = HEAD_DIM**-0.5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def time_per_call(calls: list[Callable[[], object]], min_replay_s: float = 2e-3) -> float:
    """Median seconds per call over CUDA-graph replays; the graph cycles through ``calls``."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(20):
        calls[i % len(calls)]()
    stop.record()
    torch.cuda.synchronize()
    eager = start.elapsed_time(stop) / 1e3 / 20
    n = min(2000, max(len(calls), math.ceil(min_replay_s / eager)))
    n = math.ceil(n / len(calls)) * len(calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    # Warm for ~50 ms first: the first replays after an idle host-side setup run measurably slow.
    for _ in range(max(3, math.ceil(0.05 / (n * eager)))):
        graph.replay()
    times = []
    for _ in range(21):
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / n)
    del graph
    return statistics.median(times)


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(x_ptr + start + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def measure_bandwidth() -> dict[str, float]:
    """Streaming read (Triton and torch.sum) and device copy, bytes/s; 2 GiB buffers."""
    n = 2**30  # bf16 elements
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    partial = torch.empty(sms * 8, dtype=torch.float32, device="cuda")
    read = time_per_call([lambda: _read_kernel[(sms * 8,)](x, partial, n, BLOCK=4096)])
    total = time_per_call([lambda: x.sum(dtype=torch.float32)])
    y = torch.empty_like(x)
    copy = time_per_call([lambda: y.copy_(x)])
    return {
        "triton_read": 2 * n / read,
        "torch_sum_read": 2 * n / total,
        "copy_read_write": 4 * n / copy,
    }


Dense = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v for SDPA


def decode_batches(
    batch: int, context: int, page: int
) -> tuple[list[tuple[PagedBatch, torch.Tensor]], list[Dense]]:
    """Enough independent input sets (paged + contiguous) to be 4x the L2 cache together."""
    kv_bytes = 2 * batch * context * HKV * HEAD_DIM * 2
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sets = min(16, max(1, math.ceil(4 * l2 / kv_bytes)))
    paged: list[tuple[PagedBatch, torch.Tensor]] = []
    dense: list[Dense] = []
    for _ in range(sets):
        pb = random_paged_batch([context] * batch, HKV, HEAD_DIM, page, DTYPE, "cuda")
        q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device="cuda")
        paged.append((pb, q))
        if page == PAGE_SIZES[0]:
            kv = [pb.contiguous(b) for b in range(batch)]
            dense.append(
                (
                    q.unsqueeze(2),
                    torch.stack([k for k, _ in kv]),  # [B, Hkv, L, D]
                    torch.stack([v for _, v in kv]),
                )
            )
    return paged, dense


def decode_configs(sweep: bool) -> list[DecodeConfig | None]:
    """The default, plus (with --sweep) a grid over the split plan (how many programs per SM
    a split batch aims at, the fewest tokens per split) and the tile; kernels-notes.md has
    past grids."""
    if not sweep:
        return [None]
    grid: list[DecodeConfig | None] = [None]
    for waves in (1.0, 2.0, 3.0, 4.0, 8.0, 16.0):  # 8: the plan before split_waves 2
        for min_tokens in (128, 1024):
            for stages in (2, 3):
                grid.append(
                    DecodeConfig(split_waves=waves, min_split_tokens=min_tokens, num_stages=stages)
                )
    extra = [DecodeConfig(block_n=64), DecodeConfig(num_warps=8), DecodeConfig(num_stages=4)]
    return [*grid, *extra]


# The FP8 cache read as bytes (the previous kernel, now the fallback for odd strides), with the
# split plan of the FP8 launch's default.
FP8_BYTES = replace(default_config(HEAD_DIM, PAGE_SIZES[0], fp8=True), fp8_words=False)


def fp8_configs(sweep: bool) -> list[DecodeConfig | None]:
    """The launch's default (None: the cache read as words, as the engine runs it), the cache
    read as bytes, and with --sweep a grid over the words kernel's tile, split plan and stages
    (``kernel_sass.py`` counts their instructions)."""
    configs: list[DecodeConfig | None] = [None, FP8_BYTES]
    if sweep:  # 8 warps and 256-token tiles lost everywhere on the H100 (kernels-notes.md)
        for block_n in (64, 128):
            for waves in (1.0, 2.0, 4.0, 8.0):
                for stages in (2, 3):
                    configs.append(
                        DecodeConfig(block_n=block_n, split_waves=waves, num_stages=stages)
                    )
        # 8 warps issue 17 instructions per KV KB against 4 warps' 24 (decode-sass-sm90-*.md):
        # slower on the H100, not yet timed on the H200, whose bandwidth asks more per SM.
        for waves in (4.0, 8.0, 16.0):
            for stages in (2, 3):
                configs.append(DecodeConfig(num_warps=8, split_waves=waves, num_stages=stages))
    return configs


def fp8_decode(
    paged: list[tuple[PagedBatch, torch.Tensor]],
    ref: torch.Tensor,
    context: int,
    bf16_s: float,
    log: list[str],
    sweep: bool,
) -> dict[str, float]:
    """The same caches quantized to FP8 (e4m3, a float32 scale per token and head), read as
    words (the default) and as bytes: time, speed-up over the bf16 cache, error against the
    unquantized float64 reference (quantization included)."""
    quantized = []
    for pb, q in paged:
        k, ks = reference.quantize_fp8(pb.k_cache)
        v, vs = reference.quantize_fp8(pb.v_cache)
        quantized.append((pb, q, k, v, ks, vs))
    pb0, q0, k0, v0, ks0, vs0 = quantized[0]
    times: dict[str, float] = {}
    errors: dict[str, float] = {}
    batch = q0.shape[0]
    for config in fp8_configs(sweep):
        name = "default" if config is None else str(config)
        try:
            out = launch_decode(q0, k0, v0, pb0.block_tables, pb0.seq_lens, SCALE, None,
                                context, config, ks0, vs0)  # fmt: skip
        except OutOfResources as e:  # a grid point past shared memory
            log.append(f"FAIL decode fp8 {batch}x{context} {name}: {e}")
            continue
        err = rel_err(out, ref)
        if not err < 6e-2:
            log.append(f"FAIL decode fp8 {batch}x{context} {name}: err {err}")
            continue
        t = time_per_call(
            [
                functools.partial(launch_decode, q, k, v, pb.block_tables, pb.seq_lens, SCALE,
                                  None, context, config, ks, vs)
                for pb, q, k, v, ks, vs in quantized
            ]
        )  # fmt: skip
        times[name], errors[name] = t, err
        log.append(f"decode fp8 {batch}x{context} {name}: {t * 1e6:.1f} us err {err:.1e} "
                   f"({bf16_s / t:.2f}x the bf16 cache)")  # fmt: skip
    words, by_bytes = "default", str(FP8_BYTES)
    if sweep and times:
        best = min(times, key=times.__getitem__)
        log.append(f"BEST decode fp8 {batch}x{context}: {times[best] * 1e6:.1f} us {best}")
    nan = float("nan")
    return {
        "fp8_us": times.get(words, nan) * 1e6,
        "fp8_speedup": bf16_s / times.get(words, nan),
        "fp8_err": errors.get(words, nan),
        "fp8_bytes_us": times.get(by_bytes, nan) * 1e6,
        "fp8_bytes_speedup": bf16_s / times.get(by_bytes, nan),
    }


def decode_rows_as_chunks(
    paged: list[tuple[PagedBatch, torch.Tensor]], ref: torch.Tensor, decode_s: float, log: list[str]
) -> dict[str, float]:
    """The same decode rows through the prefill kernel, as a mixed step computes its decoding
    sequences (chunks of one token, beside the prompt chunks, in one launch): its time against
    the decode kernel's, which says what a mixed step's decode rows cost over a decode step's."""
    pb0, q0 = paged[0]
    starts = torch.arange(q0.shape[0] + 1, dtype=torch.int32, device=q0.device)
    out = launch_prefill(q0, pb0.k_cache, pb0.v_cache, pb0.block_tables, pb0.seq_lens, starts,
                         SCALE, None, None)  # fmt: skip
    err = rel_err(out, ref)
    if not err < 2e-2:
        log.append(f"FAIL decode rows through the prefill kernel: err {err}")
        return {}
    t = time_per_call(
        [
            functools.partial(launch_prefill, q, pb.k_cache, pb.v_cache, pb.block_tables,
                              pb.seq_lens, starts, SCALE, None, None)
            for pb, q in paged
        ]
    )  # fmt: skip
    log.append(f"  as chunks of one through the prefill kernel: {t * 1e6:.1f} us")
    return {"as_chunks_us": t * 1e6, "as_chunks_vs_decode": t / decode_s}


def bench_decode(
    peak_read: float, sweep: bool, log: list[str], shapes: list[tuple[int, int]]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sdpa_time: dict[tuple[int, int], float] = {}
    for page in PAGE_SIZES:
        for batch, context in shapes:
            paged, dense = decode_batches(batch, context, page)
            pb0, q0 = paged[0]
            ref = reference.paged_decode_attention(
                q0.float(), pb0.k_cache.float(), pb0.v_cache.float(), pb0.block_tables,
                pb0.seq_lens, SCALE, max_seq_len=context,
            )  # fmt: skip
            if dense:
                q, k, v = dense[0]
                sdpa_out = sdpa(q, k, v, scale=SCALE, enable_gqa=True)
                log.append(f"sdpa check {batch}x{context}: {rel_err(sdpa_out.squeeze(2), ref):.2e}")
                sdpa_time[(batch, context)] = time_per_call(
                    [
                        functools.partial(sdpa, q, k, v, scale=SCALE, enable_gqa=True)
                        for q, k, v in dense
                    ]
                )
            del dense
            kv_bytes = 2 * batch * context * HKV * HEAD_DIM * 2
            best: tuple[float, str] | None = None
            grid = sweep and page == PAGE_SIZES[0]  # the grids once per shape, at the engine's page
            for config in decode_configs(grid):
                out = torch.full_like(q0, float("nan"))
                launch_decode(q0, pb0.k_cache, pb0.v_cache, pb0.block_tables, pb0.seq_lens,
                              SCALE, out, context, config)  # fmt: skip
                err = rel_err(out, ref)
                name = "default" if config is None else str(config)
                if not err < 2e-2:
                    log.append(f"FAIL decode {batch}x{context} page {page} {name}: err {err}")
                    continue
                t = time_per_call(
                    [
                        functools.partial(
                            launch_decode, q, pb.k_cache, pb.v_cache, pb.block_tables,
                            pb.seq_lens, SCALE, None, context, config,
                        )
                        for pb, q in paged
                    ]
                )  # fmt: skip
                log.append(
                    f"decode {batch}x{context} page {page} {name}: {t * 1e6:.1f} us err {err:.1e}"
                )
                if config is None:
                    rows.append(
                        {
                            "batch": batch, "context": context, "page": page, "us": t * 1e6,
                            "tbps": kv_bytes / t / 1e12, "frac": kv_bytes / t / peak_read,
                            "sdpa_us": sdpa_time[(batch, context)] * 1e6,
                            "vs_sdpa": sdpa_time[(batch, context)] / t, "err": err,
                            **fp8_decode(paged, ref, context, t, log, grid),
                            **decode_rows_as_chunks(paged, ref, t, log),
                        }
                    )  # fmt: skip
                if best is None or t < best[0]:
                    best = (t, name)
            if grid and best:
                log.append(
                    f"BEST decode {batch}x{context} page {page}: {best[0] * 1e6:.1f} us {best[1]}"
                )
            print(log[-1], flush=True)
            del paged
            torch.cuda.empty_cache()
    return rows


def prefill_configs(sweep: bool) -> list[PrefillConfig | None]:
    """The default, plus (with --sweep) tile shapes left to explore; earlier sweeps' grids and
    results are in benchmarks/results/kernels-notes.md."""
    if not sweep:
        return [None]
    return [
        None,
        PrefillConfig(128, 64, 8, 3, paged_block_n=128, self_stages=4),
        PrefillConfig(128, 64, 8, 4, paged_block_n=128),
        PrefillConfig(128, 64, 8, 3),
        PrefillConfig(128, 128, 8, 2, self_stages=2),
    ]


def engine_chunk_kv(pb: PagedBatch, query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks' own K/V as the engine passes them: K packed [T, Hkv, D] (fresh from RoPE),
    V a view of the fused QKV projection's output (row stride (Hq + 2 Hkv) * D)."""
    key, value = pb.chunk_kv(query_lens)
    qkv = torch.empty(key.shape[0], (HQ + 2 * HKV) * HEAD_DIM, dtype=DTYPE, device="cuda")
    value_view = qkv[:, (HQ + HKV) * HEAD_DIM :].view(key.shape[0], HKV, HEAD_DIM)
    value_view.copy_(value)
    return key, value_view


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each entry, timed round-robin ``rounds`` times.

    Prefill is tensor-core bound and the H100 runs it at its power cap, where the SM clock
    wanders between about 1.5 and 1.8 GHz over seconds (measured: SDPA 415-519 TFLOP/s over
    six timings of the same call), so two kernels timed once, seconds apart, do not compare.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_per_call([call]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def sdpa_on_backend(
    backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    with sdpa_kernel(backend):
        return sdpa(q, k, v, **kwargs)


def bench_prefill(sweep: bool, log: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for page in PAGE_SIZES:
        for prefix in PREFIXES:
            total = prefix + PREFILL_CHUNK
            pb = random_paged_batch([total] * PREFILL_BATCH, HKV, HEAD_DIM, page, DTYPE, "cuda")
            tokens = PREFILL_BATCH * PREFILL_CHUNK
            q = torch.randn(tokens, HQ, HEAD_DIM, dtype=DTYPE, device="cuda")
            qsl = torch.arange(0, tokens + 1, PREFILL_CHUNK, dtype=torch.int32, device="cuda")
            key, value = engine_chunk_kv(pb, [PREFILL_CHUNK] * PREFILL_BATCH)
            pairs = PREFILL_CHUNK * prefix + PREFILL_CHUNK * (PREFILL_CHUNK + 1) / 2
            flops = 4 * HEAD_DIM * HQ * PREFILL_BATCH * pairs
            ref = reference.paged_prefill_attention(
                q.float(), pb.k_cache.float(), pb.v_cache.float(), pb.block_tables, pb.seq_lens,
                qsl, SCALE,
            )  # fmt: skip
            # SDPA on the same work: [B, H, L, D], bottom-right causal; GQA native and expanded,
            # and (for context) each backend forced.
            qd = q.view(PREFILL_BATCH, PREFILL_CHUNK, HQ, HEAD_DIM).transpose(1, 2)
            kv = [pb.contiguous(b) for b in range(PREFILL_BATCH)]
            kd = torch.stack([k for k, _ in kv])
            vd = torch.stack([v for _, v in kv])
            ke = kd.repeat_interleave(HQ // HKV, dim=1)
            ve = vd.repeat_interleave(HQ // HKV, dim=1)
            mask = causal_lower_right(PREFILL_CHUNK, total) if prefix else None
            causal = prefix == 0
            sdpa_calls: dict[str, Callable[[], torch.Tensor]] = {
                "sdpa gqa": functools.partial(
                    sdpa, qd, kd, vd, attn_mask=mask, is_causal=causal, scale=SCALE,
                    enable_gqa=True,
                ),
                "sdpa expanded": functools.partial(
                    sdpa, qd, ke, ve, attn_mask=mask, is_causal=causal, scale=SCALE
                ),
            }  # fmt: skip
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                sdpa_calls[backend.name] = functools.partial(
                    sdpa_on_backend, backend, qd, ke, ve, attn_mask=mask, is_causal=causal,
                    scale=SCALE,
                )  # fmt: skip
            calls: dict[str, Callable[[], object]] = {}
            for name, call in sdpa_calls.items():
                try:
                    err = rel_err(call().transpose(1, 2).reshape(tokens, HQ, HEAD_DIM), ref)
                except Exception as exc:  # a backend unavailable for this input
                    log.append(f"SKIP {name} prefix {prefix}: {type(exc).__name__}: {exc}")
                    continue
                log.append(f"{name} prefix {prefix}: err {err:.1e}")
                calls[name] = call
            # Each config with the chunks' own K/V passed in (the engine's path), the default
            # also with them read through the pages (key/value left out).
            runs = [(c, True) for c in prefill_configs(sweep and page == PAGE_SIZES[0])]
            errs: dict[str, float] = {}
            for config, own_kv in [*runs, (None, False)]:
                out = torch.full_like(q, float("nan"))
                name = ("default" if config is None else str(config)) + ("" if own_kv else " pages")
                own = (key, value) if own_kv else (None, None)
                try:
                    launch_prefill(q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens, qsl,
                                   SCALE, out, config, *own)  # fmt: skip
                except Exception as exc:  # out of shared memory for a swept tile shape
                    log.append(f"SKIP prefill {name}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                errs[name] = rel_err(out, ref)
                if not errs[name] < 2e-2:
                    log.append(f"FAIL prefill prefix {prefix} page {page} {name}: {errs[name]}")
                    continue
                calls[name] = functools.partial(
                    launch_prefill, q, pb.k_cache, pb.v_cache, pb.block_tables, pb.seq_lens,
                    qsl, SCALE, None, config, *own,
                )  # fmt: skip
            med = interleaved_medians(calls, PREFILL_ROUNDS)
            for name, t in med.items():
                log.append(
                    f"prefill prefix {prefix} page {page} {name}: {flops / t / 1e12:.0f} TFLOP/s"
                    f" (median of {PREFILL_ROUNDS})"
                )
            sdpa_t = min(med[n] for n in ("sdpa gqa", "sdpa expanded") if n in med)
            nan = float("nan")
            if "default" in med:
                t = med["default"]
                rows.append(
                    {
                        "prefix": prefix, "page": page, "ms": t * 1e3,
                        "tflops": flops / t / 1e12, "sdpa_tflops": flops / sdpa_t / 1e12,
                        "vs_sdpa": sdpa_t / t, "err": errs["default"],
                        "pages_tflops": flops / med.get("default pages", nan) / 1e12,
                        "flash": flops / med.get("FLASH_ATTENTION", nan) / 1e12,
                        "cudnn": flops / med.get("CUDNN_ATTENTION", nan) / 1e12,
                    }
                )  # fmt: skip
            ours = {n: t for n, t in med.items() if n in errs and not n.endswith(" pages")}
            if sweep and ours:
                name = min(ours, key=ours.__getitem__)
                log.append(
                    f"BEST prefill prefix {prefix} page {page}: "
                    f"{flops / ours[name] / 1e12:.0f} TFLOP/s {name}"
                )
            print("\n".join(log[-len(med) :]), flush=True)
            del pb, kd, vd, ke, ve, key, value
            torch.cuda.empty_cache()
    return rows


def report(bw: dict[str, float], decode: list[dict], prefill: list[dict]) -> str:
    props = torch.cuda.get_device_properties(0)
    peak = max(bw["triton_read"], bw["torch_sum_read"])
    lines = [
        f"# Paged attention kernels on {props.name}",
        "",
        f"Date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}, {props.multi_processor_count} SMs, "
        f"L2 {props.L2_cache_size / 2**20:.0f} MiB.",
        f"Llama-3-8B heads ({HQ} query, {HKV} KV, head size {HEAD_DIM}, bf16), default launch configs.",
        "Times: median of CUDA-graph replays, CUDA events, inputs rotated past L2; prefill: "
        f"median of {PREFILL_ROUNDS} rounds, ours and SDPA interleaved (the GPU runs prefill at "
        "its power cap, where the clock wanders).",
        "",
        f"Measured read bandwidth: {peak / 1e12:.2f} TB/s (Triton streaming read "
        f"{bw['triton_read'] / 1e12:.2f}, torch.sum {bw['torch_sum_read'] / 1e12:.2f}); "
        f"device copy {bw['copy_read_write'] / 1e12:.2f} TB/s counting read + write.",
        "",
        "## Decode (one query token per sequence)",
        "",
        "| batch x context | page | time (us) | KV TB/s | of measured read | SDPA contiguous (us) | vs SDPA | rel err "
        "| FP8 cache (us) | FP8 vs bf16 cache | FP8 rel err | FP8 read as bytes (us) "
        "| bytes vs bf16 cache | as chunks of one (us) | vs decode kernel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in decode:
        lines.append(
            f"| {r['batch']} x {r['context']} | {r['page']} | {r['us']:.1f} | {r['tbps']:.2f} | "
            f"{r['frac']:.0%} | {r['sdpa_us']:.1f} | {r['vs_sdpa']:.2f}x | {r['err']:.1e} | "
            f"{r['fp8_us']:.1f} | {r['fp8_speedup']:.2f}x | {r['fp8_err']:.1e} | "
            f"{r['fp8_bytes_us']:.1f} | {r['fp8_bytes_speedup']:.2f}x | "
            f"{r.get('as_chunks_us', float('nan')):.1f} | "
            f"{r.get('as_chunks_vs_decode', float('nan')):.2f}x |"
        )
    lines += [
        "",
        f"## Prefill ({PREFILL_BATCH} sequences x {PREFILL_CHUNK}-token chunks, causal)",
        "",
        "| cached prefix | page | time (ms) | TFLOP/s | SDPA TFLOP/s | vs SDPA | rel err "
        "| own K/V via pages | SDPA flash-only | SDPA cuDNN-only |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in prefill:
        lines.append(
            f"| {r['prefix']} | {r['page']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
            f"{r['sdpa_tflops']:.0f} | {r['vs_sdpa']:.2f}x | {r['err']:.1e} | "
            f"{r['pages_tflops']:.0f} | {r['flash']:.0f} | {r['cudnn']:.0f} |"
        )
    lines += [
        "",
        "FP8 cache: the same caches quantized to e4m3 with a float32 scale per token and KV "
        "head (the engine's `kv_cache_dtype: fp8`); its error is against the unquantized "
        "float64 reference, so it includes the quantization. The FP8 kernel reads the cache "
        "as 16-bit words (two values each), launched as the engine launches it (its own split "
        "plan, 8 programs per SM); 'read as bytes' is the previous FP8 kernel, timed on the "
        "same inputs with the same plan.",
        "As chunks of one: the same decode rows through the prefill kernel (query_start_loc "
        "0, 1, ..., B), as a mixed step computes its decoding sequences beside the prompt "
        "chunks; its time over the decode kernel's.",
        "SDPA baselines: decode with `enable_gqa=True` over contiguous [B, Hkv, L, D]; prefill the "
        "faster of `enable_gqa=True` and K/V expanded to all heads, bottom-right causal.",
        "Prefill TFLOP/s: the chunks' own K/V passed as key/value, as the engine does (K packed, "
        "V a view of the fused QKV output); 'own K/V via pages': the same kernel reading them "
        "through the page table instead (TFLOP/s).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results file")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configs")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument(
        "--decode-shapes", help="batch x context list, e.g. 1x32768,16x8192 [default: all]"
    )
    args = parser.parse_args()
    shapes = DECODE_SHAPES
    if args.decode_shapes:
        shapes = [
            (int(b), int(c)) for b, c in (x.split("x") for x in args.decode_shapes.split(","))
        ]
    torch.manual_seed(0)
    log: list[str] = []
    bw = measure_bandwidth()
    print({k: f"{v / 1e12:.2f} TB/s" for k, v in bw.items()}, flush=True)
    peak = max(bw["triton_read"], bw["torch_sum_read"])
    decode = [] if args.skip_decode else bench_decode(peak, args.sweep, log, shapes)
    prefill = [] if args.skip_prefill else bench_prefill(args.sweep, log)
    text = report(bw, decode, prefill)
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels-{gpu.strip('-')}.md").write_text(text)
    (args.out / "kernels-log.txt").write_text("\n".join(log) + "\n")
    print("\n".join(line for line in log if line.startswith(("BEST", "FAIL"))))
    print(text)


if __name__ == "__main__":
    main()
