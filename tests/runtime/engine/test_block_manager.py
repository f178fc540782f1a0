"""The KV block pool: reference counts, prefix cache with LRU reuse, watermark, resize."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from berth.runtime.engine.block_manager import KvBlockPool
from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.sequence import ROOT, Sequence

BS = 4
# Python hashes an int modulo this prime: token ids t and t + M61 have the same hash, so blocks
# that differ only by such ids collide in any key built on hash().
M61 = 2**61 - 1


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


def test_blocks_whose_hashes_collide_are_never_taken_for_each_other() -> None:
    """A real 64-bit collision, not a simulated one: the first blocks of ``a`` and ``b`` have
    equal hashes under a hash chain (``hash((parent, *tokens))``) and under the pool's own
    keys, yet ``b`` gets no block of ``a``'s, at the first block and further down the chain."""
    pool = KvBlockPool(16, BS)
    a = _seq([0, 1, 2, 3, 4, 5, 6, 7, 8], "a")
    b = _seq([M61, 1, 2, 3, 4, 5, 6, 7, 8], "b")
    assert hash((0, *a.token_ids[:BS])) == hash((0, *b.token_ids[:BS]))
    assert hash((ROOT, tuple(a.token_ids[:BS]))) == hash((ROOT, tuple(b.token_ids[:BS])))
    assert pool.allocate(a, 9)
    _compute(pool, a, 9)
    assert len(pool.cached) == 2
    assert pool.match_prefix(b) == []
    assert pool.allocate(b, 9)
    _compute(pool, b, 9)
    assert len(pool.cached) == 4 and not set(a.block_table) & set(b.block_table)
    # Second blocks alike, first blocks colliding: the chain keeps them apart too.
    c = _seq([M61, 1, 2, 3, 4, 5, 6, 7, 9], "c")
    assert pool.match_prefix(c) == b.block_table[:2]
    pool.check_invariants([a, b])


def test_an_ended_sequence_names_only_the_blocks_whose_kv_was_written() -> None:
    """Aborted after 5 of its 12 tokens were computed: only block 0 is full and written. The
    allocated blocks 1 and 2 (one token written, and none) go back unnamed."""
    pool = KvBlockPool(8, BS)
    s = _seq(list(range(12)))
    assert pool.allocate(s, 12)
    s.num_computed_tokens = 5  # the engine counts tokens as computed when it launches them
    first = s.block_table[0]
    pool.free_sequence(s)
    assert list(pool.cached.values()) == [first] and list(pool.evictable) == [first]
    assert pool.match_prefix(_seq(list(range(12)))) == [first]
    pool.check_invariants([])


def test_a_name_whose_parent_was_dropped_is_never_reached() -> None:
    """Shrinking forgets a first block's name while its child's stays; the parent's content is
    named again under a new prefix id, so the orphan is wasted, never matched."""
    pool = KvBlockPool(4, BS)
    filler = _seq(list(range(16)), "filler")
    assert pool.allocate(filler, 16)
    pool.free_sequence(filler)  # nothing computed: the free list is now 3, 2, 1, 0
    a = _seq(list(range(9)), "a")
    assert pool.allocate(a, 9)
    _compute(pool, a, 9)
    parent, child, _ = a.block_table
    assert parent > child
    pool.free_sequence(a)
    pool.resize(parent)  # drops the parent's name only
    pool.resize(4)
    again = _seq(list(range(9)), "again")
    assert pool.match_prefix(again) == []
    assert pool.allocate(again, 9)
    _compute(pool, again, 9)
    assert pool.block_key[child] is not None and child not in again.block_table
    assert pool.match_prefix(_seq(list(range(9)))) == again.block_table[:2]
    pool.check_invariants([again])


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


