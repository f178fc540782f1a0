"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step spends a token budget: running sequences first (decodes before unfinished prefills),
then waiting ones in arrival order (FCFS), their prompts cut into chunks so that one long prompt
never stalls everyone's decoding. While any sequence decodes, prompt tokens get a smaller share
(``max_prefill_tokens_while_decoding``): a step's time grows with its prompt tokens, and every
decoding sequence waits for the whole step, so this bounds the inter-token latency a burst of
prompts causes, at the price of a longer time to first token for long prompts. A step the runner
pads up to a graph's token count computes the padding anyway, so the cap rises to fill it with
prompt tokens (``fill_padded_step``). When the pool
runs out of blocks the newest running sequence is preempted: it drops its blocks and later
computes them again (mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Sizes
from dataclasses import dataclass, field

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import EngineConfig
from berth.runtime.engine.outputs import FinishReason
from berth.runtime.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new_tokens[i]`` tokens of ``seqs[i]``, after its computed ones."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)  # can never fit the pool
    grown: list[Sequence] = field(default_factory=list)  # whose block tables changed

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token: the shape the CUDA graphs were captured for."""
        return sum(self.num_new_tokens) == len(self.seqs)  # each count is at least 1

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


def padded_size(sizes: Sizes[int], tokens: int) -> int:
    """The smallest of the ascending graph ``sizes`` that holds ``tokens`` (0: none does, the
    step runs unpadded): what the runner pads a step to, and what the scheduler fills."""
    return next((s for s in sizes if s >= tokens), 0)


def fill_padded_step(decodes: int, cap: int, step_sizes: Sizes[int]) -> int:
    """Prompt tokens a step may compute beside ``decodes`` decoding sequences: ``cap``, raised
    so that the step fills the padded size it runs at anyway (the smallest of the ascending
    ``step_sizes`` that holds ``decodes + cap``; the runner's graphs compute every padded row).
    A step larger than every size runs unpadded and keeps the cap. The step is no longer, only
    fuller: 60 decodes beside 512 prompt tokens replay the 640-token graph either way."""
    size = padded_size(step_sizes, decodes + cap)
    return size - decodes if size else cap


def _arrival(seq: Sequence) -> int:
    return seq.arrival


class Scheduler:
    """Holds the waiting queue and the running set, and the pool they draw blocks from."""

    def __init__(self, config: EngineConfig, pool: KvBlockPool, watermark: float = 0.01) -> None:
        self.pool = pool
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_prefill_tokens_while_decoding = config.max_prefill_tokens_while_decoding
        self.watermark = watermark
        # The most blocks the pool can ever have (an elastic pool's limit); a request that
        # cannot fit even then is refused, one that fits it waits for the pool to grow.
        self.max_pool_blocks: int | None = None
        # Token counts the runner pads a prefill or mixed step up to (its graphs' sizes,
        # ascending; empty where steps run eagerly): the cap beside decodes fills them.
        self.step_sizes: list[int] = []
        # Blocks a sequence held back at the last admission for lack of memory needs, all of
        # its prompt and next token (0: none was): an elastic pool grows to hold them too.
        self.blocked_blocks = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens
        self.prefix_cache_hits = 0  # tokens
        self._num_finished_running = 0  # > 0: ``running`` may hold finished sequences

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        # Decodes first, then running prefills; each group keeps its order.
        order = [s for s in self.running if len(s.token_ids) - s.num_computed_tokens == 1]
        decodes = len(order)
        if decodes != len(self.running):
            order += [s for s in self.running if len(s.token_ids) - s.num_computed_tokens != 1]
        elif budget >= decodes and self._room_for_decodes(order):
            batch.seqs, batch.num_new_tokens = order, [1] * decodes
            batch.grown = self.pool.take_grown()
            return self._admit(batch, self._prompt_budget(budget - decodes, decodes))
        allocate, running = self.pool.allocate, SequenceStatus.RUNNING
        seqs, counts = batch.seqs, batch.num_new_tokens
        prompt_budget = self._prompt_budget(budget, decodes)
        for i, seq in enumerate(order):
            if budget == 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            left = len(seq.token_ids) - seq.num_computed_tokens
            n = min(left, budget if left == 1 else prompt_budget)
            if n == 0:
                break  # prefills come after the decodes: no prompt tokens left this step
            while not allocate(seq, n):
                # The newest sequence not yet scheduled in this step (possibly seq) makes room.
                victim = max((s for s in order[i:] if s.status is running), key=_arrival)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                if left > 1:
                    prompt_budget -= n
                prompt_budget = min(prompt_budget, budget)
        batch.grown = self.pool.take_grown()
        if preempted:
            return batch
        return self._admit(batch, prompt_budget)

    def _prompt_budget(self, budget: int, decodes: int) -> int:
        """Prompt tokens this step may compute: the rest of the budget, capped while any
        sequence decodes (the cap filling the step's padding)."""
        cap = self.max_prefill_tokens_while_decoding
        if cap is None or decodes == 0:
            return budget
        return min(budget, fill_padded_step(decodes, cap, self.step_sizes))

    def _room_for_decodes(self, decodes: list[Sequence]) -> bool:
        """The common step, every running sequence decoding: only those whose next token
        starts a block (or shares its last one) ask the pool for one. False when the pool is
        out of blocks (then the full path preempts; the blocks given here stay valid)."""
        bs, refs, allocate = self.pool.block_size, self.pool.ref_counts, self.pool.allocate
        return all(
            allocate(s, 1)
            for s in decodes
            if not s.num_computed_tokens % bs or refs[s.block_table[-1]] > 1
        )

    def _admit(self, batch: ScheduledBatch, budget: int) -> ScheduledBatch:
        """Waiting sequences join in arrival order while the budget, the batch size limit
        and the pool (keeping a watermark of free blocks) allow.

        One that an elastic pool can hold only once it has grown waits at the head without
        holding back those behind it that fit now (the node agent may grant the growth late,
        or not while the GPU is full); once the pool is large enough, arrival order holds."""
        pool = self.pool
        reserve = int(self.watermark * pool.num_blocks)
        ceiling = max(pool.num_blocks, self.max_pool_blocks or 0)
        self.blocked_blocks = 0
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            whole = pool.blocks_needed(seq.num_tokens + 1)
            if whole > ceiling:
                self.waiting.popleft()
                self._finish(seq, "abort")
                batch.aborted.append(seq)
                continue
            held = reserve if self.running else 0
            if whole > pool.num_blocks:  # admitted, it would preempt itself for later chunks
                self.blocked_blocks = max(self.blocked_blocks, whole + held)
                deferred.append(self.waiting.popleft())
                continue
            # A request scoring its prompt computes every position: a cached one has no
            # logits (vLLM does the same; recomputing only the cached positions' hidden states
            # would cost as much as this and need a second kind of step).
            prefix = pool.match_prefix(seq) if seq.params.prompt_logprobs is None else []
            n = min(seq.num_tokens - len(prefix) * pool.block_size, budget)
            if not pool.allocate(seq, n, prefix, held):
                # Memory, not the token budget, holds it back: an elastic pool asks its node
                # agent for room for it.
                self.blocked_blocks = max(self.blocked_blocks, whole + held)
                break
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(prefix) * pool.block_size
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        batch.grown += pool.take_grown()
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the blocks, go back to the head of the queue."""
        self.pool.free_sequence(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._num_finished_running += 1
        self.pool.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark ``seq`` finished and free its blocks; ``drop_finished`` takes it off the list
        (a preempted sequence is taken off the waiting queue at once)."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._finish(seq, reason)

    def drop_finished(self) -> None:
        if self._num_finished_running:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
            self._num_finished_running = 0

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request's sequence wherever it is and free its blocks; None if unknown."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None

    def resize_pool(self, num_blocks: int) -> list[Sequence]:
        """Change the pool's capacity; to shrink, first preempt whoever holds the region given
        back. Returns the preempted sequences."""
        victims = [s for s in self.running if any(b >= num_blocks for b in s.block_table)]
        for seq in victims:
            self._preempt(seq)
        self.pool.resize(num_blocks)
        return victims
