"""Continuous batching: decode first, token budget, sequence limit, FCFS, preemption, abort."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import EngineConfig, SamplingParams
from berth.runtime.engine.model_runner import prefill_graph_sizes
from berth.runtime.engine.scheduler import (
    ScheduledBatch,
    Scheduler,
    fill_padded_step,
    padded_size,
)
from berth.runtime.engine.sequence import Sequence, SequenceStatus


def _scheduler(num_blocks: int = 64, **overrides: int) -> Scheduler:
    config = EngineConfig(model="unused", block_size=4, **overrides)  # type: ignore[arg-type]
    return Scheduler(config, KvBlockPool(num_blocks, 4), watermark=0.0)


def _seq(name: str, n: int) -> Sequence:
    return Sequence(name, list(range(1, n + 1)), n, SamplingParams(), n + 16)


def _run(s: Scheduler, batch: ScheduledBatch, token: int = 0) -> None:
    """Pretend the model ran: the tokens are computed, finished prefills gain a token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        s.pool.register_computed(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(token)


def test_long_prompt_is_chunked_under_the_token_budget() -> None:
    s = _scheduler(max_num_batched_tokens=8)
    s.add(_seq("a", 20))
    chunks = []
    while not chunks or chunks[-1] == 8:
        batch = s.schedule()
        chunks.append(batch.num_tokens)
        _run(s, batch)
    assert chunks == [8, 8, 4]


def test_decodes_go_before_prefills_and_new_prompts_fill_the_rest() -> None:
    s = _scheduler(max_num_batched_tokens=8)
    s.add(_seq("old", 3))
    _run(s, s.schedule())  # old finished its prefill, now decodes
    s.add(_seq("new", 20))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["old", "new"]
    assert batch.num_new_tokens == [1, 7]
    assert not batch.is_decode


def test_prompt_tokens_are_capped_while_sequences_decode() -> None:
    s = _scheduler(max_num_batched_tokens=16, max_prefill_tokens_while_decoding=4)
    s.add(_seq("first", 20))
    batch = s.schedule()
    assert batch.num_new_tokens == [16]  # nothing decodes yet: the whole budget
    _run(s, batch)
    _run(s, s.schedule())  # first's last 4 prompt tokens: it decodes from now on
    for name, n, first_id in (("second", 20, 100), ("third", 3, 200)):  # no shared prefix
        s.add(Sequence(name, list(range(first_id, first_id + n)), n, SamplingParams(), n + 16))
    chunks = []
    for _ in range(6):
        batch = s.schedule()
        assert batch.seqs[0].request_id == "first" and batch.num_new_tokens[0] == 1
        assert sum(batch.num_new_tokens[1:]) <= 4  # the decode's step stays short
        chunks.append(batch.num_new_tokens[1:])
        _run(s, batch)
    # second is chunked 4 at a time, third (FCFS) gets the cap's rest once second is done
    assert chunks == [[4], [4], [4], [4], [4], [1, 3]]


@given(
    decodes=st.integers(1, 600),
    cap=st.integers(1, 2048),
    budget=st.sampled_from([64, 256, 512, 2048, 8192]),
    graph_tokens=st.sampled_from([0, 256, 2048]),
)
def test_the_cap_fills_the_padded_step_and_never_lengthens_it(
    decodes: int, cap: int, budget: int, graph_tokens: int
) -> None:
    sizes = prefill_graph_sizes(budget, graph_tokens)
    filled = fill_padded_step(decodes, cap, sizes)
    assert filled >= cap

    def padded(tokens: int) -> int:  # what the step computes: its graph's size, or itself
        return padded_size(sizes, tokens) or tokens

    assert padded(decodes + filled) == padded(decodes + cap)  # the same graph, never larger
    if filled > cap:
        assert decodes + filled in sizes  # a graph's size exactly: no padding left
    if not sizes or decodes + cap > sizes[-1]:
        assert filled == cap  # unpadded (eager) steps keep the cap


def test_prompt_tokens_beside_decodes_fill_the_step_the_graph_pads_to() -> None:
    """Three decodes and a cap of 6 make a 9-token step; the runner would replay its 16-token
    graph for it, so the prompt takes 13 tokens, in the same step time."""
    s = _scheduler(max_num_batched_tokens=32, max_prefill_tokens_while_decoding=6)
    s.step_sizes = [8, 16, 32]
    for name, first_id in (("a", 100), ("b", 200), ("c", 300)):
        s.add(Sequence(name, list(range(first_id, first_id + 3)), 3, SamplingParams(), 40))
    _run(s, s.schedule())  # a, b and c decode from now on
    s.add(_seq("long", 40))
    batch = s.schedule()
    assert batch.num_new_tokens == [1, 1, 1, 13] and batch.num_tokens == 16
    _run(s, batch)
    s.step_sizes = []  # steps run eagerly: nothing is padded, the cap holds
    assert s.schedule().num_new_tokens == [1, 1, 1, 6]


def test_without_the_cap_prompts_fill_the_budget_beside_decodes() -> None:
    s = _scheduler(max_num_batched_tokens=16, max_prefill_tokens_while_decoding=None)  # type: ignore[arg-type]
    s.add(_seq("old", 3))
    _run(s, s.schedule())
    s.add(_seq("new", 40))
    assert s.schedule().num_new_tokens == [1, 15]


def test_admission_is_fcfs_and_bounded_by_max_num_seqs() -> None:
    s = _scheduler(max_num_seqs=2)
    for name in "abc":
        s.add(_seq(name, 2))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_out_of_blocks_preempts_the_newest_and_it_resumes_first() -> None:
    s = _scheduler(num_blocks=4)
    a, b = _seq("a", 8), _seq("b", 8)  # two blocks each: the pool is full
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    batch = s.schedule()  # a needs a third block: b goes
    assert batch.seqs == [a] and b.status is SequenceStatus.WAITING
    assert s.num_preemptions == 1 and b.block_table == [] and b.num_computed_tokens == 0
    assert list(s.waiting) == [b]
    s.pool.check_invariants(s.running)


def test_a_request_larger_than_the_pool_is_aborted() -> None:
    s = _scheduler(num_blocks=2)
    big = _seq("big", 9)  # needs 3 blocks for its prompt and next token
    s.add(big)
    batch = s.schedule()
    assert batch.aborted == [big] and big.finish_reason == "abort" and not s.has_unfinished()


def test_an_elastic_pool_holds_a_request_larger_than_it_until_it_grows() -> None:
    """Below its limit a request waits at the head, naming the blocks it waits for, while
    those behind it that fit now go ahead; past the limit it is refused."""
    s = _scheduler(num_blocks=2)
    s.max_pool_blocks = 6
    big, small = _seq("big", 9), _seq("small", 3)  # 3 blocks (prompt + next token), then 1
    s.add(big)
    s.add(small)
    batch = s.schedule()
    assert batch.seqs == [small] and not batch.aborted and s.blocked_blocks == 3
    assert list(s.waiting) == [big]
    _run(s, batch)
    s.resize_pool(6)  # the grant
    batch = s.schedule()
    assert batch.seqs == [small, big] and s.blocked_blocks == 0
    _run(s, batch)
    s.pool.check_invariants(s.running)
    too_big = _seq("too-big", 25)  # 7 blocks: more than the pool can ever hold
    s.add(too_big)
    assert s.schedule().aborted == [too_big]


def test_once_the_pool_is_large_enough_arrival_order_holds() -> None:
    s = _scheduler(num_blocks=4)
    s.max_pool_blocks = 8
    s.add(_seq("first", 8))  # 3 blocks
    _run(s, s.schedule())
    big = Sequence("big", list(range(101, 110)), 9, SamplingParams(), 25)  # no shared prefix
    small = _seq("small", 3)  # big needs 3 blocks: the pool's 4 hold it, its free 1 do not
    s.add(big)
    s.add(small)
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["first"] and list(s.waiting) == [big, small]
    assert s.blocked_blocks == 3


def test_admission_held_back_by_the_token_budget_waits_for_no_memory() -> None:
    s = _scheduler(num_blocks=64, max_num_batched_tokens=8)
    s.add(_seq("a", 8))
    s.add(_seq("b", 8))
    assert s.schedule().num_new_tokens == [8] and s.blocked_blocks == 0


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = _scheduler(num_blocks=8, max_num_seqs=1)
    s.add(_seq("running", 10))
    s.add(_seq("waiting", 3))
    s.schedule()
    assert s.pool.num_free_blocks == 5
    assert s.abort("running") is not None and s.pool.num_free_blocks == 8
    assert s.abort("waiting") is not None and not s.has_unfinished()
    assert s.abort("unknown") is None


def test_shrinking_the_pool_preempts_holders_of_the_region_given_back() -> None:
    s = _scheduler(num_blocks=8)
    a, b = _seq("a", 8), _seq("b", 8)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    assert b.block_table == [2, 3]
    victims = s.resize_pool(3)
    assert victims == [b] and s.pool.num_blocks == 3 and a.status is SequenceStatus.RUNNING
    s.pool.check_invariants(s.running)


def test_a_preempted_sequence_resumes_from_its_cached_blocks() -> None:
    s = _scheduler(num_blocks=5)
    a = Sequence("a", list(range(1, 9)), 8, SamplingParams(), 24)
    b = Sequence("b", list(range(101, 109)), 8, SamplingParams(), 24)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())  # two blocks each, full and computed; each gains a token
    held = list(b.block_table)
    batch = s.schedule()  # a takes the last free block, b needs one too and goes
    assert batch.seqs == [a] and b.status is SequenceStatus.WAITING
    s.abort("a")
    batch = s.schedule()
    assert batch.seqs == [b] and batch.num_new_tokens == [1]  # only its sampled token
    assert b.block_table[:2] == held and b.num_computed_tokens == 8
    s.pool.check_invariants(s.running)
