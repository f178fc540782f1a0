"""The paged KV block pool: reference-counted fixed-size blocks with a prefix cache.

A block holds ``block_size`` consecutive tokens' keys and values for every layer. A sequence
owns an ordered list of block ids (its block table). Full blocks whose keys and values have been
computed are *named* in the prefix cache, so a new sequence whose prompt starts with the same
tokens reuses those blocks instead of computing them again.

A name is exact, not a hash: a block's key is ``(parent prefix id, its token ids)``, where the
parent prefix id is the serial number that the preceding block of the same prefix got when it
was named (``ROOT`` before a first block). By induction a key stands for one exact token prefix,
and the dict compares whole keys on a hash match, so prompts whose 64-bit hashes collide never
share keys and values. A hash chain such as ``hash((parent_hash, *tokens))`` would silently
serve another prompt's KV on a collision, and Python's integer hashing is not randomised, so
collisions can be crafted. The other production answer, a SHA-256 or BLAKE2 chain over (parent
digest, token bytes), is collision-resistant but not free: measured here (blocks of 16 tokens),
the digest alone takes 1.0-1.4 us per block, while naming a block with these keys takes about
0.45 us, as the old hash chain did. A decode step at batch 64 names about 4 blocks, against a
host budget of 0.80 ms per step. Digests would only pay off as keys shared across processes,
which this pool has no use for. Exactness costs memory instead: a named block keeps a tuple of
its token ids (under 1 KB). Nothing else goes into the key yet (no adapters, no multimodal
inputs); such inputs would join it. Serial numbers are never reused, so once a block's name is
dropped (evicted, or given back by a shrink), the names chained after it can never be reached
again: they are wasted, never wrong.

Free blocks come in two kinds: plain ones (no cached content), used first, and *evictable*
ones, which still hold a cached prefix and are reused least-recently-freed first. The pool's
capacity can change while it runs: ``resize`` grows it, or shrinks it by giving back its highest
block ids once nobody holds them (the elastic-memory path maps and unmaps that region).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq

from berth.runtime.engine.sequence import ROOT, Sequence

BlockKey = tuple[int, tuple[int, ...]]  # (parent prefix id, the block's token ids)


class KvBlockPool:
    """Hands out KV blocks to sequences; knows which cached prefixes it still holds."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_blocks = 0
        self.ref_counts: list[int] = []
        self.block_key: list[BlockKey | None] = []  # the name of the block's content
        self.prefix_id: list[int] = []  # serial of the block's name (ROOT while unnamed)
        self.cached: dict[BlockKey, int] = {}  # name -> block id
        self._serials = itertools.count(ROOT + 1)
        self.free: deque[int] = deque()  # ref 0, no cached content
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; LRU first
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self.grown: list[Sequence] = []  # sequences whose block tables gained blocks
        self.resize(num_blocks)

    # ---- capacity -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def resize(self, num_blocks: int) -> None:
        """Grow to, or shrink to, ``num_blocks`` blocks (ids ``0..num_blocks-1``).

        Shrinking gives back the highest ids; each of them must be free (the scheduler preempts
        their holders first). Cached content in a given-back block is forgotten.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks >= self.num_blocks:
            new = range(self.num_blocks, num_blocks)
            self.ref_counts.extend(0 for _ in new)
            self.block_key.extend(None for _ in new)
            self.prefix_id.extend(ROOT for _ in new)
            self.free.extend(new)
            self.num_blocks = num_blocks
            return
        held = [b for b in range(num_blocks, self.num_blocks) if self.ref_counts[b]]
        if held:
            raise RuntimeError(f"cannot shrink to {num_blocks} blocks: blocks {held[:8]} are held")
        for b in range(num_blocks, self.num_blocks):
            if self.block_key[b] is not None:
                self._unname(b)
                del self.evictable[b]
        self.free = deque(b for b in self.free if b < num_blocks)
        del self.ref_counts[num_blocks:]
        del self.block_key[num_blocks:]
        del self.prefix_id[num_blocks:]
        self.num_blocks = num_blocks

    # ---- prefix cache ---------------------------------------------------------------------

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[i * bs : (i + 1) * bs])

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold ``seq``'s leading full blocks, in order.

        The last token is never covered: its logits are needed to sample, so at least one
        token is always computed.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = ROOT
        for i in range((seq.num_tokens - 1) // self.block_size):
            b = self.cached.get((parent, self._block_tokens(seq, i)))
            if b is None:
                break
            hits.append(b)
            parent = self.prefix_id[b]
        return hits

    def register_computed(self, seq: Sequence) -> None:
        """Name ``seq``'s full blocks whose keys and values are computed, so that later prompts
        can reuse them. The caller guarantees that the first ``num_computed_tokens`` token ids
        are known (no placeholder for a token still on the device). A block whose exact prefix
        is already named elsewhere stays unnamed; the chain continues through that name."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_named_blocks:
            return
        parent = seq.prefix_id
        for i in range(seq.num_named_blocks, num_full):
            key = (parent, self._block_tokens(seq, i))
            b = self.cached.get(key)
            if b is None:
                b = seq.block_table[i]
                assert self.block_key[b] is None, "a held block is named for other tokens"
                self.cached[key] = b
                self.block_key[b] = key
                self.prefix_id[b] = next(self._serials)
            parent = self.prefix_id[b]
        seq.num_named_blocks = num_full
        seq.prefix_id = parent

    def _unname(self, b: int) -> None:
        key = self.block_key[b]
        assert key is not None
        del self.cached[key]
        self.block_key[b] = None
        self.prefix_id[b] = ROOT

    # ---- allocation -----------------------------------------------------------------------

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)
            self._unname(b)
        self.ref_counts[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            if self.block_key[b] is None:
                self.free.append(b)
            else:
                self.evictable[b] = None

    def allocate(
        self, seq: Sequence, num_new_tokens: int, prefix: Seq[int] = (), reserve: int = 0
    ) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens after its computed ones.

        ``prefix`` (from ``match_prefix``, only for a sequence that holds no blocks yet) are
        cached blocks it takes as already computed. Fails, changing nothing, unless at least
        ``reserve`` free blocks (the admission watermark) would remain.
        """
        bs = self.block_size
        if (
            num_new_tokens == 1
            and seq.num_computed_tokens % bs
            and self.ref_counts[seq.block_table[-1]] == 1
        ):
            return True  # the common decode step: room left in an unshared last block
        num_computed = seq.num_computed_tokens + len(prefix) * bs
        held = len(seq.block_table) + len(prefix)
        need = max(0, self.blocks_needed(num_computed + num_new_tokens) - held)
        # Appending into a partial last block that a fork shares: copy it first.
        cow = (
            num_new_tokens > 0
            and num_computed % bs != 0
            and self.ref_counts[seq.block_table[-1]] > 1
        )
        revived = sum(1 for b in prefix if self.ref_counts[b] == 0)
        if self.num_free_blocks - revived - need - cow < reserve:
            return False
        if prefix:
            assert not seq.block_table, "a prefix is only taken by a sequence with no blocks"
            for b in prefix:
                if self.ref_counts[b] == 0:
                    del self.evictable[b]
                self.ref_counts[b] += 1
            seq.block_table.extend(prefix)
            seq.num_computed_tokens = num_computed
            seq.num_named_blocks = len(prefix)
            seq.prefix_id = self.prefix_id[prefix[-1]]
        if cow:
            src = seq.block_table[-1]
            dst = self._take()
            self._release(src)
            seq.block_table[-1] = dst
            self.pending_copies.append((src, dst))
        for _ in range(need):
            seq.block_table.append(self._take())
        if need or prefix:
            self.grown.append(seq)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copy-on-write for a partial last one)."""
        assert not child.block_table
        for b in parent.block_table:
            self.ref_counts[b] += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_named_blocks = parent.num_named_blocks
        child.prefix_id = parent.prefix_id

    def free_sequence(self, seq: Sequence) -> None:
        """Drop ``seq``'s blocks, naming its computed full blocks first (however soon it ended:
        finished, aborted or preempted), so that their content stays reusable; tail first, so
        a cached prefix outlives its suffix in the LRU. Blocks past ``num_computed_tokens``
        (allocated for keys and values never written) are not named."""
        self.register_computed(seq)
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_named_blocks = 0
        seq.prefix_id = ROOT

    def take_grown(self) -> list[Sequence]:
        grown, self.grown = self.grown, []
        return grown

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- invariants (tests and debugging) ---------------------------------------------------

    def check_invariants(self, holders: Iterable[Sequence]) -> None:
        """Assert that reference counts match the holders' block tables and nothing leaked."""
        counts = [0] * self.num_blocks
        for seq in holders:
            for b in seq.block_table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with the block tables"
        free = set(self.free)
        assert len(free) == len(self.free), "a block is on the free list twice"
        assert not free & set(self.evictable), "a block is both free and evictable"
        unheld = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert free | set(self.evictable) == unheld, "free + evictable != unheld blocks (leak)"
        assert all(self.block_key[b] is None for b in free), "a plain free block is named"
        assert all(self.block_key[b] is not None for b in self.evictable)
        for key, b in self.cached.items():
            assert self.block_key[b] == key, "the cache map and the block names disagree"
            assert len(key[1]) == self.block_size, "a partial block is named"
            assert min(key[1]) >= 0, "a named block holds a placeholder token"
            assert ROOT <= key[0] < self.prefix_id[b], "a name's parent is not older than it"
        named = [self.prefix_id[b] for b in self.cached.values()]
        assert len(set(named)) == len(named), "two names share a prefix id"
        assert sum(k is not None for k in self.block_key) == len(self.cached)
        assert all(
            (self.block_key[b] is None) == (self.prefix_id[b] == ROOT)
            for b in range(self.num_blocks)
        )