TOKENS = st.sampled_from([0, 1, M61, M61 + 1])  # two pairs of ids whose hashes collide


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / compute / append / fork / free / resize sequences keep the pool
    consistent and its prefix cache exact. A shadow of the KV cache records, for each slot
    written, the token prefix its keys and values were computed from (a token's KV depends on
    every token before it): each computed token of each sequence must find its own prefix
    there, and each named block the prefix its name stands for. Token ids come in pairs whose
    hashes collide, and sequences may end with tokens allocated but not yet computed."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = KvBlockPool(12, BS)
        self.live: list[Sequence] = []
        self.kv: dict[int, dict[int, tuple[int, ...]]] = {}  # block -> offset -> prefix
        self.names = 0

    def _new(self, tokens: list[int]) -> Sequence:
        self.names += 1
        return _seq(tokens, f"s{self.names}")

    def _compute(self, seq: Sequence, n: int) -> None:
        """The engine's part: copy blocks on write, then write ``n`` more tokens' KV."""
        for src, dst in self.pool.take_pending_copies():
            assert src != dst
            self.kv[dst] = dict(self.kv.get(src, {}))
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = self.kv.setdefault(seq.block_table[p // BS], {})
            block[p % BS] = tuple(seq.token_ids[: p + 1])
        _compute(self.pool, seq, n)

    @rule(
        tokens=st.lists(TOKENS, min_size=1, max_size=20),
        computed=st.integers(0, 20),
        reserve=st.integers(0, 2),
    )
    def allocate(self, tokens: list[int], computed: int, reserve: int) -> None:
        seq = self._new(tokens)
        prefix = self.pool.match_prefix(seq)
        n = seq.num_tokens - len(prefix) * BS
        free_before = self.pool.num_free_blocks
        if self.pool.allocate(seq, n, prefix, reserve):
            assert self.pool.num_free_blocks >= reserve
            self._compute(seq, min(computed, n))  # a chunk of the prompt, maybe all of it
            self.live.append(seq)
        else:
            assert self.pool.num_free_blocks == free_before and not seq.block_table

    @precondition(lambda self: any(s.num_computed_tokens < s.num_tokens for s in self.live))
    @rule(index=st.integers(0, 100), n=st.integers(1, 20))
    def compute(self, index: int, n: int) -> None:
        """The next chunk of a prompt whose blocks were all allocated at admission."""
        pending = [s for s in self.live if s.num_computed_tokens < s.num_tokens]
        seq = pending[index % len(pending)]
        self._compute(seq, min(n, seq.num_tokens - seq.num_computed_tokens))

    @precondition(lambda self: any(s.num_computed_tokens == s.num_tokens for s in self.live))
    @rule(index=st.integers(0, 100), token=TOKENS)
    def append(self, index: int, token: int) -> None:
        done = [s for s in self.live if s.num_computed_tokens == s.num_tokens]
        seq = done[index % len(done)]
        seq.token_ids.append(token)
        if self.pool.allocate(seq, 1):
            self._compute(seq, 1)
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

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants(self.live)
        owned = [b for s in self.live for b in s.block_table]
        assert all(0 <= b < self.pool.num_blocks for b in owned)
        # A block held by several sequences is only ever a shared (forked or cached) one.
        for s in self.live:
            assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
            assert len(s.block_table) >= self.pool.blocks_needed(s.num_computed_tokens)

    @invariant()
    def every_computed_token_reads_its_own_prefix(self) -> None:
        for s in self.live:
            for p in range(s.num_computed_tokens):
                got = self.kv[s.block_table[p // BS]][p % BS]
                assert got == tuple(s.token_ids[: p + 1]), f"{s.request_id} reads another KV"

    @invariant()
    def every_name_stands_for_its_blocks_content(self) -> None:
        """A name (parent prefix id, tokens) holds those tokens computed after the parent's
        prefix: the whole prefix, by induction over the chain while the parent is named."""
        by_prefix_id = {self.pool.prefix_id[b]: b for b in self.pool.cached.values()}
        for (parent, tokens), b in self.pool.cached.items():
            content = [self.kv[b][offset] for offset in range(BS)]
            assert tuple(c[-1] for c in content) == tokens
            assert all(c == content[-1][: len(c)] for c in content)
            if parent == ROOT:
                assert len(content[-1]) == BS
            elif parent in by_prefix_id:
                assert content[0][:-1] == self.kv[by_prefix_id[parent]][BS - 1]


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
