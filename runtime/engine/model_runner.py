"""Runs the model for one scheduled batch: builds the step's inputs, owns the KV cache, and
replays CUDA graphs for decode steps.

A decode step (one token per sequence) on the GPU replays a graph captured for the next larger
batch size, padded with rows that write nowhere, so its CPU cost is filling a few pinned host
arrays and one replay instead of hundreds of kernel launches. An input token that the previous
step sampled but the host has not read yet is copied on the device from that step's output.
Prefill and mixed steps of up to ``max_prefill_graph_tokens`` tokens replay a graph captured for
the next larger token count (``pad_step``: the padding tokens form one extra sequence that
attends only to itself and writes nowhere, and every graph has room for ``max_num_seqs + 1``
sequences, so the attention kernel's grid is the same at every replay); larger steps, whose
launches the device's work hides, run eagerly. On the CPU the same code runs eagerly with the
kernels' PyTorch references.

The weights live in one range of their own (``weight_arena``) and the KV cache in another
(``kv_arena``), so that warm standby can give both back and map them again at the same
addresses (``release_memory`` / ``restore_memory``): the decode graphs captured at load replay
after a wake.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from berth.runtime.engine import blas_choice, decode_linear
from berth.runtime.engine.budget import KvPlan, plan_kv_pool
from berth.runtime.engine.config import EngineConfig
from berth.runtime.engine.kv_arena import (
    KvLayout,
    coarsened,
    device_granularity,
    fit_kv_arena,
    reserve_kv_arena,
)
from berth.runtime.engine.layers import Pointwise
from berth.runtime.engine.memory_profile import (
    cap_allocator,
    device_uuid,
    measure_footprint,
    profile_largest_step,
    select_device_by_uuid,
    tensors_bytes,
    whole_device_budget,
)
from berth.runtime.engine.model import AttentionMetadata, AttentionOps, CausalLM, DecoderLayer
from berth.runtime.engine.model_config import DTYPES, ModelConfig
from berth.runtime.engine.prompt_logprobs import PromptLogprobs, PromptRows, score
from berth.runtime.engine.scheduler import ScheduledBatch, padded_size
from berth.runtime.engine.sequence import Sequence
from berth.runtime.engine.token_counts import TokenCounts
from berth.runtime.engine.uploads import upload_values
from berth.runtime.engine.weight_arena import WeightArena
from berth.runtime.engine.weights import load_weights

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE as _PoolHandle

    from berth.kernels.skinny_matmul import SkinnyConfig

log = logging.getLogger(__name__)

_PAD_TOKENS = np.array([[0], [0], [-1]])  # token id, position, slot of a padding row
PENDING = -1  # an input token the host has not seen yet (the engine's placeholder)
# True: the layers' norm weights are folded into the projections at load (CausalLM.fold_norms)
# and the RMSNorms between two projections that a decode graph runs on the skinny kernel run
# inside it (decode_linear.fuses_norm). Off by default: on an H100 it took 0.05-0.08 ms (1 %)
# off a steady batch-1 decode step and nothing at 16 (results: engine-fused-norms-h100.md), not
# yet measured on an H200, and folding rounds the weights once more in the model's type.
FUSE_NORMS = False
# The previous step's sampled ids on the device, and the sequences of its rows.
PendingTokens = tuple[torch.Tensor, list[Sequence]]


def resolve_device(name: str, gpu_uuid: str | None = None) -> torch.device:
    """``auto``/``cuda`` with the budget's GPU UUID picks that device among the visible ones."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
        if device.index is None:
            if gpu_uuid is not None:
                return select_device_by_uuid(gpu_uuid)
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, checkpoint: torch.dtype) -> torch.dtype:
    return checkpoint if name == "auto" else DTYPES[name]


def attention_ops(device: torch.device) -> tuple[AttentionOps, str]:
    """Triton kernels on the GPU when ``berth.kernels`` provides them, else the references."""
    if device.type == "cuda":
        try:
            from berth import kernels

            return (
                AttentionOps(
                    kernels.write_kv_cache,
                    kernels.paged_decode_attention,
                    kernels.paged_prefill_attention,
                    kernels.rope_write_kv_cache,
                ),
                "triton",
            )
        except (ImportError, AttributeError) as e:
            log.warning("Triton kernels unavailable (%s); using the PyTorch references", e)
    from berth.kernels import reference

    ops = AttentionOps(
        reference.write_kv_cache,
        reference.paged_decode_attention,
        reference.paged_prefill_attention,
    )
    return ops, "reference"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _fresh_blas_workspaces(device: torch.device, dtype: torch.dtype) -> None:
    """Empty torch's cache, and move the cuBLAS(Lt) workspaces into segments of their own.

    A workspace lives as long as the process. The profile run's first matmul carves it out
    of whatever large free block the cache holds then, and that one live block keeps the whole
    segment reserved, which a parked runtime cannot give back (Llama-3.2-1B on an H200: a
    segment of 502 MiB; Llama-3-8B on an H100: about 1 GiB). Freed and made again by a small matmul on an
    empty cache, each workspace gets a segment of its own size."""
    torch.cuda.synchronize(device)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    x = torch.ones((16, 16), dtype=dtype, device=device)
    torch.nn.functional.linear(x, x)  # the model's own op (cuBLASLt for 16-bit types)
    torch.mm(x, x)
    torch.cuda.synchronize(device)
    del x


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


