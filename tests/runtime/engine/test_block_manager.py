"""The KV block pool: reference counts, prefix cache with LRU reuse, watermark, resize."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.sequence import Sequence

BS = 4


def _seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, list(tokens), len(tokens), SamplingParams(), len(tokens) + 16)


def _compute(pool: KvBlockPool, seq: Sequence, n: int) -> None:
    """What the engine does after a step: the tokens' KV is written, full blocks are named."""
    seq.num_computed_tokens += n
    pool.register_computed(seq)


def test_prefix_blocks_are_shared_and_last_token_always_computed() -> None:
    pool = KvBlockPool(16, BS)
    a = _seq(list(range(10)), "a")
    assert pool.allocate(a, 10, pool.match_prefix(a))
    _compute(pool, a, 10)
    b = _seq([*range(8), 99, 98], "b")  # shares two full blocks with a
    prefix = pool.match_prefix(b)
    assert prefix == a.block_table[:2]
    assert pool.allocate(b, 2, prefix)
    assert b.num_computed_tokens == 8 and pool.ref_counts[prefix[0]] == 2
    c = _seq(list(range(8)), "c")  # all full blocks cached: the last block is recomputed
    assert pool.match_prefix(c) == a.block_table[:1]
    pool.check_invariants([a, b])


def test_freed_cached_blocks_are_reused_least_recently_freed_first() -> None:
    pool = KvBlockPool(4, BS)
    a = _seq(list(range(9)), "a")  # 3 blocks, two of them full and cached
    assert pool.allocate(a, 9)
    _compute(pool, a, 9)
    first, second, partial = a.block_table
    pool.free_sequence(a)
    assert list(pool.free) == [3, partial] and list(pool.evictable) == [second, first]
    b = _seq([50 + i for i in range(12)], "b")  # needs 3 blocks: 2 plain, then evicts `second`
    assert pool.allocate(b, 12)
    assert b.block_table == [3, partial, second]
    again = _seq(list(range(9)), "again")
    assert pool.match_prefix(again) == [first]  # `second`'s content is gone, `first` survives
    pool.check_invariants([b])


def test_watermark_reserve_refuses_admission_but_changes_nothing() -> None:
    pool = KvBlockPool(4, BS)
    s = _seq(list(range(12)))
    assert not pool.allocate(s, 12, reserve=2)
    assert s.block_table == [] and pool.num_free_blocks == 4
    assert pool.allocate(s, 12, reserve=1)


def test_shrink_refuses_held_blocks_and_forgets_cached_ones() -> None:
    pool = KvBlockPool(8, BS)
    s = _seq(list(range(16)))
    assert pool.allocate(s, 16)
    _compute(pool, s, 16)
    try:
        pool.resize(2)
    except RuntimeError as e:
        assert "held" in str(e)
    else:
        raise AssertionError("shrinking over held blocks must fail")
    pool.free_sequence(s)
    pool.resize(2)
    assert pool.num_blocks == 2 and pool.num_free_blocks == 2
    assert all(b < 2 for b in pool.cached.values())
    pool.resize(6)
    assert pool.num_free_blocks == 6
    pool.check_invariants([])


def test_fork_shares_blocks_and_copies_a_shared_partial_block_on_write() -> None:
    pool = KvBlockPool(8, BS)
    parent = _seq(list(range(6)), "parent")
    assert pool.allocate(parent, 6)
    _compute(pool, parent, 6)
    child = _seq(list(range(6)), "child")
    pool.fork(parent, child)
    assert child.block_table == parent.block_table
    child.token_ids.append(7)
    assert pool.allocate(child, 1)
    ((src, dst),) = pool.take_pending_copies()
    assert src == parent.block_table[1] and child.block_table == [parent.block_table[0], dst]
    pool.check_invariants([parent, child])


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / resize sequences keep the pool consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = KvBlockPool(12, BS)
        self.live: list[Sequence] = []
        self.names = 0

    def _new(self, tokens: list[int]) -> Sequence:
        self.names += 1
        return _seq(tokens, f"s{self.names}")

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=20), reserve=st.integers(0, 2))
    def allocate(self, tokens: list[int], reserve: int) -> None:
        seq = self._new(tokens)
        prefix = self.pool.match_prefix(seq)
        n = seq.num_tokens - len(prefix) * BS
        free_before = self.pool.num_free_blocks
        if self.pool.allocate(seq, n, prefix, reserve):
            assert self.pool.num_free_blocks >= reserve
            _compute(self.pool, seq, n)
            self.live.append(seq)
        else:
            assert self.pool.num_free_blocks == free_before and not seq.block_table

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), token=st.integers(0, 3))
    def append(self, index: int, token: int) -> None:
        seq = self.live[index % len(self.live)]
        seq.token_ids.append(token)
        if self.pool.allocate(seq, 1):
            _compute(self.pool, seq, 1)
            assert len(seq.block_table) == self.pool.blocks_needed(seq.num_tokens)
        else:
            seq.token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def fork(self, index: int) -> None:
        parent = self.live[index % len(self.live)]
        child = self._new(list(parent.token_ids))
        self.pool.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def free(self, index: int) -> None:
        self.pool.free_sequence(self.live.pop(index % len(self.live)))

    @rule(num_blocks=st.integers(1, 16))
    def resize(self, num_blocks: int) -> None:
        held = any(b >= num_blocks for s in self.live for b in s.block_table)
        try:
            self.pool.resize(num_blocks)
        except RuntimeError:
            assert held
        else:
            assert not held and self.pool.num_blocks == num_blocks

    @rule()
    def apply_copies(self) -> None:
        for src, dst in self.pool.take_pending_copies():
            assert src != dst

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants(self.live)
        owned = [b for s in self.live for b in s.block_table]
        assert all(0 <= b < self.pool.num_blocks for b in owned)
        # A block held by several sequences is only ever a shared (forked or cached) one.
        for s in self.live:
            assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
            assert len(s.block_table) >= self.pool.blocks_needed(s.num_computed_tokens)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
