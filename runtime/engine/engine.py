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

import torch

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.detokenizer import Detokenizer
from berth.runtime.engine.model_config import ModelConfig
from berth.runtime.engine.model_runner import PENDING, ModelRunner
from berth.runtime.engine.outputs import EngineStats, FinishReason, RequestOutput, TokenLogprob
from berth.runtime.engine.sampler import Sampler
from berth.runtime.engine.scheduler import ScheduledBatch, Scheduler
from berth.runtime.engine.sequence import Sequence, SequenceStatus
from berth.runtime.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detokenizer: Detokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    max_len: int  # total tokens (prompt + output) at which it ends with "length"
    plain: bool  # greedy without log-probs: sampled by one batched argmax


@dataclass(eq=False)
class _InFlight:
    """A launched batch whose results the next ``step`` collects."""

    batch: ScheduledBatch
    sampling: list[Sequence]  # rows of ``logits``
    slots: list[int]  # index of each sampling sequence's placeholder token
    logits: torch.Tensor
    sampled: torch.Tensor | None = None  # greedy token ids on the device
    host_tokens: torch.Tensor | None = None  # their copy on the host, valid once ``done``
    done: torch.cuda.Event | None = None


class Engine:
    """Loads one model and serves many concurrent requests with continuous batching."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.model_name = Path(config.model).resolve().name
        self.max_model_len = self._max_model_len(config, self.model_config)
        self.runner = ModelRunner(config, self.model_config, self.max_model_len)
        self.pool = KvBlockPool(
            self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.pool)
        self.sampler = Sampler(self.runner.device, config.seed)
        self.requests: dict[str, _Request] = {}
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self._ids = itertools.count()
        self._num_special = 0  # live requests that need the full sampler
        self._in_flight: _InFlight | None = None
        self._waited = 0.0  # seconds this step spent waiting for the device
        # Host time of the last step that ran the model, excluding the wait for the device:
        # scheduling, input preparation, sampling and output processing (seconds).
        self.last_step_host_seconds = 0.0
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
        seq = Sequence(request_id, token_ids, len(token_ids), params)
        if params.logprobs is not None:
            seq.logprobs = []
        generator = None if params.seed is None else self.sampler.request_generator(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self._eos
        )
        max_len = min(len(token_ids) + params.max_tokens, self.max_model_len)
        plain = params.greedy and params.logprobs is None
        self.requests[request_id] = _Request(
            seq, Detokenizer(self.tokenizer, params.stop), generator, stop_ids, max_len, plain
        )
        self._num_special += not plain
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; an unknown id is a no-op."""
        if request_id in self.requests:
            self._forget(request_id)
            self.scheduler.abort(request_id)

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
        decode step takes it straight from the previous batch's sampled ids on the device (so
        the device never waits for the host between decode steps). A request's tokens come
        back in the call after the one that launched them; ``has_unfinished`` stays true until
        they have.
        """
        start = time.perf_counter()
        self._waited = 0.0
        flight, collected = self._in_flight, None
        self._in_flight = None
        if flight is not None and flight.host_tokens is None:
            collected, flight = self._collect(flight), None  # the sampler needs the logits
        self.scheduler.drop_finished()
        batch = self.scheduler.schedule()
        outputs = [self._finished_output(seq) for seq in batch.aborted]
        if flight is not None and not batch.is_decode:
            collected, flight = self._collect(flight), None  # prefill inputs come from the host
        if batch.seqs:
            copies = self.pool.take_pending_copies()
            if copies:
                self.runner.copy_blocks(copies)
            pending = None
            if flight is not None and flight.sampled is not None:
                pending = (flight.sampled, flight.sampling)
            self._in_flight = self._launch(batch, self.runner.execute(batch, pending))
        if flight is not None:
            collected = self._collect(flight)
        if collected is not None:
            outputs += self._process(*collected)
            self.scheduler.drop_finished()
        self.last_step_host_seconds = time.perf_counter() - start - self._waited
        return outputs

    def _launch(self, batch: ScheduledBatch, logits: torch.Tensor) -> _InFlight:
        """Count the launched tokens as computed, give each sampling sequence a placeholder
        for its coming token, and start the greedy argmax and its copy to the host."""
        sampling: list[Sequence] = []
        slots: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == len(seq.token_ids):
                slots.append(len(seq.token_ids))
                seq.token_ids.append(PENDING)
                sampling.append(seq)
        for seq, slot in zip(sampling, slots, strict=True):
            if slot + 1 >= self.requests[seq.request_id].max_len:
                self.scheduler.finish(seq, "length")  # never schedule past its last token
        flight = _InFlight(batch, sampling, slots, logits)
        if self._num_special == 0 and sampling:
            flight.sampled = logits.argmax(dim=-1)
            flight.host_tokens, flight.done = self.runner.copy_to_host(flight.sampled)
        return flight

    def _collect(
        self, flight: _InFlight
    ) -> tuple[
        list[_Request],
        list[int],
        list[TokenLogprob | None] | None,
        list[FinishReason | None],
        list[int],
    ]:
        """Wait for a launched batch and take its tokens: fill in the placeholders, end the
        requests that a stop token ends, and name the blocks it completed. Requests aborted or
        ended by a stop string meanwhile are skipped."""
        t = time.perf_counter()
        if flight.done is not None:
            flight.done.synchronize()
        else:
            self.runner.synchronize()
        self._waited += time.perf_counter() - t
        if flight.host_tokens is not None:
            token_ids = flight.host_tokens[: len(flight.sampling)].tolist()
            logprobs = None
        else:
            requests = [self.requests.get(s.request_id) for s in flight.sampling]
            token_ids, logprobs = self.sampler(
                flight.logits,
                [s.params for s in flight.sampling],
                [r.generator if r is not None else None for r in requests],
            )
        live: list[_Request] = []
        tokens: list[int] = []
        probs: list[TokenLogprob | None] = []
        ended: list[FinishReason | None] = []
        counts: list[int] = []
        for i, (seq, slot) in enumerate(zip(flight.sampling, flight.slots, strict=True)):
            req = self.requests.get(seq.request_id)
            if req is None or req.seq is not seq:
                continue
            token = token_ids[i]
            seq.token_ids[slot] = token
            reason: FinishReason | None = None
            if token in req.stop_ids:
                reason = "stop"
                if seq.is_finished:  # ended at launch by its length; the stop token came first
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")
            elif slot + 1 >= req.max_len:
                reason = "length"  # the sequence was finished when this token was launched
            if reason is not None:
                self._forget(seq.request_id)
            live.append(req)
            tokens.append(token)
            ended.append(reason)
            counts.append(slot + 1 - seq.num_prompt_tokens)
            if logprobs is not None:
                probs.append(logprobs[i])
        block_size = self.pool.block_size
        running = SequenceStatus.RUNNING
        for seq in flight.batch.seqs:
            if (
                seq.status is running
                and seq.num_computed_tokens >= (seq.num_hashed_blocks + 1) * block_size
            ):
                self.pool.register_computed(seq)
        return live, tokens, probs if logprobs is not None else None, ended, counts

    def _process(
        self,
        requests: list[_Request],
        token_ids: list[int],
        logprobs: list[TokenLogprob | None] | None,
        ended: list[FinishReason | None],
        counts: list[int],
    ) -> list[RequestOutput]:
        """Detokenize the collected tokens in one batched call, apply stop strings and build
        the outputs (runs while the device computes the next batch)."""
        windows: list[list[int]] = []
        decoding: list[int] = []
        for i, (req, token) in enumerate(zip(requests, token_ids, strict=True)):
            if ended[i] != "stop":
                window = req.detokenizer.push(token)
                if window is not None:
                    windows.append(window)
                    decoding.append(i)
        if windows:
            texts = self.tokenizer.hf.decode_batch(windows, skip_special_tokens=True)
            for i, full in zip(decoding, texts, strict=True):
                if requests[i].detokenizer.accept(full):
                    seq = requests[i].seq
                    if seq.is_finished:
                        seq.finish_reason = "stop"  # the text ended it, not the length
                    else:
                        self.scheduler.finish(seq, "stop")
                    if ended[i] is None:
                        self._forget(seq.request_id)
                    ended[i] = "stop"
        outputs = []
        for i, (req, token) in enumerate(zip(requests, token_ids, strict=True)):
            seq = req.seq
            logprob = logprobs[i] if logprobs is not None else None
            if logprob is not None and seq.logprobs is not None:
                seq.logprobs.append(logprob)
            reason = ended[i]
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    [token],
                    req.detokenizer.take(reason is not None),
                    reason is not None,
                    reason,
                    seq.num_prompt_tokens,
                    counts[i],
                    seq.num_cached_tokens,
                    None if logprob is None else [logprob],
                )
            )
        return outputs

    def _finished_output(self, seq: Sequence) -> RequestOutput:
        """The final output of a request the scheduler ended on its own (it can never fit)."""
        req = self._forget(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[],
            new_text=req.detokenizer.take(True),
            finished=True,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[] if seq.logprobs is not None else None,
        )

    def _forget(self, request_id: str) -> _Request:
        req = self.requests.pop(request_id)
        self._num_special -= not req.plain
        return req

    # ---- capacity and gauges -------------------------------------------------------------------

    def resize_kv_pool(self, num_blocks: int) -> int:
        """Change how many KV blocks the scheduler may use (at most the allocated tensor's);
        shrinking preempts the sequences holding the blocks given back. Returns how many
        sequences were preempted. The elastic-memory path backs growth past the allocation."""
        if not 1 <= num_blocks <= self.runner.num_kv_blocks:
            raise ValueError(
                f"num_blocks must be in [1, {self.runner.num_kv_blocks}] (the allocated KV "
                f"tensor), got {num_blocks}"
            )
        self.runner.synchronize()  # the batch in flight may still write the region
        return len(self.scheduler.resize_pool(num_blocks))

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


def _merge(into: RequestOutput, out: RequestOutput) -> None:
    into.new_token_ids += out.new_token_ids
    into.new_text += out.new_text
    into.finished, into.finish_reason = out.finished, out.finish_reason
    into.num_output_tokens = out.num_output_tokens
    if into.logprobs is not None and out.logprobs is not None:
        into.logprobs += out.logprobs
