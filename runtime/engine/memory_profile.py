"""What the runtime holds besides its KV cache, measured at start-up rather than guessed.

``workspace`` is everything but the weights and the KV cache: the peak of the caching allocator
over a full-size prefill, the sampler on the largest batch and the capture of every decode
graph (activations, logits, graph pools, cuBLAS workspaces), plus what the allocator does not
see (the CUDA context, kernel images), read from NVML for this process. As nano-vllm does,
the peak is taken after a warm-up at the largest shapes, so serving never needs more live
memory. What it may hold is another matter: steps of varying shapes (a sampler's rows, a
mixed step's tokens) fragment torch's caching allocator, which then reserves new segments while
cached ones sit free. On a GPU of its own the KV arena leaves no room and the allocator frees
its cache and retries; beside other tenants there is room, and measured on an H100 a 1B-shape
runtime sampling 128 streams held 3-4 GiB past its grant, enough that a neighbour's granted
burst failed in ``cuMemCreate``. So ``cap_allocator`` holds the allocator to the measured peak
plus ``allocator_slack`` (counted in the workspace): past it, the allocator frees cached blocks
and retries before it reserves more.

On the CPU the logical GPU holds only weights and KV blocks (activations are host memory): the
workspace is 0.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from berth.runtime.engine import nvml
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.model import AttentionMetadata, CausalLM
from berth.runtime.engine.sampler import Sampler
from berth.runtime.engine.token_counts import TokenCounts

log = logging.getLogger(__name__)

# Used only where NVML cannot find this process (a container that sees host pids): what a
# CUDA 12/13 context with cuBLAS, Triton's modules and torch's kernels took on an H100/H200.
CONTEXT_FALLBACK_BYTES = 768 << 20


def tensors_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def device_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def select_device_by_uuid(uuid: str) -> torch.device:
    """The visible CUDA device whose UUID is ``uuid`` (with or without the ``GPU-`` prefix)."""
    want = uuid.removeprefix("GPU-").lower()
    seen = []
    for i in range(torch.cuda.device_count()):
        have = str(torch.cuda.get_device_properties(i).uuid).lower()
        if have == want:
            return torch.device("cuda", i)
        seen.append(f"GPU-{have}")
    raise ValueError(
        f"BERTH_GPU_UUID names {uuid}, which this process cannot see (visible: {seen or 'none'})"
    )


def _outside_allocator_bytes(device: torch.device, mapped_bytes: int) -> int:
    """This process's device memory that torch's allocator does not count (context, kernels)."""
    own = nvml.process_bytes(uuid=device_uuid(device))
    if own is None:
        log.warning(
            "NVML cannot see this process; counting %d MiB for the CUDA context",
            CONTEXT_FALLBACK_BYTES >> 20,
        )
        return CONTEXT_FALLBACK_BYTES
    return max(0, own - torch.cuda.memory_reserved(device) - mapped_bytes)


def whole_device_budget(device: torch.device) -> GpuBudget:
    """No budget given (local use): everything free on the device now, plus the context this
    process already holds. Taken before the weights load."""
    free, _ = torch.cuda.mem_get_info(device)
    context = _outside_allocator_bytes(device, 0)
    return GpuBudget(free + context, free + context, device_uuid(device))


@dataclass(frozen=True)
class Footprint:
    """Measured bytes: the weights, and the rest that is not KV cache: what torch's caching
    allocator may hold (its measured peak and the slack over it: ``allocator_limit_bytes``)
    and what the allocator does not see (the CUDA context, kernel images; the weights, mapped
    in their own range, are counted there and taken out of the workspace)."""

    weights_bytes: int
    workspace_bytes: int
    allocator_peak_bytes: int = 0
    outside_allocator_bytes: int = 0
    allocator_limit_bytes: int = 0


# Room for fragmentation over the allocator's measured peak: an eighth, at least 128 MiB.
MIN_ALLOCATOR_SLACK = 128 << 20


def allocator_slack(peak_bytes: int) -> int:
    """What torch's caching allocator may reserve beyond its measured peak before it must free
    cached blocks: enough that it rarely has to (each time costs a device sync)."""
    return max(MIN_ALLOCATOR_SLACK, peak_bytes // 8)


def measure_footprint(device: torch.device, weights_bytes: int, mapped_kv_bytes: int) -> Footprint:
    """After the profile run and the graph capture: the allocator's peak and its slack, plus
    what it does not see, less the weights."""
    if device.type != "cuda":
        return Footprint(weights_bytes, 0)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device)
    limit = peak + allocator_slack(peak)
    outside = _outside_allocator_bytes(device, mapped_kv_bytes)
    workspace = max(0, limit + outside - weights_bytes)
    return Footprint(weights_bytes, workspace, peak, outside, limit)


def cap_allocator(device: torch.device, limit_bytes: int | None) -> None:
    """Hold torch's caching allocator on ``device`` to ``limit_bytes`` reserved (None: the
    whole device): past it, it frees its cached blocks and retries, and only live memory
    beyond it raises ``OutOfMemoryError`` (which the profile's peak rules out). The limit is
    the process's: one engine per process under a budget, as in a pod."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if limit_bytes is None else min(1.0, limit_bytes / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)


@torch.inference_mode()
def profile_largest_step(
    model: CausalLM,
    config: EngineConfig,
    max_model_len: int,
    max_blocks_per_seq: int,
    counts: TokenCounts,
) -> None:
    """Run the largest step the scheduler can form (``max_num_batched_tokens`` prompt tokens in
    sequences of at most ``max_model_len``) and sample ``max_num_seqs`` rows with the full
    sampler (penalties over ``counts``' rows, bias, a ban, a grammar mask, top-k, top-p,
    log-probs), so that the allocator's peak covers every step. Writes no KV (slots -1) and
    reads block 0 only, the one chunk backed during the profile."""
    dev = next(model.parameters()).device
    total = config.max_num_batched_tokens
    lens = [min(max_model_len, total - i) for i in range(0, total, max_model_len)]
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
    starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=dev),
        block_tables=torch.zeros((len(lens), max_blocks_per_seq), dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        query_start_loc=starts,
        max_seq_len=max(lens),
    )
    hidden = model(torch.zeros(total, dtype=torch.int64, device=dev), positions, meta)
    rows = min(config.max_num_seqs, total)
    logits = model.logits(hidden[:rows])
    # Every path a draw can take, each holding its own [rows, vocab] copy: penalties and a
    # logit bias, a min_tokens ban, a grammar's mask, then top-k, top-p and log-probs.
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5,
                            presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
                            logit_bias={0: 1.0})  # fmt: skip
    words = torch.full((rows, -(-logits.shape[1] // 32)), -1, dtype=torch.int32)
    every = list(range(rows))
    Sampler(dev, 0)(
        logits, [params] * rows, [None] * rows, [frozenset({0})] * rows,
        counts.rows(every, every, params), (every, words),
    )  # fmt: skip
    del hidden, logits
    counts.table.zero_()  # the draw counted its ids
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