def prefill_graph_sizes(max_num_batched_tokens: int, max_graph_tokens: int) -> list[int]:
    """Token counts of the prefill/mixed graphs: powers of two to 256, then steps of 128 (a
    padded step computes at most 128 tokens more, under 1/3 from 384 tokens on), up to the
    step budget or ``max_graph_tokens`` (larger steps run eagerly: at 2,048 tokens of an 8B
    model the device computes for longer than the host takes to launch the step)."""
    top = min(max_num_batched_tokens, max_graph_tokens)
    if top <= 0:
        return []
    sizes = [t for t in (16, 32, 64, 128, 256) if t < top]
    sizes += list(range(384, top, 128))
    return [*sizes, top]


@dataclass
class StepInputs:
    """A prefill or mixed step as host arrays: ``tokens`` int64 [3, T] (ids, positions, KV
    slots), per sequence ``query_start_loc`` int32 [B + 1] and ``seq_lens`` int32 [B] (tokens in
    the cache after the step), the rows whose logits are sampled, and the tokens whose ids the
    previous step is still sampling on the device (``PENDING`` in ``tokens``: a decoding
    sequence's input in a mixed step) with the batch row each belongs to."""

    tokens: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    sample_rows: list[int]
    pending_at: list[int] = field(default_factory=list)
    pending_rows: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def step_inputs(batch: ScheduledBatch, tables: np.ndarray, block_size: int) -> StepInputs:
    """A prefill or mixed step's host arrays, ``tables`` holding the batch's block tables in
    its first rows. Vectorised over the step's tokens: a mixed step of 256 decodes beside a
    prompt chunk is one pass of array operations, not 256 small ones."""
    seqs, counts = batch.seqs, np.asarray(batch.num_new_tokens, dtype=np.int64)
    b = len(seqs)
    computed = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=b)
    query_start_loc = np.zeros(b + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    rows = np.repeat(np.arange(b), counts)
    positions = np.arange(num_tokens) + np.repeat(computed - query_start_loc[:-1], counts)
    slots = tables[rows, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size
    ids = np.fromiter(
        itertools.chain.from_iterable(
            s.token_ids[c : c + n]
            for s, c, n in zip(seqs, computed.tolist(), batch.num_new_tokens, strict=True)
        ),
        dtype=np.int64,
        count=num_tokens,
    )
    pending_at = np.flatnonzero(ids == PENDING)
    seq_lens = computed + counts
    prompt_done = seq_lens == np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=b)
    return StepInputs(
        np.stack([ids, positions, slots]),
        query_start_loc,
        seq_lens.astype(np.int32),
        (query_start_loc[1:][prompt_done] - 1).tolist(),
        pending_at.tolist(),
        rows[pending_at].tolist(),
    )


def pad_step(step: StepInputs, num_tokens: int, num_seqs: int) -> StepInputs:
    """``step`` as a graph of ``num_tokens`` tokens and ``num_seqs`` sequences runs it. The
    padding tokens form one extra sequence with no prefix, so they attend only to each other
    and write nowhere (slot -1); the sequences after it are empty. The real tokens' results are
    those of the unpadded step."""
    t, b = step.num_tokens, step.num_seqs
    if t > num_tokens or b + (t < num_tokens) > num_seqs:
        raise ValueError(
            f"a step of {t} tokens in {b} sequences does not fit a graph of {num_tokens} "
            f"tokens and {num_seqs} sequences"
        )
    tokens = np.empty((3, num_tokens), dtype=np.int64)
    tokens[:, :t] = step.tokens
    tokens[:, t:] = _PAD_TOKENS
    query_start_loc = np.full(num_seqs + 1, num_tokens, dtype=np.int32)
    query_start_loc[: b + 1] = step.query_start_loc
    seq_lens = np.zeros(num_seqs, dtype=np.int32)
    seq_lens[:b] = step.seq_lens
    if t < num_tokens:
        seq_lens[b] = num_tokens - t  # the padding sequence: its own tokens, no prefix
    return replace(step, tokens=tokens, query_start_loc=query_start_loc, seq_lens=seq_lens)


def _copy_pending(
    input_ids: torch.Tensor,
    missing: list[int],
    owners: list[Sequence],
    pending: PendingTokens | None,
) -> None:
    """Input tokens still on the device (sampled by the previous step, not yet seen by the
    host: ``input_ids[missing[k]]`` is the token of ``owners[k]``) are copied there from its
    sampled ids, without a round trip."""
    if not missing:
        return
    assert pending is not None, "an input token is missing"
    sampled, sampled_seqs = pending
    rows = {id(s): i for i, s in enumerate(sampled_seqs)}
    src = [rows[id(s)] for s in owners]
    dev = input_ids.device
    # Uploaded through pinned memory: a plain copy of the indices would wait for the step
    # still running, the one whose sampled ids these are.
    index = upload_values([missing, src], dev)
    input_ids[index[0]] = sampled[index[1]]


class ModelRunner:
    """Owns the weights, the KV cache tensors and the captured decode graphs."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        budget = config.budget
        self.device = resolve_device(config.device, budget.gpu_uuid if budget else None)
        self.dtype = resolve_dtype(config.dtype, model_config.dtype)
        self.model_config = model_config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // config.block_size)
        self.max_num_seqs = config.max_num_seqs
        self.ops, self.kernel_backend = attention_ops(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if budget is None and config.num_kv_blocks is None and config.kv_cache_bytes is None:
                budget = whole_device_budget(self.device)  # local use: the whole device
        self.budget = budget
        self.gpu_uuid = device_uuid(self.device)  # None on the CPU
        use_graphs = (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.kernel_backend == "triton"
        )
        self.pointwise = Pointwise.compiled() if use_graphs else Pointwise()
        if use_graphs:
            import torch._inductor.config as inductor_config

            from berth.kernels.checks import programmatic_launch

            if programmatic_launch(self.device):  # the compiled pointwise kernels too
                inductor_config.triton.enable_pdl = True
        with torch.device("meta"), _default_dtype(self.dtype):
            model = CausalLM(model_config, self.ops, self.pointwise, max_model_len)
        self.weight_arena = WeightArena(model, self.device)  # the weights' own range
        self.model = model.eval()
        load_weights(self.model, model_config, Path(config.model))
        if FUSE_NORMS:
            self.model.fold_norms()
        self.model.init_rope()
        if config.standby:
            self.weight_arena.keep_host_copy()
        self.weights_bytes = tensors_bytes(self.model)
        fp8 = config.kv_cache_dtype == "fp8"
        if fp8 and self.device.type == "cuda":
            from berth.kernels.checks import check_fp8_capability

            check_fp8_capability(torch.cuda.get_device_capability(self.device))
        self.layout = KvLayout(
            model_config.num_layers,
            config.block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            1 if fp8 else torch.empty((), dtype=self.dtype).element_size(),
            device_granularity(self.device),
            fp8=fp8,
        )
        sized_by_budget = config.num_kv_blocks is None and config.kv_cache_bytes is None
        if self.device.type == "cuda" and not sized_by_budget:
            # Fewer, larger pieces: the driver's calls are slow. A budget's pool is sized by
            # the profile run below, so its layout is chosen after it.
            self.layout = coarsened(self.layout, self._expected_kv_bytes(config))
        self._reserve_arena(config)
        # Penalized requests' token counts (``token_counts``): allocated before the profile,
        # so the measured workspace includes it (128 MiB at 256 rows of a 128k vocabulary).
        self.token_counts = TokenCounts(self.max_num_seqs, model_config.vocab_size, self.device)
        pin = self.device.type == "cuda"
        # Host staging for decode steps: [3, max_num_seqs] (ids, positions, slots), seq lens,
        # block tables. Pinned, so the copies to the device are asynchronous.
        self.h_tokens = torch.zeros((3, self.max_num_seqs), dtype=torch.int64, pin_memory=pin)
        self.h_seq_lens = torch.ones(self.max_num_seqs, dtype=torch.int32, pin_memory=pin)
        self.h_block_tables = torch.zeros(
            (self.max_num_seqs, self.max_blocks_per_seq), dtype=torch.int32, pin_memory=pin
        )
        self.np_tokens = self.h_tokens.numpy()
        self.np_seq_lens = self.h_seq_lens.numpy()
        self.np_block_tables = self.h_block_tables.numpy()
        self.h_sampled = [
            torch.zeros(self.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)
        ]
        self._host_flip = 0
        # Marks the queued copies out of the pinned staging buffers above (and the prefill
        # graphs'): the next step writes those buffers only once the copies have run
        # (``_await_staging``).
        self._staged: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_sizes: list[int] = []
        self.blas_for_size: dict[int, str] = {}  # the BLAS library each decode graph uses
        # The projections (decode_linear) each decode graph runs on the skinny kernel.
        self.skinny_for_size: dict[int, dict[str, SkinnyConfig]] = {}
        self.num_graph_replays = 0
        # Prefill/mixed graphs by token count; each has room for ``graph_seqs`` sequences.
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graph_sizes: list[int] = []
        self.num_prefill_graph_replays = 0
        self.graph_seqs = self.max_num_seqs + 1  # and one for the padding tokens
        self.graph_capture_seconds = 0.0
        self._table_seqs: list[Sequence] = []  # whose block tables the host rows hold
        self._table_rows: dict[int, int] = {}  # id(seq) -> row
        self._table_width = 1
        if self.device.type == "cuda":
            cap_allocator(self.device, None)  # an engine before this one in the process capped it
            torch.cuda.reset_peak_memory_stats(self.device)
            # Eager: the steps too large for a graph run so (the graphs' pools are measured
            # after their capture), and the eager functions hold more intermediates.
            with self.pointwise.eager_for_now():
                profile_largest_step(
                    self.model, config, self.max_model_len, self.max_blocks_per_seq,
                    self.token_counts,
                )  # fmt: skip
            _fresh_blas_workspaces(self.device, self.dtype)
            if sized_by_budget:
                self._coarsen_arena(config)
        if use_graphs:
            started = time.perf_counter()
            try:
                self._capture_graphs(config)
            except Exception as e:  # torch.compile is optional: graphs work without it
                if not self.pointwise.is_compiled:
                    raise
                log.warning("fused pointwise ops failed (%s); capturing eager ones", e)
                self.pointwise.use_eager()
                self._capture_graphs(config)
            # The graphs hold the fused kernels. Eager steps (the largest prefills) launch few,
            # large kernels, where a compiled function's per-call guard checks cost more host
            # time than the launches it saves, so they run the eager functions.
            self.pointwise.use_eager()
            self.graph_capture_seconds = time.perf_counter() - started
            log.info(
                "captured %d decode and %d prefill/mixed graphs in %.1f s",
                len(self.graphs),
                len(self.prefill_graphs),
                self.graph_capture_seconds,
            )
        self.footprint = measure_footprint(self.device, self.weights_bytes, self.arena.mapped_bytes)
        if config.budget is not None:  # a share of a GPU that others use: hold to it
            cap_allocator(self.device, self.footprint.allocator_limit_bytes)
        self.plan: KvPlan | None = None
        if self.budget is not None:
            self.plan = plan_kv_pool(
                self.budget,
                self.footprint.weights_bytes,
                self.footprint.workspace_bytes,
                self.layout.chunk_bytes,
            )
        self.num_kv_blocks = fit_kv_arena(self.arena, self.plan, self._fixed_blocks)
        log.info(
            "memory: weights %.0f MiB, workspace %.0f MiB (allocator peak %.0f MiB and "
            "%.0f MiB of slack%s; outside the allocator %.0f MiB incl. the weights), KV %d "
            "chunks of %.1f MiB (%s)",
            self.footprint.weights_bytes / 2**20,
            self.footprint.workspace_bytes / 2**20,
            self.footprint.allocator_peak_bytes / 2**20,
            (self.footprint.allocator_limit_bytes - self.footprint.allocator_peak_bytes) / 2**20,
            ", the allocator held to both" if config.budget is not None else "",
            self.footprint.outside_allocator_bytes / 2**20,
            self.arena.num_chunks,
            self.layout.chunk_bytes / 2**20,
            "from the budget" if self.plan is not None else "fixed",
        )

    # ---- KV cache -------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_kv_blocks * self.block_bytes

    @property
    def max_kv_blocks(self) -> int:
        """The most blocks the pool can ever hold: at the budget's limit for a pool sized from
        a budget (it grows there as the node agent grants), else the fixed pool."""
        if self.plan is None:
            return self.num_kv_blocks
        return min(self.plan.limit_chunks, self.arena.max_chunks) * self.layout.chunk_blocks

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers, K and V)."""
        self.forget_block_tables()
        pairs = upload_values(copies, self.device)  # [n, 2]: (source, destination)
        self.arena.copy_blocks(pairs[:, 0], pairs[:, 1])

    def synchronize(self) -> None:
        """Wait for the device to finish the step (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- standby --------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Park: unmap every KV chunk and the weights and empty torch's cache. The CUDA graphs,
        their memory pool and the staging buffers stay where they are, so that the graphs
        replay after :meth:`restore_memory` (the KV and weight ranges keep their addresses)."""
        self.synchronize()
        self.arena.resize(0)
        self.weight_arena.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore_memory(self, kv_chunks: int) -> None:
        """Wake: map and fill the weights, then back ``kv_chunks`` KV chunks (mapped while the
        weights' copies run); on failure (the device is out of memory) give back what was
        mapped and raise, still parked."""
        try:
            self.weight_arena.restore(wait=False)
            self.arena.resize(kv_chunks)
            self.synchronize()
        except Exception:
            self.synchronize()
            self.arena.resize(0)
            if self.weight_arena.resident:
                self.weight_arena.release()
            raise

    # ---- one step -------------------------------------------------------------------------

    def copy_to_host(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying sampled ids to a pinned host buffer; the event marks them ready.

        Two buffers alternate: the previous step's ids are read while this copy runs."""
        self._host_flip ^= 1
        host = self.h_sampled[self._host_flip]
        host[: token_ids.shape[0]].copy_(token_ids, non_blocking=True)
        if self.device.type != "cuda":
            return host, None
        done = torch.cuda.Event()
        done.record()
        return host, done

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None,
        scored: PromptRows | None = None,
    ) -> tuple[torch.Tensor, PromptLogprobs | None]:
        """Run the batch; return logits [S, vocab] (model dtype) for the sequences that sample, i.e.
        those whose new tokens reach their last token, in batch order, and, for a prefill or
        mixed step given ``scored``, those rows' prompt log-probabilities (queued on the device,
        their copy to the host started). A decode step scores nothing: a prompt's last token
        alone is never scored (its row is the sampled one)."""
        self._await_staging()
        if batch.is_decode:
            return self._decode(batch, pending), None
        return self._prefill(batch, pending, scored)

    def _await_staging(self) -> None:
        """Wait until the last step's copies out of the pinned staging buffers have run.

        The host writes the next step's inputs into them while the device still runs the step
        before: pipelined, the host has only seen the step before that end. The copies are
        queued right behind it and have nearly always run by then; but while the device is
        held up there (another process's time slice on a shared GPU, a long kernel queued in
        between), overwriting them would feed this step's inputs to the last one, which would
        then write its keys and values at this step's slots. An event query when they have run."""
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.synchronize()

    def _staging_copied(self) -> None:
        """Mark the staging copies just queued (``_await_staging``)."""
        self._staged = torch.cuda.Event()
        self._staged.record()

    def _fill_block_tables(self, seqs: list[Sequence], rows: int, grown: list[Sequence]) -> int:
        """Write the sequences' block tables into the pinned host rows; return the widest.

        Consecutive decode steps mostly run the same sequences in the same order, so then only
        the rows of the sequences that gained a block (``grown``) are rewritten.
        """
        table = self.np_block_tables
        if seqs == self._table_seqs:
            rows_of = self._table_rows
            for seq in grown:
                i = rows_of.get(id(seq))
                if i is not None:
                    table[i, : len(seq.block_table)] = seq.block_table
                    self._table_width = max(self._table_width, len(seq.block_table))
        else:
            self._table_seqs = list(seqs)
            self._table_rows = {id(s): i for i, s in enumerate(seqs)}
            self._table_width = 1
            for i, seq in enumerate(seqs):
                table[i, : len(seq.block_table)] = seq.block_table
                self._table_width = max(self._table_width, len(seq.block_table))
        table[len(seqs) : rows, 0] = 0
        return self._table_width

    def forget_block_tables(self) -> None:
        """Block ids changed in place (copy-on-write, resize): rewrite all rows next step."""
        self._table_seqs = []

    def _decode(self, batch: ScheduledBatch, pending: PendingTokens | None) -> torch.Tensor:
        seqs = batch.seqs
        b = len(seqs)
        bs = self.block_size
        graph_size = padded_size(self.graph_sizes, b)
        rows = graph_size or b
        tokens, seq_lens = self.np_tokens, self.np_seq_lens
        # The usual step: the same sequences as the last one, whose input tokens are all still
        # on the device (the host has not seen them yet), so no input id is read here.
        from_device = pending is not None and seqs == pending[1][:b]
        positions = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        if not from_device:
            tokens[0, :b] = [s.token_ids[p] for s, p in zip(seqs, positions.tolist(), strict=True)]
        width = self._fill_block_tables(seqs, rows, batch.grown)
        tokens[1, :b] = positions
        tokens[2, :b] = self.np_block_tables[np.arange(b), positions // bs] * bs + positions % bs
        seq_lens[:b] = positions
        seq_lens[:b] += 1
        if rows > b:  # graph padding: read block 0, write nowhere
            tokens[:, b:rows] = _PAD_TOKENS
            seq_lens[b:rows] = 1
        if graph_size:
            self.d_tokens[:, :rows].copy_(self.h_tokens[:, :rows], non_blocking=True)
            self.d_seq_lens[:rows].copy_(self.h_seq_lens[:rows], non_blocking=True)
            self.d_block_tables[:rows, :width].copy_(
                self.h_block_tables[:rows, :width], non_blocking=True
            )
            self._staging_copied()
            self._fill_pending(self.d_tokens[0], seqs, pending, from_device)
            self.graphs[graph_size].replay()
            self.num_graph_replays += 1
            return self.d_logits[:b]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=self.h_tokens[2, :b].to(dev),
            block_tables=self.h_block_tables[:b, :width].to(dev),
            seq_lens=self.h_seq_lens[:b].to(dev),
            query_start_loc=None,
            max_seq_len=int(seq_lens[:b].max()),
        )
        input_ids = self.h_tokens[0, :b].to(dev, copy=True)
        self._fill_pending(input_ids, seqs, pending, from_device)
        hidden = self.model(input_ids, self.h_tokens[1, :b].to(dev), meta)
        return self.model.logits(hidden)

    def _fill_pending(
        self,
        input_ids: torch.Tensor,
        seqs: list[Sequence],
        pending: PendingTokens | None,
        from_device: bool,
    ) -> None:
        """A decode step's inputs still on the device: all of them in order (``from_device``),
        or those the host has not seen yet."""
        b = len(seqs)
        if from_device:
            assert pending is not None
            input_ids[:b].copy_(pending[0][:b])
            return
        missing: list[int] = np.flatnonzero(self.np_tokens[0, :b] == PENDING).tolist()
        _copy_pending(input_ids, missing, [seqs[i] for i in missing], pending)

    def _prefill(
        self, batch: ScheduledBatch, pending: PendingTokens | None, scored: PromptRows | None
    ) -> tuple[torch.Tensor, PromptLogprobs | None]:
        """A prefill or mixed step. Launched before the previous step's tokens are back on
        the host: a decoding sequence's input is taken from that step's sampled ids on the
        device, as in a decode step, so the device does not idle while the host collects.

        Prompt log-probabilities (``scored``) come from the step's hidden states of every
        token, which both paths have: a replayed graph leaves them in ``d_hidden``, and they
        are scored on the same stream before any later replay overwrites them, as the sampled
        rows are picked from there."""
        b = len(batch.seqs)
        width = self._fill_block_tables(batch.seqs, b, batch.grown)
        step = step_inputs(batch, self.np_block_tables, self.block_size)
        owners = [batch.seqs[r] for r in step.pending_rows]
        dev = self.device
        rows = upload_values(step.sample_rows, dev)
        size = padded_size(self.prefill_graph_sizes, step.num_tokens)
        if size and b + (step.num_tokens < size) <= self.graph_seqs:
            # The sampled rows and their logits go to buffers allocated once, not per step (a
            # fresh cudaMalloc beside a KV arena that holds the rest of the share can fail,
            # empty torch's cache and synchronize). The 30 ms stalls of these steps at 256
            # concurrent were not that (no retry counted) but cuBLAS's lazy kernel loads,
            # which ``_load_sampling_kernels`` moves to start-up.
            r = len(step.sample_rows)
            hidden = self._replay_prefill(step, size, width, owners, pending)
            picked = torch.index_select(hidden, 0, rows, out=self.d_sampled_hidden[:r])
            logits = self.model.logits(picked, out=self.d_logits[:r])
            return logits, self._score(hidden, scored)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(step.tokens[2]).to(dev),
            block_tables=self.h_block_tables[:b, :width].to(dev),
            seq_lens=torch.from_numpy(step.seq_lens).to(dev),
            query_start_loc=torch.from_numpy(step.query_start_loc).to(dev),
            max_seq_len=int(step.seq_lens.max()),
        )
        tokens = torch.from_numpy(step.tokens).to(dev, copy=True)
        _copy_pending(tokens[0], step.pending_at, owners, pending)
        hidden = self.model(tokens[0], tokens[1], meta)
        return self.model.logits(hidden[rows]), self._score(hidden, scored)

    def _score(self, hidden: torch.Tensor, scored: PromptRows | None) -> PromptLogprobs | None:
        if scored is None:
            return None
        return score(hidden, self.model.logits, scored).to_host()

    def _reserve_arena(self, config: EngineConfig) -> None:
        """Reserve the KV arena for ``self.layout`` and point every layer's caches at it."""
        self.arena, self._fixed_blocks = reserve_kv_arena(
            config,
            self.layout,
            self.budget,
            self.weights_bytes,
            self.device,
            self.dtype,
            self.max_blocks_per_seq,
        )
        self.kv_cache = self.arena.tensor
        for i, layer in enumerate(self.model.model.layers):
            attn = cast(DecoderLayer, layer).self_attn
            attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale = self.arena.layer_caches(i)

    def _coarsen_arena(self, config: EngineConfig) -> None:
        """After the profile run: the layout in the coarsest pieces that still cut what the
        request leaves for KV (request - weights - the workspace measured so far) into
        ``MIN_CHUNKS`` chunks, and the arena again in it (nothing is captured over it yet).
        Chosen before the profile, from request - weights alone, a small pool's chunk could
        outgrow what the workspace leaves of the request and a runtime that fits be refused."""
        assert self.budget is not None
        measured = measure_footprint(self.device, self.weights_bytes, self.arena.mapped_bytes)
        kv_bytes = self.budget.request_bytes - self.weights_bytes - measured.workspace_bytes
        layout = coarsened(self.layout, kv_bytes)
        if layout == self.layout:
            return
        self.arena.close()
        self.layout = layout
        self._reserve_arena(config)

    def _expected_kv_bytes(self, config: EngineConfig) -> int:
        """A configured KV pool's size."""
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        assert config.num_kv_blocks is not None
        return config.num_kv_blocks * self.layout.block_bytes

    def _replay_prefill(
        self,
        step: StepInputs,
        size: int,
        width: int,
        owners: list[Sequence],
        pending: PendingTokens | None,
    ) -> torch.Tensor:
        """Copy the padded step into the graph's inputs, replay; the graph's hidden states
        [size, hidden] (read before the next replay)."""
        padded = pad_step(step, size, self.graph_seqs)
        b = step.num_seqs
        self.np_prefill_tokens[:, :size] = padded.tokens
        self.np_prefill_seqs[0, : self.graph_seqs + 1] = padded.query_start_loc
        self.np_prefill_seqs[1, : self.graph_seqs] = padded.seq_lens
        self.d_prefill_tokens[:, :size].copy_(self.h_prefill_tokens[:, :size], non_blocking=True)
        _copy_pending(self.d_prefill_tokens[0], step.pending_at, owners, pending)
        self.d_prefill_seqs.copy_(self.h_prefill_seqs, non_blocking=True)
        self.d_block_tables[:b, :width].copy_(self.h_block_tables[:b, :width], non_blocking=True)
        self._staging_copied()
        self.prefill_graphs[size].replay()
        self.num_prefill_graph_replays += 1
        return self.d_hidden[:size]

    # ---- CUDA graphs ----------------------------------------------------------------------

    def _capture_graphs(self, config: EngineConfig) -> None:
        """Capture the prefill/mixed graphs, then the decode graphs, largest first, all in one
        memory pool (they never run at once). Their outputs go to two buffers outside the pool
        (hidden states of the largest prefill graph, logits of the largest batch), so the pool
        holds only what one graph needs while it runs: a graph that kept its own output would
        keep it in the pool for good (Llama-3-8B: 0.6 GB of logits over the decode sizes, which
        the KV cache gets instead and a parked runtime does not hold)."""
        dev = self.device
        n, s = self.max_num_seqs, self.graph_seqs
        # The profile run left large free segments in torch's cache: a buffer allocated now
        # would be carved out of one and keep all of it reserved, which a park cannot give back.
        torch.cuda.empty_cache()
        self.d_tokens = torch.zeros((3, n), dtype=torch.int64, device=dev)
        self.d_tokens[2].fill_(-1)
        self.d_seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.d_block_tables = torch.zeros(
            (s, self.max_blocks_per_seq), dtype=torch.int32, device=dev
        )
        sizes = prefill_graph_sizes(config.max_num_batched_tokens, config.max_prefill_graph_tokens)
        top = max(sizes, default=0)
        # Prefill staging, pinned: [3, top] (ids, positions, slots) and [2, s + 1] (query
        # starts; sequence lengths in the first s).
        self.h_prefill_tokens = torch.zeros((3, top), dtype=torch.int64, pin_memory=True)
        self.h_prefill_seqs = torch.zeros((2, s + 1), dtype=torch.int32, pin_memory=True)
        self.np_prefill_tokens = self.h_prefill_tokens.numpy()
        self.np_prefill_seqs = self.h_prefill_seqs.numpy()
        self.d_prefill_tokens = torch.zeros((3, top), dtype=torch.int64, device=dev)
        self.d_prefill_seqs = torch.zeros((2, s + 1), dtype=torch.int32, device=dev)
        cfg = self.model.config
        self.d_hidden = torch.empty((top, cfg.hidden_size), dtype=self.dtype, device=dev)
        self.d_logits = torch.empty((n, cfg.vocab_size), dtype=self.dtype, device=dev)
        self.d_sampled_hidden = torch.empty((n, cfg.hidden_size), dtype=self.dtype, device=dev)
        pool = None
        try:
            pool = self._capture_prefill_graphs(sizes)
        except Exception as e:  # graphs are an optimisation: prefill still runs eagerly
            log.warning("prefill/mixed steps run eagerly: capturing their graphs failed (%s)", e)
            self.prefill_graphs.clear()
            self.prefill_graph_sizes = []
            torch.cuda.synchronize(dev)
        decode_sizes = graph_batch_sizes(n)
        projections = decode_linear.by_kind(self.model)
        if config.decode_blas == "measured":
            self.blas_for_size = blas_choice.choose(self._matmul_weights(), decode_sizes)
            if self.dtype in (torch.bfloat16, torch.float16):
                self.skinny_for_size = blas_choice.choose_skinny(
                    {kind: [m.weight for m in ms] for kind, ms in projections.items()},
                    self.blas_for_size,
                    decode_linear.MAX_ROWS,
                )
        else:
            self.blas_for_size = dict.fromkeys(decode_sizes, config.decode_blas)
        for size in reversed(decode_sizes):
            meta = AttentionMetadata(
                slot_mapping=self.d_tokens[2, :size],
                block_tables=self.d_block_tables[:size],
                seq_lens=self.d_seq_lens[:size],
                query_start_loc=None,
                max_seq_len=self.max_model_len,
            )
            step = functools.partial(self._decode_logits, self.d_tokens[:, :size], meta, size)
            skinny = self.skinny_for_size.get(size, {})
            with (
                blas_choice.preferred(self.blas_for_size[size]),
                decode_linear.skinny(projections, skinny, FUSE_NORMS),
            ):
                graph = self._capture(step, pool)
            pool = graph.pool()
            self.graphs[size] = graph
        self._load_sampling_kernels()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the same for what is allocated after: fresh segments
        self.graph_sizes = decode_sizes

    def _matmul_weights(self) -> list[torch.Tensor]:
        """The weights a decode step multiplies by, in order: every linear, then the LM head."""
        weights = [m.weight for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if self.model.lm_head is None:  # tied: the LM head is the embedding
            weights.append(self.model.model.embed_tokens.weight)
        return weights

    def _load_sampling_kernels(self) -> None:
        """Run a mixed step's eager tail (the sampled rows, the LM head, the argmax) once at
        every row count. cuBLAS picks a different kernel as the row count grows, and CUDA loads
        a kernel lazily, on first use, synchronizing the device: on an H100 the LM head's first
        call at 17 rows took 14.8 ms of host time behind a running step, once per new kernel,
        and those first calls were the ITL p99 of a 256-stream arrival run. At start-up all of
        them load at once (0.3 s for 256 row counts on an H100, each call synchronized)."""
        hidden, logits = self.d_sampled_hidden, self.d_logits
        if self.d_hidden.shape[0]:
            first = torch.zeros(1, dtype=torch.int64, device=hidden.device)
            torch.index_select(self.d_hidden, 0, first, out=hidden[:1])
        for r in range(1, hidden.shape[0] + 1):
            self.model.logits(hidden[:r], out=logits[:r]).argmax(dim=-1)

    def _capture_prefill_graphs(self, sizes: list[int]) -> _PoolHandle | None:
        """One prefill/mixed graph per token count, largest first; their shared memory pool."""
        s = self.graph_seqs
        pool = None
        for size in reversed(sizes):
            # Capture-time inputs: one sequence of ``size`` new tokens, no prefix, writing
            # nowhere; the replays copy in the real step.
            self.d_prefill_tokens[:, :size].zero_()
            self.d_prefill_tokens[2, :size].fill_(-1)
            self.d_prefill_seqs[0].fill_(size)
            self.d_prefill_seqs[0, 0] = 0
            self.d_prefill_seqs[1].zero_()
            self.d_prefill_seqs[1, 0] = size
            meta = AttentionMetadata(
                slot_mapping=self.d_prefill_tokens[2, :size],
                block_tables=self.d_block_tables,
                seq_lens=self.d_prefill_seqs[1, :s],
                query_start_loc=self.d_prefill_seqs[0],
                max_seq_len=self.max_model_len,
            )
            ids, positions = self.d_prefill_tokens[0, :size], self.d_prefill_tokens[1, :size]
            graph = self._capture(
                functools.partial(self._prefill_hidden, ids, positions, meta), pool
            )
            pool = graph.pool()
            self.prefill_graphs[size] = graph
        self.prefill_graph_sizes = sizes
        return pool

    def _decode_logits(self, tokens: torch.Tensor, meta: AttentionMetadata, size: int) -> None:
        self.model.logits(self.model(tokens[0], tokens[1], meta), out=self.d_logits[:size])

    def _prefill_hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        self.d_hidden[: ids.shape[0]].copy_(self.model(ids, positions, meta))

    def _capture(self, run: Callable[[], None], pool: _PoolHandle | None) -> torch.cuda.CUDAGraph:
        """Run once eagerly (compile, autotune), then capture ``run`` into ``pool``."""
        with torch.inference_mode():
            run()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                run()
        return graph
