"""The engine: requests in, tokens out, one scheduler iteration per ``step()``.

Synchronous and single-threaded by design: the server drives ``step()`` from one thread and
the benchmarks and the CLI call ``generate``/``stream``. Each step schedules a batch and
launches it on the device, then takes the tokens of the batch the previous step launched and
turns them into per-request outputs (text, stops, log-probs) while the device computes: the
device never waits for the host between decode steps (see ``step``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.detokenizer import Detokenizer
from berth.runtime.engine.model_config import ModelConfig
from berth.runtime.engine.model_runner import PENDING, ModelRunner
from berth.runtime.engine.outputs import EngineStats, FinishReason, RequestOutput, TokenLogprob
from berth.runtime.engine.prompt_logprobs import PromptLogprobs, prompt_rows
from berth.runtime.engine.sampler import Draw, Sampler
from berth.runtime.engine.scheduler import ScheduledBatch, Scheduler
from berth.runtime.engine.sequence import Sequence, SequenceStatus
from berth.runtime.engine.structured import Grammars
from berth.runtime.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance import LLMatcher

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: Detokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    plain: bool  # greedy without log-probs or bans: one batched argmax chooses its tokens
    matcher: LLMatcher | None  # its grammar's state (structured output)


@dataclass(eq=False)
class _InFlight:
    """A launched batch whose results the next ``step`` collects."""

    sampling: list[Sequence]  # rows of ``logits``
    slots: list[int]  # index of each sampling sequence's placeholder token
    filled: list[Sequence]  # sequences whose computed tokens completed a KV block
    ended: list[Sequence]  # sequences whose coming token is their last (length)
    logits: torch.Tensor
    prompt: PromptLogprobs | None = None  # scored prompt tokens, on the host once ``done``
    sampled: torch.Tensor | None = None  # the chosen token ids on the device
    host_tokens: torch.Tensor | None = None  # their copy on the host, valid once ``done``
    draw: Draw | None = None  # log-probabilities on the host, valid once ``done``
    done: torch.cuda.Event | None = None


class Engine:
    """Loads one model and serves many concurrent requests with continuous batching."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.tokenizer.token_texts  # built now, not inside the first request's latency  # noqa: B018
        self.model_name = Path(config.model).resolve().name
        self.max_model_len = self._max_model_len(config, self.model_config)
        self.runner = ModelRunner(config, self.model_config, self.max_model_len)
        self.pool = KvBlockPool(
            self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.pool)
        self.scheduler.max_pool_blocks = self.runner.max_kv_blocks
        self.scheduler.step_sizes = self.runner.prefill_graph_sizes
        pool_tokens = self.runner.max_kv_blocks * config.block_size
        if pool_tokens < self.max_model_len:
            # A longer sequence could never be held. One asked for by name is refused at start
            # (as vLLM does); the model's own context is lowered, with a warning, and shown in
            # /v1/models: a longer request then gets a 400 naming the context, not a start and
            # an abort once it outgrows the pool.
            where = "its GPU memory limit" if self.runner.plan is not None else "its fixed size"
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {config.max_model_len} does not fit the KV cache: its pool "
                    f"holds at most {pool_tokens} tokens, even at {where}; lower max_model_len "
                    "to that or give the service more GPU memory (gpu.memory.limit)"
                )
            log.warning("max_model_len %d lowered to %d: the KV pool holds no more tokens, even "
                        "at %s", self.max_model_len, pool_tokens, where)  # fmt: skip
            self.max_model_len = pool_tokens
        self.sampler = Sampler(self.runner.device, config.seed)
        self.requests: dict[str, _Request] = {}
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, sorted(self._eos))
        self._ids = itertools.count()
        self._num_special = 0  # live requests that need the full sampler
        self._num_host_bound = 0  # live requests whose choice needs their output on the host
        self._num_penalized = 0  # live requests whose choice counts their tokens
        self._num_scoring_prompt = 0  # live requests asking for prompt log-probabilities
        self._in_flight: _InFlight | None = None
        self.parked = False  # weights and KV off the device (``park``); no step until ``wake``
        self._growth_stalled_at: int | None = None  # chunks held when growth last failed
        self._blocks_before_park = 0
        self._waited = 0.0  # seconds this step spent waiting for the device
        # Host time of the last step that ran the model, excluding the wait for the device:
        # scheduling, input preparation, sampling and output processing (seconds).
        self.last_step_host_seconds = 0.0
        # The batch the last step launched: (sequences, tokens); a decode step has as many
        # tokens as sequences (what a benchmark needs to tell a slow step's kind).
        self.last_step_batch = (0, 0)
        log.info(
            "engine ready: %s (%s, %s, %s kernels), %d KV blocks of %d tokens, max_model_len %d",
            self.model_name,
            self.runner.device,
            self.runner.dtype,
            self.runner.kernel_backend,
            self.pool.num_blocks,
            config.block_size,
            self.max_model_len,
        )

    @staticmethod
    def _max_model_len(config: EngineConfig, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if model.sliding_window is not None:
            limit = min(limit, model.sliding_window)  # no sliding-window attention kernel
        if config.max_model_len is None:
            return limit
        if config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds what the model supports ({limit})"
            )
        return config.max_model_len

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raise ``ValueError`` if it is empty, too long, or its params are bad."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate(self.max_model_len)
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; this model's context holds "
                f"{self.max_model_len}, and at least one must be left for the output"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if outside := sorted(t for t in params.logit_bias if t >= vocab):
            raise ValueError(f"logit_bias names token ids outside [0, {vocab}): {outside[:5]}")
        matcher = None if params.grammar is None else self.grammars.matcher(params.grammar)
        max_num_tokens = min(len(token_ids) + params.max_tokens, self.max_model_len)
        seq = Sequence(request_id, token_ids, len(token_ids), params, max_num_tokens)
        if params.logprobs is not None:
            seq.logprobs = []
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first token has no context to be scored in
        generator = None if params.seed is None else self.sampler.request_generator(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self._eos
        )
        plain = (
            params.greedy
            and params.logprobs is None
            and not params.min_tokens
            and not params.adjusts_logits
            and params.grammar is None
        )
        self.requests[request_id] = _Request(
            seq,
            Detokenizer(self.tokenizer, params.stop, params.min_tokens,
                        params.include_stop_str_in_output),
            generator, stop_ids,
            plain, matcher,
        )  # fmt: skip
        self._num_special += not plain
        self._num_host_bound += params.host_bound
        self._num_penalized += params.penalized
        self._num_scoring_prompt += params.prompt_logprobs is not None
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; an unknown id is a no-op."""
        if request_id in self.requests:
            self._forget(request_id)
            self.scheduler.abort(request_id)

    def unfinished_request_ids(self) -> list[str]:
        """The requests not finished yet, waiting or running."""
        return list(self.requests)

    def has_unfinished(self) -> bool:
        """True while a request waits, runs, or has tokens in flight on the device."""
        if self.scheduler.has_unfinished():
            return True
        flight = self._in_flight
        return flight is not None and any(s.request_id in self.requests for s in flight.sampling)

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration; an output for each request that gained tokens or finished.

        Pipelined by one batch: a call launches the next batch before it collects the tokens
        of the one the previous call launched, then detokenizes them and builds their outputs
        while the device computes. A token not yet back is a placeholder in its sequence; a
        decode or mixed step takes it straight from the previous batch's chosen ids on the
        device (so the device never waits for the host between steps). A request's tokens
        come back in the call after the one that launched them; ``has_unfinished`` stays true
        until they have. The new batch's tokens are chosen right after its launch (penalties
        count the tokens on the device), or, while a request with a grammar is live, right
        after the collection: its mask follows the tokens just collected, and the device
        runs the batch meanwhile.
        """
        if self.parked:
            raise RuntimeError("the engine is parked: wake it before stepping")
        start = time.perf_counter()
        self._waited = 0.0
        flight, self._in_flight = self._in_flight, None
        self.scheduler.drop_finished()
        batch = self.scheduler.schedule()
        self.last_step_batch = (len(batch.seqs), batch.num_tokens)
        outputs = [self._finished_output(seq) for seq in batch.aborted]
        if batch.seqs:
            copies = self.pool.take_pending_copies()
            if copies:
                self.runner.copy_blocks(copies)
            pending = None
            if flight is not None and flight.sampled is not None:
                pending = (flight.sampled, flight.sampling)
            scored = None
            if self._num_scoring_prompt and not batch.is_decode:
                scored = prompt_rows(batch)
            logits, prompt = self.runner.execute(batch, pending, scored)
            self._in_flight = self._launch(batch, logits)
            self._in_flight.prompt = prompt
        if flight is not None:
            outputs += self._collect(flight)
        launched = self._in_flight
        if launched is not None:
            if launched.sampling and launched.sampled is None:
                self._draw(launched)
            self._settle(launched)
        self.scheduler.drop_finished()
        self.last_step_host_seconds = time.perf_counter() - start - self._waited
        return outputs

    def _launch(self, batch: ScheduledBatch, logits: torch.Tensor) -> _InFlight:
        """Count the launched tokens as computed, give each sampling sequence a placeholder
        for its coming token, and start choosing the tokens (``_draw``). While a request with
        a grammar is live (its mask follows the tokens of the step still in flight), the
        choice waits until ``step`` has collected those."""
        sampling: list[Sequence] = []
        slots: list[int] = []
        filled: list[Sequence] = []  # completed a KV block: name it once its tokens are known
        ended: list[Sequence] = []  # the coming token is the last: end it in ``_settle``
        block_size = self.pool.block_size
        if batch.is_decode:  # one token each: every sequence samples
            sampling = batch.seqs
            for seq in sampling:
                seq.num_computed_tokens += 1
                slot = len(seq.token_ids)
                seq.token_ids.append(PENDING)
                slots.append(slot)
                if slot % block_size == 0:
                    filled.append(seq)
                if slot + 1 >= seq.max_num_tokens:
                    ended.append(seq)
        else:
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                seq.num_computed_tokens += n
                if seq.num_computed_tokens >= (seq.num_named_blocks + 1) * block_size:
                    filled.append(seq)
                slot = len(seq.token_ids)
                if seq.num_computed_tokens == slot:
                    seq.token_ids.append(PENDING)
                    slots.append(slot)
                    sampling.append(seq)
                    if slot + 1 >= seq.max_num_tokens:
                        ended.append(seq)
        flight = _InFlight(sampling, slots, filled, ended, logits)
        if sampling and not self._num_host_bound:
            self._draw(flight)
        return flight

    def _draw(self, flight: _InFlight) -> None:
        """Queue the choice of ``flight``'s tokens on the device and their copy to the host:
        one argmax when every live request is plain, else the sampler's draw, with the
        penalized requests' token counts and each grammar's mask for its next token.
        Nothing here waits for the device."""
        sampling, slots = flight.sampling, flight.slots
        if self._num_special == 0:
            flight.sampled = flight.logits.argmax(dim=-1)
        else:
            requests = [self.requests.get(s.request_id) for s in sampling]
            matchers = [r.matcher if r is not None else None for r in requests]
            draw = self.sampler.draw(
                flight.logits,
                [s.params for s in sampling],
                [r.generator if r is not None else None for r in requests],
                _banned(sampling, slots, requests),
                self.runner.token_counts.select(sampling, slots) if self._num_penalized else None,
                self.grammars.masks(matchers) if any(matchers) else None,
            )
            flight.sampled, flight.draw = draw.chosen, draw.to_host()
        flight.host_tokens, flight.done = self.runner.copy_to_host(flight.sampled)

    def _collect(self, flight: _InFlight) -> list[RequestOutput]:
        """Wait for a launched batch and turn its tokens into outputs: fill in the placeholders,
        detokenize, apply stop tokens and stop strings (``_settle`` names the KV blocks).
        Requests aborted or ended by a stop string meanwhile are skipped. One pass, a few dozen
        Python operations per sequence: at batch 256 this loop is most of a step's host time."""
        t = time.perf_counter()
        if flight.done is not None:
            flight.done.synchronize()
        else:
            self.runner.synchronize()
        self._waited += time.perf_counter() - t
        logprobs: list[TokenLogprob | None] | None = None
        if flight.prompt is not None:
            flight.prompt.record()
        token_ids: list[int] = []
        if flight.host_tokens is not None:
            token_ids = flight.host_tokens[: len(flight.sampling)].tolist()
            if flight.draw is not None:
                logprobs = flight.draw.read(token_ids)
        live = self.requests
        outputs: list[RequestOutput] = []
        for i, (seq, slot, token) in enumerate(
            zip(flight.sampling, flight.slots, token_ids, strict=True)
        ):
            req = live.get(seq.request_id)
            if req is None or req.seq is not seq:
                continue
            seq.token_ids[slot] = token
            reason: FinishReason | None = None
            if req.matcher is not None and _completes(req.matcher, token):
                reason = "stop"  # the grammar allows nothing after it (or it is the EOS)
                text = "" if token in req.stop_ids else req.detokenizer.push(token)
                text += req.detokenizer.flush()
            elif token in req.stop_ids:
                reason = "stop"
                text = req.detokenizer.flush()
            else:
                text = req.detokenizer.push(token)
                if req.detokenizer.stopped:
                    reason = "stop"  # a stop string; the text ends before it
                elif slot + 1 >= seq.max_num_tokens:
                    reason = "length"  # ``_settle`` ended it when this token was launched
                    text += req.detokenizer.flush()
            if reason is not None:
                if reason == "stop":
                    self._stop(seq)
                self._forget(seq.request_id)
            logprob = None
            if logprobs is not None:
                logprob = logprobs[i]
                if logprob is not None and seq.logprobs is not None:
                    seq.logprobs.append(logprob)
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    [token],
                    text,
                    reason is not None,
                    reason,
                    seq.num_prompt_tokens,
                    slot + 1 - seq.num_prompt_tokens,
                    seq.num_cached_tokens,
                    None if logprob is None else [logprob],
                    # the scored prompt (None unless asked for) goes with the first output
                    seq.prompt_logprobs if slot == seq.num_prompt_tokens else None,
                )
            )
        return outputs

    def _settle(self, flight: _InFlight) -> None:
        """Called once the step has collected the batch before ``flight``: every token that
        ``flight`` computes is known on the host now (a decode's input was the placeholder that
        collection filled in). Name the KV blocks it completed, and end the sequences whose
        coming token is their last, so that none is scheduled past it. Ending frees their
        blocks only now, after naming them: a request that ends in its first steps still
        leaves its prompt in the prefix cache. The keys and values are not all written yet,
        but every later batch that could read them runs after this one on the device."""
        running = SequenceStatus.RUNNING
        for seq in flight.filled:
            if seq.status is running:
                self.pool.register_computed(seq)
        for seq in flight.ended:
            if seq.status is running:  # not stopped by the token collected meanwhile
                self.scheduler.finish(seq, "length")

    def _stop(self, seq: Sequence) -> None:
        """End ``seq`` with "stop"; one that its length already ended keeps its blocks freed."""
        if seq.is_finished:  # its length ended it when its last token was launched
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq, "stop")

    def _finished_output(self, seq: Sequence) -> RequestOutput:
        """The final output of a request the scheduler ended on its own (it can never fit)."""
        req = self._forget(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[],
            new_text=req.detokenizer.flush(),
            finished=True,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[] if seq.logprobs is not None else None,
        )

    def _forget(self, request_id: str) -> _Request:
        req = self.requests.pop(request_id)
        self.runner.token_counts.release(req.seq)
        self._num_special -= not req.plain
        self._num_host_bound -= req.seq.params.host_bound
        self._num_penalized -= req.seq.params.penalized
        self._num_scoring_prompt -= req.seq.params.prompt_logprobs is not None
        return req

    # ---- capacity and gauges -------------------------------------------------------------------

    def resize_kv_pool(self, num_blocks: int) -> int:
        """Change how many KV blocks the scheduler may use, backing or giving back the KV
        tensor's chunks to match. Shrinking preempts the sequences that hold blocks in the
        region given back (they are computed again later, mostly from the prefix cache: no
        request fails), waits for the device, then unmaps. Returns how many were preempted.
        Growing stops early, with a warning, if the device runs out of memory."""
        arena = self.runner.arena
        if not 1 <= num_blocks <= arena.max_blocks:
            raise ValueError(
                f"num_blocks must be in [1, {arena.max_blocks}] (the KV tensor reserved at "
                f"start-up), got {num_blocks}"
            )
        chunks = -(-num_blocks // arena.layout.chunk_blocks)
        preempted = 0
        if num_blocks < self.pool.num_blocks:
            self.runner.synchronize()  # the batch in flight may still use the region
            preempted = len(self.scheduler.resize_pool(num_blocks))
            self.runner.forget_block_tables()
        try:
            arena.resize(chunks)
        except RuntimeError as e:  # the driver's out-of-memory: keep what was mapped
            # The lease asks again every cycle while its grant stands: say so once per stall.
            if self._growth_stalled_at != arena.num_chunks:
                log.warning("KV pool stopped growing at %d chunks: %s", arena.num_chunks, e)
            self._growth_stalled_at = arena.num_chunks
        else:
            self._growth_stalled_at = None
        num_blocks = min(num_blocks, arena.num_blocks)
        if num_blocks > self.pool.num_blocks:
            self.scheduler.resize_pool(num_blocks)
        return preempted

    def resize_kv_memory(self, held_bytes: int) -> int:
        """Fit the KV pool so that all the device memory the engine holds stays within
        ``held_bytes`` (never below the budget's request, never past its limit); returns what
        it holds afterwards. Only for a pool sized from a budget."""
        plan = self.runner.plan
        if plan is None:
            raise RuntimeError("this engine's KV pool has a fixed size (no GPU memory budget)")
        chunks = min(plan.chunks_within(held_bytes), self.runner.arena.max_chunks)
        self.resize_kv_pool(chunks * self.runner.arena.layout.chunk_blocks)
        return self.held_bytes

    # ---- warm standby ----------------------------------------------------------------------

    def park(self) -> int:
        """Give the device memory of the weights and the KV pool back (a host copy of the
        weights stays). Running sequences are preempted: they wait, with their tokens, and are
        computed again after ``wake``; the prefix cache is dropped. Returns how many were
        preempted. Needs ``EngineConfig.standby`` (the host copy, taken at load)."""
        if self.runner.weight_arena.host is None:
            raise RuntimeError(
                "this engine keeps no host copy of its weights (EngineConfig.standby is off), "
                "so it cannot park"
            )
        if self.parked:
            return 0
        self.runner.synchronize()  # the batch in flight still reads weights and KV
        self._blocks_before_park = self.pool.num_blocks
        preempted = len(self.scheduler.resize_pool(0))
        self.runner.forget_block_tables()
        self.runner.release_memory()
        self.parked = True
        return preempted

    def wake(self) -> None:
        """Map the weights and the KV pool back at their addresses and copy the weights in;
        the pool comes back at the budget's request (or its size before the park, without a
        budget). Raises, still parked, when the device has no memory for it."""
        if not self.parked:
            return
        arena, plan = self.runner.arena, self.runner.plan
        chunk_blocks = arena.layout.chunk_blocks
        blocks = self._blocks_before_park
        if plan is not None:
            blocks = min(plan.request_chunks, arena.max_chunks) * chunk_blocks
        self.runner.restore_memory(-(-blocks // chunk_blocks))
        self.scheduler.resize_pool(min(blocks, arena.num_blocks))
        self.parked = False

    @property
    def held_bytes(self) -> int:
        """Device memory held: weights, measured workspace and the backed KV chunks (parked:
        the workspace only: graphs' pool, context)."""
        arena = self.runner.arena
        plan = self.runner.plan
        if self.parked:
            return self.runner.footprint.workspace_bytes
        if plan is None:
            return self.runner.weights_bytes + arena.mapped_bytes
        return plan.held_bytes(arena.num_chunks)

    def stats(self) -> EngineStats:
        pool = self.pool
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_total_blocks=pool.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            kv_cache_usage=pool.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            kv_cache_bytes=pool.num_blocks * self.runner.block_bytes,
            held_bytes=self.held_bytes,
            blocked_blocks=self.scheduler.blocked_blocks,
        )

    # ---- conveniences ---------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion together; one aggregated output per prompt, in order
        (all token ids, the whole text, every log-prob). Needs an otherwise idle engine."""
        self._require_idle("generate")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        merged: dict[str, RequestOutput] = {}
        try:
            while self.has_unfinished():
                for out in self.step():
                    if out.request_id in merged:
                        _merge(merged[out.request_id], out)
                    else:
                        merged[out.request_id] = out
        finally:
            for request_id in ids:
                self.abort_request(request_id)
        return [merged[i] for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Yield one request's outputs as they come; closing the iterator aborts it."""
        self._require_idle("stream")
        request_id = f"stream-{next(self._ids)}"
        self.add_request(request_id, prompt, params)
        try:
            while self.has_unfinished():
                for out in self.step():
                    yield out
                    if out.finished:
                        return
        finally:
            self.abort_request(request_id)

    def _require_idle(self, what: str) -> None:
        if self.has_unfinished():
            raise RuntimeError(
                f"Engine.{what} drives the engine itself; it cannot run beside other requests "
                "(use add_request/step instead)"
            )


def _completes(matcher: LLMatcher, token: int) -> bool:
    """Advance a grammar by the chosen token; True once the output is complete. The mask let
    only valid tokens through, so a refusal means a defect: logged, and the output ends."""
    if not matcher.consume_token(token):
        log.error("structured output: token %d refused by its grammar: %s", token,
                  matcher.get_error())  # fmt: skip
        return True
    return matcher.is_stopped()


def _merge(into: RequestOutput, out: RequestOutput) -> None:
    into.new_token_ids += out.new_token_ids
    into.new_text += out.new_text
    into.finished, into.finish_reason = out.finished, out.finish_reason
    into.num_output_tokens = out.num_output_tokens
    if into.logprobs is not None and out.logprobs is not None:
        into.logprobs += out.logprobs
    if into.prompt_logprobs is None:
        into.prompt_logprobs = out.prompt_logprobs


def _banned(
    sampling: list[Sequence], slots: list[int], requests: list[_Request | None]
) -> list[frozenset[int]] | None:
    """Per row, the stop ids the sampler must not choose: those of a request that has not yet
    produced its ``min_tokens`` (the token at ``slot`` is output number ``slot - prompt``)."""
    banned = [
        r.stop_ids
        if r is not None and slot - seq.num_prompt_tokens < seq.params.min_tokens
        else frozenset()
        for seq, slot, r in zip(sampling, slots, requests, strict=True)
    ]
    return banned if any(banned) else None
