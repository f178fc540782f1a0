"""The engine: requests in, tokens out, one scheduler iteration per ``step()``.

Synchronous and single-threaded by design: the server drives ``step()`` from one thread and
the benchmarks and the CLI call ``generate``/``stream``. Each step schedules a batch, runs the
model, samples, and turns the new tokens into per-request outputs (text, stops, log-probs).
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
from berth.runtime.engine.model_runner import ModelRunner
from berth.runtime.engine.outputs import EngineStats, RequestOutput, TokenLogprob
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
    logits: torch.Tensor


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
        return flight is not None and any(
            s.status is SequenceStatus.RUNNING for s in flight.sampling
        )

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration; an output for each request that gained tokens or finished.

        Pipelined by one step on the device: a call collects the tokens of the batch launched by
        the previous call, launches the next batch, and only then detokenizes and builds the
        outputs, while the device computes. So a request's tokens come back one call after the
        call that scheduled them, and ``has_unfinished`` stays true until they have.
        """
        start = time.perf_counter()
        waited = 0.0
        collected = None
        if self._in_flight is not None:
            t = time.perf_counter()
            self.runner.synchronize()
            waited = time.perf_counter() - t
            collected = self._collect(self._in_flight)
            self._in_flight = None
        self.scheduler.drop_finished()
        batch = self.scheduler.schedule()
        outputs = [self._finished_output(seq) for seq in batch.aborted]
        if batch.seqs:
            copies = self.pool.take_pending_copies()
            if copies:
                self.runner.copy_blocks(copies)
            sampling = [
                seq
                for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
                if seq.num_computed_tokens + n == len(seq.token_ids)
            ]
            self._in_flight = _InFlight(batch, sampling, self.runner.execute(batch))
        if collected is not None:
            outputs += self._process(*collected)
            self.scheduler.drop_finished()
        self.last_step_host_seconds = time.perf_counter() - start - waited
        return outputs

    def _collect(
        self, flight: _InFlight
    ) -> tuple[list[_Request], list[int], list[TokenLogprob | None] | None, list[bool]]:
        """Take a finished batch's results: count its tokens computed, sample, append the
        tokens, and end the requests that a stop token or the length limit ends. Sequences that
        finished or were aborted while it ran are skipped."""
        running = SequenceStatus.RUNNING
        block_size = self.pool.block_size
        for seq, n in zip(flight.batch.seqs, flight.batch.num_new_tokens, strict=True):
            if seq.status is running:
                seq.num_computed_tokens += n
                if seq.num_computed_tokens >= (seq.num_hashed_blocks + 1) * block_size:
                    self.pool.register_computed(seq)
        requests = [self.requests.get(s.request_id) for s in flight.sampling]
        if self._num_special == 0:  # all greedy, no log-probs: skip the sampler's bookkeeping
            token_ids, logprobs = flight.logits.argmax(dim=-1).tolist(), None
        else:
            token_ids, logprobs = self.sampler(
                flight.logits,
                [s.params for s in flight.sampling],
                [r.generator if r is not None else None for r in requests],
            )
        live: list[_Request] = []
        tokens: list[int] = []
        probs: list[TokenLogprob | None] = []
        stopped: list[bool] = []
        for i, (seq, req) in enumerate(zip(flight.sampling, requests, strict=True)):
            if req is None or req.seq is not seq or seq.status is not running:
                continue
            token = token_ids[i]
            seq.token_ids.append(token)
            stop = token in req.stop_ids
            if stop or len(seq.token_ids) >= req.max_len:
                self.scheduler.finish(seq, "stop" if stop else "length")
                self._forget(seq.request_id)
            live.append(req)
            tokens.append(token)
            stopped.append(stop)
            if logprobs is not None:
                probs.append(logprobs[i])
        return live, tokens, probs if logprobs is not None else None, stopped

    def _process(
        self,
        requests: list[_Request],
        token_ids: list[int],
        logprobs: list[TokenLogprob | None] | None,
        stopped: list[bool],
    ) -> list[RequestOutput]:
        """Detokenize the collected tokens in one batched call, apply stop strings and build
        the outputs (runs while the device computes the next batch)."""
        windows: list[list[int]] = []
        decoding: list[int] = []
        for i, (req, token) in enumerate(zip(requests, token_ids, strict=True)):
            if not stopped[i]:
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
                        self._forget(seq.request_id)
        outputs = []
        for i, (req, token) in enumerate(zip(requests, token_ids, strict=True)):
            seq = req.seq
            logprob = logprobs[i] if logprobs is not None else None
            if logprob is not None and seq.logprobs is not None:
                seq.logprobs.append(logprob)
            finished = seq.is_finished
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    [token],
                    req.detokenizer.take(finished),
                    finished,
                    seq.finish_reason,
                    seq.num_prompt_tokens,
                    len(seq.token_ids) - seq.num_prompt_tokens,
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
